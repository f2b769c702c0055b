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


# --------------------------------------------------------------------------- the CPU kernels
# batch_norm_forward(mask=) / batch_norm_backward(mask=) run _kernels.masked_channel_stats and
# _kernels.masked_backward on NumPy float32/float64 input: NCL segments (a mask row per outer
# index shared by all channels) and channels-last / 2-D rows (a mask byte per row).

from fastbn import _cpu, _kernels  # noqa: E402


def ref_nd(x, mask, w, b, dy, eps, axis, relu=False):
    """float64 reference for any layout: statistics over x[mask] per channel (the feature axis
    moved last), y and the gradients everywhere."""
    xl = np.moveaxis(x.astype(np.float64), axis, -1)
    gl = np.moveaxis(dy.astype(np.float64), axis, -1)
    sel = xl[mask]
    n = sel.shape[0]
    mean, var = sel.mean(axis=0), sel.var(axis=0)
    s = 1 / np.sqrt(var + eps)
    xh = (xl - mean) * s
    y = xh * w + b
    if relu:
        y = np.maximum(y, 0)
        gl = gl * (y > 0)
    red = tuple(range(xl.ndim - 1))
    sg, sgx = gl.sum(axis=red), (gl * xh).sum(axis=red)
    dx = w * s * (gl - mask[..., None] * (sg + xh * sgx) / n)
    back = lambda a: np.moveaxis(a, -1, axis)  # noqa: E731
    return back(y), mean, var, back(dx), sgx, sg


def layout_case(kind, inner, dtype, seed=0, p=0.7, C=5, pad=1e4):
    """x, mask, axis for an NCHW-like (N, C, inner), channels-last (N, inner, C) or 2-D (N, C)
    array, with the masked-out values set to pad (they must not count)."""
    rng = np.random.default_rng(seed)
    N = 6
    if kind == "ncl":
        shape, axis, mshape = (N, C, inner), 1, (N, inner)
    elif kind == "nlc":
        shape, axis, mshape = (N, inner, C), -1, (N, inner)
    else:
        shape, axis, mshape = (N * inner, C), 1, (N * inner,)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    mask = rng.random(mshape) < p
    mask.flat[0] = mask.flat[-1] = True
    xm = np.moveaxis(x, axis, -1)
    xm[~mask] = pad
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, mask, axis, w, b, dy


def _check(got, want, dtype, rtol64=1e-12):
    tol = 2e-5 if dtype == np.float32 else rtol64
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30) if want.size else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", [1, 3, 7, 17, 49, 1000])
@pytest.mark.parametrize("kind", ["ncl", "nlc", "2d"])
def test_kernels_match_float64_reference(level, kind, inner, dtype, relu):
    x, mask, axis, w, b, dy = layout_case(kind, inner, dtype, C=7 if inner == 49 else 5)
    act = "relu" if relu else None
    eps = 1e-3
    yr, mr, vr, dxr, dwr, dbr = ref_nd(x, mask, w.astype(np.float64), b.astype(np.float64), dy,
                                       eps, axis, relu)
    y, mean, invstd, var, n = fastbn.variants._masked_forward(x, w, b, axis, eps, act, None,
                                                              mask)
    assert n == mask.sum() and y.dtype == dtype and y.shape == x.shape
    _check(mean, mr, dtype, 1e-13)
    _check(var, vr, dtype, 1e-12)
    _check(invstd, 1 / np.sqrt(vr + eps), dtype)
    _check(y, yr, dtype)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, activation=act,
                                            y=y if relu else None, mask=mask)
    assert dx.dtype == dtype and dw.dtype == dtype
    _check(dx, dxr, dtype, 1e-11)
    _check(dw, dwr, dtype, 1e-11)
    _check(db, dbr, dtype, 1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((4, 6, 7, 7), 1), ((3, 9, 5, 11), -1), ((50, 9), 1),
                                         ((2, 3, 1000), 1)])
def test_kernels_all_true_is_plain_batch_norm(dtype, shape, axis):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) + 7).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    full = np.ones(tuple(s for i, s in enumerate(shape) if i != axis % len(shape)), bool)
    y, m, s = fastbn.batch_norm_forward(x, w, b, axis=axis, mask=full)
    y0, m0, s0 = fastbn.batch_norm_forward(x, w, b, axis=axis)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(m, m0, rtol=tol, atol=tol)
    np.testing.assert_allclose(s, s0, rtol=tol * 10)
    np.testing.assert_allclose(y, y0, rtol=tol * 10, atol=tol * 10)
    g = fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis, mask=full)
    g0 = fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis)
    for a, r in zip(g, g0):
        np.testing.assert_allclose(a, r, rtol=tol * 10, atol=tol * 10 * np.abs(r).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((8, 16, 33, 31), 1), ((5, 300, 7, 7), 1),
                                         ((16, 33, 35, 24), -1), ((5001, 37), 1),
                                         ((3, 2, 70001), 1)])
