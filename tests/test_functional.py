"""fastbn's kernels against the plain float64 NumPy reference, over dtypes, axes, layouts."""
import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref
from fastbn.functional import channel_moments, forward_with_stats

from conftest import TOL, rel_err

# (shape, axis): ragged sizes, C = 1, spatial 1x1, N = 2, ndim 2..5, first/middle/last axis
CASES = [
    ((97, 5), 1),
    ((97, 5), -1),
    ((2, 3), 1),
    ((101, 1), 1),
    ((13, 97), 0),
    ((4, 7, 13), 1),
    ((4, 7, 13), -1),
    ((3, 5, 1, 1), 1),
    ((2, 6, 9, 11), 1),
    ((2, 9, 11, 6), -1),
    ((2, 6, 9, 11), 2),
    ((2, 3, 4, 5, 6), 1),
    ((2, 3, 4, 5, 6), -1),
    ((2, 3, 4, 5, 6), 2),
    ((5, 3, 101), 1),
]
DTYPES = [np.float64, np.float32, np.float16]
LAYOUTS = ["C", "F", "strided", "permuted"]


def make(shape, dtype, layout, rng, offset=0.5, scale=2.0):
    """An array of `shape` in the given memory layout, values offset + scale * N(0, 1)."""
    if layout == "strided":
        # every other element along the last axis: no contiguous view exists, fastbn copies
        big = list(shape)
        big[-1] *= 2
        a = (offset + scale * rng.standard_normal(big)).astype(dtype)
        return a[..., ::2]
    a = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "permuted":
        # C-contiguous after a permutation of the axes (PyTorch's channels_last strides)
        order = list(range(1, a.ndim)) + [0]
        return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))
    return a


def channel_params(C, rng):
    return rng.standard_normal(C), rng.standard_normal(C)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_train_matches_reference(shape, axis, dtype, layout, rng):
    x = make(shape, dtype, layout, rng)
    C = shape[axis]
    w, b = channel_params(C, rng)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, eps=1e-3)
    ry, rmean, rvar, rinv = ref.forward(x, w, b, axis=axis, eps=1e-3)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.shape == (C,) and invstd.shape == (C,)
    stat_tol = 1e-12 if dtype == np.float64 else 1e-6
    assert rel_err(mean, rmean) < stat_tol
    assert rel_err(invstd, rinv) < stat_tol
    assert rel_err(y, ry) < TOL[dtype]


@pytest.mark.parametrize("layout", ["C", "permuted"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_eval_matches_reference(shape, axis, dtype, layout, rng):
    x = make(shape, dtype, layout, rng)
    C = shape[axis]
    w, b = channel_params(C, rng)
    rm = rng.standard_normal(C)
    rv = rng.uniform(0.5, 2.0, C)
    y = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=False, axis=axis, eps=1e-4)
    ry, *_ = ref.forward(x, w, b, axis=axis, eps=1e-4, mean=rm, var=rv)
    assert y.dtype == x.dtype
    assert rel_err(y, ry) < TOL[dtype]


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_matches_reference(shape, axis, dtype, layout, training, activation, rng):
    x = make(shape, dtype, layout, rng)
    C = shape[axis]
    w, b = channel_params(C, rng)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, activation=activation)
    dy = make(shape, dtype, "C", rng, offset=0.0, scale=1.0)
    kw = dict(axis=axis, training=training)
    if activation:
        kw.update(activation="relu", y=y)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, **kw)
    rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, axis=axis, training=training,
                                 y=y if activation else None)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    tol = TOL[dtype] * (5 if dtype == np.float32 else 1)
    g = np.abs(dy.astype(np.float64))
    dx_scale = np.max(np.abs(w)) * np.max(invstd) * np.max(g)
    assert rel_err(dx, rdx, dx_scale) < tol
    # dweight sums g * x_hat, dbias sums g: both can cancel, so scale by the summed magnitudes
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    xhat = ref.forward(x, axis=axis, eps=1e-5)[0]
    assert rel_err(dw, rdw, np.max(np.sum(g * np.abs(xhat), axis=red))) < tol
    assert rel_err(db, rdb, np.max(np.sum(g, axis=red))) < tol


def test_outputs_follow_input_layout(rng):
    x = make((4, 6, 5, 7), np.float32, "permuted", rng)
    y, _, _ = fastbn.batch_norm_forward(x)
    assert np.argsort(y.strides).tolist() == np.argsort(x.strides).tolist()
    xf = make((4, 6, 5, 7), np.float64, "F", rng)
    yf, _, _ = fastbn.batch_norm_forward(xf)
    assert yf.flags.f_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_argument_and_in_place(dtype, rng):
    x = make((6, 4, 9), dtype, "C", rng)
    w, b = channel_params(4, rng)
    expected, _, _ = fastbn.batch_norm_forward(x, w, b)
    out = np.empty_like(x)
    y, _, _ = fastbn.batch_norm_forward(x, w, b, out=out)
    assert y is out and np.array_equal(out, expected)
    # an out of another layout is filled correctly too
    out_f = np.asfortranarray(np.empty_like(x))
    fastbn.batch_norm_forward(x, w, b, out=out_f)
    assert np.array_equal(out_f, expected)
    # in place
    xi = x.copy()
    y, _, _ = fastbn.batch_norm_forward(xi, w, b, out=xi)
    assert y is xi and np.array_equal(xi, expected)
    # eval, in place
    xi = x.copy()
    rm, rv = np.zeros(4), np.ones(4)
    y = fastbn.batch_norm(xi, rm, rv, w, b, training=False, out=xi)
    ry, *_ = ref.forward(x, w, b, mean=rm, var=rv)
    assert y is xi and rel_err(xi, ry) < TOL[dtype]


