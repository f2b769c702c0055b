"""fastbn.BatchNorm against a plain float64 NumPy layer, finite differences, and its contracts.

These tests need no PyTorch; tests/test_layer_torch.py checks the same layer against PyTorch.
"""
import copy
import importlib.util
import pickle

import numpy as np
import pytest

import fastbn
from fastbn.layer import IncompatibleKeys

from conftest import rel_err

TOL = {np.float64: 1e-10, np.float32: 1e-5}


# --------------------------------------------------------------------------- reference

def to_rows(a, axis):
    """(M, C) view of a, one column per channel."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def from_rows(r, shape, axis):
    moved = list(np.moveaxis(np.empty(shape), axis, -1).shape)
    return np.moveaxis(r.reshape(moved), -1, axis)


class RefBatchNorm:
    """PyTorch's BatchNorm semantics written plainly in float64, from the formulas."""

    def __init__(self, C, axis=1, eps=1e-5, momentum=0.1, affine=True, track=True, relu=False):
        self.C, self.axis, self.eps, self.momentum = C, axis, eps, momentum
        self.affine, self.track, self.relu = affine, track, relu
        self.weight = np.ones(C) if affine else None
        self.bias = np.zeros(C) if affine else None
        self.running_mean = np.zeros(C) if track else None
        self.running_var = np.ones(C) if track else None
        self.num_batches_tracked = 0 if track else None
        self.training = True

    def forward(self, x):
        r = to_rows(x, self.axis)
        n = r.shape[0]
        self.batch = self.training or not self.track
        if self.batch:
            mean = r.mean(axis=0)
            var = ((r - mean) ** 2).mean(axis=0)
            if self.training and self.track:
                self.num_batches_tracked += 1
                f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean = (1 - f) * self.running_mean + f * mean
                self.running_var = (1 - f) * self.running_var + f * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        self.std = np.sqrt(var + self.eps)
        self.xhat = (r - mean) / self.std
        w = self.weight if self.affine else 1.0
        b = self.bias if self.affine else 0.0
        y = w * self.xhat + b
        if self.relu:
            y = np.maximum(y, 0.0)
        self.y = y
        return from_rows(y, np.shape(x), self.axis)

    def backward(self, dy):
        g = to_rows(dy, self.axis)
        if self.relu:
            g = np.where(self.y > 0, g, 0.0)
        w = self.weight if self.affine else 1.0
        if self.batch:
            dx = w / self.std * (g - g.mean(axis=0) - self.xhat * (g * self.xhat).mean(axis=0))
        else:
            dx = g * w / self.std
        self.grad_weight = (g * self.xhat).sum(axis=0)
        self.grad_bias = g.sum(axis=0)
        return from_rows(dx, np.shape(dy), self.axis)


def batch(shape, axis, rng, dtype=np.float64):
    """Inputs with a different mean and spread per channel."""
    C = shape[axis]
    cshape = [1] * len(shape)
    cshape[axis] = C
    offset = rng.uniform(-3, 3, C).reshape(cshape)
    scale = rng.uniform(0.5, 2.0, C).reshape(cshape)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


# --------------------------------------------------------------------------- training loops

