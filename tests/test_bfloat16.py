"""bfloat16 input (ml_dtypes.bfloat16): accepted wherever float16 is, computed in float32,
returned as bfloat16.

References: float64 NumPy (fastbn._reference) on the very bfloat16 values, fastbn's own float64
path for the variants (itself tested against references elsewhere), and PyTorch's bfloat16
batch norm. Outputs are rounded once to bfloat16 (8 significant bits: a relative rounding of at
most 2**-9), so they are compared with rtol 2**-8; statistics (float64) and dweight/dbias
(float32) carry no bfloat16 rounding and are compared tightly. ml_dtypes stays optional: the
last test runs without it, in a subprocess that cannot import it.
"""
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _reference as R
from fastbn import functional as F

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - the test extra installs it
    ml_dtypes = BF16 = None

needs_ml_dtypes = pytest.mark.skipif(
    ml_dtypes is None, reason="ml_dtypes not installed (pip install ml_dtypes): NumPy has no "
    "bfloat16 without it")

RTOL = 2.0 ** -8  # one bfloat16 rounding of the output, with room for float32's own
STAT_RTOL = 1e-6  # statistics: exact bfloat16 values summed in double


def _bf(shape, seed, loc=0.5):
    r = np.random.default_rng(seed)
    return (loc + r.standard_normal(shape)).astype(BF16)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _close_bf16(got, ref, name, atol_scale=1e-5):
    """got (bfloat16) against a float64 ref: rtol 2**-8 per element, atol a small fraction
    of the array's scale (elements near zero come out of a float32 cancellation)."""
    assert got.dtype == BF16, f"{name}: dtype {got.dtype}"
    ref = _f64(ref)
    atol = atol_scale * max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-30)
    np.testing.assert_allclose(_f64(got), ref, rtol=RTOL, atol=atol, err_msg=name)


LAYOUTS = [((6, 3, 7, 5), 1), ((64, 5), 1), ((4, 5, 6, 3), -1), ((97, 2), -1)]


@needs_ml_dtypes
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
def test_forward_entry_points_match_float64(shape, axis):
    x = _bf(shape, 1)
    C = shape[axis]
    w, b = _bf((C,), 2), _bf((C,), 3)
    ry, rmean, rvar, rinv = R.forward(x, w, b, axis=axis, activation="relu")
    y, mean, invstd = F.batch_norm_forward(x, w, b, axis=axis, activation="relu")
    _close_bf16(y, ry, "batch_norm_forward y")
    assert mean.dtype == invstd.dtype == np.float64
    np.testing.assert_allclose(mean, rmean, rtol=STAT_RTOL)
    np.testing.assert_allclose(invstd, rinv, rtol=STAT_RTOL)
    y, mean, invstd, var, n = F.forward_with_stats(x, w, b, axis=axis, activation="relu")
    _close_bf16(y, ry, "forward_with_stats y")
    np.testing.assert_allclose(var, rvar, rtol=STAT_RTOL)
    assert n == x.size // C
    n, mean, m2 = F.channel_moments(x, axis=axis)
    np.testing.assert_allclose(m2 / n, rvar, rtol=STAT_RTOL)
    # normalize with given (float64) statistics, and out= of bfloat16 in place
    y = F.normalize(x, rmean, rinv, w, b, axis=axis)
    _close_bf16(y, R.forward(x, w, b, axis=axis)[0], "normalize")
    xc = x.copy()
    assert F.batch_norm_forward(xc, w, b, axis=axis, out=xc)[0] is xc
    _close_bf16(xc, R.forward(x, w, b, axis=axis)[0], "out=x")


@needs_ml_dtypes
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
def test_batch_norm_running_statistics_and_eval(shape, axis):
    x = _bf(shape, 4)
    C = shape[axis]
    n = x.size // C
    _ry, rmean, rvar, _ri = R.forward(x, axis=axis)
    for run_dtype in (np.float32, BF16):  # the buffers in float32, or in bfloat16 as x
        rm, rv = np.zeros(C, run_dtype), np.ones(C, run_dtype)
        y = F.batch_norm(x, rm, rv, training=True, momentum=0.25, axis=axis)
        _close_bf16(y, R.forward(x, axis=axis)[0], "batch_norm training")
        tol = RTOL if run_dtype is BF16 else 1e-6
        np.testing.assert_allclose(_f64(rm), 0.25 * rmean, rtol=tol, atol=1e-7)
        np.testing.assert_allclose(_f64(rv), 0.75 + 0.25 * rvar * n / (n - 1), rtol=tol)
        y = F.batch_norm(x, rm, rv, None, None, False, axis=axis)
        _close_bf16(y, R.forward(x, axis=axis, mean=_f64(rm), var=_f64(rv))[0],
                    "batch_norm eval")


