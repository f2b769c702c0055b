"""fastbn on a real GPU (CuPy): GPU results against the CPU kernels.

Skipped, with the reason, without CuPy or without a CUDA device. Run with
``python -m pytest tests/gpu -q`` on a machine with an NVIDIA GPU and cupy-cuda12x/13x.
"""
import numpy as np
import pytest

cupy = pytest.importorskip(
    "cupy", reason="CuPy is not installed: the GPU tests need cupy-cuda12x or cupy-cuda13x"
)

import fastbn  # noqa: E402
from fastbn import functional as F  # noqa: E402
from fastbn.cuda import kernels as K  # noqa: E402
from fastbn.cuda import unavailable_reason  # noqa: E402

_why = unavailable_reason()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)


# (shape, axis): ragged NCHW; NCHW with many 4096-value chunks per channel; the 3-channel
# channels-last case; 2-D with C > 256 and a partial 32-channel tile; channels-last 4-D;
# 1x1 spatial; C = 1; a tall 2-D batch (many row blocks per channel).
CASES = [
    ((3, 5, 7, 11), 1),
    ((16, 3, 97, 101), 1),
    ((8, 97, 101, 3), -1),
    ((130, 300), 1),
    ((4, 6, 9, 5), -1),
    ((6, 4, 1, 1), 1),
    ((33, 1), 1),
    ((20011, 7), 1),
]
DTYPES = [np.float32, np.float64, np.float16]
TOL = {np.float64: 1e-12, np.float32: 3e-6, np.float16: 2e-3}


def _data(shape, dtype, seed, loc=0.5):
    r = np.random.default_rng(seed)
    return (loc + r.standard_normal(shape)).astype(dtype)


def _host(a):
    return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else np.asarray(a)


def _close(gpu, cpu, tol, name):
    assert isinstance(gpu, cupy.ndarray), f"{name}: expected a CuPy array, got {type(gpu)}"
    g = _host(gpu).astype(np.float64)
    c = np.asarray(cpu, dtype=np.float64)
    assert g.shape == c.shape, name
    if not c.size:
        return
    scale = max(float(np.max(np.abs(c))), 1e-30)
    err = float(np.max(np.abs(g - c))) / scale
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=str)
def test_forward_matches_cpu(shape, axis, dtype):
    x = _data(shape, dtype, 1)
    C = shape[axis]
    w, b = _data((C,), np.float32, 2), _data((C,), np.float32, 3)
    gx = cupy.asarray(x)
    for act in (None, "relu"):
        y, mean, invstd = fastbn.batch_norm_forward(gx, cupy.asarray(w), cupy.asarray(b),
                                                    axis=axis, activation=act)
        assert y.dtype == dtype and y.shape == x.shape
        ry, rmean, rinvstd = fastbn.batch_norm_forward(x, w, b, axis=axis, activation=act)
        _close(mean, rmean, 1e-12, "mean")
        _close(invstd, rinvstd, 1e-9 if dtype != np.float64 else 1e-12, "invstd")
        _close(y, ry, TOL[dtype], f"y ({act})")
    np.testing.assert_array_equal(_host(gx), x)  # input untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=str)
