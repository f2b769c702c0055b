"""Masked statistics over random shapes, feature axes, dtypes, memory layouts and masks,
against a float64 reference written here (Keras/Flax semantics). Seeded; each case prints
its parameters on failure."""
import numpy as np
import pytest

import fastbn

N_CASES = 300
DTYPES = [np.float16, np.float32, np.float64]


def _reference(x, mask, axis, w, b, dy, eps):
    xm = np.moveaxis(x.astype(np.float64), axis, -1)        # (..., C)
    gm = np.moveaxis(dy.astype(np.float64), axis, -1)
    m = mask.astype(bool)[..., None]
    n = m.sum()
    mean = (xm * m).sum(axis=tuple(range(xm.ndim - 1))) / n
    var = (((xm - mean) ** 2) * m).sum(axis=tuple(range(xm.ndim - 1))) / n
    inv = 1 / np.sqrt(var + eps)
    xh = (xm - mean) * inv
    y = xh * w + b
    red = tuple(range(xm.ndim - 1))
    sg, sgx = gm.sum(axis=red), (gm * xh).sum(axis=red)
    dx = w * inv * (gm - m * (sg + xh * sgx) / n)
    return (np.moveaxis(y, -1, axis), mean, inv, np.moveaxis(dx, -1, axis), sgx, sg)


def _layout(a, kind, rng):
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "perm":  # a transposed view (strides of some permutation)
        p = rng.permutation(a.ndim)
        return np.ascontiguousarray(a.transpose(p)).transpose(np.argsort(p))
    if kind == "strided":
        big = np.repeat(a, 2, axis=0)
        return big[::2]
    return a


@pytest.mark.parametrize("seed", range(N_CASES))
def test_masked_matches_the_reference(seed):
    rng = np.random.default_rng([18, seed])
    ndim = int(rng.integers(2, 5))
    shape = tuple(int(s) for s in rng.integers(1, 9, ndim))
    shape = (max(shape[0], 2),) + shape[1:]
    axis = int(rng.integers(-ndim, ndim))
    if shape[axis] == shape[0] and axis % ndim == 0:
        axis = 1 if ndim > 1 else axis
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    C = shape[axis]
    x = (rng.standard_normal(shape) * rng.choice([1e-2, 1, 30]) + rng.choice([0, 5, -100]))
    x = x.astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mshape = tuple(s for i, s in enumerate(shape) if i != axis % ndim)
    mask = rng.random(mshape) < rng.choice([0.3, 0.8, 1.0])
    flat = mask.reshape(-1)
    flat[:2] = True  # at least two positions count
    w = rng.uniform(0.5, 1.5, C)
    b = rng.standard_normal(C)
    kind = ["C", "F", "perm", "strided"][int(rng.integers(4))]
    xl, dyl = _layout(x, kind, rng), _layout(dy, kind, rng)
    what = f"shape={shape} axis={axis} dtype={np.dtype(dtype).name} layout={kind}"
    y, mean, invstd = fastbn.batch_norm_forward(xl, w, b, axis=axis, mask=mask, eps=1e-3)
    dx, dw, db = fastbn.batch_norm_backward(dyl, xl, mean, invstd, w, axis=axis, mask=mask)
    ry, rmean, rinv, rdx, rdw, rdb = _reference(x, mask, axis, w, b, dy, 1e-3)
    tol = {np.float16: 4e-3, np.float32: 2e-5, np.float64: 1e-10}[dtype]
    assert y.dtype == dtype and dx.dtype == dtype, what
    np.testing.assert_allclose(mean, rmean, rtol=tol, atol=tol * (1 + np.abs(x.astype(float)).max()),
                               err_msg=what)
    np.testing.assert_allclose(invstd, rinv, rtol=10 * tol, err_msg=what)
    for got, ref, name in ((y, ry, "y"), (dx, rdx, "dx"), (dw, rdw, "dweight"),
                           (db, rdb, "dbias")):
        got = np.asarray(got, dtype=np.float64)
        scale = 1 + np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=10 * tol, atol=10 * tol * scale,
                                   err_msg=f"{name}: {what}")