@needs_ml_dtypes
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
def test_backward_matches_float64(shape, axis, training):
    x, dy = _bf(shape, 5), _bf(shape, 6, loc=0.0)
    C = shape[axis]
    w = _bf((C,), 7)
    y, mean, invstd = F.batch_norm_forward(x, w, None, axis=axis, activation="relu")
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=training,
                                       activation="relu", y=y)
    rdx, rdw, rdb = R.backward(dy, x, mean, invstd, w, axis=axis, training=training, y=y)
    _close_bf16(dx, rdx, "dx", atol_scale=1e-4)
    assert dw.dtype == db.dtype == np.float32  # the compute dtype, as for float16
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5 * np.abs(rdw).max())
    np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-5 * np.abs(rdb).max())
    # the building blocks the distributed backward uses
    n, s1, s2 = F.backward_sums(dy, x, mean, axis=axis, activation="relu", y=y)
    dx2 = F.backward_dx(dy, x, mean, invstd, s1, s2, n, w, axis=axis, training=training,
                        activation="relu", y=y)
    _close_bf16(dx2, rdx, "backward_dx", atol_scale=1e-4)


def _as64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


@needs_ml_dtypes
def test_every_variant_matches_its_float64_run():
    # Each variant on bfloat16 x against the same call on the float64 values of x: x-shaped
    # results are bfloat16 within one rounding, per-channel gradients are float32.
    x, dy, dd = _bf((8, 3, 5), 8), _bf((8, 3, 5), 9, loc=0.0), _bf((8, 3, 5), 10, loc=0.0)
    w, b = _bf((3,), 11), _bf((3,), 12)
    mean, var = np.array([0.4, 0.5, 0.6]), np.array([0.9, 1.1, 1.3])
    mask = np.random.default_rng(13).random((8, 5)) < 0.7
    x8, dy8, dd8, w8, b8 = (_as64(a) for a in (x, dy, dd, w, b))
    y8, m8, i8 = F.batch_norm_forward(x8, w8, b8)
    y, m, i = F.batch_norm_forward(x, w, b)
    cases = {
        "fixed_batch_norm": lambda X, W, B, DY, DD: (
            F.fixed_batch_norm(X, mean, var, W, B),),
        "fixed_batch_norm_backward": lambda X, W, B, DY, DD: F.fixed_batch_norm_backward(
            DY, X, mean, var, W),
        "batch_renorm_forward": lambda X, W, B, DY, DD: F.batch_renorm_forward(
            X, mean, np.sqrt(var), W, B, rmax=1.5, dmax=0.5),
        "batch_renorm_backward": lambda X, W, B, DY, DD: F.batch_renorm_backward(
            DY, X, m8, i8, np.array([1.1, 0.9, 1.0]), np.array([0.1, -0.2, 0.0]), W),
        "ghost_batch_norm_forward": lambda X, W, B, DY, DD: F.ghost_batch_norm_forward(
            X, W, B, virtual_batch_size=4),
        "ghost_batch_norm_backward": lambda X, W, B, DY, DD: F.ghost_batch_norm_backward(
            DY, X, np.stack([m8, m8]), np.stack([i8, i8]), W, virtual_batch_size=4),
        "masked forward": lambda X, W, B, DY, DD: F.batch_norm_forward(X, W, B, mask=mask),
        "masked backward": lambda X, W, B, DY, DD: F.batch_norm_backward(
            DY, X, m8, i8, W, mask=mask),
        "batch_norm_double_backward": lambda X, W, B, DY, DD: F.batch_norm_double_backward(
            DD, None, None, DY, X, m8, i8, W),
        "axes forward": lambda X, W, B, DY, DD: F.batch_norm_forward(
            X, np.ones((3, 5)), None, axis=(1, 2)),
        "axes backward": lambda X, W, B, DY, DD: F.batch_norm_backward(
            DY, X, np.full((3, 5), 0.5), np.ones((3, 5)), axis=(1, 2)),
    }
    for name, call in cases.items():
        got = call(x, w, b, dy, dd)
        ref = call(x8, w8, b8, dy8, dd8)
        for k, (g, r) in enumerate(zip(got, ref)):
            if r.shape == x.shape:
                _close_bf16(g, r, f"{name}[{k}]", atol_scale=1e-4)
            else:  # statistics (float64) or parameter gradients (float32: the compute dtype)
                assert g.dtype in (np.float32, np.float64), f"{name}[{k}]: {g.dtype}"
                np.testing.assert_allclose(_f64(g), r, rtol=1e-5,
                                           atol=1e-5 * max(np.abs(r).max(), 1e-30),
                                           err_msg=f"{name}[{k}]")
    assert y.dtype == BF16 and m.dtype == np.float64 and i.dtype == np.float64


