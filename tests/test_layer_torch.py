"""fastbn.BatchNorm step for step against torch.nn.BatchNorm{1,2,3}d (PyTorch CPU).

Every comparison is max|fastbn - torch| / max|torch| over the array; the largest seen per dtype
is printed at the end of the module (the issue's closing note quotes it).
"""
import numpy as np
import pytest

import fastbn

from conftest import rel_err

torch = pytest.importorskip(
    "torch", reason="PyTorch is an optional reference for the parity tests (pip install torch)"
)

TOL = {np.float64: 1e-10, np.float32: 1e-5, np.float16: 2e-3}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32, np.float16: torch.float16}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}
SHAPES = [(16, 5), (6, 5, 7), (4, 5, 3, 6), (3, 5, 2, 3, 4)]

WORST = {}
RAW_WORST = {}  # gradients relative to max|torch| instead of to the summed terms


@pytest.fixture(scope="module", autouse=True)
def report_worst(request):
    # The arrays are tiny: one torch thread avoids OpenMP spin-waiting on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if WORST:
        plugins = request.config.pluginmanager
        reporter = plugins.getplugin("terminalreporter")
        capture = plugins.getplugin("capturemanager")

        def fmt(table):
            return ", ".join(
                f"{np.dtype(dt).name}: {err:.2e} ({what})" for dt, (err, what) in sorted(
                    table.items(), key=lambda kv: np.dtype(kv[0]).itemsize)
            )

        if reporter is not None and capture is not None:
            # module teardown runs under output capture: lift it to reach the terminal
            with capture.global_and_fixture_disabled():
                reporter.write_line(
                    f"\nlargest fastbn/PyTorch difference per dtype: {fmt(WORST)}; "
                    f"gradients relative to max|torch grad| rather than to the summed "
                    f"terms: {fmt(RAW_WORST)}"
                )


def check(actual, expected, dtype, what, scale=None):
    """Assert actual ~ expected (torch tensor or array) and record the difference.

    The difference is relative to max|expected|, or to ``scale`` for sums that can cancel.
    """
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().double().numpy()
    err = rel_err(actual, expected, scale)
    if err > WORST.get(dtype, (-1.0, ""))[0]:
        WORST[dtype] = (err, what)
    if scale is not None:
        raw = rel_err(actual, expected)
        if raw > RAW_WORST.get(dtype, (-1.0, ""))[0]:
            RAW_WORST[dtype] = (raw, what)
    assert err <= TOL[dtype], f"{what}: relative difference {err:.3e} > {TOL[dtype]:.0e}"


def channel_batch(shape, rng, dtype):
    C = shape[1]
    cshape = (1, C) + (1,) * (len(shape) - 2)
    offset = rng.uniform(-3, 3, C).reshape(cshape)
    scale = rng.uniform(0.5, 2.0, C).reshape(cshape)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


