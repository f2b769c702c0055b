"""fastbn.torch: the PyTorch drop-ins against torch's own batch norm."""
import contextlib
import copy
import subprocess
import sys

import numpy as np
import pytest


def test_import_fastbn_does_not_import_torch():
    code = ("import sys, fastbn, fastbn.functional, fastbn.layer; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


torch = pytest.importorskip("torch", reason="fastbn.torch needs PyTorch")
from torch import nn  # noqa: E402

import fastbn  # noqa: E402
import fastbn.torch as ft  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


@contextlib.contextmanager
def _counting_fastbn_calls():
    """Counts the forwards that really ran on fastbn (a fallback to torch would not)."""
    calls = []
    real = ft._forward

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    ft._forward = spy
    try:
        yield calls
    finally:
        ft._forward = real


def _close(a, b, dtype=torch.float32, what=""):
    torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- gradients

def _gradcheck_case(seed, affine):
    """(x, weight, bias, running_mean, running_var), float64, x (3, 4, 5) requiring grad."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    x = torch.randn(3, 4, 5, generator=g, dtype=d, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=d, requires_grad=True) if affine else None
    b = torch.randn(4, generator=g, dtype=d, requires_grad=True) if affine else None
    rm = torch.randn(4, generator=g, dtype=d)
    rv = torch.rand(4, generator=g, dtype=d) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("path", ["function", "op"])
def test_gradcheck(path, training, affine):
    x, w, b, rm, rv = _gradcheck_case(0, affine)
    fn = ft.BatchNormFunction.apply if path == "function" else ft.batch_norm
    args = (x, rm, rv, w, b, training, 0.1, 1e-5)
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_channels_last():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ft.batch_norm, (x, None, None, w, b, True, 0.1, 1e-5))


def test_function_matches_torch_and_updates_running_stats():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 4, 4, generator=g)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rm1, rv1 = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = ft.BatchNormFunction.apply(x, rm1, rv1, w, b, True, 0.3, 1e-5)
    y2 = nn.functional.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-5)
    _close(y1, y2, what="y")
    _close(rm1, rm2, what="running_mean")
    _close(rv1, rv2, what="running_var")


def test_function_float16():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 5, generator=g).half().requires_grad_()
    w = torch.ones(3, dtype=torch.float16, requires_grad=True)
    y = ft.BatchNormFunction.apply(x, None, None, w, None, True, 0.1, 1e-5)
    t = torch.randn(8, 3, 5, generator=g)
    (y.float() * t).sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.float16
    xr = x.detach().float().requires_grad_()
    yr = nn.functional.batch_norm(xr, None, None, None, None, True, 0.1, 1e-5)
    (yr * t).sum().backward()
    torch.testing.assert_close(y.float(), yr, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    w = torch.randn(4, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    torch.library.opcheck(torch.ops.fastbn.batch_norm.default, (x, w, b, rm, rv, training, 1e-5))
    xcl = torch.randn(2, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastbn.batch_norm.default,
                          (xcl, None, None, rm, rv, training, 1e-5))
    m, v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default,
                          (torch.randn(3, 4, 5, generator=g), x.detach(), m, v, w.detach(),
                           training))
    torch.library.opcheck(torch.ops.fastbn.update_running_stats_.default,
                          (torch.zeros(4), torch.ones(4), m + 1, v * 2, 10, 0.1, None))


# --------------------------------------------------------------------------- modules

def _pair(torch_cls, fast_cls, C, dtype, **kw):
    torch.manual_seed(0)
    ref = torch_cls(C, dtype=dtype, **kw)
    fast = fast_cls(C, dtype=dtype, **kw)
    fast.load_state_dict(ref.state_dict())
    if ref.affine:  # not the default ones/zeros, so that mistakes in weight/bias show
        with torch.no_grad():
            for p, q in zip(ref.parameters(), fast.parameters()):
                p.uniform_(0.5, 1.5)
                q.copy_(p)
    return ref, fast


def _run_steps(ref, fast, shape, dtype, memory_format=torch.contiguous_format, steps=5):
    """Train both modules step for step with SGD, then compare them in eval mode."""
    with _counting_fastbn_calls() as calls:
        _steps(ref, fast, shape, dtype, memory_format, steps)
    assert len(calls) == steps + 1, "the fastbn.torch module did not run on fastbn"


def _steps(ref, fast, shape, dtype, memory_format, steps):
    params = list(ref.parameters())
    opt_r = torch.optim.SGD(params, lr=0.1) if params else None
    opt_f = torch.optim.SGD(fast.parameters(), lr=0.1) if params else None
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = (3 * torch.randn(shape, generator=g, dtype=dtype) + 2)
        if len(shape) == 4:
            x = x.to(memory_format=memory_format)
        target = torch.randn(shape, generator=g, dtype=dtype)
        xr = x.clone().requires_grad_()  # clone() keeps the memory format
        xf = x.clone().requires_grad_()
        yr, yf = ref(xr), fast(xf)
        at = f"step {step}"
        _close(yf, yr, dtype, f"{at} y")
        assert yf.stride() == yr.stride() == x.stride()
        for y, opt in ((yr, opt_r), (yf, opt_f)):
            if opt is not None:
                opt.zero_grad()
            (y * target).sum().backward()
        _close(xf.grad, xr.grad, dtype, f"{at} dx")
        for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
            _close(q.grad, p.grad, dtype, f"{at} grad {name}")
        if opt_r is not None:
            opt_r.step()
            opt_f.step()
        for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
            _close(q, p, dtype, f"{at} {name}")
        for (name, p), q in zip(ref.named_buffers(), fast.buffers()):
            if name == "num_batches_tracked":
                assert q.item() == p.item() == step + 1
            else:
                _close(q, p, dtype, f"{at} {name}")
    ref.eval()
    fast.eval()
    x = torch.randn(shape, generator=g, dtype=dtype)
    if len(shape) == 4:
        x = x.to(memory_format=memory_format)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    _close(yf, yr, dtype, "eval y")
    yr.square().sum().backward()
    yf.square().sum().backward()
    _close(xf.grad, xr.grad, dtype, "eval dx")
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        _close(q.grad, p.grad, dtype, f"eval grad {name}")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_batchnorm2d_training_steps(fmt, dtype):
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 6, dtype)
    _run_steps(ref, fast, (8, 6, 7, 5), dtype, FORMATS[fmt])


@pytest.mark.parametrize("torch_cls, fast_cls, shape", [
    (nn.BatchNorm1d, ft.BatchNorm1d, (16, 5)),
    (nn.BatchNorm1d, ft.BatchNorm1d, (8, 5, 9)),
    (nn.BatchNorm3d, ft.BatchNorm3d, (4, 3, 3, 4, 5)),
], ids=["1d-NC", "1d-NCL", "3d"])
def test_batchnorm1d_3d(torch_cls, fast_cls, shape):
    ref, fast = _pair(torch_cls, fast_cls, shape[1], torch.float32)
    _run_steps(ref, fast, shape, torch.float32)


@pytest.mark.parametrize("kw", [
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False, momentum=None),
    dict(eps=1e-3, momentum=0.5),
], ids=["momentum-None", "no-affine", "no-running-stats", "bare", "eps-momentum"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_batchnorm2d_options(kw, fmt):
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 4, torch.float32, **kw)
    _run_steps(ref, fast, (5, 4, 3, 6), torch.float32, FORMATS[fmt], steps=3)


def test_eval_after_load_matches_torch():
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 3, torch.float32)
    with torch.no_grad():
        ref.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        ref.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    fast.load_state_dict(ref.state_dict())
    ref.eval()
    fast.eval()
    x = torch.randn(2, 3, 4, 4)
    _close(fast(x), ref(x))


def test_non_dense_input():
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 3, torch.float32)
    x = torch.randn(6, 3, 8, 8)[::2, :, 1:7:2]
    y = fast(x)
    _close(y, ref(x))
    assert y.stride() == torch.empty_like(x).stride()


def test_empty_batch():
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 3, torch.float32)
    x = torch.randn(0, 3, 4, 4)
    yr, yf = ref(x), fast(x)
    assert yf.shape == yr.shape == x.shape
    for (name, p), q in zip(ref.named_buffers(), fast.buffers()):
        assert torch.equal(q, p), name


def test_one_value_per_channel_raises_like_torch():
    ref, fast = _pair(nn.BatchNorm1d, ft.BatchNorm1d, 3, torch.float32)
    x = torch.randn(1, 3)
    with pytest.raises(ValueError):
        ref(x)
    with pytest.raises(ValueError):
        fast(x)
    assert fast.running_mean.abs().sum() == 0


def test_check_input_dim():
    with pytest.raises(ValueError, match="4D"):
        ft.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2D or 3D"):
        ft.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_subclass_and_state_dict_compatible():
    fast = ft.BatchNorm2d(5, momentum=0.2)
    assert isinstance(fast, nn.BatchNorm2d)
    ref = nn.BatchNorm2d(5, momentum=0.2)
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    fast.load_state_dict(ref.state_dict())


# --------------------------------------------------------------------------- fallback

def _forbid_fastbn(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fastbn was called")
    monkeypatch.setattr(ft, "_forward", boom)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_fallback_dtype(monkeypatch, dtype):
    _forbid_fastbn(monkeypatch)
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 3, dtype)
    x = torch.randn(4, 3, 5, 5).to(dtype)
    torch.testing.assert_close(fast(x), ref(x))
    torch.testing.assert_close(fast.running_mean, ref.running_mean)
    assert fast.num_batches_tracked.item() == 1


def test_fallback_meta(monkeypatch):
    _forbid_fastbn(monkeypatch)
    fast = ft.BatchNorm2d(3, device="meta")
    y = fast(torch.empty(4, 3, 5, 5, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 3, 5, 5)


def test_fallback_mixed_dtypes(monkeypatch):
    _forbid_fastbn(monkeypatch)
    fast = ft.BatchNorm2d(3, dtype=torch.float64)
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 5, 5)  # float32 input, float64 parameters: torch decides
    try:
        expected = ref(x)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            fast(x)
    else:
        torch.testing.assert_close(fast(x), expected)


def test_supports():
    x = torch.randn(2, 3)
    assert ft.supports(x) and ft.supports(x.double(), None, torch.ones(3, dtype=torch.float64))
    assert not ft.supports(x.half())
    assert not ft.supports(x, torch.ones(3, dtype=torch.float64))
    assert not ft.supports(torch.randn(3))
    assert not ft.supports(x.to_sparse())


# --------------------------------------------------------------------------- convert

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(16, 10), nn.BatchNorm1d(10), nn.Linear(10, 4))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_convert(fmt):
    torch.manual_seed(0)
    model = _Net()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    assert ft.convert(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params))
    after = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert after == bns  # the same module objects
    assert [type(m) for m in after] == [ft.BatchNorm2d, ft.BatchNorm2d, ft.BatchNorm1d]
    g = torch.Generator().manual_seed(1)
    if fmt == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    for step in range(3):
        x = torch.randn(6, 3, 8, 8, generator=g).to(memory_format=FORMATS[fmt])
        t = torch.randn(6, 4, generator=g)
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            with _counting_fastbn_calls() as calls:
                ((m(x) - t) ** 2).mean().backward()
            assert len(calls) == (3 if m is model else 0)
            o.step()
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    for (name, p), q in zip(ref.named_buffers(), model.buffers()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    model.eval()
    ref.eval()
    x = torch.randn(6, 3, 8, 8, generator=g).to(memory_format=FORMATS[fmt])
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_convert_keeps_training_flag_and_leaves_others_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3), nn.LazyBatchNorm2d(),
                          MyBN(3), nn.BatchNorm3d(2).eval(), ft.BatchNorm1d(2))
    types = [type(m) for m in model]
    ft.convert(model)
    assert [type(m) for m in model] == [ft.BatchNorm2d] + types[1:4] + [ft.BatchNorm3d,
                                                                      ft.BatchNorm1d]
    assert model[0].training and not model[4].training
    bn = nn.BatchNorm1d(4)
    assert ft.convert(bn) is bn and type(bn) is ft.BatchNorm1d


# --------------------------------------------------------------------------- compile / export

def _small_model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ft.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3), ft.BatchNorm2d(4, momentum=momentum))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_torch_compile_no_graph_break(fmt):
    # backend="aot_eager": traces forward and backward (AOTAutograd, functionalization of the
    # running-statistics update) like inductor does, without inductor's C++ compile time
    # (~40 s on 2 cores for this model). set FASTBN_TEST_INDUCTOR=1 to use inductor.
    import os

    backend = "inductor" if os.environ.get("FASTBN_TEST_INDUCTOR") else "aot_eager"
    torch._dynamo.reset()
    x = torch.randn(4, 3, 10, 10).to(memory_format=FORMATS[fmt])
    t = torch.randn(4, 4, 8, 8)
    explain = torch._dynamo.explain(_small_model(momentum=None))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    eager, model = _small_model(momentum=None), _small_model(momentum=None)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        ys = []
        for m, o in ((eager, opt_e), (compiled, opt_c)):
            o.zero_grad()
            ys.append(m(x))
            # Not y.square(): through batch norm its gradient is ~0 (scale invariance), all
            # rounding noise, which the steps amplify.
            (ys[-1] * t).mean().backward()
            o.step()
        torch.testing.assert_close(ys[1], ys[0])
        assert ys[1].stride() == ys[0].stride()
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    for (name, p), q in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(q, p, msg=name)
    eager.eval()
    compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x))
    torch._dynamo.reset()


def test_torch_export():
    model = _small_model()
    x = torch.randn(4, 3, 10, 10)
    ep = torch.export.export(copy.deepcopy(model), (x,))
    code = ep.graph_module.code
    assert "fastbn.batch_norm" in code and "fastbn.update_running_stats_" in code
    exported = ep.module()
    torch.testing.assert_close(exported(x), model(x))
    for (name, p), q in zip(model.named_buffers(), exported.buffers()):
        torch.testing.assert_close(q, p, msg=name)


# --------------------------------------------------------------------------- state dicts

def test_state_dict_round_trip():
    rng = np.random.default_rng(0)
    layer = fastbn.BatchNorm(4, momentum=0.3)
    layer.forward(rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    layer.forward(rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    sd = layer.state_dict()
    tsd = ft.state_dict_to_torch(sd)
    assert list(tsd) == list(sd)
    assert all(isinstance(v, torch.Tensor) for v in tsd.values())
    for fn in (nn.BatchNorm2d, ft.BatchNorm2d):
        m = fn(4, momentum=0.3)
        m.load_state_dict(tsd)
        assert m.num_batches_tracked.item() == 2 and m.num_batches_tracked.dtype == torch.int64
        np.testing.assert_array_equal(m.running_var.numpy(), sd["running_var"])
        np.testing.assert_array_equal(m.weight.detach().numpy(), sd["weight"])
    # torch -> fastbn, after a torch step, both layers then agree in eval.
    m = ft.BatchNorm2d(4, momentum=0.3)
    m.load_state_dict(tsd)
    x = torch.randn(8, 4, 3, 3)
    m(x)
    back = ft.state_dict_from_torch(m.state_dict())
    assert back["num_batches_tracked"].shape == () and back["num_batches_tracked"] == 3
    assert all(isinstance(v, np.ndarray) for v in back.values())
    layer.load_state_dict(back)
    assert layer.num_batches_tracked == 3
    layer.eval()
    m.eval()
    np.testing.assert_allclose(layer.forward(x.numpy()), m(x).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    # The result is a snapshot, not a view of the module's buffers.
    back["running_mean"][:] = 7
    assert not (m.running_mean == 7).any()


def test_state_dict_prefixed_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    sd = ft.state_dict_from_torch(model.state_dict())
    assert list(sd) == list(model.state_dict())
    assert "1.num_batches_tracked" in sd and sd["1.num_batches_tracked"].dtype == np.int64
    sd["1.running_mean"][:] = 3.0
    model.load_state_dict(ft.state_dict_to_torch(sd))
    assert (model[1].running_mean == 3).all()


# --------------------------------------------------------------------------- double backward

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("path", ["function", "op"])
def test_double_backward_gradgradcheck(path, training, affine):
    """torch's own finite-difference check of the second derivatives (float64)."""
    x, w, b, rm, rv = _gradcheck_case(1, affine)

    def f(x, *wb):
        w, b = wb if wb else (None, None)
        if path == "function":
            return ft.BatchNormFunction.apply(x, rm.clone(), rv.clone(), w, b, training, 0.1,
                                              1e-3)
        return ft.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_double_backward_gradient_penalty_matches_torch(mode, memory_format):
    """A WGAN-GP-style penalty |d loss / d x|^2 through BatchNorm2d: its gradients with
    respect to x and the module's weight and bias, fastbn against torch, float64."""
    d = torch.float64
    ref, fast = _pair(nn.BatchNorm2d, ft.BatchNorm2d, 3, d)
    ref.train(mode == "train")
    fast.train(mode == "train")
    x0 = torch.randn(4, 3, 5, 6, dtype=d).contiguous(memory_format=memory_format)
    target = torch.randn(4, 3, 5, 6, dtype=d)
    grads = []
    with _counting_fastbn_calls() as calls:
        for m in (ref, fast):
            x = x0.clone().requires_grad_(True)
            loss = ((m(x) - target) ** 3).sum()
            (gx,) = torch.autograd.grad(loss, x, create_graph=True)
            penalty = (gx ** 2).sum()
            grads.append(torch.autograd.grad(penalty, (x, m.weight, m.bias)))
    assert len(calls) == 1
    for a, b, name in zip(grads[0], grads[1], ("x", "weight", "bias")):
        _close(b, a, d, what=name)


def test_double_backward_compiles_as_custom_ops():
    """The new op has a fake implementation: torch.library's own consistency checks pass."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    args = (torch.randn_like(x), torch.randn(4, dtype=torch.float64), None, torch.randn_like(x),
            x, x.mean(dim=(0, 2), dtype=torch.float64),
            1 / (x.var(dim=(0, 2), unbiased=False) + 1e-5).sqrt(),
            torch.rand(4, dtype=torch.float64) + 0.5, True)
    torch.library.opcheck(torch.ops.fastbn.batch_norm_double_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