@needs_ml_dtypes
def test_layer_takes_bfloat16_input_with_float32_parameters():
    r = np.random.default_rng(14)
    bf, ref = fastbn.BatchNorm(4, momentum=0.2), fastbn.BatchNorm(4, momentum=0.2)
    for _step in range(3):
        x = (2.0 + r.standard_normal((6, 4, 3))).astype(BF16)
        dy = r.standard_normal(x.shape).astype(BF16)
        y = bf(x)
        _close_bf16(y, ref(_as64(x).astype(np.float32)), "layer y")
        dx = bf.backward(dy)
        _close_bf16(dx, ref.backward(_as64(dy).astype(np.float32)), "layer dx",
                    atol_scale=1e-4)
    for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        got, want = getattr(bf, name), getattr(ref, name)
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    bf.eval()
    x = r.standard_normal((5, 4, 2)).astype(BF16)
    ref.eval()
    _close_bf16(bf(x), ref(_as64(x).astype(np.float32)), "layer eval y")


@needs_ml_dtypes
def test_refusals_name_the_argument_and_the_dtypes():
    x = _bf((4, 3), 15)
    with pytest.raises(TypeError, match=r"dtype: expected float32 or float64, got bfloat16 "
                                        r"\(for bfloat16 inputs keep float32 parameters"):
        fastbn.BatchNorm(3, dtype=ml_dtypes.bfloat16)
    # dy, y and out must have x's dtype, as they must for float16
    with pytest.raises(TypeError, match=r"dy: expected dtype bfloat16 \(the dtype of x\), got "
                                        r"float32"):
        F.batch_norm_backward(np.ones((4, 3), np.float32), x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match=r"dy: expected dtype bfloat16 \(the dtype of x\), got "
                                        r"float16"):
        F.batch_norm_backward(np.ones((4, 3), np.float16), x, np.zeros(3), np.ones(3))
    out = np.empty((4, 3), np.float16)
    with pytest.raises(TypeError, match=r"out: expected dtype bfloat16 \(the dtype of x\)"):
        F.batch_norm_forward(x, out=out)
    with pytest.raises(TypeError, match=r"out: expected dtype float16 \(the dtype of x\), got "
                                        r"bfloat16"):
        F.batch_norm_forward(x.astype(np.float16), out=np.empty((4, 3), BF16))
    # a bfloat16 in foreign byte order is, to NumPy, a raw 'V2' dtype: refused, never read
    for raw in (x.view("V2"), x.view(np.dtype("V2").newbyteorder(">"))):
        with pytest.raises(TypeError, match=r"x: expected a floating-point array \(float16, "
                                            r"bfloat16, float32 or float64\), got dtype"):
            F.batch_norm_forward(raw)
    layer = fastbn.BatchNorm(3)
    with pytest.raises(TypeError, match=r"x: expected dtype float32 \(the layer's dtype\), "
                                        r"float16 or bfloat16, got float64"):
        layer(np.ones((4, 3)))


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is an optional reference (pip install "
                                               "torch==2.13.0)")