class Pair:
    """A torch BatchNorm and a fastbn BatchNorm fed the same data (fastbn maybe channels-last)."""

    def __init__(self, shape, dtype, momentum=0.1, affine=True, track=True, activation=None,
                 channels_last=False, param_dtype=None):
        C = shape[1]
        param_dtype = param_dtype or dtype
        self.last = channels_last
        self.relu = activation == "relu"
        self.torch = TORCH_BN[len(shape)](C, momentum=momentum, affine=affine,
                                          track_running_stats=track,
                                          dtype=TORCH_DTYPE[param_dtype])
        self.fast = fastbn.BatchNorm(C, axis=-1 if channels_last else 1, momentum=momentum,
                                     affine=affine, track_running_stats=track,
                                     activation=activation, dtype=param_dtype)

    def to_fast(self, a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if self.last else a

    def from_fast(self, a):
        return np.moveaxis(a, -1, 1) if self.last else a

    def step(self, x, dy):
        """Forward and backward on both; returns (y_fast, y_torch, dx_fast, dx_torch)."""
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = self.torch(xt)
        if self.relu:
            yt = torch.relu(yt)
        yt.backward(torch.from_numpy(dy))
        yf = self.fast(self.to_fast(x))
        dxf = self.fast.backward(self.to_fast(dy))
        assert yf.dtype == x.dtype and dxf.dtype == x.dtype
        return self.from_fast(yf), yt, self.from_fast(dxf), xt.grad

    def set_parameters(self, rng):
        C = self.fast.num_features
        w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
        self.fast.weight, self.fast.bias = w, b
        with torch.no_grad():
            self.torch.weight.copy_(torch.from_numpy(w))
            self.torch.bias.copy_(torch.from_numpy(b))

    def sgd(self, lr):
        self.fast.weight -= lr * self.fast.grad_weight
        self.fast.bias -= lr * self.fast.grad_bias
        self.fast.zero_grad()
        with torch.no_grad():
            for p in (self.torch.weight, self.torch.bias):
                p -= lr * p.grad
                p.grad = None


def compare_state(pair, dtype, tag):
    f, t = pair.fast, pair.torch
    if f.affine:
        check(f.weight, t.weight, dtype, f"weight {tag}")
        check(f.bias, t.bias, dtype, f"bias {tag}")
    else:
        assert f.weight is None and t.weight is None
    if f.track_running_stats:
        check(f.running_mean, t.running_mean, dtype, f"running_mean {tag}")
        check(f.running_var, t.running_var, dtype, f"running_var {tag}")
        assert f.num_batches_tracked == int(t.num_batches_tracked)
    else:
        assert f.running_mean is None and t.running_mean is None
        assert f.num_batches_tracked is None


def grad_scales(pair, x, dy, yt):
    """max over channels of sum|g * x_hat| and sum|g|: the size of the terms each gradient sums.

    A gradient that cancels to ~0 (a channel almost dead under ReLU) is compared with the error
    its sum can carry, not with its own tiny value.
    """
    red = tuple(i for i in range(x.ndim) if i != 1)
    cshape = (1, -1) + (1,) * (x.ndim - 2)
    xd = x.astype(np.float64)
    t = pair.torch
    if t.training or not t.track_running_stats:
        mean, var = xd.mean(axis=red, keepdims=True), xd.var(axis=red, keepdims=True)
    else:
        mean = t.running_mean.double().numpy().reshape(cshape)
        var = t.running_var.double().numpy().reshape(cshape)
    xhat = np.abs(xd - mean) / np.sqrt(var + t.eps)
    g = np.abs(dy.astype(np.float64))
    if pair.relu:
        g = np.where(yt.detach().numpy() > 0, g, 0.0)
    return float(np.max(np.sum(g * xhat, axis=red))), float(np.max(np.sum(g, axis=red)))


def compare_step(pair, x, dy, dtype, tag, param_dtype=None):
    yf, yt, dxf, dxt = pair.step(x, dy)
    check(yf, yt, dtype, f"y {tag}")
    check(dxf, dxt, dtype, f"dx {tag}")
    if pair.fast.affine:
        gtol = param_dtype or dtype
        sw, sb = grad_scales(pair, x, dy, yt)
        check(pair.fast.grad_weight, pair.torch.weight.grad, gtol, f"grad_weight {tag}", sw)
        check(pair.fast.grad_bias, pair.torch.bias.grad, gtol, f"grad_bias {tag}", sb)
    else:
        assert pair.fast.grad_weight is None and pair.fast.grad_bias is None


def run_loop(pair, shape, dtype, rng, steps=20, lr=0.1, param_dtype=None):
    if pair.fast.affine:
        pair.set_parameters(rng)
    for step in range(steps):
        x = channel_batch(shape, rng, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        compare_step(pair, x, dy, dtype, f"train step {step}", param_dtype)
        if pair.fast.affine:
            pair.sgd(lr)
        compare_state(pair, param_dtype or dtype, f"after step {step}")
    pair.torch.eval()
    pair.fast.eval()
    for step in range(2):
        x = channel_batch(shape, rng, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        compare_step(pair, x, dy, dtype, f"eval {step}", param_dtype)
        if pair.fast.affine:
            pair.sgd(lr)
    compare_state(pair, param_dtype or dtype, "after eval")


# momentum only matters with running statistics
OPTION_GRID = [(m, affine, True) for m in (0.1, 0.5, None) for affine in (True, False)] + [
    (0.1, True, False), (0.1, False, False)]


# (N, C) has no separate channels-last layout
LAYOUT_CASES = [(shape, last) for shape in SHAPES for last in (False, True)
                if len(shape) > 2 or not last]


@pytest.mark.parametrize("shape,channels_last", LAYOUT_CASES,
                         ids=lambda v: f"{len(v)}d" if isinstance(v, tuple) else
                         ("channels_last" if v else "axis1"))
@pytest.mark.parametrize("momentum,affine,track", OPTION_GRID)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_steps_match_torch(dtype, shape, momentum, affine, track, channels_last):
    rng = np.random.default_rng(2024)
    pair = Pair(shape, dtype, momentum, affine, track, channels_last=channels_last)
    run_loop(pair, shape, dtype, rng)


@pytest.mark.parametrize("channels_last", [False, True], ids=["axis1", "channels_last"])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_training_steps_match_torch(dtype, track, channels_last):
    shape = (4, 5, 3, 6)
    rng = np.random.default_rng(77)
    pair = Pair(shape, dtype, 0.1, True, track, "relu", channels_last)
    run_loop(pair, shape, dtype, rng)


@pytest.mark.parametrize("channels_last", [False, True], ids=["axis1", "channels_last"])
def test_float16_mixed_precision_matches_torch(channels_last):
    """float16 input, float32 parameters: PyTorch's CPU mixed mode."""
    shape = (4, 5, 3, 6)
    rng = np.random.default_rng(16)
    pair = Pair(shape, np.float16, channels_last=channels_last, param_dtype=np.float32)
    run_loop(pair, shape, np.float16, rng, steps=5, param_dtype=np.float32)


def trained_torch(shape, dtype, rng, affine=True, track=True, momentum=0.1):
    bn = TORCH_BN[len(shape)](shape[1], momentum=momentum, affine=affine,
                              track_running_stats=track, dtype=TORCH_DTYPE[dtype])
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, shape[1])))
            bn.bias.copy_(torch.from_numpy(rng.standard_normal(shape[1])))
    with torch.no_grad():
        for _ in range(4):
            bn(torch.from_numpy(channel_batch(shape, rng, dtype)))
    return bn.eval()


