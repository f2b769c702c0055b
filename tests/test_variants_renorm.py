"""Issue 18, batch renormalization (Ioffe 2017) as Keras's renorm=True follows it."""
import numpy as np
import pytest

import fastbn
from fastbn.functional import batch_renorm_backward, batch_renorm_forward

from conftest import numerical_gradient


def ref_forward(x, rmean, rstd, w, b, eps, rmax=None, rmin=None, dmax=None, r=None, d=None):
    """Independent float64 reference (NCL layout), Keras's formulas; r, d given: held fixed."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2))
    var = ((x - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    std = np.sqrt(var + eps)
    ref = np.maximum(rstd, np.sqrt(eps))
    if r is None:
        r = std / ref
        d = (mean - rmean) / ref
        r = np.clip(r, 0 if rmin is None else rmin, np.inf if rmax is None else rmax)
        d = np.clip(d, -np.inf if dmax is None else -dmax, np.inf if dmax is None else dmax)
    xhat = (x - mean[None, :, None]) / std[None, :, None]
    y = w[None, :, None] * (xhat * r[None, :, None] + d[None, :, None]) + b[None, :, None]
    return y, mean, var, r, d


def case(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((6, 3, 5)) * [[[1.0], [3.0], [0.2]]] + 2.0).astype(dtype)
    return (x, rng.standard_normal(3) * 0.5, rng.uniform(0.5, 2.0, 3), rng.uniform(0.5, 2, 3),
            rng.standard_normal(3), rng.standard_normal(x.shape).astype(dtype))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("clip", [dict(), dict(rmax=1.5, rmin=1 / 1.5, dmax=0.5),
                                  dict(rmax=1.1, dmax=0.0)])
def test_forward_matches_reference(dtype, tol, clip):
    x, rm, rs, w, b, _ = case(dtype)
    y, mean, invstd, r, d = batch_renorm_forward(x, rm, rs, w, b, eps=1e-3, **clip)
    yr, mr, vr, rr, dr = ref_forward(x, rm, rs, w, b, 1e-3, **clip)
    np.testing.assert_allclose(y, yr, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(r, rr, rtol=tol)
    np.testing.assert_allclose(d, dr, rtol=tol, atol=tol)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(vr + 1e-3), rtol=tol)
    assert y.dtype == dtype


def test_backward_is_the_gradient_with_r_d_constant():
    x, rm, rs, w, b, dy = case()
    eps = 1e-3
    _y, mean, invstd, r, d = batch_renorm_forward(x, rm, rs, w, b, eps=eps, rmax=1.2, dmax=0.3)
    dx, dw, db = batch_renorm_backward(dy, x, mean, invstd, r, d, w)
    loss = lambda x, w, b: float((ref_forward(x, rm, rs, w, b, eps, r=r, d=d)[0] * dy).sum())  # noqa: E731,E501
    args = [x, w, b]
    for k, got in enumerate([dx, dw, db]):
        num = numerical_gradient(loss, args, k, 1e-6)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-7)


def test_unclipped_with_reference_equal_to_batch_is_plain_batch_norm():
    x, _rm, _rs, w, b, dy = case()
    y0, m0, s0 = fastbn.batch_norm_forward(x, w, b, eps=0.0)
    y, mean, invstd, r, d = batch_renorm_forward(x, m0, 1 / s0, w, b, eps=0.0)
    np.testing.assert_allclose(r, 1.0, rtol=1e-14)
    np.testing.assert_allclose(y, y0, atol=1e-12)


def test_layer_follows_keras_updates_and_eval():
    x, *_ = case(np.float32)
    clip = dict(rmax=2.0, rmin=0.5, dmax=1.0)
    bn = fastbn.BatchNorm(3, renorm=True, renorm_clipping=clip, renorm_momentum=0.9)
    rm0, rs0 = bn.renorm_mean.copy(), bn.renorm_std.copy()
    y = bn(x)
    yr, mean, var, r, d = ref_forward(x, rm0.astype(np.float64), rs0.astype(np.float64),
                                      np.ones(3), np.zeros(3), 1e-5, **clip)
    np.testing.assert_allclose(y, yr, atol=1e-5)
    np.testing.assert_allclose(bn.renorm_mean, 0.9 * rm0 + 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(bn.renorm_std, 0.9 * rs0 + 0.1 * np.sqrt(var + 1e-5), rtol=1e-6)
    n = x.size // 3  # running statistics: PyTorch's rule, unchanged
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6)
    dy = np.ones_like(y)
    dx = bn.backward(dy)
    dx_r, dw_r, db_r = batch_renorm_backward(dy, x, *fastbn.batch_norm_forward(x)[1:], r, d,
                                             np.ones(3, np.float32))
    np.testing.assert_allclose(dx, dx_r, atol=1e-6)
    np.testing.assert_allclose(bn.grad_weight, dw_r, rtol=1e-5, atol=1e-5)
    assert {"renorm_mean", "renorm_std"} <= set(bn.state_dict())
    other = fastbn.BatchNorm(3, renorm=True)
    other.load_state_dict(bn.state_dict())
    np.testing.assert_array_equal(other.renorm_std, bn.renorm_std)
    # eval: r = 1, d = 0: plain batch norm with the running statistics
    bn.eval()
    np.testing.assert_array_equal(bn(x), _eval_plain(bn, x))


def _eval_plain(bn, x):
    plain = fastbn.BatchNorm(3)
    plain.load_state_dict({k: v for k, v in bn.state_dict().items() if not k.startswith("renorm")})
    return plain.eval()(x)


def test_layer_relu_masks_the_backward():
    x, *_ = case(np.float64)
    bn = fastbn.BatchNorm(3, renorm=True, activation="relu", dtype=np.float64)
    plain = fastbn.BatchNorm(3, renorm=True, dtype=np.float64)
    y = bn(x)
    y0 = plain(x)
    np.testing.assert_array_equal(y, np.maximum(y0, 0))
    dy = np.ones_like(y)
    np.testing.assert_allclose(bn.backward(dy), plain.backward(np.where(y0 > 0, dy, 0)))


@pytest.mark.parametrize("kw, exc, name", [
    (dict(renorm_clipping={"rmax": -1.0}), ValueError, "rmax"),
    (dict(renorm_clipping={"rmin": 2.0, "rmax": 1.0}), ValueError, "rmin"),
    (dict(renorm_clipping={"dmin": 1.0}), ValueError, "renorm_clipping"),
    (dict(renorm_clipping=[1.0]), TypeError, "renorm_clipping"),
    (dict(renorm_momentum=1.5), ValueError, "renorm_momentum"),
    (dict(renorm="yes"), TypeError, "renorm"),
])
def test_bad_options_named(kw, exc, name):
    with pytest.raises(exc, match=name):
        fastbn.BatchNorm(3, renorm=kw.pop("renorm", True), **kw)


def test_bad_functional_arguments_named():
    x, rm, rs, w, b, dy = case()
    with pytest.raises(ValueError, match="renorm_std"):
        batch_renorm_forward(x, rm, np.zeros(3), eps=0.0)
    with pytest.raises(ValueError, match="renorm_mean"):
        batch_renorm_forward(x, rm[:2], rs)
    with pytest.raises(TypeError, match="dmax"):
        batch_renorm_forward(x, rm, rs, dmax="1")
    with pytest.raises(ValueError, match="r"):
        batch_renorm_backward(dy, x, rm, rs, np.ones(2), np.zeros(3))