LOOP_CASES = [
    # shape, axis, momentum, affine, track, activation
    ((16, 5), 1, 0.1, True, True, None),
    ((6, 4, 7), 1, None, True, True, None),
    ((6, 7, 4), -1, 0.5, True, True, "relu"),
    ((3, 4, 5, 6), 1, 0.1, False, True, None),
    ((3, 5, 6, 4), -1, None, True, False, None),
    ((2, 3, 4, 3, 2), 2, 0.1, True, True, "relu"),
    ((5, 3), 0, 0.1, False, False, "relu"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis,momentum,affine,track,activation", LOOP_CASES)
def test_training_loop_matches_reference(shape, axis, momentum, affine, track, activation,
                                         dtype):
    rng = np.random.default_rng(7)
    C = shape[axis]
    bn = fastbn.BatchNorm(C, axis=axis, momentum=momentum, affine=affine,
                          track_running_stats=track, activation=activation, dtype=dtype)
    ref = RefBatchNorm(C, axis, 1e-5, momentum, affine, track, activation == "relu")
    tol = TOL[dtype]
    lr = 0.1
    for step in range(12):
        if step == 10:
            bn.eval()
            ref.training = False
        x = batch(shape, axis, rng, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y = bn(x)
        dx = bn.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype
        assert rel_err(y, ref.forward(x)) < tol
        assert rel_err(dx, ref.backward(dy)) < tol
        if affine:
            assert rel_err(bn.grad_weight, ref.grad_weight) < tol
            assert rel_err(bn.grad_bias, ref.grad_bias) < tol
            bn.weight -= lr * bn.grad_weight
            bn.bias -= lr * bn.grad_bias
            ref.weight = ref.weight - lr * ref.grad_weight
            ref.bias = ref.bias - lr * ref.grad_bias
            bn.zero_grad()
        else:
            assert bn.weight is None and bn.grad_weight is None and bn.grad_bias is None
        if track:
            assert rel_err(bn.running_mean, ref.running_mean) < tol
            assert rel_err(bn.running_var, ref.running_var) < tol
            assert bn.num_batches_tracked == ref.num_batches_tracked == min(step + 1, 10)
        else:
            assert bn.running_mean is None and bn.num_batches_tracked is None


def test_float16_input_with_float32_parameters():
    rng = np.random.default_rng(3)
    shape = (8, 3, 5, 4)
    bn = fastbn.BatchNorm(3)
    ref = RefBatchNorm(3)
    for training in (True, False):
        bn.train(training)
        ref.training = training
        x = batch(shape, 1, rng, np.float16)
        dy = rng.standard_normal(shape).astype(np.float16)
        y = bn(x)
        dx = bn.backward(dy)
        assert y.dtype == np.float16 and dx.dtype == np.float16
        assert bn.grad_weight.dtype == np.float32 and bn.running_mean.dtype == np.float32
        # the reference sees the same float16 values; the only extra error is the final rounding
        assert rel_err(y, ref.forward(x)) < 2e-3
        assert rel_err(dx, ref.backward(dy)) < 2e-3
        assert rel_err(bn.grad_weight, ref.grad_weight) < 1e-5
        assert rel_err(bn.grad_bias, ref.grad_bias) < 1e-5
        assert rel_err(bn.running_var, ref.running_var) < 1e-6
        bn.zero_grad()


# --------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("training,track,activation", [
    (True, True, None), (False, True, None), (True, True, "relu"), (False, True, "relu"),
    (False, False, None),
])
def test_backward_matches_finite_differences(training, track, activation):
    rng = np.random.default_rng(11)
    shape, axis = (4, 3, 5), -1
    bn = fastbn.BatchNorm(5, axis=axis, track_running_stats=track, activation=activation,
                          dtype=np.float64)
    bn.weight = rng.uniform(0.5, 2.0, 5)
    bn.bias = rng.standard_normal(5)
    if track:
        bn.running_mean = rng.standard_normal(5)
        bn.running_var = rng.uniform(0.5, 2.0, 5)
    bn.train(training)
    x = batch(shape, axis, rng)
    r = rng.standard_normal(shape)  # loss = sum(r * y)
    state = bn.state_dict()

    def loss(xv, w=None, b=None):
        probe = fastbn.BatchNorm(5, axis=axis, track_running_stats=track,
                                 activation=activation, dtype=np.float64)
        probe.load_state_dict(state)
        probe.train(training)
        if w is not None:
            probe.weight, probe.bias = w, b
        return float(np.sum(r * probe(xv)))

    bn(x)
    dx = bn.backward(r)
    h = 1e-6
    num_dx = np.zeros(shape)
    for i in np.ndindex(shape):
        e = np.zeros(shape)
        e[i] = h
        num_dx[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    assert rel_err(dx, num_dx) < 1e-6
    w0, b0 = state["weight"], state["bias"]
    for c in range(5):
        e = np.zeros(5)
        e[c] = h
        gw = (loss(x, w0 + e, b0) - loss(x, w0 - e, b0)) / (2 * h)
        gb = (loss(x, w0, b0 + e) - loss(x, w0, b0 - e)) / (2 * h)
        assert abs(bn.grad_weight[c] - gw) < 1e-6 * max(1.0, abs(gw))
        assert abs(bn.grad_bias[c] - gb) < 1e-6 * max(1.0, abs(gb))


# --------------------------------------------------------------------------- semantics

def test_momentum_none_is_cumulative_average():
    rng = np.random.default_rng(5)
    bn = fastbn.BatchNorm(4, momentum=None, dtype=np.float64)
    means, uvars = [], []
    for _ in range(5):
        x = batch((10, 4, 3), 1, rng)
        bn(x)
        means.append(x.mean(axis=(0, 2)))
        uvars.append(x.var(axis=(0, 2), ddof=1))
    assert bn.num_batches_tracked == 5
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.running_var, np.mean(uvars, axis=0), rtol=1e-12)


def test_eval_uses_running_statistics_and_does_not_update_them():
    rng = np.random.default_rng(6)
    bn = fastbn.BatchNorm(3, eps=1e-3, dtype=np.float64).eval()
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                        "num_batches_tracked": np.int64(4)})
    x = batch((1, 3, 2), 1, rng)  # one sample is fine in eval
    y = bn(x)
    ref = (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-3) * w[:, None] + b[:, None]
    assert rel_err(y, ref) < 1e-13
    dy = rng.standard_normal(x.shape)
    assert rel_err(bn.backward(dy), dy * (w / np.sqrt(rv + 1e-3))[:, None]) < 1e-13
    assert bn.num_batches_tracked == 4
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)


