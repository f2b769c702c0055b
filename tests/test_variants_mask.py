"""Issue 18, masked statistics (Keras's and Flax's mask=): only True positions count."""
import numpy as np
import pytest

import fastbn


def ref(x, mask, w, b, dy, eps):
    """Independent float64 reference on (N, C, L): statistics from x[mask] per channel, y and
    gradients everywhere (formulas written out)."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    m = mask[:, None, :].astype(np.float64)
    n = mask.sum()
    sel = np.moveaxis(x, 1, -1)[mask]  # (n, C)
    mean = sel.mean(axis=0)
    var = sel.var(axis=0)
    s = 1 / np.sqrt(var + eps)
    xh = (x - mean[None, :, None]) * s[None, :, None]
    y = xh * w[None, :, None] + b[None, :, None]
    sg, sgx = dy.sum(axis=(0, 2)), (dy * xh).sum(axis=(0, 2))
    dx = (w * s)[None, :, None] * (dy - m * (sg[None, :, None] + xh * sgx[None, :, None]) / n)
    return y, mean, var, dx, sgx, sg


def case(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, 3, 7)) * 2 + 100).astype(dtype)   # |mean| >> std
    mask = rng.random((5, 7)) < 0.6
    x[~np.broadcast_to(mask[:, None, :], x.shape)] = 1e4            # masked out: must not count
    return x, mask, rng.uniform(0.5, 2, 3), rng.standard_normal(3), \
        rng.standard_normal(x.shape).astype(dtype)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_matches_reference(dtype, tol):
    x, mask, w, b, dy = case(dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, eps=1e-3, mask=mask)
    yr, mr, vr, dxr, dwr, dbr = ref(x, mask, w, b, dy, 1e-3)
    np.testing.assert_allclose(mean, mr, rtol=1e-12)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(vr + 1e-3), rtol=1e-9)
    np.testing.assert_allclose(y, yr, rtol=tol, atol=tol * np.abs(yr).max())
    assert y.dtype == dtype
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, mask=mask)
    np.testing.assert_allclose(dx, dxr, rtol=tol * 10, atol=tol * 10 * np.abs(dxr).max())
    np.testing.assert_allclose(dw, dwr, rtol=tol * 10, atol=tol * 10 * np.abs(dwr).max())
    np.testing.assert_allclose(db, dbr, rtol=tol * 10, atol=tol * 10)


def test_all_true_is_plain_batch_norm():
    x, _mask, w, b, dy = case()
    full = np.ones((5, 7), bool)
    y, m, s = fastbn.batch_norm_forward(x, w, b, mask=full)
    y0, m0, s0 = fastbn.batch_norm_forward(x, w, b)
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-9)
    g = fastbn.batch_norm_backward(dy, x, m, s, w, mask=full)
    g0 = fastbn.batch_norm_backward(dy, x, m0, s0, w)
    for a, r in zip(g, g0):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-9)


def test_backward_matches_finite_differences():
    x, mask, w, b, dy = case()
    x = (x - 100) / 50  # keep the differences well conditioned
    eps = 1e-3
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, eps=eps, mask=mask)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, mask=mask)
    loss = lambda x: float((ref(x, mask, w, b, dy, eps)[0] * dy).sum())  # noqa: E731
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += 1e-6
        lo[i] -= 1e-6
        num[i] = (loss(hi) - loss(lo)) / 2e-6
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-6)


def test_layer_channels_last_and_running_stats():
    x, mask, w, b, dy = case()
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # (N, L, C), axis=-1
    bn = fastbn.BatchNorm(3, axis=-1, dtype=np.float64)
    y = bn(xl, mask=mask)
    yr, mr, vr, dxr, dwr, dbr = ref(x, mask, np.ones(3), np.zeros(3), dy, 1e-5)
    np.testing.assert_allclose(y, np.moveaxis(yr, 1, -1), atol=1e-9)
    n = mask.sum()
    np.testing.assert_allclose(bn.running_mean, 0.1 * mr, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * vr * n / (n - 1), rtol=1e-12)
    dx = bn.backward(np.ascontiguousarray(np.moveaxis(dy, 1, -1)))
    np.testing.assert_allclose(dx, np.moveaxis(dxr, 1, -1), atol=1e-9)
    np.testing.assert_allclose(bn.grad_weight, dwr, rtol=1e-9)
    bn.eval()
    np.testing.assert_array_equal(bn(xl, mask=mask), bn(xl))  # eval ignores the mask


@pytest.mark.parametrize("mask, exc, match", [
    (np.ones((5, 7), np.int8), TypeError, "mask: expected a boolean"),
    (np.ones((5, 3, 7), bool), ValueError, r"mask: expected shape \(5, 7\)"),
    (np.eye(5, 7, dtype=bool) & False, ValueError, "more than 1 True"),
])
def test_bad_masks_named_and_nothing_written(mask, exc, match):
    x, _m, w, b, dy = case()
    out = np.zeros_like(x)
    with pytest.raises(exc, match=match):
        fastbn.batch_norm_forward(x, w, b, mask=mask, out=out)
    assert not out.any()
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    with pytest.raises(exc, match=match):
        bn(x, mask=mask)
    assert bn.num_batches_tracked == 0