def test_kernels_thread_count_invariant(dtype, shape, axis):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 2 + 30).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    mask = rng.random(tuple(s for i, s in enumerate(shape) if i != axis % len(shape))) < 0.6
    res = []
    try:
        for nt in (1, 2):
            fastbn.set_num_threads(nt)
            y, m, s = fastbn.batch_norm_forward(x, w, b, axis=axis, mask=mask)
            res.append((y, m, s) + fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                              mask=mask))
    finally:
        fastbn.set_num_threads(None)
    for a, b_ in zip(*res):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("kind", ["ncl", "nlc", "2d"])
@pytest.mark.parametrize("inner", [1, 49, 3000])
def test_kernels_large_offset_float32(level, kind, inner):
    """mean 1e4 x the standard deviation, masked-out padding 1e6: within 1e-5 of the exact
    float64 statistics of the same float32 values (the numerical contract)."""
    x, mask, axis, w, b, dy = layout_case(kind, inner, np.float32, seed=7, C=6, pad=1e6)
    rng = np.random.default_rng(8)
    xm = np.moveaxis(x, axis, -1)
    xm[mask] = (1e4 + rng.standard_normal(xm[mask].shape)).astype(np.float32)
    xm[mask.nonzero()[0][0] if mask.ndim == 1 else tuple(i[0] for i in mask.nonzero())] += 30
    _y, mean, _inv, var, _n = fastbn.variants._masked_forward(x, None, None, axis, 0.0, None,
                                                              None, mask)
    sel = xm[mask].astype(np.float64)
    np.testing.assert_allclose(mean, sel.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(var, sel.var(axis=0), rtol=1e-5)


def test_kernels_padding_never_reaches_the_statistics():
    """NaN and inf at masked-out positions (padding) leave the statistics finite and exact; y
    there is whatever normalising them gives, y elsewhere is unaffected."""
    x, mask, axis, w, b, dy = layout_case("ncl", 49, np.float64, C=6)
    xp = x.copy()
    xm = np.moveaxis(xp, axis, -1)
    xm[~mask] = np.nan
    xm[~mask & (np.arange(mask.shape[1]) % 2 == 0)] = np.inf
    y0, m0, s0 = fastbn.batch_norm_forward(x, w, b, mask=mask)
    y1, m1, s1 = fastbn.batch_norm_forward(xp, w, b, mask=mask)
    np.testing.assert_allclose(m1, m0, rtol=1e-14)
    np.testing.assert_allclose(s1, s0, rtol=1e-13)
    sel = np.broadcast_to(mask[:, None, :], x.shape)
    np.testing.assert_allclose(y1[sel], y0[sel], rtol=1e-13)


def test_kernels_careful_fallback_channels():
    """Channels the one-pass sums cannot vouch for are recomputed (_cpu._careful_masked): a
    shift far from the mean (two of the three pilot values are outliers), a variance small
    enough for squares to underflow, a NaN among the masked-in values; a constant channel is
    exact."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 4, 13))
    mask = rng.random((5, 13)) < 0.7
    mask[0, 0] = mask[-1, -1] = True
    first = (0, 0)
    x[0, 0, 0] = x[4, 0, 12] = 1e6    # first and last masked-in positions: the pilot's median
    x[:, 1] = 2.5
    x[:, 2] *= 1e-140                 # squares (1e-280) below the one-pass floor (2^-900)
    o, i = first
    x[o, 3, i] = np.nan
    _y, mean, invstd, var, n = fastbn.variants._masked_forward(x, None, None, 1, 0.0, None,
                                                               None, mask)
    out = np.empty(12)
    _kernels.masked_channel_stats(x, _cpu.mask_rows(mask[:, None, :]), 5, 4, 13, out, 1)
    assert list(out[8:]) == [1, 0, 1, 1]  # the kernel flagged the channels it could not vouch for
    sel = np.moveaxis(x, 1, -1)[mask]
    np.testing.assert_allclose(mean[0], sel[:, 0].mean(), rtol=1e-14)
    np.testing.assert_allclose(var[0], sel[:, 0].var(), rtol=1e-13)
    assert mean[1] == 2.5 and var[1] == 0 and invstd[1] == 0
    e = sel[:, 2] * 1e140
    np.testing.assert_allclose(mean[2] * 1e140, e.mean(), rtol=1e-13)
    np.testing.assert_allclose(var[2] * 1e280, e.var(), rtol=1e-12)
    assert np.isnan(mean[3]) and np.isnan(var[3])


def test_kernels_float16_and_out():
    x, mask, axis, w, b, dy = layout_case("ncl", 17, np.float32)
    x16 = (x - 50).astype(np.float16)
    y16, m16, s16 = fastbn.batch_norm_forward(x16, mask=mask)
    assert y16.dtype == np.float16
    yr, mr, vr, *_ = ref_nd(x16, mask, np.ones(5), np.zeros(5), dy, 1e-5, 1)
    np.testing.assert_allclose(m16, mr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y16, yr, rtol=2e-3, atol=2e-3)
    dx16, dw16, _db = fastbn.batch_norm_backward(dy.astype(np.float16), x16, m16, s16, mask=mask)
    assert dx16.dtype == np.float16 and dw16.dtype == np.float32
    out = x.copy()
    y, _m, _s = fastbn.batch_norm_forward(out, w, b, mask=mask, out=out)  # in place
    assert y is out
    np.testing.assert_allclose(out, fastbn.batch_norm_forward(x, w, b, mask=mask)[0], rtol=1e-6,
                               atol=1e-6)


def test_kernel_entry_points_refuse_bad_arrays():
    x = np.zeros((2, 3, 4), np.float32)
    out = np.empty(9)
    with pytest.raises(TypeError, match="mask must be uint8"):
        _kernels.masked_channel_stats(x, np.ones((2, 4), bool), 2, 3, 4, out, 1)
    with pytest.raises(ValueError, match="mask must have 8 values"):
        _kernels.masked_channel_stats(x, np.ones(7, np.uint8), 2, 3, 4, out, 1)
    assert _kernels.masked_channel_stats(x, np.zeros(8, np.uint8), 2, 3, 4, out, 1) == 0
    assert not out.any()
    y = np.full_like(x, 7.0)
    stats = np.full(15, 3.0)
    assert _kernels.masked_forward_train(x, y, np.zeros(8, np.uint8), 2, 3, 4, None, None, 1e-5,
                                         False, stats, 1) == 0
    assert not stats.any() and (y == 7).all()  # no masked-in position: y left as it is
    assert _kernels.masked_forward_train(x, y, np.ones(8, np.uint8), 2, 3, 4, None, None, 1e-5,
                                         False, stats, 1) == -8  # zeros: flagged (careful path)
    assert (y == 7).all()
    assert _kernels.masked_forward_train(x + 1, y, np.ones(8, np.uint8), 2, 3, 4, None, None,
                                         1e-5, False, stats, 1) == 8
    assert not y.any() and (stats[12:] == 1 / np.sqrt(1e-5)).all()
    dx = np.empty_like(x)
    with pytest.raises(TypeError, match="mask"):
        _kernels.masked_backward(x, x, None, None, dx, 2, 3, 4, np.zeros(3), np.ones(3), None,
                                 np.empty(6), 1)
    mk = _cpu.mask_rows(np.ones((2, 1, 4), bool))
    assert mk.dtype == np.uint8 and mk.shape == (2, 4)


def test_kernels_strided_layouts():
    """x in PyTorch's channels_last strides (an NCHW view of NHWC memory: the kernels' canonical
    view through a permutation) and a sliced x (copied once) give the contiguous results."""
    rng = np.random.default_rng(11)
    base = (rng.standard_normal((3, 6, 7, 5)) + 4)  # N, H, W, C
    x = base.transpose(0, 3, 1, 2)                  # N, C, H, W view
    xc = np.ascontiguousarray(x)
    dy = rng.standard_normal(x.shape)
    mask = rng.random((3, 6, 7)) < 0.6
    w = rng.uniform(0.5, 2, 5)
    y, m, s = fastbn.batch_norm_forward(x, w, mask=mask)
    yc, mc, sc = fastbn.batch_norm_forward(xc, w, mask=mask)
    np.testing.assert_allclose(m, mc, rtol=1e-14)
    np.testing.assert_allclose(y, yc, rtol=1e-12, atol=1e-12)
    assert y.strides == x.strides  # the output follows x's layout
    g = fastbn.batch_norm_backward(dy, x, m, s, w, mask=mask)
    gc = fastbn.batch_norm_backward(dy, xc, m, s, w, mask=mask)
    for a, r in zip(g, gc):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)
    big = rng.standard_normal((3, 5, 14, 7))
    xs = big[:, :, ::2]
    ms2 = rng.random((3, 7, 7)) < 0.6
    ys, ms, _ = fastbn.batch_norm_forward(xs, mask=ms2)
    yr, mr, *_ = ref_nd(np.ascontiguousarray(xs), ms2, np.ones(5), np.zeros(5), xs, 1e-5, 1)
    np.testing.assert_allclose(ms, mr, rtol=1e-13)
    np.testing.assert_allclose(ys, yr, rtol=1e-11, atol=1e-11)
