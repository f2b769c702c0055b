"""Several feature axes (Chainer's reduced axes, Keras 2's list of axes): gamma, beta and the
statistics shaped over more than one axis, on the functional API and the layer."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F


def _x(shape=(6, 3, 4, 5), seed=0, dtype=np.float64):
    return (1.0 + 2.0 * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def _reference(x, axes, w=None, b=None, eps=1e-5):
    red = tuple(i for i in range(x.ndim) if i not in axes)
    m = x.mean(axis=red, keepdims=True)
    v = ((x - m) ** 2).mean(axis=red, keepdims=True)
    y = (x - m) / np.sqrt(v + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y, m.reshape([x.shape[a] for a in axes]), v.reshape([x.shape[a] for a in axes])


@pytest.mark.parametrize("axes", [(1, 2), (2, 1), (1, 3), (2, 3), (0, 3), (-3, -1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_matches_the_float64_reference(axes, dtype):
    x = _x(dtype=dtype)
    norm = tuple(sorted(a % x.ndim for a in axes))
    fshape = tuple(x.shape[a] for a in norm)
    r = np.random.default_rng(1)
    w, b = r.uniform(0.5, 2, fshape), r.standard_normal(fshape)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axes)
    ry, rm, rv = _reference(x.astype(np.float64), norm, w, b)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert y.dtype == dtype and y.shape == x.shape and mean.shape == fshape
    np.testing.assert_allclose(y, ry, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(mean, rm, rtol=tol, atol=tol)
    np.testing.assert_allclose(1 / invstd**2 - 1e-5, rv, rtol=tol * 10, atol=tol)
    n, m2mean, m2 = F.channel_moments(x, axis=axes)
    np.testing.assert_allclose(m2 / n, rv, rtol=tol * 10)


def test_backward_is_the_merged_single_axis_backward():
    x = _x()
    w = np.random.default_rng(2).uniform(0.5, 2, (3, 4))
    dy = np.cos(x)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, axis=(1, 2))
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=(1, 2))
    xm, dym = x.reshape(6, 12, 5), dy.reshape(6, 12, 5)
    _y, m1, i1 = fastbn.batch_norm_forward(xm, w.ravel())
    dx1, dw1, db1 = fastbn.batch_norm_backward(dym, xm, m1, i1, w.ravel())
    assert np.array_equal(dx, dx1.reshape(x.shape))
    assert np.array_equal(dw, dw1.reshape(3, 4)) and np.array_equal(db, db1.reshape(3, 4))


def test_backward_matches_finite_differences_for_non_adjacent_axes():
    x = _x((5, 2, 3, 4))
    w = np.random.default_rng(3).uniform(0.5, 2, (2, 4))
    dy = np.random.default_rng(4).standard_normal(x.shape)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, axis=(1, 3))
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=(1, 3))[0]
    h = 1e-6
    for idx in [(0, 0, 0, 0), (3, 1, 2, 3), (4, 0, 1, 2)]:
        e = np.zeros_like(x)
        e[idx] = h
        f = lambda z: float(np.sum(fastbn.batch_norm_forward(z, w, axis=(1, 3))[0] * dy))  # noqa
        assert abs((f(x + e) - f(x - e)) / (2 * h) - dx[idx]) < 1e-6


def test_batch_norm_updates_running_statistics_of_the_feature_shape():
    x = _x()
    rm, rv = np.zeros((3, 4)), np.ones((3, 4))
    fortran = np.asfortranarray(np.zeros((3, 4))), np.asfortranarray(np.ones((3, 4)))
    fastbn.batch_norm(x, rm, rv, training=True, momentum=0.25, axis=(1, 2))
    fastbn.batch_norm(x, *fortran, training=True, momentum=0.25, axis=(1, 2))
    _ry, m, v = _reference(x, (1, 2))
    n = x.shape[0] * x.shape[3]
    np.testing.assert_allclose(rm, 0.25 * m, rtol=1e-12)
    np.testing.assert_allclose(rv, 0.75 + 0.25 * v * n / (n - 1), rtol=1e-12)
    assert np.array_equal(fortran[0], rm) and np.array_equal(fortran[1], rv)
    y = fastbn.batch_norm(x, rm, rv, axis=(1, 2))  # eval: the running statistics
    np.testing.assert_allclose(y, (x - rm[None, :, :, None]) / np.sqrt(rv[None, :, :, None]
                                                                       + 1e-5), rtol=1e-12)


def test_out_and_refusals():
    x = _x()
    out = np.empty_like(x)
    y = fastbn.batch_norm_forward(x, axis=(1, 2), out=out)[0]
    assert y is out
    with pytest.raises(ValueError, match=r"weight: expected shape \(3, 4\)"):
        fastbn.batch_norm_forward(x, np.ones((4, 3)), axis=(1, 2))
    with pytest.raises(ValueError, match="axis: expected distinct feature axes"):
        fastbn.batch_norm_forward(x, axis=(1, -3))
    with pytest.raises(ValueError, match="axis: expected fewer feature axes"):
        fastbn.batch_norm_forward(x, axis=(0, 1, 2, 3))
    with pytest.raises(TypeError, match="axis: expected an int"):
        fastbn.batch_norm_forward(x, axis=(1, 2.0))
    with pytest.raises(ValueError, match=r"axis: expected an int in \[-4, 3\]"):
        fastbn.batch_norm_forward(x, axis=(1, 7))
    with pytest.raises(TypeError, match="mean: expected an array"):
        F.normalize(x, None, np.ones((3, 4)), axis=(1, 2))


def test_the_layer_over_two_feature_axes_equals_one_over_the_merged_axis():
    x = _x(dtype=np.float32)
    a = fastbn.BatchNorm((3, 4), axis=(1, 2))
    b = fastbn.BatchNorm(12)
    for step in range(3):
        xs = x + step
        ya, yb = a(xs), b(xs.reshape(6, 12, 5))
        assert np.array_equal(ya, yb.reshape(x.shape))
        dy = np.sin(xs)
        assert np.array_equal(a.backward(dy), b.backward(dy.reshape(6, 12, 5)).reshape(x.shape))
    for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        assert np.array_equal(getattr(a, name).reshape(-1), getattr(b, name)), name
    a.eval()
    b.eval()
    assert np.array_equal(a(x), b(x.reshape(6, 12, 5)).reshape(x.shape))
    assert a.weight.shape == (3, 4) and a.state_dict()["running_var"].shape == (3, 4)
    c = fastbn.BatchNorm((3, 4), axis=(1, 2))
    c.load_state_dict(a.state_dict())
    assert np.array_equal(c.running_mean, a.running_mean)


def test_layer_refusals():
    with pytest.raises(ValueError, match="axis: expected a tuple of 2 feature axes"):
        fastbn.BatchNorm((3, 4), axis=1)
    with pytest.raises(ValueError, match="renorm: not supported with several feature axes"):
        fastbn.BatchNorm((3, 4), axis=(1, 2), renorm=True)
    bn = fastbn.BatchNorm((3, 4), axis=(1, 2))
    with pytest.raises(ValueError, match=r"x: expected \(3, 4\) features"):
        bn(_x((6, 4, 3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"weight: expected shape \(3, 4\)"):
        bn.weight = np.ones(12)