@pytest.mark.parametrize("as_tensors", [False, True], ids=["numpy", "tensors"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_state_loads_and_reproduces_eval(dtype, shape, affine, track, as_tensors):
    rng = np.random.default_rng(31)
    tbn = trained_torch(shape, dtype, rng, affine, track)
    state = tbn.state_dict()
    if not as_tensors:
        state = {k: v.numpy() for k, v in state.items()}
    for channels_last in (False, True):
        bn = fastbn.BatchNorm(shape[1], axis=-1 if channels_last else 1, affine=affine,
                              track_running_stats=track, dtype=dtype)
        bn.load_state_dict(state)
        bn.eval()
        x = channel_batch(shape, rng, dtype)
        with torch.no_grad():
            expected = tbn(torch.from_numpy(x))
        y = bn(np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x)
        check(np.moveaxis(y, -1, 1) if channels_last else y, expected, dtype,
              "eval output from a PyTorch state")
        if track:
            assert bn.num_batches_tracked == int(tbn.num_batches_tracked) == 4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fastbn_state_loads_into_torch(dtype):
    rng = np.random.default_rng(32)
    shape = (4, 5, 3, 6)
    pair = Pair(shape, dtype)
    run_loop(pair, shape, dtype, rng, steps=3)
    fresh = torch.nn.BatchNorm2d(5, dtype=TORCH_DTYPE[dtype]).eval()
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v))
                           for k, v in pair.fast.state_dict().items()})
    x = channel_batch(shape, rng, dtype)
    with torch.no_grad():
        check(pair.fast(x), fresh(torch.from_numpy(x)), dtype, "PyTorch eval from a fastbn state")
    assert int(fresh.num_batches_tracked) == 3


def test_state_dict_keys_match_torch():
    for affine in (True, False):
        for track in (True, False):
            t = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track)
            f = fastbn.BatchNorm(3, affine=affine, track_running_stats=track)
            assert list(f.state_dict()) == list(t.state_dict())
            for k, v in t.state_dict().items():
                assert f.state_dict()[k].shape == tuple(v.shape)
