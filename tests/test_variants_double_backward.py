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


def _reference(ddx, ddw, ddb, dy, x, w, training, eps=1e-5):
    """The float64 result on (N, C, L) arrays (the kernels' results are compared against it)."""
    mean, invstd, _ = stats(x, eps)
    return mean, invstd, batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w,
                                                    training=training)


@pytest.mark.parametrize("shape", [(5, 7, 37), (64, 9, 1), (3, 130, 2), (2, 3, 1000)])
@pytest.mark.parametrize("training", [True, False])
def test_float32_kernels_match_float64_over_vector_tails(shape, training):
    """Odd extents exercise the kernels' vector tails and both walk orders (I = 1: rows)."""
    x, dy, w, ddx, ddw, ddb = case(3, shape)
    mean, invstd, ref = _reference(ddx, ddw, ddb, dy, x, w, training)
    f = lambda a: a.astype(np.float32)  # noqa: E731
    got = batch_norm_double_backward(f(ddx), ddw, ddb, f(dy), f(x), mean, invstd, w,
                                     training=training)
    for name, a, b in zip(("ddy", "dx", "dweight"), got, ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * np.abs(b).max(), err_msg=name)


def test_float64_matches_torch_on_a_larger_batch():
    """The kernels' float64 path against PyTorch beyond the tiny cases above (N*L = 294)."""
    torch = pytest.importorskip("torch")
    x, dy, w, ddx, ddw, ddb = case(4, (6, 5, 49))
    xt, dyt = torch.tensor(x, requires_grad=True), torch.tensor(dy, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, wt, torch.zeros(5, dtype=torch.float64),
                                       training=True, eps=1e-5)
    gx, gw = torch.autograd.grad(y, (xt, wt), dyt, create_graph=True)
    total = ((gx * torch.tensor(ddx)).sum() + (gw * torch.tensor(ddw)).sum()
             + (dyt.sum(dim=(0, 2)) * torch.tensor(ddb)).sum())
    theirs = torch.autograd.grad(total, (dyt, xt, wt))
    mean, invstd, ours = _reference(ddx, ddw, ddb, dy, x, w, True)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-9, atol=1e-10)


def test_inputs_in_different_layouts_and_byte_orders():
    """dy Fortran-ordered, ddx a channels-last-strided view, x big-endian: one answer."""
    x, dy, w, ddx, ddw, ddb = case(5, (4, 6, 10))
    mean, invstd, ref = _reference(ddx, ddw, ddb, dy, x, w, True)
    cl = np.ascontiguousarray(np.moveaxis(ddx, 1, -1))
    got = batch_norm_double_backward(np.moveaxis(cl, -1, 1), ddw, ddb, np.asfortranarray(dy),
                                     x.astype(">f8"), mean, invstd, w)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_float16_is_computed_in_float32():
    x, dy, w, ddx, ddw, ddb = case(6, (4, 3, 9))
    h = lambda a: a.astype(np.float16)  # noqa: E731
    x, dy, ddx = h(x), h(dy), h(ddx)
    up = lambda a: a.astype(np.float64)  # noqa: E731
    mean, invstd, ref = _reference(up(ddx), ddw, ddb, up(dy), up(x), w, True)
    ddy, dx, dweight = batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w)
    assert (ddy.dtype, dx.dtype, dweight.dtype) == (np.float16, np.float16, np.float32)
    for a, b in zip((ddy, dx, dweight), ref):
        np.testing.assert_allclose(up(a), b, rtol=3e-3, atol=3e-3 * np.abs(b).max())


def test_results_do_not_depend_on_the_thread_count():
    import fastbn
    x, dy, w, ddx, ddw, ddb = (a.astype(np.float32) if a.ndim == 3 else a
                               for a in case(7, (8, 33, 300)))
    mean, invstd, _ = stats(x.astype(np.float64), 1e-5)
    try:
        fastbn.set_num_threads(1)
        one = batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w)
        fastbn.set_num_threads(2)
        two = batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean, invstd, w)
    finally:
        fastbn.set_num_threads(None)
    for a, b in zip(one, two):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_zero_gradients(training):
    """No values (as the first backward allows, following PyTorch): zeros of the right shapes."""
    z = np.zeros((0, 3, 4))
    ddy, dx, dweight = batch_norm_double_backward(z, None, None, z, z, np.zeros(3), np.ones(3),
                                                  training=training)
    assert ddy.shape == dx.shape == z.shape and np.array_equal(dweight, np.zeros(3))


def test_one_value_per_channel_is_refused_when_training():
    one = np.ones((1, 3, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_double_backward(one, None, None, one, one, np.zeros(3), np.ones(3))