def test_out_overlapping_input_is_safe(rng):
    # out is a shifted view of the same buffer as x: fastbn must not read what it wrote
    buf = rng.standard_normal((10, 3, 8))
    x = buf[:8]
    out = buf[2:]
    expected, _, _ = fastbn.batch_norm_forward(x.copy())
    fastbn.batch_norm_forward(x, out=out)
    assert np.array_equal(buf[2:], expected)


def test_float16_out(rng):
    x = make((8, 3, 5), np.float16, "C", rng)
    out = np.empty_like(x)
    y, _, _ = fastbn.batch_norm_forward(x, out=out)
    ry, *_ = ref.forward(x)
    assert y is out and out.dtype == np.float16 and rel_err(out, ry) < TOL[np.float16]


def test_weight_bias_optional_and_any_float_dtype(rng):
    x = make((9, 4, 3), np.float32, "C", rng)
    w32, b32 = (a.astype(np.float32) for a in channel_params(4, rng))
    y1, _, _ = fastbn.batch_norm_forward(x, w32, b32)
    ry, *_ = ref.forward(x, w32, b32)
    assert rel_err(y1, ry) < TOL[np.float32]
    y2, _, _ = fastbn.batch_norm_forward(x)
    ry2, *_ = ref.forward(x)
    assert rel_err(y2, ry2) < TOL[np.float32]
    # array-likes for the per-channel parameters
    y3, _, _ = fastbn.batch_norm_forward(x, list(w32), tuple(b32))
    assert np.array_equal(y3, y1)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0])
def test_running_stats_update(momentum, rng):
    x = make((7, 3, 11), np.float64, "C", rng)
    rm0, rv0 = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    rm, rv = rm0.copy(), rv0.copy()
    fastbn.batch_norm(x, rm, rv, None, None, training=True, momentum=momentum)
    xm = x.mean(axis=(0, 2))
    xv = x.var(axis=(0, 2), ddof=1)  # unbiased, as PyTorch's running variance
    np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * xm, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(rv, (1 - momentum) * rv0 + momentum * xv, rtol=1e-13, atol=1e-15)


def test_running_stats_float32_buffers(rng):
    x = make((7, 3, 11), np.float32, "C", rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fastbn.batch_norm(x, rm, rv, None, None, training=True, momentum=0.1)
    assert rm.dtype == np.float32
    xd = x.astype(np.float64)
    np.testing.assert_allclose(rm, 0.1 * xd.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * xd.var(axis=(0, 2), ddof=1), rtol=1e-6)


def test_channel_moments(rng):
    x = make((5, 4, 33), np.float32, "C", rng, offset=100.0)
    n, mean, m2 = channel_moments(x)
    xd = x.astype(np.float64)
    assert n == 5 * 33
    # float32 values: differences from the shift are squared and summed in short float blocks
    # (a few roundings of 6e-8 each), then in double; float64 data is summed in double only.
    assert rel_err(mean, xd.mean(axis=(0, 2))) < 1e-9
    assert rel_err(m2, ((xd - xd.mean(axis=(0, 2))[None, :, None]) ** 2).sum(axis=(0, 2))) < 1e-6
    x64 = make((5, 4, 33), np.float64, "C", rng, offset=100.0)
    n, mean, m2 = channel_moments(x64)
    assert rel_err(mean, x64.mean(axis=(0, 2))) < 1e-14
    assert rel_err(m2, ((x64 - x64.mean(axis=(0, 2))[None, :, None]) ** 2).sum(axis=(0, 2))) < 1e-12
    n0, mean0, m20 = channel_moments(np.empty((0, 4)))
    assert n0 == 0 and not mean0.any() and not m20.any()


def test_forward_with_stats_returns_biased_var(rng):
    x = make((6, 3, 7), np.float64, "C", rng)
    _, _, invstd, var, n = forward_with_stats(x, eps=0.0)
    assert n == 42
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x.var(axis=(0, 2))), rtol=1e-13)


def central_difference(f, x, h):
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 3), -1)])
def test_gradients_against_finite_differences(shape, axis, activation, rng):
    x = rng.standard_normal(shape)
    C = shape[axis]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    dy = rng.standard_normal(shape)

    def loss():
        y, _, _ = fastbn.batch_norm_forward(x, w, b, axis=axis, eps=1e-3, activation=activation)
        return float(np.sum(y * dy))

    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, eps=1e-3,
                                                activation=activation)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            activation=activation, y=y)
    h = 1e-6
    assert rel_err(dx, central_difference(loss, x, h)) < 1e-7
    assert rel_err(dw, central_difference(loss, w, h)) < 1e-7
    assert rel_err(db, central_difference(loss, b, h)) < 1e-7


def test_inference_gradient_against_finite_differences(rng):
    x = rng.standard_normal((4, 3, 5))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    dy = rng.standard_normal(x.shape)

    def loss():
        return float(np.sum(fastbn.batch_norm(x, rm, rv, w, b, training=False) * dy))

    invstd = 1 / np.sqrt(rv + 1e-5)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, rm, invstd, w, training=False)
    assert rel_err(dx, central_difference(loss, x, 1e-6)) < 1e-7
    assert rel_err(dw, central_difference(loss, w, 1e-6)) < 1e-7
    assert rel_err(db, central_difference(loss, b, 1e-6)) < 1e-7