def test_without_running_stats_eval_uses_batch_statistics():
    rng = np.random.default_rng(8)
    bn = fastbn.BatchNorm(3, track_running_stats=False, dtype=np.float64)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert list(bn.state_dict()) == ["weight", "bias"]
    x = batch((6, 3, 4), 1, rng)
    dy = rng.standard_normal(x.shape)
    y_train, dx_train = bn(x), bn.backward(dy)
    bn.eval()
    y_eval, dx_eval = bn(x), bn.backward(dy)
    assert np.array_equal(y_train, y_eval) and np.array_equal(dx_train, dx_eval)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x[:1, :, :1])


def test_affine_false_has_no_parameters():
    bn = fastbn.BatchNorm(3, affine=False)
    assert bn.weight is None and bn.bias is None
    x = batch((5, 3), 1, np.random.default_rng(0), np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is None and bn.grad_bias is None
    assert list(bn.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    with pytest.raises(AttributeError, match="weight: this layer has none"):
        bn.weight = np.ones(3)


def test_backward_uses_the_mode_and_weight_of_its_forward():
    rng = np.random.default_rng(9)
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    bn.weight = rng.uniform(0.5, 2, 3)
    x = batch((6, 3, 4), 1, rng)
    dy = rng.standard_normal(x.shape)
    bn(x)
    expected = bn.backward(dy)
    bn.zero_grad()
    bn.eval()  # switching mode after the forward does not change its gradient
    bn.weight = bn.weight * 3  # nor does an optimizer step
    assert np.array_equal(bn.backward(dy), expected)


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(10)
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    assert bn.grad_weight is None and bn.grad_bias is None  # as PyTorch's .grad
    x = batch((6, 3, 4), 1, rng)
    dy = rng.standard_normal(x.shape)
    bn(x)
    bn.backward(dy)
    gw, gb = bn.grad_weight.copy(), bn.grad_bias.copy()
    held = bn.grad_weight
    bn.backward(dy)
    assert bn.grad_weight is held  # accumulated in place
    np.testing.assert_allclose(bn.grad_weight, 2 * gw, rtol=1e-15)
    np.testing.assert_allclose(bn.grad_bias, 2 * gb, rtol=1e-15)
    bn.zero_grad(set_to_none=False)
    assert bn.grad_weight is held and not held.any() and not bn.grad_bias.any()
    bn.zero_grad()
    assert bn.grad_weight is None and bn.grad_bias is None
    bn.zero_grad(set_to_none=False)
    assert np.array_equal(bn.grad_weight, np.zeros(3)) and bn.grad_weight.dtype == np.float64


def test_relu_is_fused_and_masks_the_gradient():
    rng = np.random.default_rng(12)
    bn = fastbn.BatchNorm(4, activation="relu", dtype=np.float64)
    plain = fastbn.BatchNorm(4, dtype=np.float64)
    x = batch((8, 4, 3), 1, rng)
    y, y_plain = bn(x), plain(x)
    assert np.array_equal(y, np.maximum(y_plain, 0))
    dy = rng.standard_normal(x.shape)
    g = np.where(y_plain > 0, dy, 0.0)
    assert rel_err(bn.backward(dy), plain.backward(g)) < 1e-14
    assert np.array_equal(bn.grad_bias, plain.grad_bias)


def test_channels_last_equals_channels_first():
    rng = np.random.default_rng(13)
    x = batch((4, 3, 5, 6), 1, rng)
    dy = rng.standard_normal(x.shape)
    first = fastbn.BatchNorm(3, dtype=np.float64)
    last = fastbn.BatchNorm(3, axis=-1, dtype=np.float64)
    xl, dyl = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
    assert rel_err(np.moveaxis(last(xl), -1, 1), first(x)) < 1e-14
    assert rel_err(np.moveaxis(last.backward(dyl), -1, 1), first.backward(dy)) < 1e-14
    assert rel_err(last.running_var, first.running_var) < 1e-14


def test_inputs_are_not_modified():
    rng = np.random.default_rng(14)
    bn = fastbn.BatchNorm(3, activation="relu")
    x = batch((5, 3, 4), 1, rng, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    x0, dy0 = x.copy(), dy.copy()
    bn(x)
    bn.backward(dy)
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0)


def test_repr():
    assert repr(fastbn.BatchNorm(64)) == (
        "BatchNorm(64, axis=1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    )
    assert repr(fastbn.BatchNorm(3, axis=-1, eps=1e-3, momentum=None, affine=False,
                                 track_running_stats=False, activation="relu",
                                 dtype=np.float64)) == (
        "BatchNorm(3, axis=-1, eps=0.001, momentum=None, affine=False, "
        "track_running_stats=False, activation='relu', dtype=float64)"
    )


# --------------------------------------------------------------------------- state

def trained(dtype=np.float32, steps=3, **options):
    rng = np.random.default_rng(21)
    bn = fastbn.BatchNorm(4, dtype=dtype, **options)
    for _ in range(steps):
        x = batch((6, 4, 3), 1, rng, dtype)
        bn(x)
        bn.backward(rng.standard_normal(x.shape).astype(dtype))
        if bn.affine:
            bn.weight -= 0.3 * bn.grad_weight
            bn.bias -= 0.3 * bn.grad_bias
    return bn


OPTIONS = [dict(), dict(affine=False), dict(track_running_stats=False), dict(momentum=None),
           dict(activation="relu")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS)
def test_state_dict_round_trip(options, dtype):
    bn = trained(dtype, **options)
    state = bn.state_dict()
    if bn.track_running_stats:
        assert state["num_batches_tracked"].dtype == np.int64
        assert state["num_batches_tracked"].shape == ()
    fresh = fastbn.BatchNorm(4, dtype=dtype, **options)
    held = {k: getattr(fresh, k) for k in ("weight", "running_mean")}
    assert fresh.load_state_dict(state) == IncompatibleKeys([], [])
    for k, a in held.items():
        assert getattr(fresh, k) is a  # loaded in place, like PyTorch's copy_
    x = batch((5, 4, 3), 1, np.random.default_rng(1), dtype)
    for mode in (False, True):
        assert np.array_equal(bn.train(mode)(x), fresh.train(mode)(x))
    assert fresh.num_batches_tracked == bn.num_batches_tracked
    # the state dict is a snapshot, not a view of the layer
    if bn.affine:
        state["weight"][:] = 123
        assert not np.any(bn.weight == 123)


def test_load_state_dict_not_strict_reports_keys():
    bn = fastbn.BatchNorm(2)
    result = bn.load_state_dict({"weight": np.array([2.0, 3.0]), "extra": 1}, strict=False)
    # num_batches_tracked is filled in from the layer, as torch does (version-1 checkpoints)
    assert result.missing_keys == ["bias", "running_mean", "running_var"]
    assert result.unexpected_keys == ["extra"]
    assert np.array_equal(bn.weight, [2, 3]) and bn.weight.dtype == np.float32


@pytest.mark.parametrize("options", OPTIONS[:3])
def test_pickle_round_trip(options):
    bn = trained(np.float64, **options)
    bn.eval()
    clone = pickle.loads(pickle.dumps(bn))
    assert repr(clone) == repr(bn) and clone.training is False
    assert clone.num_batches_tracked == bn.num_batches_tracked
    x = batch((5, 4, 3), 1, np.random.default_rng(2), np.float64)
    assert np.array_equal(clone(x), bn(x))
    assert clone._ctx is not None
    # the cached forward is activation memory, not state: it does not travel
    again = pickle.loads(pickle.dumps(bn))
    with pytest.raises(RuntimeError, match="no forward to differentiate"):
        again.backward(np.ones_like(x))


def test_device_cpu():
    bn = fastbn.BatchNorm(3)
    assert bn.device == "cpu"
    assert bn.to("cpu") is bn and bn.to("CPU") is bn


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None,
                    reason="CuPy is installed: tests/gpu covers .to('gpu')")
def test_to_gpu_without_cupy_raises_and_changes_nothing():
    bn = trained()
    before = snapshot(bn)
    with pytest.raises(ImportError, match="needs CuPy"):
        bn.to("gpu")
    assert_same_state(before, snapshot(bn))
    assert bn.device == "cpu"


# --------------------------------------------------------------------------- bad input

def snapshot(bn):
    """Everything the layer holds, deep-copied, with the identity of each array and the cache."""
    state = dict(vars(bn))
    snap = {"_local.id": id(state.pop("_local"))}  # the per-thread forward cache: by identity
    state["_ctx"] = bn._ctx
    for k, v in state.items():
        if k == "_ctx":
            snap["_ctx.id"] = id(v)
            if v is not None:
                for s in type(v).__slots__:
                    a = getattr(v, s)
                    snap[f"_ctx.{s}.id"] = id(a)
                    snap[f"_ctx.{s}"] = copy.deepcopy(a)
            continue
        snap[k + ".id"] = id(v)
        snap[k] = copy.deepcopy(v)
    return snap


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for k in before:
        a, b = before[k], after[k]
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), k
        else:
            assert type(a) is type(b) and a == b, k


class FakeCupyArray:
    """Looks like a CuPy array to fastbn._backend (its type's module is cupy)."""

    shape = (6, 4, 3)
    dtype = np.dtype(np.float32)
    ndim = 3


FakeCupyArray.__module__ = "cupy._core.core"

X_OK = batch((6, 4, 3), 1, np.random.default_rng(0), np.float32)

BAD_FORWARD = [
    (np.zeros((6, 5, 3), np.float32), ValueError,
     r"x: expected 4 features .* got shape \(6, 5, 3\)"),
    (X_OK.astype(np.int32), TypeError, "x: expected a floating-point array .* got dtype int32"),
    (X_OK.astype(np.complex64), TypeError, "x: expected a floating-point .* complex64"),
    (X_OK.astype(np.float64), TypeError, "x: expected dtype float32 .* got float64"),
    (np.zeros(4, np.float32), ValueError, r"at least 2 dimensions .* got shape \(4,\)"),
    (np.float32(1.0), ValueError, r"at least 2 dimensions .* got shape \(\)"),
    (X_OK[:1, :, :1], ValueError, "more than 1 value per channel"),
    (np.zeros((1, 4), np.float32), ValueError, "more than 1 value per channel"),
    ([[1, 2, 3, 4]] * 3, TypeError, "got dtype int64"),
    ("abc", TypeError, "floating-point array"),
    (FakeCupyArray(), TypeError, r"x: expected a NumPy array \(CPU\) .* got a CuPy array"),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bad,exc,match", BAD_FORWARD)
def test_bad_forward_input_changes_nothing(bad, exc, match, mode):
    bn = trained(activation="relu")
    bn.train(mode == "train")
    dy = np.ones_like(X_OK)
    bn(X_OK)
    dx_before = bn.backward(dy)
    before = snapshot(bn)
    if mode == "eval" and "value per channel" in match:
        bn(bad)  # one value per channel is fine with running statistics
        return
    with pytest.raises(exc, match=match):
        bn(bad)
    assert_same_state(before, snapshot(bn))
    # the cache still holds the last successful forward
    bn.zero_grad()
    assert np.array_equal(bn.backward(dy), dx_before)


def test_axis_out_of_range_for_the_input():
    bn = trained()
    bn(X_OK)
    bn.axis = 3
    before = snapshot(bn)
    with pytest.raises(ValueError, match=r"axis: expected an int in \[-3, 2\] .* got 3"):
        bn(X_OK)
    assert_same_state(before, snapshot(bn))


def test_backward_before_forward():
    bn = fastbn.BatchNorm(4)
    with pytest.raises(RuntimeError, match="no forward to differentiate; call the layer"):
        bn.backward(np.ones((6, 4, 3), np.float32))
    assert bn.grad_weight is None


BAD_BACKWARD = [
    (np.ones((6, 4, 2), np.float32), ValueError, r"dy: expected shape \(6, 4, 3\)"),
    (np.ones((6, 4, 3), np.float64), TypeError, "dy: expected dtype float32"),
    (np.ones((6, 4, 3), np.int32), TypeError, "dy: expected a floating-point array"),
    (FakeCupyArray(), TypeError, r"dy: expected a NumPy array \(CPU\) .* got a CuPy array"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_BACKWARD)
def test_bad_backward_input_changes_nothing(bad, exc, match):
    bn = trained()
    bn(X_OK)
    bn.backward(np.ones_like(X_OK))
    before = snapshot(bn)
    with pytest.raises(exc, match=match):
        bn.backward(bad)
    assert_same_state(before, snapshot(bn))


def good_state():
    return {"weight": np.full(4, 2.0), "bias": np.full(4, -1.0), "running_mean": np.full(4, 5.0),
            "running_var": np.full(4, 7.0), "num_batches_tracked": np.array(9)}


def with_(**changes):
    d = good_state()
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return d


BAD_STATE = [
    (with_(running_var=KeyError), ValueError, r"missing \['running_var'\]"),
    (with_(momentum=np.array(0.3)), ValueError, r"unexpected \['momentum'\]"),
    (with_(weight=np.ones(5)), ValueError, r"weight: expected shape \(4,\) .* got \(5,\)"),
    (with_(bias=np.ones((4, 1))), ValueError, r"bias: expected shape \(4,\) .* got \(4, 1\)"),
    (with_(running_mean=np.ones(3)), ValueError, r"running_mean: expected shape \(4,\)"),
    # the last key is the bad one: nothing before it may have been assigned
    (with_(running_var=np.ones(2)), ValueError, r"running_var: expected shape \(4,\)"),
    (with_(running_var=np.ones(4, np.complex128)), TypeError, "running_var: expected a real"),
    (with_(weight=np.array(["a"] * 4)), TypeError, "weight: expected a real"),
    (with_(weight=None), TypeError, "weight: expected an array of shape"),
    (with_(num_batches_tracked=np.array(-1)), ValueError,
     "num_batches_tracked: expected a non-negative"),
    (with_(num_batches_tracked=np.array(2.5)), TypeError,
     "num_batches_tracked: expected an integer"),
    (with_(num_batches_tracked=np.array([3])), ValueError, r"expected a scalar \(shape \(\)\)"),
    ([("weight", np.ones(4))], TypeError, "state_dict: expected a mapping"),
]


@pytest.mark.parametrize("state,exc,match", BAD_STATE)
def test_bad_state_dict_changes_nothing(state, exc, match):
    bn = trained()
    bn(X_OK)
    before = snapshot(bn)
    with pytest.raises(exc, match=match):
        bn.load_state_dict(state)
    assert_same_state(before, snapshot(bn))
    bn.load_state_dict(good_state())  # and the layer still loads a good one
    assert bn.num_batches_tracked == 9 and np.array_equal(bn.running_var, np.full(4, 7.0))


BAD_SETTERS = [
    ("weight", np.ones(3), ValueError, r"weight: expected shape \(4,\)"),
    ("running_var", None, TypeError, "running_var: expected an array"),
    ("momentum", 1.5, ValueError, r"momentum: expected a float in \[0, 1\]"),
    ("momentum", "0.1", TypeError, "momentum: expected a float"),
    ("eps", -1e-5, ValueError, "eps: expected a finite non-negative float"),
    ("eps", float("nan"), ValueError, "eps: expected a finite"),
    ("axis", 1.0, TypeError, "axis: expected an int, got float"),
    ("activation", "tanh", ValueError, "activation: expected None or 'relu'"),
    ("num_batches_tracked", -3, ValueError, "num_batches_tracked: expected a non-negative"),
    ("num_features", 8, AttributeError, "num_features"),
]


@pytest.mark.parametrize("name,value,exc,match", BAD_SETTERS)
def test_bad_assignment_changes_nothing(name, value, exc, match):
    bn = trained()
    bn(X_OK)
    before = snapshot(bn)
    with pytest.raises(exc, match=match):
        setattr(bn, name, value)
    assert_same_state(before, snapshot(bn))


def test_bad_train_mode_and_device_change_nothing():
    bn = trained()
    before = snapshot(bn)
    with pytest.raises(TypeError, match="mode: expected a bool, got str"):
        bn.train("no")
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'gpu'"):
        bn.to("tpu")
    assert_same_state(before, snapshot(bn))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_features=0), ValueError, "num_features: expected a positive int, got 0"),
    (dict(num_features=2.5), TypeError, "num_features: expected a positive int, got float"),
    (dict(num_features=True), TypeError, "num_features: expected a positive int, got bool"),
    (dict(eps=-1.0), ValueError, "eps: expected a finite non-negative"),
    (dict(momentum=-0.1), ValueError, "momentum: expected a float in"),
    (dict(affine=1), TypeError, "affine: expected a bool, got int"),
    (dict(track_running_stats="yes"), TypeError, "track_running_stats: expected a bool"),
    (dict(activation="gelu"), ValueError, "activation: expected None or 'relu'"),
    (dict(dtype=np.int32), TypeError, "dtype: expected float32 or float64, got int32"),
    (dict(dtype=np.float16), TypeError, "keep float32 parameters"),
    (dict(axis="1"), TypeError, "axis: expected an int, got str"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs = {"num_features": 4, **kwargs}
    with pytest.raises(exc, match=match):
        fastbn.BatchNorm(kwargs.pop("num_features"), **kwargs)