@needs_ml_dtypes
@pytest.mark.parametrize("shape", [(8, 3, 6, 5), (40, 4)], ids=str)
def test_matches_pytorch_bfloat16_batch_norm(shape):
    torch = _torch()
    x, dy = _bf(shape, 16), _bf(shape, 17, loc=0.0)
    C = shape[1]
    w, b = _bf((C,), 18), _bf((C,), 19)
    tx = torch.tensor(_as64(x)).to(torch.bfloat16).requires_grad_()
    tw = torch.tensor(_as64(w)).to(torch.bfloat16).requires_grad_()
    tb = torch.tensor(_as64(b)).to(torch.bfloat16).requires_grad_()
    rm, rv = torch.zeros(C, dtype=torch.bfloat16), torch.ones(C, dtype=torch.bfloat16)
    ty = torch.nn.functional.batch_norm(tx, rm, rv, tw, tb, True, 0.1, 1e-5)
    ty.backward(torch.tensor(_as64(dy)).to(torch.bfloat16))
    y, mean, invstd = F.batch_norm_forward(x, w, b)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w)
    # torch rounds to bfloat16 too (and its gradients partly compute in it): compare at a
    # few bfloat16 ulps of each array's scale
    for name, got, want in (("y", y, ty), ("dx", dx, tx.grad), ("dweight", dw, tw.grad),
                            ("dbias", db, tb.grad)):
        want = want.detach().double().numpy()
        err = np.max(np.abs(_f64(got) - want)) / np.max(np.abs(want))
        assert err < 4 * 2.0 ** -8, f"{name}: relative error {err:.3g} against torch"


@needs_ml_dtypes
def test_torch_bfloat16_tensors_and_batch_norm_function():
    torch = _torch()
    import fastbn.torch as ft

    tx = torch.randn(8, 3, 5, dtype=torch.bfloat16)
    # the functional API reads a torch.bfloat16 tensor as an ml_dtypes view (no copy)
    y, mean, invstd = F.batch_norm_forward(tx)
    ry = R.forward(tx.double().numpy())[0]
    _close_bf16(y, ry, "functional on a torch tensor")
    x = tx.clone().requires_grad_()
    w = torch.rand(3, dtype=torch.bfloat16, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    out = ft.BatchNormFunction.apply(x, rm, rv, w, None, True, 0.5, 1e-5)
    assert out.dtype == torch.bfloat16
    dy = torch.randn(8, 3, 5, dtype=torch.bfloat16)
    out.backward(dy)
    rdx, rdw, _rdb = R.backward(dy.double().numpy(), tx.double().numpy(), mean, invstd,
                                w.detach().double().numpy())
    _close_bf16(np.asarray(x.grad.double().numpy(), dtype=BF16), rdx, "dx", atol_scale=1e-4)
    np.testing.assert_allclose(w.grad.double().numpy(), rdw, rtol=2.0 ** -7)
    np.testing.assert_allclose(rm.double().numpy(), 0.5 * mean, rtol=2.0 ** -7, atol=1e-6)
    # the modules keep torch's own path for bfloat16, as for float16
    assert not ft.supports(tx)


def test_without_ml_dtypes_fastbn_works_and_says_what_bfloat16_needs():
    # ml_dtypes is optional: blocked from import, fastbn still imports and runs, and a
    # torch.bfloat16 tensor is refused with a message naming ml_dtypes.
    code = r"""
import sys
sys.modules["ml_dtypes"] = None  # import ml_dtypes now raises ImportError
import numpy as np, fastbn
y, m, s = fastbn.batch_norm_forward(np.ones((4, 3), np.float16))
assert y.dtype == np.float16
try:
    import torch
except ImportError:
    print("ok (no torch)")
    raise SystemExit
try:
    fastbn.batch_norm_forward(torch.ones(4, 3, dtype=torch.bfloat16))
except TypeError as e:
    assert "torch.bfloat16" in str(e) and "ml_dtypes" in str(e), e
    print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr


@needs_ml_dtypes
def test_torch_bfloat16_double_backward_matches_float64_torch():
    # create_graph=True through BatchNormFunction on bfloat16 (fastbn's double backward) against
    # torch's own float64 double backward of the same bfloat16 values
    torch = _torch()
    import fastbn.torch as ft

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 5, generator=g).bfloat16()
    w0 = torch.rand(3, generator=g).bfloat16()
    c = torch.randn(8, 3, 5, generator=g).bfloat16()
    res = []
    for fn, dt in ((ft.BatchNormFunction.apply, torch.bfloat16),
                   (torch.nn.functional.batch_norm, torch.float64)):
        x = x0.to(dt, copy=True).requires_grad_()
        w = w0.to(dt, copy=True).requires_grad_()
        y = fn(x, None, None, w, None, True, 0.1, 1e-5)
        gx, = torch.autograd.grad((y * c.to(dt)).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        res.append([t.detach().double() for t in (y, gx, x.grad, w.grad)])
    for name, got, want in zip(("y", "dx", "d(dx^2)/dx", "d(dx^2)/dweight"), *res):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 4 * 2.0 ** -8, f"{name}: relative error {err:.3g}"
