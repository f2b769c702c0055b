"""fastbn against PyTorch's CPU batch norm on the same inputs (skipped without PyTorch)."""
import numpy as np
import pytest

import fastbn

from conftest import rel_err

torch = pytest.importorskip("torch", reason="PyTorch is an optional reference: pip install torch==2.13.0")

SHAPES = [(8, 5), (6, 4, 17), (4, 6, 9, 7), (2, 3, 4, 5, 6), (2, 3, 1, 1)]


def to_torch(a, channels_last):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if channels_last and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif channels_last and t.ndim == 5:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def fastbn_view(a, channels_last):
    """The same data as fastbn sees it: NCHW, or channels-last memory with axis=-1."""
    if channels_last and a.ndim >= 3:
        order = (0,) + tuple(range(2, a.ndim)) + (1,)
        return np.ascontiguousarray(a.transpose(order)), -1, order
    return a, 1, None


def back(a, order):
    return a if order is None else a.transpose(np.argsort(order))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_batch_norm_and_backward(shape, dtype, channels_last):
    rng = np.random.default_rng(3)
    x = (1.5 + 2 * rng.standard_normal(shape)).astype(dtype)
    C = shape[1]
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx, tdy = to_torch(x, channels_last), to_torch(dy, channels_last)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    rm, rv = torch.zeros(C, dtype=tw.dtype), torch.ones(C, dtype=tw.dtype)
    ty, tmean, tinv = torch.ops.aten.native_batch_norm(tx, tw, tb, rm, rv, True, 0.1, 1e-5)
    tdx, tdw, tdb = torch.ops.aten.native_batch_norm_backward(
        tdy, tx, tw, rm, rv, tmean, tinv, True, 1e-5, [True, True, True])

    fx, axis, order = fastbn_view(x, channels_last)
    fdy = fastbn_view(dy, channels_last)[0]
    y, mean, invstd = fastbn.batch_norm_forward(fx, w, b, axis=axis)
    dx, dw, db = fastbn.batch_norm_backward(fdy, fx, mean, invstd, w, axis=axis)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert rel_err(back(y, order), ty.numpy()) < tol
    assert rel_err(mean, tmean.numpy()) < tol
    assert rel_err(invstd, tinv.numpy()) < tol
    scale = np.abs(w).max() * invstd.max() * np.abs(dy).max()
    assert rel_err(back(dx, order), tdx.numpy(), scale) < tol
    n = x.size // C
    assert rel_err(dw, tdw.numpy(), n * np.abs(dy).max() * 3) < tol
    assert rel_err(db, tdb.numpy(), n * np.abs(dy).max()) < tol
    # running statistics as updated by native_batch_norm (unbiased variance, momentum 0.1)
    frm, frv = np.zeros(C, dtype), np.ones(C, dtype)
    fastbn.batch_norm(fx, frm, frv, w, b, training=True, momentum=0.1, axis=axis)
    assert rel_err(frm, rm.numpy()) < tol
    assert rel_err(frv, rv.numpy()) < tol


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_functional_batch_norm_steps(channels_last, momentum):
    import torch.nn.functional as tF

    rng = np.random.default_rng(4)
    shape, C = (5, 3, 6, 7), 3
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(5):
        x = rng.standard_normal(shape) * (step + 1) + step
        fx, axis, order = fastbn_view(x, channels_last)
        y = fastbn.batch_norm(fx, rm, rv, w, b, training=True, momentum=momentum, axis=axis)
        ty = tF.batch_norm(to_torch(x, channels_last), trm, trv, torch.from_numpy(w),
                           torch.from_numpy(b), training=True, momentum=momentum)
        assert rel_err(back(y, order), ty.numpy()) < 1e-12
        assert rel_err(rm, trm.numpy()) < 1e-12 and rel_err(rv, trv.numpy()) < 1e-12
    ye = fastbn.batch_norm(fx, rm, rv, w, b, training=False, axis=axis)
    tye = tF.batch_norm(to_torch(x, channels_last), trm, trv, torch.from_numpy(w),
                        torch.from_numpy(b), training=False)
    assert rel_err(back(ye, order), tye.numpy()) < 1e-12


def test_relu_fused_matches_torch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 5, 5))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal(x.shape)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    tb = torch.from_numpy(b).requires_grad_()
    ty = torch.relu(torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True))
    ty.backward(torch.from_numpy(dy))
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, activation="relu")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, activation="relu", y=y)
    assert rel_err(y, ty.detach().numpy()) < 1e-12
    assert rel_err(dx, tx.grad.numpy()) < 1e-11
    assert rel_err(dw, tw.grad.numpy()) < 1e-11
    assert rel_err(db, tb.grad.numpy()) < 1e-11


# torch.nn.functional.batch_norm calls as a PyTorch user writes them, run verbatim against both
# libraries: the names F, x, rm, rv, w, b are bound to torch (tensors) or fastbn (arrays).
PORTED_CALLS = [
    "F.batch_norm(x, rm, rv)",
    "F.batch_norm(x, rm, rv, w, b)",
    "F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)",
    "F.batch_norm(x, rm, rv, w, b, True)",
    "F.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-3)",
    "F.batch_norm(x, rm, rv, weight=w, bias=b, training=True, momentum=0.2)",
    "F.batch_norm(x, None, None, w, b, True)",
    "F.batch_norm(x, None, None, training=True)",
    "F.batch_norm(x, rm, rv, None, b, training=True, eps=1e-3)",
    "F.batch_norm(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True)",
]


@pytest.mark.parametrize("call", PORTED_CALLS)
def test_torch_functional_calls_port_verbatim(call):
    rng = np.random.default_rng(11)
    x = (2.0 + 3.0 * rng.standard_normal((6, 4, 5))).astype(np.float32)
    w, b = rng.uniform(0.5, 2.0, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    rm, rv = rng.standard_normal(4).astype(np.float32), rng.uniform(0.5, 2.0, 4).astype(np.float32)
    ours = dict(F=fastbn, x=x, w=w, b=b, rm=rm.copy(), rv=rv.copy())
    theirs = dict(F=torch.nn.functional, x=torch.from_numpy(x), w=torch.from_numpy(w),
                  b=torch.from_numpy(b), rm=torch.from_numpy(rm.copy()),
                  rv=torch.from_numpy(rv.copy()))
    y = eval(call, {}, ours)
    ty = eval(call, {}, theirs)
    assert isinstance(y, np.ndarray) and y.shape == tuple(ty.shape)
    assert rel_err(y, ty.numpy()) < 1e-5, call
    for k in ("rm", "rv"):
        assert rel_err(ours[k], theirs[k].numpy()) < 1e-5, (call, k)


def test_the_old_fastbn_order_is_not_silently_accepted():
    # fastbn 0.1's (x, weight, bias, running_mean, running_var) read as torch's order: the
    # default training=False normalises with what it takes for the running statistics, and
    # matches torch called the same way, rather than training on them.
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    a = [rng.uniform(0.5, 2, 4).astype(np.float32) for _ in range(4)]
    y = fastbn.batch_norm(x, *a)
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), *map(torch.from_numpy, a))
    assert rel_err(y, ty.numpy()) < 1e-6
