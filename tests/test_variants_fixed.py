"""Issue 18, frozen statistics with gradients (Chainer's fixed_batch_normalization)."""
import numpy as np
import pytest

from fastbn.functional import fixed_batch_norm, fixed_batch_norm_backward

from conftest import numerical_gradient


def ref(x, mean, var, w, b, eps, axis=1):
    """Independent float64 forward."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    r = lambda a: np.asarray(a, np.float64).reshape(shape)  # noqa: E731
    return (x.astype(np.float64) - r(mean)) / np.sqrt(r(var) + eps) * r(w) + r(b)


def case(dtype=np.float64, shape=(5, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    return (x, rng.standard_normal(C), rng.uniform(0.5, 2, C), rng.uniform(0.5, 2, C),
            rng.standard_normal(C), rng.standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_forward_matches_reference(dtype, tol):
    x, m, v, w, b, _ = case(dtype)
    y = fixed_batch_norm(x, m, v, w, b, eps=1e-3)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref(x, m, v, w, b, 1e-3), atol=tol * 10, rtol=tol)


def test_backward_matches_finite_differences():
    x, m, v, w, b, dy = case()
    eps = 1e-3
    dx, dm, dv, dw, db = fixed_batch_norm_backward(dy, x, m, v, w, eps=eps)
    loss = lambda x, m, v, w, b: float((ref(x, m, v, w, b, eps) * dy).sum())  # noqa: E731
    args = [x, m, v, w, b]
    for k, got in enumerate([dx, dm, dv, dw, db]):
        num = numerical_gradient(loss, args, k, 1e-6)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-7, err_msg=f"argument {k}")


def test_float32_backward_within_tolerance_and_channels_last():
    x, m, v, w, b, dy = case(np.float32, (4, 5, 5, 3))
    # axis=-1: C = 3
    m, v, w = m[:3], v[:3], w[:3]
    dx, dm, dv, dw, db = fixed_batch_norm_backward(dy, x, m, v, w, axis=-1)
    d64 = fixed_batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), m, v, w,
                                    axis=-1)
    for a, r in zip((dx, dm, dv, dw, db), d64):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    assert dx.dtype == np.float32 and dw.dtype == np.float32


def test_no_weight_means_gamma_one():
    x, m, v, _w, _b, dy = case()
    np.testing.assert_array_equal(fixed_batch_norm(x, m, v),
                                  fixed_batch_norm(x, m, v, np.ones(3), np.zeros(3)))
    a = fixed_batch_norm_backward(dy, x, m, v)
    r = fixed_batch_norm_backward(dy, x, m, v, np.ones(3))
    for p, q in zip(a, r):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(var=np.ones(2)), ValueError, "var"),
    (dict(mean=None), TypeError, "mean"),
    (dict(weight=np.ones((3, 1))), ValueError, "weight"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(var=np.ones(3, np.int64)), TypeError, "var"),
])
def test_bad_arguments_named(kw, exc, name):
    x, m, v, w, b, dy = case()
    args = dict(mean=m, var=v, weight=w, eps=1e-5) | kw
    with pytest.raises(exc, match=name):
        fixed_batch_norm(x, **args)
    with pytest.raises(exc, match=name):
        fixed_batch_norm_backward(dy, x, **args)
