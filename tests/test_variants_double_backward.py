"""Issue 18, double backward: the gradient of batch_norm_backward (PyTorch, Chainer)."""
import numpy as np
import pytest

from fastbn.functional import batch_norm_double_backward

from conftest import numerical_gradient


def first_backward(dy, x, w, eps, training, mean=None, var=None):
    """Independent float64 first backward (N, C, L), statistics from x when training."""
    if training:
        mean = x.mean(axis=(0, 2))
        var = ((x - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    s = (1 / np.sqrt(var + eps))[None, :, None]
    xh = (x - mean[None, :, None]) * s
    n = x.shape[0] * x.shape[2]
    db, dw = dy.sum(axis=(0, 2)), (dy * xh).sum(axis=(0, 2))
    if training:
        dx = w[None, :, None] * s * (dy - db[None, :, None] / n - xh * dw[None, :, None] / n)
    else:
        dx = w[None, :, None] * s * dy
    return dx, dw, db


def case(seed=0, shape=(4, 3, 5)):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.standard_normal(shape) * 1.5 + 0.7
    return (x, rng.standard_normal(shape), rng.uniform(0.5, 2, C), rng.standard_normal(shape),
            rng.standard_normal(C), rng.standard_normal(C))


def stats(x, eps):
    mean = x.mean(axis=(0, 2))
    var = ((x - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    return mean, 1 / np.sqrt(var + eps), var


@pytest.mark.parametrize("training", [True, False])
def test_matches_finite_differences_of_the_first_backward(training):
    x, dy, w, ddx, ddw, ddb = case()
    eps = 1e-3
    mean, invstd, var = stats(x, eps)
    ddy, dx, dweight = batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w,
                                                  training=training)

    def loss(dy, x, w):
        a, b, c = first_backward(dy, x, w, eps, training, mean, var)
        return float((a * ddx).sum() + (b * ddw).sum() + (c * ddb).sum())

    args = [dy, x, w]
    for k, got in enumerate([ddy, dx, dweight]):
        num = numerical_gradient(loss, args, k, 1e-5)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-7, err_msg=f"argument {k}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("none", [(), ("ddx",), ("ddw", "ddb"), ("w",)])
def test_matches_torch_create_graph(training, none):
    torch = pytest.importorskip("torch")
    x, dy, w, ddx, ddw, ddb = case(1, (3, 4, 6))
    ddx, ddw, ddb, w = (None if k in none else a for k, a in
                        (("ddx", ddx), ("ddw", ddw), ("ddb", ddb), ("w", w)))
    eps = 1e-5
    xt = torch.tensor(x, requires_grad=True)
    dyt = torch.tensor(dy, requires_grad=True)
    wt = torch.tensor(np.ones(4) if w is None else w, requires_grad=True)
    rm, rv = torch.tensor(x.mean(axis=(0, 2))), torch.tensor(x.var(axis=(0, 2)))
    y = torch.nn.functional.batch_norm(xt, rm, rv, wt, torch.zeros(4, dtype=torch.float64),
                                       training=training, eps=eps)
    outs = torch.autograd.grad(y, (xt, wt), dyt, create_graph=True)
    gx, gw = outs
    gb = dyt.sum(dim=(0, 2))
    total = sum(((g * torch.tensor(a)).sum() for g, a in ((gx, ddx), (gw, ddw), (gb, ddb))
                 if a is not None), torch.zeros((), dtype=torch.float64))
    tddy, tdx, tdw = torch.autograd.grad(total, (dyt, xt, wt), allow_unused=True)
    if training:
        mean, invstd, _ = stats(x, eps)
    else:
        mean, invstd = rm.numpy(), 1 / np.sqrt(rv.numpy() + eps)
    ddy, dx, dweight = batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w,
                                                  training=training)
    for ours, theirs in ((ddy, tddy), (dx, tdx), (dweight, tdw)):
        ref = np.zeros_like(ours) if theirs is None else theirs.detach().numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-10)


def test_float32_and_layout():
    x, dy, w, ddx, ddw, ddb = case(2, (4, 3, 5))
    mean, invstd, _ = stats(x, 1e-5)
    r = batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w)
    f = lambda a: a.astype(np.float32)  # noqa: E731
    got = batch_norm_double_backward(f(ddx), ddw, ddb, f(dy), f(x), mean, invstd, w)
    for a, b in zip(got, r):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    # channels-last (axis=-1) gives the transposed result
    t = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))  # noqa: E731
    got = batch_norm_double_backward(t(ddx), ddw, ddb, t(dy), t(x), mean, invstd, w, axis=-1)
    np.testing.assert_allclose(got[0], t(r[0]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], t(r[1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw, exc, name", [(dict(ddx=np.ones((2, 3))), ValueError, "ddx"),
                                           (dict(ddweight=np.ones(2)), ValueError, "ddweight"),
                                           (dict(training="yes"), TypeError, "training")])
def test_bad_arguments_named(kw, exc, name):
    x, dy, w, ddx, ddw, ddb = case()
    mean, invstd, _ = stats(x, 1e-5)
    args = dict(ddx=ddx, ddweight=ddw, ddbias=ddb) | kw
    training = args.pop("training", True)
    with pytest.raises(exc, match=name):
        batch_norm_double_backward(args["ddx"], args["ddweight"], args["ddbias"], dy, x, mean,
                                   invstd, w, training=training)
