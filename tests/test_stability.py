"""Statistics independent of the order of the data, free of overflow and underflow.

DESIGN.md's numerical contract: float32 within 1e-5 and float64 within 1e-13 relative of the
exact statistics of the same values whatever comes first (an outlier first, last or in the
middle, sorted, reversed), in NCL, channels-last and 2-D layouts; no overflow for any finite
input whose float64 statistics are finite; subnormal-scale float32 data normalised correctly;
NaN poisons its channel only; bitwise identical results for any thread count.
The references are exact: math.fsum of the values scaled by a power of two.
"""
import math

import numpy as np
import pytest

import fastbn
from fastbn import _kernels
from fastbn.functional import channel_moments

TOL = {np.float32: 1e-5, np.float64: 1e-13}
N = 200_000  # values per channel


def exact(v):
    """(mean, var) of the values v (1-D), exactly rounded-ish: fsum of 2^-e-scaled values."""
    v = np.asarray(v, np.float64)
    e = math.frexp(float(np.max(np.abs(v))) or 1.0)[1]
    w = np.ldexp(v, -e)
    m = math.fsum(w) / w.size
    d = w - m
    m += math.fsum(d) / w.size
    d = w - m
    return math.ldexp(m, e), math.ldexp(math.fsum(d * d) / w.size, 2 * e)


