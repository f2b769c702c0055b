"""Issue 18, ghost batch norm (Hoffer et al. 2017; Keras 2's virtual_batch_size)."""
import numpy as np
import pytest

import fastbn
from fastbn.functional import ghost_batch_norm_backward, ghost_batch_norm_forward


def ref(x, w, b, dy, v, eps):
    """Independent float64 reference: loop over sub-batches, formulas written out."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    ys, dxs, means, vars_ = [], [], [], []
    dw = np.zeros(x.shape[1])
    db = np.zeros(x.shape[1])
    red = (0,) + tuple(range(2, x.ndim))
    sh = (1, -1) + (1,) * (x.ndim - 2)
    for g in range(x.shape[0] // v):
        xs, gs = x[g * v:(g + 1) * v], dy[g * v:(g + 1) * v]
        m = xs.mean(axis=red)
        var = ((xs - m.reshape(sh)) ** 2).mean(axis=red)
        s = 1 / np.sqrt(var + eps)
        xh = (xs - m.reshape(sh)) * s.reshape(sh)
        ys.append(xh * w.reshape(sh) + b.reshape(sh))
        n = xs.size // xs.shape[1]
        sg, sgx = gs.sum(axis=red), (gs * xh).sum(axis=red)
        dxs.append((w * s).reshape(sh) * (gs - sg.reshape(sh) / n - xh * sgx.reshape(sh) / n))
        dw += sgx
        db += sg
        means.append(m)
        vars_.append(var)
    return (np.concatenate(ys), np.concatenate(dxs), dw, db, np.array(means), np.array(vars_))


def case(dtype, shape=(8, 3, 5)):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))).astype(dtype)
    return (x, rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1]),
            rng.standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("v", [2, 4, 8])
def test_matches_reference(dtype, tol, v):
    x, w, b, dy = case(dtype)
    y, mean, invstd = ghost_batch_norm_forward(x, w, b, virtual_batch_size=v, eps=1e-3)
    dx, dw, db = ghost_batch_norm_backward(dy, x, mean, invstd, w, virtual_batch_size=v)
    yr, dxr, dwr, dbr, mr, vr = ref(x, w, b, dy, v, 1e-3)
    assert mean.shape == (8 // v, 3) and y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_allclose(y, yr, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(mean, mr, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dxr, rtol=tol * 10, atol=tol * 10 * np.abs(dxr).max())
    np.testing.assert_allclose(dw, dwr, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(db, dbr, rtol=tol * 10, atol=tol * 10)


def test_one_virtual_batch_is_plain_batch_norm_bitwise():
    x, w, b, dy = case(np.float32)
    y, mean, invstd = ghost_batch_norm_forward(x, w, b, virtual_batch_size=8)
    y0, m0, s0 = fastbn.batch_norm_forward(x, w, b)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(mean[0], m0)


def test_channels_last_layout_kept():
    x, w, b, dy = case(np.float32, (8, 4, 4, 3))
    xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # NHWC strides
    y, mean, invstd = ghost_batch_norm_forward(xt, virtual_batch_size=4)
    y0, *_ = ghost_batch_norm_forward(x, virtual_batch_size=4)
    assert y.strides == xt.strides
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)  # another summation order


def test_layer_running_stats_are_keras_means():
    x, w, b, dy = case(np.float64)
    bn = fastbn.BatchNorm(3, virtual_batch_size=4, dtype=np.float64)
    y = bn(x)
    yr, dxr, dwr, dbr, mr, vr = ref(x, np.ones(3), np.zeros(3), dy, 4, 1e-5)
    np.testing.assert_allclose(y, yr, atol=1e-12)
    n = 4 * 5
    np.testing.assert_allclose(bn.running_mean, 0.1 * mr.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * vr.mean(axis=0) * n / (n - 1),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.backward(dy), dxr, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, dwr, rtol=1e-12)
    assert "virtual_batch_size=4" in repr(bn)


@pytest.mark.parametrize("v, axis, match", [(3, 1, "virtual_batch_size: expected a divisor"),
                                            (0, 1, "virtual_batch_size"),
                                            (2, 0, "virtual_batch_size: ghost batches split")])
def test_bad_sizes_named(v, axis, match):
    x, w, b, dy = case(np.float64)
    with pytest.raises(ValueError, match=match):
        ghost_batch_norm_forward(x, virtual_batch_size=v, axis=axis)
    with pytest.raises(ValueError, match=match):
        ghost_batch_norm_backward(dy, x, np.zeros((4, 3)), np.ones((4, 3)),
                                  virtual_batch_size=v, axis=axis)


def test_layer_refuses_and_changes_nothing():
    bn = fastbn.BatchNorm(3, virtual_batch_size=3)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn(np.ones((8, 3, 2), np.float32))
    assert bn.num_batches_tracked == 0
    with pytest.raises(TypeError, match="virtual_batch_size"):
        fastbn.BatchNorm(3, virtual_batch_size=2.5)
    with pytest.raises(ValueError, match="do not combine"):
        fastbn.BatchNorm(3, virtual_batch_size=2, renorm=True)
    with pytest.raises(ValueError, match="mean"):
        ghost_batch_norm_backward(np.ones((8, 3)), np.ones((8, 3)), np.zeros(3), np.ones(3),
                                  virtual_batch_size=4)
