"""Every ISA level of the kernels (baseline, x86-64-v3, x86-64-v4, as far as this CPU runs them)
against the float64 reference, its thread-count invariance, and the level switch itself."""
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _kernels, _reference
from fastbn.functional import (batch_norm_backward, batch_norm_forward, channel_moments,
                               normalize)

from conftest import subprocess_env

LEVELS = _kernels.cpu_levels()

# (shape, axis): NCL with short (7x7 = 49) and long segments, a segment shorter than a register,
# and channels-last; short segments read as rows (inner 7 and 11, tiles of whole channels) and
# a few wide rows (one row block, finished in the tasks)
CASES = [((6, 24, 7, 7), 1), ((3, 5, 61, 67), 1), ((4, 9, 3), 1), ((2, 300, 5), 1),
         ((40, 33), -1), ((5, 7, 7, 70), -1), ((16, 300, 7), 1), ((5, 97, 11), 1),
         ((8, 3000), 1)]


def _tol(dtype):
    return (2e-5, 2e-5) if dtype == np.float32 else (1e-11, 1e-11)


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def _close(a, ref, dtype, scale=None):
    rtol, atol = _tol(dtype)
    s = np.abs(ref).max() if scale is None else scale
    np.testing.assert_allclose(np.asarray(a, np.float64), ref, rtol=rtol, atol=atol * max(s, 1))


def test_levels_listed():
    assert LEVELS[0] == "baseline"
    assert set(LEVELS) <= {"baseline", "x86-64-v3", "x86-64-v4"}
    assert _kernels.cpu_level() in LEVELS
    assert list(LEVELS) == sorted(LEVELS, key=["baseline", "x86-64-v3", "x86-64-v4"].index)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_level_matches_reference(level, dtype, shape, axis):
    assert _kernels.cpu_level() == level
    x, dy = _data(shape, dtype)
    C = shape[axis]
    w = np.linspace(0.5, 1.5, C).astype(dtype)
    b = np.linspace(-0.2, 0.3, C).astype(dtype)
    ry, rmean, rvar, rinv = _reference.forward(x, w, b, axis=axis, activation="relu")
    # channel statistics
    n, mean, m2 = channel_moments(x, axis=axis)
    _close(mean, rmean, dtype)
    _close(m2 / n, rvar, dtype)
    # training forward, with and without ReLU
    y, m, inv = batch_norm_forward(x, w, b, axis=axis, activation="relu")
    _close(y, ry, dtype)
    _close(inv, rinv, dtype)
    y0, _, _ = batch_norm_forward(x, w, b, axis=axis)
    _close(y0, _reference.forward(x, w, b, axis=axis)[0], dtype)
    # eval forward
    ye = normalize(x, rmean, rinv, w, b, axis=axis, activation="relu")
    _close(ye, ry, dtype)
    # backward (training and inference), with the ReLU mask
    rdx, rdw, rdb = _reference.backward(dy, x, rmean, rinv, w, axis=axis, y=ry)
    dx, dw, db = batch_norm_backward(dy, x, m, inv, w, axis=axis, activation="relu", y=y)
    _close(dx, rdx, dtype)
    _close(dw, rdw, dtype, scale=np.abs(dy).sum() / C)
    _close(db, rdb, dtype, scale=np.abs(dy).sum() / C)
    rdx, _, _ = _reference.backward(dy, x, rmean, rinv, w, axis=axis, training=False)
    dx, _, _ = batch_norm_backward(dy, x, m, inv, w, axis=axis, training=False)
    _close(dx, rdx, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((8, 64, 7, 7), 1), ((4, 16, 56, 56), 1),
                                        ((64, 7, 7, 96), -1), ((16, 3584, 7), 1),
                                        ((16, 25088), 1)])
def test_level_bitwise_thread_invariant(level, dtype, shape, axis):
    x, dy = _data(shape, dtype, seed=1)
    results = []
    try:
        for nt in (1, 2, 3):
            fastbn.set_num_threads(nt)
            y, m, inv = batch_norm_forward(x, axis=axis, activation="relu")
            dx, dw, db = batch_norm_backward(dy, x, m, inv, axis=axis, activation="relu", y=y)
            _, mean, m2 = channel_moments(x, axis=axis)
            results.append((y, m, inv, dx, dw, db, mean, m2))
    finally:
        fastbn.set_num_threads(None)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_set_cpu_level_errors():
    cur = _kernels.cpu_level()
    with pytest.raises(ValueError, match="x86-64-v9"):
        _kernels.set_cpu_level("x86-64-v9")
    with pytest.raises(TypeError):
        _kernels.set_cpu_level(3)
    for name in ("baseline", "x86-64-v3", "x86-64-v4"):
        if name not in LEVELS:
            with pytest.raises(ValueError, match=name):
                _kernels.set_cpu_level(name)
    assert _kernels.cpu_level() == cur
    assert _kernels.set_cpu_level(cur) == cur


def test_set_cpu_level_returns_previous():
    cur = _kernels.cpu_level()
    try:
        assert _kernels.set_cpu_level("baseline") == cur
        assert _kernels.cpu_level() == "baseline"
        assert _kernels.set_cpu_level(LEVELS[-1]) == "baseline"
    finally:
        _kernels.set_cpu_level(cur)


def _child_level(value):
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import fastbn._kernels as k; print(k.cpu_level())")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(FASTBN_CPU_LEVEL=value),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


def test_env_baseline_in_child():
    level, err = _child_level("baseline")
    assert level == "baseline"
    assert "RuntimeWarning" not in err


def test_env_unknown_value_warns_and_uses_best():
    level, err = _child_level("pentium-mmx")
    assert level == LEVELS[-1]
    assert "RuntimeWarning" in err and "pentium-mmx" in err


@pytest.mark.skipif("x86-64-v4" in LEVELS, reason="this CPU runs every level")
def test_env_unsupported_level_warns_and_caps():
    level, err = _child_level("x86-64-v4")
    assert level == LEVELS[-1]
    assert "RuntimeWarning" in err and "x86-64-v4" in err


def test_stream_read():
    a = np.arange(1000, dtype=np.uint64)
    buf = a.view(np.uint8)
    want = int(a.sum()) % (1 << 64)
    cur = _kernels.cpu_level()
    try:
        for name in LEVELS:
            _kernels.set_cpu_level(name)
            for nt in (1, 2, 3):
                assert _kernels.stream_read(buf, nt) == want
    finally:
        _kernels.set_cpu_level(cur)
    assert _kernels.stream_read(np.zeros(0, np.uint8), 1) == 0
    with pytest.raises(TypeError):
        _kernels.stream_read(np.zeros(8, np.float32), 1)
