"""The one front door (issue 14): conversions, empty batches as in PyTorch, refusals that write
nothing, byte order, and the per-thread forward cache of the layer.

tests/test_fuzz.py throws random combinations at every entry point; these are the named cases.
"""
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref
from fastbn import functional as F
from fastbn import _kernels



def _x(shape=(8, 4, 5), dtype=np.float32, seed=0):
    r = np.random.default_rng(seed)
    return (2.0 + 3.0 * r.standard_normal(shape)).astype(dtype)


@pytest.fixture
def general_path(monkeypatch):
    """Make every one-call fast path decline, so the general path answers."""
    for name in ("batch_norm_fast", "forward_with_stats_fast", "normalize_fast",
                 "batch_norm_backward_fast", "invstd_fast"):
        monkeypatch.setattr(_kernels, name, lambda *a, **k: None)


# --------------------------------------------------------------------------- array-likes

class _DLPackOnly:
    """An array that offers only the DLPack protocol (no __array__)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_only_objects_are_read_without_a_copy():
    x = _x()
    y = fastbn.batch_norm_forward(_DLPackOnly(x))[0]
    assert np.array_equal(y, fastbn.batch_norm_forward(x)[0])


def test_torch_tensors_that_require_grad_are_read_and_never_written():
    torch = pytest.importorskip("torch")
    x = _x()
    t = torch.tensor(x, requires_grad=True)
    w = torch.linspace(0.5, 2.0, 4, requires_grad=True)
    y, mean, invstd = fastbn.batch_norm_forward(t, w)
    assert isinstance(y, np.ndarray)
    assert np.array_equal(y, fastbn.batch_norm_forward(x, w.detach().numpy())[0])
    assert np.array_equal(t.detach().numpy(), x) and t.requires_grad
    with pytest.raises(TypeError, match=r"out: expected a writable NumPy array, got torch\.Tensor"):
        fastbn.batch_norm_forward(x, out=torch.zeros(x.shape))
    bn = fastbn.BatchNorm(4)
    assert np.array_equal(bn(t), fastbn.batch_norm_forward(x)[0])


def test_masked_arrays_are_refused_in_every_slot():
    x = _x()
    m = np.ma.array(x, mask=np.zeros_like(x, bool))
    with pytest.raises(TypeError, match=r"x: expected an array without a mask"):
        fastbn.batch_norm_forward(m)
    with pytest.raises(TypeError, match=r"weight: expected an array without a mask"):
        fastbn.batch_norm_forward(x, np.ma.ones(4))
    rm = np.ma.zeros(4)
    with pytest.raises(TypeError, match=r"running_mean: expected a writable NumPy array without "
                                        r"a mask"):
        fastbn.batch_norm(x, rm, np.ones(4), None, None, training=True)
    with pytest.raises(TypeError, match=r"x: expected an array without a mask"):
        fastbn.BatchNorm(4)(m)


def test_a_ragged_list_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"x: expected an array or a \(rectangular\) nested"):
        fastbn.batch_norm_forward([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match=r"weight: expected an array or a \(rectangular\)"):
        fastbn.batch_norm_forward(_x(), [1.0, [2.0, 3.0], 4.0, 5.0])


# --------------------------------------------------------------------------- byte order

@pytest.mark.parametrize("use_fast_path", [True, False])
def test_non_native_byte_order_is_read_and_written_correctly(use_fast_path, monkeypatch):
    if not use_fast_path:
        for name in ("batch_norm_fast", "forward_with_stats_fast", "normalize_fast",
                     "batch_norm_backward_fast", "invstd_fast"):
            monkeypatch.setattr(_kernels, name, lambda *a, **k: None)
    x = _x()
    w, b = np.linspace(0.5, 2.0, 4), np.linspace(-1.0, 1.0, 4)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = fastbn.batch_norm(x, rm, rv, w.astype(np.float32), b.astype(np.float32), training=True)
    xs, ws, bs = x.astype(">f4"), w.astype(">f4"), b.astype(">f4")  # same values as y's
    rms, rvs = np.zeros(4, ">f4"), np.ones(4, ">f4")
    ys = fastbn.batch_norm(xs, rms, rvs, ws, bs, training=True)
    assert np.array_equal(ys, y)
    assert rms.dtype == ">f4" and np.array_equal(rms, rm) and np.array_equal(rvs, rv)
    assert np.array_equal(fastbn.batch_norm(xs, rms, rvs, ws, bs, training=False),
                          fastbn.batch_norm(x, rm, rv, w.astype(np.float32), b.astype(np.float32), training=False))
    out = np.empty(x.shape, ">f4")
    assert fastbn.batch_norm_forward(xs, ws, out=out)[0] is out
    assert np.array_equal(out, fastbn.batch_norm_forward(x, w)[0])
    _y, mean, invstd = fastbn.batch_norm_forward(x)
    g = fastbn.batch_norm_backward(xs, xs, mean.astype(">f8"), invstd.astype(">f8"), ws)
    g0 = fastbn.batch_norm_backward(x, x, mean, invstd, w.astype(np.float32))
    for a, e in zip(g, g0):
        assert np.array_equal(a, e)
    assert np.array_equal(F.invstd_from_var(np.array([0.25, 4.0], ">f4"), 0.0), [2.0, 0.5])


def test_misaligned_arrays_are_read_correctly():
    x = _x((6, 3, 4))
    buf = bytearray(x.nbytes + 1)
    mis = np.frombuffer(buf, np.float32, count=x.size, offset=1).reshape(x.shape)
    mis[...] = x
    assert not mis.flags.aligned
    assert np.array_equal(fastbn.batch_norm_forward(mis)[0], fastbn.batch_norm_forward(x)[0])


# --------------------------------------------------------------------------- empty batches

@pytest.mark.parametrize("shape, axis", [((0, 4, 3), 1), ((5, 4, 0), 1), ((0, 4), -1)])
def test_an_empty_training_batch_behaves_as_in_pytorch(shape, axis):
    torch = pytest.importorskip("torch")
    x = np.zeros(shape, np.float32)
    rm, rv = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    y = fastbn.batch_norm(x, rm, rv, None, None, training=True, axis=axis)
    t_rm, t_rv = torch.full((4,), 0.5), torch.full((4,), 2.0)
    tx = torch.zeros(shape) if axis == 1 else torch.zeros(shape)
    ty = torch.nn.functional.batch_norm(tx, t_rm, t_rv, training=True)
    assert y.shape == tuple(ty.shape) == shape
    assert np.array_equal(rm, t_rm.numpy()) and np.array_equal(rv, t_rv.numpy())
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    assert y.shape == shape and mean.shape == (4,) and np.all(mean == 0)
    dx, dw, db = fastbn.batch_norm_backward(x, x, mean, invstd, axis=axis)
    assert dx.shape == shape and np.all(dw == 0) and np.all(db == 0)


def test_an_empty_batch_in_the_layer_counts_but_moves_nothing():
    torch = pytest.importorskip("torch")
    bn = fastbn.BatchNorm(4)
    tbn = torch.nn.BatchNorm1d(4)
    bn(_x((6, 4, 3)))
    tbn(torch.tensor(_x((6, 4, 3))))
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(np.zeros((0, 4, 3), np.float32))
    ty = tbn(torch.zeros(0, 4, 3))
    assert y.shape == tuple(ty.shape) == (0, 4, 3)
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked) == 2
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)
    np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    dx = bn.backward(np.zeros((0, 4, 3), np.float32))
    assert dx.shape == (0, 4, 3)
    assert np.all(bn.grad_weight == 0) and np.all(bn.grad_bias == 0)


def test_zero_channels_give_empty_results_without_running_a_kernel():
    x = np.zeros((8, 0), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert y.shape == (8, 0) and mean.shape == invstd.shape == (0,)
    assert F.channel_moments(x)[0] == 8
    dx, dw, db = fastbn.batch_norm_backward(x, x, mean, invstd)
    assert dx.shape == (8, 0) and dw.shape == db.shape == (0,)


def test_one_value_per_channel_in_training_is_still_an_error():
    with pytest.raises(ValueError, match=r"x: expected more than 1 value per channel"):
        fastbn.batch_norm_forward(np.ones((1, 3), np.float32))


# --------------------------------------------------------------------------- nothing written

def test_update_running_stats_checks_everything_before_writing(general_path):
    rm, rv = np.zeros(3), np.ones(3)
    mean, var = np.full(3, 2.0), np.full(3, 4.0)
    bad = [
        (dict(running_var=np.ones(3)[::-1].copy().reshape(3, 1)), ValueError, "running_var"),
        (dict(running_var=np.ones(3, np.int64)), TypeError, "running_var"),
        (dict(running_var=np.ones(3, complex)), TypeError, "running_var"),
        (dict(running_var=np.ones(3)[None].repeat(2, 0)), ValueError, "running_var"),
        (dict(momentum=5.0), ValueError, "momentum"),
        (dict(momentum=float("nan")), ValueError, "momentum"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(momentum=True), TypeError, "momentum"),
        (dict(count=0), ValueError, "count"),
        (dict(count=-1), ValueError, "count"),
        (dict(count="30"), TypeError, "count"),
        (dict(mean=np.array(0.5)), ValueError, "mean"),
        (dict(var=np.ones(4)), ValueError, "var"),
    ]
    ro = np.ones(3)
    ro.flags.writeable = False
    bad.append((dict(running_var=ro), ValueError, "running_var"))
    for override, exc, name in bad:
        args = dict(running_mean=rm, running_var=rv, mean=mean, var=var, count=30, momentum=0.1)
        args.update(override)
        with pytest.raises(exc, match=name):
            F.update_running_stats(**args)
        assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3)), override


@pytest.mark.parametrize("value, exc", [(True, TypeError), ("1e-5", TypeError),
                                        (-2.0, ValueError), (float("inf"), ValueError)])
def test_eps_is_checked_by_every_function_that_takes_it(value, exc):
    x = _x()
    calls = [lambda: fastbn.batch_norm_forward(x, eps=value),
             lambda: fastbn.batch_norm(x, None, None, training=True, eps=value),
             lambda: F.forward_with_stats(x, eps=value),
             lambda: F.invstd_from_var(np.ones(4), value),
             lambda: fastbn.BatchNorm(4, eps=value)]
    for call in calls:
        with pytest.raises(exc, match="eps"):
            call()


@pytest.mark.parametrize("value", ["False", 0, 1, None, 1.0])
def test_training_must_be_a_bool(value):
    x = _x()
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match="training: expected a bool"):
        fastbn.batch_norm(x, rm, rv, None, None, training=value)
    assert np.array_equal(rm, np.zeros(4)) and np.array_equal(rv, np.ones(4))
    _y, mean, invstd = fastbn.batch_norm_forward(x)
    with pytest.raises(TypeError, match="training: expected a bool"):
        fastbn.batch_norm_backward(x, x, mean, invstd, training=value)


@pytest.mark.parametrize("count", [0, -5, float("nan"), float("inf"), "30", True])
def test_backward_dx_checks_its_count(count):
    x = _x()
    _y, mean, invstd = fastbn.batch_norm_forward(x)
    n, s1, s2 = F.backward_sums(x, x, mean)
    with pytest.raises((TypeError, ValueError), match="count"):
        F.backward_dx(x, x, mean, invstd, s1, s2, count)


@pytest.mark.parametrize("value", [True, False, 1.0, "1"])
def test_axis_must_be_an_int_in_the_functional_api_too(value):
    with pytest.raises(TypeError, match="axis: expected an int"):
        fastbn.batch_norm_forward(_x(), axis=value)


def test_required_statistics_given_as_none_are_refused():
    x = _x()
    inv = np.ones(4)
    with pytest.raises(TypeError, match=r"mean: expected an array of shape \(4,\), got None"):
        fastbn.batch_norm_backward(x, x, None, inv)
    with pytest.raises(TypeError, match=r"mean: expected an array of shape \(4,\), got None"):
        F.normalize(x, None, inv)
    with pytest.raises(TypeError, match=r"mean: expected an array"):
        F.backward_sums(x, x, None)
    for k in range(4):
        stats = [np.zeros(4), inv, np.zeros(4), np.zeros(4)]
        names = ["mean", "invstd", "sum_dy", "sum_dy_xmu"]
        stats[k] = None
        with pytest.raises(TypeError, match=names[k]):
            F.backward_dx(x, x, *stats, 40)


# --------------------------------------------------------------------------- threads

def test_two_threads_sharing_a_layer_each_differentiate_their_own_forward():
    bn = fastbn.BatchNorm(4, dtype=np.float64)
    xs = {"a": _x(dtype=np.float64, seed=1), "b": 5.0 * _x(dtype=np.float64, seed=2) - 3.0}
    barrier = threading.Barrier(2)
    got = {}

    def step(name):
        x = xs[name]
        bn(x)
        barrier.wait()  # both forwards are done before either backward
        got[name] = bn.backward(x * 0.5)

    threads = [threading.Thread(target=step, args=(k,)) for k in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, x in xs.items():
        _yr, mean, _var, invstd = ref.forward(x)
        dx_ref = ref.backward(x * 0.5, x, mean, invstd)[0]
        np.testing.assert_allclose(got[name], dx_ref, rtol=1e-10, atol=1e-12)


def test_a_thread_without_a_forward_has_nothing_to_differentiate():
    bn = fastbn.BatchNorm(4)
    bn(_x())
    errors = []

    def other():
        try:
            bn.backward(np.ones((8, 4, 5), np.float32))
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and "no forward to differentiate" in str(errors[0])


@pytest.mark.parametrize("shape, axis", [((4, 3, 5), 1), ((6, 3), 1), ((2, 5, 3), -1),
                                         ((16, 3, 7), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inference_backward_keeps_nan_out_where_it_does_not_belong(shape, axis, dtype):
    """Inference dx = weight * invstd * g, g = dy masked by y > 0: a NaN in dy where the ReLU
    masks it, or anywhere in x, must not reach dx (it did, as 0 * NaN, in every layout)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    mean, invstd, w = np.zeros(C), np.full(C, 2.0), np.full(C, 0.5)
    y = fastbn.batch_norm_forward(x, axis=axis, activation="relu")[0]
    dy[y <= 0] = np.nan
    x_nan = x.copy()
    x_nan[(0,) * x.ndim] = np.nan
    dx, _dw, _db = fastbn.batch_norm_backward(dy, x_nan, mean, invstd, w, axis=axis,
                                              training=False, activation="relu", y=y)
    expect = np.where(y > 0, dy, 0) * 1.0
    assert np.array_equal(dx, expect.astype(dtype))