def _orders(rng):
    base = rng.standard_normal(N)
    out = {}
    for where, i in (("first", 0), ("middle", N // 2), ("last", N - 1)):
        v = base.copy()
        v[i] = 1000.0
        out[f"outlier {where}"] = v
    out["sorted"] = np.sort(base)
    out["reversed"] = np.sort(base)[::-1].copy()
    out["mean 1e4 std"] = 1e4 + base
    out["random"] = base
    return out


ORDERS = list(_orders(np.random.default_rng(0)))


def _layouts(v, dtype):
    """(name, x, axis, values of channel 0 in memory order). Channel 1 holds the values
    reversed (so each order is also tried backwards), in every layout."""
    v = v.astype(dtype)
    two = np.stack([v, v[::-1]])  # (2, N)
    nchw = two.reshape(2, 100, N // 100).transpose(1, 0, 2).copy()  # (100, 2, N/100)
    cl = np.ascontiguousarray(two.T)  # (N, 2)
    return [("NCL", nchw, 1), ("channels-last", cl.reshape(N // 100, 10, 10, 2), -1),
            ("2-D", cl, 1)]


def _channel_values(x, axis):
    x = np.moveaxis(x, axis, 0)
    return [x[c].ravel() for c in range(x.shape[0])]


def _check(x, axis, dtype, mean, var):
    for c, v in enumerate(_channel_values(x, axis)):
        m_ref, v_ref = exact(v)
        scale = max(abs(m_ref), math.sqrt(v_ref))
        assert abs(mean[c] - m_ref) <= TOL[dtype] * scale, (c, mean[c], m_ref)
        assert abs(var[c] - v_ref) <= TOL[dtype] * v_ref, (c, var[c], v_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("order", ORDERS)
def test_statistics_do_not_depend_on_the_order_of_the_values(dtype, order):
    v = _orders(np.random.default_rng(0))[order]
    for name, x, axis in _layouts(v, dtype):
        count, mean, m2 = channel_moments(x, axis=axis)
        _check(x, axis, dtype, mean, m2 / count)


def test_float32_with_huge_std_does_not_overflow(rng):
    v = rng.standard_normal(N) * 3e18
    v[0] = 3e38  # a value near float32's largest
    for name, x, axis in _layouts(v, np.float32):
        count, mean, m2 = channel_moments(x, axis=axis)
        assert np.all(np.isfinite(m2)), name
        _check(x, axis, np.float32, mean, m2 / count)
        y, m, inv = fastbn.batch_norm_forward(x, axis=axis, eps=0.0)
        assert np.all(np.isfinite(y)) and np.all(inv > 0), name
        _check_y(x, axis, y, 1e-5)


@pytest.mark.parametrize("scale", [1e150, 1e153, 1e-150])
def test_float64_extreme_scales(rng, scale):
    v = rng.standard_normal(N) * scale
    for name, x, axis in _layouts(v, np.float64):
        y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, eps=0.0)
        for c, vals in enumerate(_channel_values(x, axis)):
            m_ref, v_ref = exact(vals)
            assert abs(mean[c] - m_ref) <= 1e-13 * math.sqrt(v_ref), name
            assert abs(invstd[c] * math.sqrt(v_ref) - 1) <= 1e-13, name
        _check_y(x, axis, y, 1e-12)


def _check_y(x, axis, y, tol):
    xs = np.moveaxis(x, axis, 0).astype(np.float64)
    ys = np.moveaxis(y, axis, 0).astype(np.float64)
    for c in range(xs.shape[0]):
        m_ref, v_ref = exact(xs[c].ravel())
        with np.errstate(over="ignore"):
            ref = (xs[c] - m_ref) / math.sqrt(v_ref)
        assert np.max(np.abs(ys[c] - ref)) <= tol * max(1.0, np.max(np.abs(ref))), c


@pytest.mark.parametrize("scale", [1e-38, 1e-40, 1e-44])
def test_subnormal_scale_float32_is_normalised(rng, scale):
    v = rng.standard_normal(N) * scale
    for name, x, axis in _layouts(v, np.float32):
        count, mean, m2 = channel_moments(x, axis=axis)
        assert np.all(m2 > 0), name
        if scale >= 1e-38:  # below, the values themselves hold only a few bits
            _check(x, axis, np.float32, mean, m2 / count)
        y, _, _ = fastbn.batch_norm_forward(x, axis=axis, eps=0.0)
        assert np.all(np.isfinite(y)), name
        # the float32 values are exact inputs; y is within float32 rounding of the exact x_hat
        _check_y(x, axis, y, 1e-6)


def test_nan_and_inf_poison_their_channel_only(rng):
    x = rng.standard_normal((64, 4, 50)).astype(np.float32) + 3
    x[5, 1, 7] = np.nan
    x[9, 2, 0] = np.inf
    for xx, axis in ((x, 1), (np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1)):
        count, mean, m2 = channel_moments(xx, axis=axis)
        assert np.isnan(mean[1]) and np.isnan(m2[1])
        assert np.isinf(mean[2]) and np.isnan(m2[2])
        with np.errstate(invalid="ignore"):
            y, _, _ = fastbn.batch_norm_forward(xx, axis=axis)
        ys = np.moveaxis(y, axis, 0)
        assert np.all(np.isfinite(ys[[0, 3]]))
        for c in (0, 3):
            m_ref, v_ref = exact(np.moveaxis(xx, axis, 0)[c].ravel())
            assert abs(mean[c] - m_ref) <= 1e-5 * math.sqrt(v_ref)
            assert abs(m2[c] / count - v_ref) <= 1e-5 * v_ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channels_have_zero_variance(dtype):
    x = np.zeros((50, 4, 30), dtype)
    x[:, 1] = 1e-30
    x[:, 2] = 7.25e4
    x[:, 3] = -1e-44 if dtype == np.float32 else -1e-320
    for xx, axis in ((x, 1), (np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1)):
        _, mean, m2 = channel_moments(xx, axis=axis)
        assert np.array_equal(m2, np.zeros(4))
        assert np.array_equal(mean, x[0, :, 0].astype(np.float64))
        y, _, inv = fastbn.batch_norm_forward(xx, axis=axis, eps=0.0)
        assert np.all(y == 0)


def _kernel_stats(x3, nt):
    O, C, I = x3.shape
    out = np.empty(2 * C)
    _kernels.channel_stats(x3, O, C, I, out, nt)
    return out


@pytest.mark.parametrize("case", ["ordinary", "outlier first", "std 3e18", "nan", "tiny"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_any_thread_count(rng, case, dtype):
    base = rng.standard_normal((40, 6, 2000))
    if case == "outlier first":
        base[0, :, 0] = 1e4
    elif case == "std 3e18":
        base *= 3e18
    elif case == "nan":
        base[7, 3, 11] = np.nan
    elif case == "tiny":
        base *= 1e-39 if dtype == np.float32 else 1e-300
    x = base.astype(dtype)
    for x3 in (x, np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, 6, 1)):
        ref = _kernel_stats(x3, 1)
        for nt in (1, 2, 3):
            got = _kernel_stats(x3, nt)
            assert np.array_equal(got.view(np.uint64), ref.view(np.uint64)), nt
        stats = [np.empty(3 * 6) for _ in range(3)]
        ys = [np.empty_like(x3) for _ in range(3)]
        with np.errstate(all="ignore"):
            for nt in (1, 2, 3):
                _kernels.forward_train(x3, ys[nt - 1], x3.shape[0], 6, x3.shape[2], None, None,
                                       1e-5, False, stats[nt - 1], nt)
        for nt in (2, 3):
            assert np.array_equal(stats[nt - 1], stats[0], equal_nan=True)
            assert np.array_equal(ys[nt - 1], ys[0], equal_nan=True)