def test_backward_matches_cpu(shape, axis, dtype):
    x = _data(shape, dtype, 4)
    dy = _data(shape, dtype, 5, loc=0.0)
    C = shape[axis]
    w = _data((C,), np.float32, 6)
    for act in (None, "relu"):
        y, mean, invstd = fastbn.batch_norm_forward(x, w, None, axis=axis, activation=act)
        for training in (True, False):
            got = fastbn.batch_norm_backward(
                cupy.asarray(dy), cupy.asarray(x), cupy.asarray(mean), cupy.asarray(invstd),
                cupy.asarray(w), axis=axis, training=training, activation=act,
                y=cupy.asarray(y) if act else None)
            ref = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                             training=training, activation=act,
                                             y=y if act else None)
            for name, g, r in zip(("dx", "dweight", "dbias"), got, ref):
                assert g.dtype == r.dtype, name
                tol = TOL[dtype] * (30 if (name == "dx" and training) else 3)
                _close(g, r, tol, f"{name} (relu={act}, training={training})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=str)
def test_building_blocks_match_cpu(shape, axis, dtype):
    x = _data(shape, dtype, 7)
    dy = _data(shape, dtype, 8, loc=0.0)
    C = shape[axis]
    gx, gdy = cupy.asarray(x), cupy.asarray(dy)
    n, mean, m2 = F.channel_moments(gx, axis=axis)
    rn, rmean, rm2 = F.channel_moments(x, axis=axis)
    assert n == rn
    _close(mean, rmean, 1e-12, "mean")
    _close(m2, rm2, 1e-11, "M2")
    invstd = 1.0 / np.sqrt(rm2 / rn + 1e-5)
    w, b = _data((C,), np.float64, 9), _data((C,), np.float64, 10)
    g = [cupy.asarray(a) for a in (rmean, invstd, w, b)]
    _close(F.normalize(gx, *g, axis=axis, activation="relu"),
           F.normalize(x, rmean, invstd, w, b, axis=axis, activation="relu"), TOL[dtype],
           "normalize")
    n, s1, s2 = F.backward_sums(gdy, gx, g[0], axis=axis)
    rn, rs1, rs2 = F.backward_sums(dy, x, rmean, axis=axis)
    _close(s1, rs1, 1e-12, "sum_dy")
    _close(s2, rs2, 1e-12, "sum_dy_xmu")
    dx = F.backward_dx(gdy, gx, g[0], g[1], cupy.asarray(rs1), cupy.asarray(rs2), rn, g[2],
                       axis=axis)
    _close(dx, F.backward_dx(dy, x, rmean, invstd, rs1, rs2, rn, w, axis=axis),
           TOL[dtype] * 30, "backward_dx")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_batch_norm_running_stats_and_inference(dtype):
    x = _data((8, 6, 13, 9), dtype, 11)
    rm, rv = np.zeros(6, dtype), np.ones(6, dtype)
    grm, grv = cupy.asarray(rm), cupy.asarray(rv)
    for _ in range(3):
        y = fastbn.batch_norm(cupy.asarray(x), grm, grv, None, None, training=True, momentum=0.3)
        ry = fastbn.batch_norm(x, rm, rv, None, None, training=True, momentum=0.3)
        _close(y, ry, TOL[dtype], "train y")
    _close(grm, rm, 1e-6, "running_mean")
    _close(grv, rv, 1e-6, "running_var")
    y = fastbn.batch_norm(cupy.asarray(x), grm, grv, None, None, training=False)
    _close(y, fastbn.batch_norm(x, rm, rv, None, None, training=False), TOL[dtype], "eval y")


@pytest.mark.parametrize("shape,axis", [((64, 8, 64, 64), 1), ((64, 64, 64, 8), -1)], ids=str)
def test_stability_mean_1e4_times_std(shape, axis):
    # DESIGN.md's numerical contract: float32 data with mean 1e4 x std, statistics within
    # 1e-5 of the exact float64 statistics of the same float32 values.
    r = np.random.default_rng(12)
    x = (1e4 + r.standard_normal(shape)).astype(np.float32)
    n, mean, m2 = F.channel_moments(cupy.asarray(x), axis=axis)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64 = x.astype(np.float64)
    exact_mean, exact_var = x64.mean(axis=axes), x64.var(axis=axes)
    assert np.max(np.abs(_host(mean) - exact_mean) / exact_mean) < 1e-5
    assert np.max(np.abs(_host(m2) / n - exact_var) / exact_var) < 1e-5
    y = fastbn.batch_norm_forward(cupy.asarray(x), axis=axis)[0]
    ry = fastbn.batch_norm_forward(x, axis=axis)[0]
    assert float(np.max(np.abs(_host(y).astype(np.float64) - ry))) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((16, 3, 97, 101), 1), ((20011, 7), 1),
                                        ((8, 97, 101, 3), -1)], ids=str)
def test_bitwise_deterministic_run_to_run(shape, axis, dtype):
    x = cupy.asarray(_data(shape, dtype, 13))
    dy = cupy.asarray(_data(shape, dtype, 14, loc=0.0))
    C = shape[axis]
    w = cupy.asarray(_data((C,), dtype if dtype != np.float16 else np.float32, 15))

    def run():
        y, mean, invstd = fastbn.batch_norm_forward(x, w, w, axis=axis, activation="relu")
        dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                activation="relu", y=y)
        return [_host(a) for a in (y, mean, invstd, dx, dw, db)]

    first = run()
    for _ in range(3):
        for a, b in zip(first, run()):
            assert a.tobytes() == b.tobytes()


