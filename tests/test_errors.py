"""Bad input is refused before any work, with a message naming the argument; nothing is written."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F

C = 4


def good():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, C, 5)).astype(np.float32)
    return dict(
        x=x,
        weight=rng.standard_normal(C).astype(np.float32),
        bias=rng.standard_normal(C).astype(np.float32),
        running_mean=np.zeros(C, np.float32),
        running_var=np.ones(C, np.float32),
        out=np.full_like(x, 7.0),
    )


def ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


FORWARD_BAD = [
    (dict(x=np.ones((6, C, 5), np.int64)), TypeError, r"x: expected a floating-point array.*got dtype int64"),
    (dict(x=np.ones((6, C, 5), np.complex64)), TypeError, r"x: expected a floating-point.*complex64"),
    (dict(x=np.array([[None] * C] * 3, dtype=object)), TypeError, r"x: expected a floating-point.*object"),
    (dict(x=np.ones(C, np.float32)), ValueError, r"x: expected an array with at least 2 dimensions.*\(4,\)"),
    (dict(axis=3), ValueError, r"axis: expected an int in \[-3, 2\].*got 3"),
    (dict(axis=-4), ValueError, r"axis: expected an int in \[-3, 2\].*got -4"),
    (dict(axis=1.0), TypeError, r"axis: expected an int, got float"),
    (dict(weight=np.ones(C + 1, np.float32)), ValueError, r"weight: expected shape \(4,\).*got \(5,\)"),
    (dict(weight=np.ones((C, 1), np.float32)), ValueError, r"weight: expected shape \(4,\).*got \(4, 1\)"),
    (dict(bias=np.ones(C, np.int32)), TypeError, r"bias: expected a floating-point array .*got dtype int32"),
    (dict(out=np.empty((6, C, 4), np.float32)), ValueError, r"out: expected shape \(6, 4, 5\).*got \(6, 4, 4\)"),
    (dict(out=np.empty((6, C, 5), np.float64)), TypeError, r"out: expected dtype float32.*got float64"),
    (dict(out=ro(np.empty((6, C, 5), np.float32))), ValueError, r"out: expected a writable array"),
    (dict(out=[0.0]), TypeError, r"out: expected a writable NumPy array, got list"),
    (dict(eps=-1.0), ValueError, r"eps: expected a finite non-negative float, got -1.0"),
    (dict(eps=float("nan")), ValueError, r"eps: expected a finite non-negative float"),
    (dict(eps="a"), TypeError, r"eps: expected a finite non-negative float, got str"),
    (dict(activation="gelu"), ValueError, r"activation: expected None or 'relu', got 'gelu'"),
    (dict(x=np.ones((1, C, 1), np.float32), out=None), ValueError,
     r"x: expected more than 1 value per channel when training.*\(1, 4, 1\)"),
]

BATCH_NORM_BAD = [
    (dict(running_mean=np.zeros(C + 1, np.float32)), ValueError, r"running_mean: expected shape \(4,\)"),
    (dict(running_var=np.zeros(C, np.int64)), TypeError, r"running_var: expected a floating-point array"),
    (dict(running_var=ro(np.ones(C, np.float32))), ValueError, r"running_var: expected a writable array"),
    (dict(running_mean=[0.0] * C), TypeError, r"running_mean: expected a writable NumPy array, got list"),
    (dict(momentum=1.5), ValueError, r"momentum: expected a float in \[0, 1\], got 1.5"),
    (dict(momentum=None), TypeError, r"momentum: expected a float in \[0, 1\], got NoneType"),
    (dict(training=False, running_mean=None), ValueError, r"running_mean, running_var: expected both arrays when training=False"),
]


def snapshot(d):
    return {k: v.copy() for k, v in d.items() if isinstance(v, np.ndarray)}


def assert_unchanged(before, d):
    for k, v in before.items():
        if isinstance(d.get(k), np.ndarray) and d[k].shape == v.shape and d[k].dtype == v.dtype:
            same = np.array_equal(d[k], v, equal_nan=d[k].dtype.kind in "fc")
            assert same, f"{k} was modified by a failed call"


@pytest.mark.parametrize("override,exc,match", FORWARD_BAD)
def test_batch_norm_forward_rejects(override, exc, match):
    d = good()
    d.pop("running_mean"), d.pop("running_var")
    d.update(override)
    before = snapshot(d)
    x = d.pop("x")
    with pytest.raises(exc, match=match):
        fastbn.batch_norm_forward(x, **d)
    assert_unchanged(before, dict(d, x=x))


@pytest.mark.parametrize("override,exc,match", FORWARD_BAD + BATCH_NORM_BAD)
def test_batch_norm_rejects_and_writes_nothing(override, exc, match):
    d = good()
    d.update(override)
    before = snapshot(d)
    x = d.pop("x")
    d.setdefault("training", True)  # fastbn.batch_norm's default is torch's: False
    with pytest.raises(exc, match=match):
        fastbn.batch_norm(x, **d)
    assert_unchanged(before, dict(d, x=x))


def test_backward_rejects():
    d = good()
    x = d["x"]
    y, mean, invstd = fastbn.batch_norm_forward(x)
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match=r"dy: expected shape \(6, 4, 5\) \(the shape of x\), got \(6, 4\)"):
        fastbn.batch_norm_backward(dy[..., 0], x, mean, invstd)
    with pytest.raises(TypeError, match=r"dy: expected dtype float32 \(the dtype of x\), got float64"):
        fastbn.batch_norm_backward(dy.astype(np.float64), x, mean, invstd)
    with pytest.raises(ValueError, match=r"mean: expected shape \(4,\)"):
        fastbn.batch_norm_backward(dy, x, mean[:3], invstd)
    with pytest.raises(ValueError, match=r"invstd: expected shape \(4,\)"):
        fastbn.batch_norm_backward(dy, x, mean, invstd[:3])
    with pytest.raises(ValueError, match=r"y: expected the forward's output when activation='relu'"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, activation="relu")
    with pytest.raises(ValueError, match=r"y: expected shape"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y[:2])
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        fastbn.batch_norm_backward(dy[:1, :, :1], x[:1, :, :1], mean, invstd)
    # inference backward has no such restriction
    dx, _, _ = fastbn.batch_norm_backward(dy[:1, :, :1], x[:1, :, :1], mean, invstd,
                                          training=False)
    assert dx.shape == (1, C, 1)


def test_mixed_array_modules_are_named():
    class FakeGpuArray:
        __cuda_array_interface__ = {}
        shape = (6, C, 5)

    with pytest.raises(TypeError, match=r"x: expected a NumPy array.*FakeGpuArray"):
        fastbn.batch_norm_forward(FakeGpuArray())
    d = good()
    with pytest.raises(TypeError, match=r"weight: expected a NumPy array"):
        fastbn.batch_norm_forward(d["x"], FakeGpuArray())


def call_every_function(d):
    x, w, b = d["x"], d["weight"], d["bias"]
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, activation="relu")
    fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, w, activation="relu", y=y)
    fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, w, training=False)
    fastbn.batch_norm(x, d["running_mean"], d["running_var"], w, b, training=False)
    fastbn.batch_norm(x, None, None, w, b, training=True)  # training without running statistics
    F.channel_moments(x)
    F.normalize(x, mean, invstd, w, b)
    n, s1, s2 = F.backward_sums(np.ones_like(x), x, mean)
    F.backward_dx(np.ones_like(x), x, mean, invstd, s1, s2, n, w)
    F.forward_with_stats(x, w, b)
    return mean, invstd


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_no_input_is_ever_modified(layout):
    d = good()
    if layout == "F":
        d["x"] = np.asfortranarray(d["x"])
    elif layout == "strided":
        d["x"] = np.repeat(d["x"], 2, axis=2)[..., ::2]
    d.pop("out")
    before = snapshot(d)
    mean, invstd = call_every_function(d)
    assert_unchanged(before, d)
    # also with read-only inputs: nothing needs to write to them
    ro_inputs = {k: ro(v) for k, v in d.items() if k not in ("running_mean", "running_var")}
    ro_inputs["running_mean"] = ro(d["running_mean"])
    ro_inputs["running_var"] = ro(d["running_var"])
    call_every_function(ro_inputs)