def test_layouts_out_and_degenerate_channels():
    r = np.random.default_rng(16)
    x = r.standard_normal((6, 4, 5, 3)).astype(np.float32)
    x[:, 1] = 2.5           # constant channel: x_hat = 0 (eps = 0: invstd = 0)
    x[0, 2, 0, 0] = np.nan  # poisons channel 2 only
    ry = fastbn.batch_norm_forward(x, eps=0.0)[0]
    for view in (lambda a: a[:, :, ::2], lambda a: a.transpose(0, 2, 3, 1)):
        gx, cx = view(cupy.asarray(x)), view(x)
        ax = 1 if gx.shape[1] == 4 else 3
        gy = _host(fastbn.batch_norm_forward(gx, eps=0.0, axis=ax)[0])
        cy = fastbn.batch_norm_forward(cx, eps=0.0, axis=ax)[0]
        np.testing.assert_array_equal(np.isnan(gy), np.isnan(cy))
        ok = ~np.isnan(cy)
        np.testing.assert_allclose(gy[ok], cy[ok], rtol=0, atol=1e-5)
    gy, _m, ginv = fastbn.batch_norm_forward(cupy.asarray(x), eps=0.0)
    assert float(ginv[1]) == 0.0 and bool((gy[:, 1] == 0).all())
    gx = cupy.asarray(x)
    assert fastbn.batch_norm_forward(gx, eps=0.0, out=gx)[0] is gx
    np.testing.assert_allclose(np.nan_to_num(_host(gx)), np.nan_to_num(ry), atol=1e-5)
    out = cupy.zeros(x.shape[::-1], cupy.float32).transpose(3, 2, 1, 0)
    assert fastbn.batch_norm_forward(cupy.asarray(x), eps=0.0, out=out)[0] is out
    np.testing.assert_allclose(np.nan_to_num(_host(out)), np.nan_to_num(ry), atol=1e-5)


def test_mixed_modules_are_refused():
    x = cupy.ones((4, 3), cupy.float32)
    with pytest.raises(TypeError, match=r"weight: expected a CuPy array like x, got numpy"):
        fastbn.batch_norm_forward(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"weight: expected a NumPy array, got cupy"):
        fastbn.batch_norm_forward(np.ones((4, 3), np.float32), cupy.ones(3, cupy.float32))


def test_layer_parity_cpu_gpu_over_ten_training_steps():
    r = np.random.default_rng(17)
    cpu = fastbn.BatchNorm(16, activation="relu", momentum=0.2)
    gpu = fastbn.BatchNorm(16, activation="relu", momentum=0.2).to("gpu")
    for step in range(10):
        x = (3.0 + 2.0 * r.standard_normal((8, 16, 12, 10))).astype(np.float32)
        dy = r.standard_normal(x.shape).astype(np.float32)
        _close(gpu(cupy.asarray(x)), cpu(x), 1e-5, f"y, step {step}")
        _close(gpu.backward(cupy.asarray(dy)), cpu.backward(dy), 1e-4, f"dx, step {step}")
        for layer in (cpu, gpu):
            layer.weight = layer.weight - 0.1 * layer.grad_weight
            layer.bias = layer.bias - 0.1 * layer.grad_bias
            layer.zero_grad()
    for name in ("weight", "bias", "running_mean", "running_var"):
        _close(getattr(gpu, name), getattr(cpu, name), 1e-5, name)
    cpu.eval()
    gpu.eval()
    x = r.standard_normal((8, 16, 12, 10)).astype(np.float32)
    _close(gpu(cupy.asarray(x)), cpu(x), 1e-5, "eval y")
    back = gpu.to("cpu")
    assert isinstance(back.weight, np.ndarray)


def test_module_compiled_once_per_device():
    x = cupy.asarray(_data((4, 3, 5), np.float32, 18))
    for _ in range(3):
        fastbn.batch_norm_forward(x)
        fastbn.batch_norm_forward(x.astype(cupy.float64))
    assert len(K._modules) == 1


@pytest.mark.parametrize("shape, axis", [((5, 6, 7, 7), 1), ((4, 9, 11, 6), -1), ((300, 7), 1)])
def test_masked_statistics_match_cpu(shape, axis):
    """mask= on CuPy arrays (the array-module path of fastbn.variants) against the CPU kernels."""
    r = np.random.default_rng(21)
    x = (3 + r.standard_normal(shape)).astype(np.float32)
    dy = r.standard_normal(shape).astype(np.float32)
    w = r.uniform(0.5, 2, shape[axis]).astype(np.float32)
    mask = r.random(tuple(s for i, s in enumerate(shape) if i != axis % len(shape))) < 0.7
    cy, cm, cs = fastbn.batch_norm_forward(x, w, axis=axis, mask=mask)
    gy, gm, gs = fastbn.batch_norm_forward(cupy.asarray(x), cupy.asarray(w), axis=axis,
                                           mask=cupy.asarray(mask))
    _close(gy, cy, 3e-6, "y")
    _close(gm, cm, 3e-6, "mean")
    _close(gs, cs, 3e-6, "invstd")
    cg = fastbn.batch_norm_backward(dy, x, cm, cs, w, axis=axis, mask=mask)
    gg = fastbn.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), gm, gs, cupy.asarray(w),
                                    axis=axis, mask=cupy.asarray(mask))
    for g, c, name in zip(gg, cg, ("dx", "dweight", "dbias")):
        _close(g, c, 3e-5, name)
