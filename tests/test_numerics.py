"""The numerical contract: stable statistics, degenerate channels, determinism, threads."""
import os
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref, functional as F

from conftest import rel_err


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("shape,axis", [((64, 8, 33, 17), 1), ((64, 33, 17, 8), -1),
                                        ((4, 3, 70000), 1), ((50000, 3), 1)])
def test_stable_statistics_float32(offset, shape, axis, rng):
    # mean 10^4 (10^6) times the standard deviation: E[x^2] - E[x]^2 in float32 fails here
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, eps=0.0)
    xd = x.astype(np.float64)  # the exact statistics of the same float32 values
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    exact_mean = xd.mean(axis=red)
    exact_var = xd.var(axis=red)
    var = 1.0 / invstd**2
    assert np.max(np.abs(mean - exact_mean) / np.abs(exact_mean)) < 1e-5
    assert np.max(np.abs(var - exact_var) / exact_var) < 1e-5
    # and the normalised output is accurate, not just the statistics
    ry, *_ = ref.forward(x, axis=axis, eps=0.0)
    assert rel_err(y, ry) < 1e-5
    # so is the backward, which uses the float64 mean handed back by the forward
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    rdx, rdw, rdb = ref.backward(dy, x, exact_mean, 1 / np.sqrt(exact_var), axis=axis)
    assert rel_err(dx, rdx) < 1e-4
    assert rel_err(dw, rdw, np.abs(rdb).max() + np.abs(rdw).max() + 1) < 1e-4


def test_stable_statistics_float64(rng):
    x = 1e8 + rng.standard_normal((300, 5, 40))
    _, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0)
    xd = x - 1e8  # exact in float64 here, so this gives the exact deviations
    exact_var = xd.var(axis=(0, 2))
    assert np.max(np.abs(1 / invstd**2 - exact_var) / exact_var) < 1e-8


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_constant_channel_gives_zero_xhat(eps, dtype, axis, rng):
    x = rng.standard_normal((40, 3, 50)).astype(dtype)
    if axis == -1:
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    sl = (slice(None), slice(None), 1) if axis == -1 else (slice(None), 1)
    x[sl] = 12345.678  # channel 1 constant
    w, b = np.array([1.0, 2.0, 3.0]), np.array([0.5, -0.25, 0.125])
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, eps=eps)
    assert np.all(np.isfinite(y))
    assert np.all(y[sl] == dtype(-0.25))  # x_hat = 0 exactly: y = beta
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    if eps == 0.0:
        assert invstd[1] == 0.0 and np.all(dx[sl] == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("axis", [1, -1])
def test_nonfinite_poisons_only_its_channel(bad, axis, rng):
    x = rng.standard_normal((30, 4, 20))
    if axis == -1:
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    clean = x.copy()
    idx = (7, 5, 2) if axis == -1 else (7, 2, 5)
    x[idx] = bad
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    yc, meanc, invc = fastbn.batch_norm_forward(clean, axis=axis)
    others = [0, 1, 3]
    take = (lambda a: a[..., others]) if axis == -1 else (lambda a: a[:, others])
    assert np.array_equal(take(y), take(yc))
    assert np.array_equal(mean[others], meanc[others])
    assert not np.isfinite(mean[2]) or not np.isfinite(invstd[2]) or not np.all(
        np.isfinite(y[..., 2] if axis == -1 else y[:, 2]))
    dy = rng.standard_normal(x.shape)
    dx, dw, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    dxc, dwc, _ = fastbn.batch_norm_backward(dy, clean, meanc, invc, axis=axis)
    assert np.array_equal(take(dx), take(dxc)) and np.array_equal(dw[others], dwc[others])


# Shapes that exercise every partition: many chunks per channel (NCL), ragged tiles and
# super-rows (channels-last), more tiles than threads, sizes above the parallel threshold.
THREAD_CASES = [
    ((3, 5, 40001), 1, np.float32),
    ((7, 3, 101, 97), 1, np.float64),
    ((70001, 3), 1, np.float32),
    ((301, 1030), -1, np.float32),
    ((33, 17, 19, 70), -1, np.float64),
    ((2, 2500, 13), 1, np.float32),
]
# The reduction partition's modes (_kernels._reduction): NCL runs spanning every channel (a slot
# per channel and run), runs shorter than C (a slot per segment), pieces of long segments,
# one-block segments (7x7, and shorter than a vector), half-size runs of small inputs;
# channels-last super-rows at C = 256, and enough slots for a parallel merge.
PARTITION_CASES = [
    ((64, 16, 2500), 1, np.float32),
    ((40, 300, 500), 1, np.float32),
    ((2, 3, 70001), 1, np.float64),
    ((40, 64, 49), 1, np.float32),
    ((100, 64, 7), 1, np.float32),
    ((16, 40, 49), 1, np.float64),
    ((500, 256), 1, np.float32),
    ((2100, 1030), 1, np.float32),
]
THREAD_CASES += PARTITION_CASES


@pytest.mark.parametrize("shape,axis,dtype", PARTITION_CASES)
def test_reduction_partitions_match_float64(shape, axis, dtype, rng):
    x = (5.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    red = tuple(i for i in range(x.ndim) if i != axis)
    xd, dyd = x.astype(np.float64), dy.astype(np.float64)
    n, mean, m2 = F.channel_moments(x, axis=axis)
    emean = xd.mean(axis=red)
    dev = xd - np.expand_dims(emean, red)
    assert n == x.size // x.shape[axis]
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert rel_err(mean, emean) < tol
    assert rel_err(m2, (dev**2).sum(axis=red)) < tol
    _, s1, s2 = F.backward_sums(dy, x, mean, axis=axis)
    assert rel_err(s1, dyd.sum(axis=red), np.abs(dyd).sum(axis=red).max()) < tol
    terms = np.abs(dyd * dev).sum(axis=red).max()
    assert rel_err(s2, (dyd * dev).sum(axis=red), terms) < tol


def run_all(x, axis, rng_seed=7):
    r = np.random.default_rng(rng_seed)
    C = x.shape[axis]
    w, b = r.standard_normal(C), r.standard_normal(C)
    dy = r.standard_normal(x.shape).astype(x.dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, activation="relu")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            activation="relu", y=y)
    y2, mean2, invstd2 = fastbn.batch_norm_forward(x, w, b, axis=axis)
    dx2, dw2, db2 = fastbn.batch_norm_backward(dy, x, mean2, invstd2, w, axis=axis)
    ye = fastbn.batch_norm(x, mean, 1 / invstd**2, w, b, training=False, axis=axis)
    return [y, mean, invstd, dx, dw, db, y2, dx2, dw2, db2, ye]


def assert_bitwise(results_a, results_b):
    for a, b in zip(results_a, results_b):
        assert a.dtype == b.dtype
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("shape,axis,dtype", THREAD_CASES)
def test_bitwise_identical_for_any_thread_count(shape, axis, dtype, rng):
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    try:
        fastbn.set_num_threads(1)
        base = run_all(x, axis)
        for n in (2, 3, 4):
            fastbn.set_num_threads(n)
            assert_bitwise(base, run_all(x, axis))
        fastbn.set_num_threads(2)
        assert_bitwise(base, run_all(x, axis))  # run to run
    finally:
        fastbn.set_num_threads(None)


def test_threadpoolctl_sees_and_limits_fastbn(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not fastbn.openmp_enabled():
        pytest.skip("fastbn was built without OpenMP (FASTBN_NO_OPENMP)")
    x = (3.0 + rng.standard_normal((70001, 3))).astype(np.float32)
    fastbn.set_num_threads(None)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
        base = run_all(x, 1)
    for n in (2, 3, 4):
        with threadpoolctl.threadpool_limits(limits=n, user_api="openmp"):
            assert fastbn.get_num_threads() == n
            assert_bitwise(base, run_all(x, 1))
    import fastbn._kernels as kernels

    libs = [m for m in threadpoolctl.threadpool_info() if m["user_api"] == "openmp"]
    assert libs, "threadpoolctl sees no OpenMP runtime although fastbn loaded one"
    assert kernels.omp_max_threads() >= 1


def test_set_num_threads_validation():
    with pytest.raises(ValueError, match="n: expected a positive int"):
        fastbn.set_num_threads(0)
    with pytest.raises(TypeError, match="n: expected a positive int or None, got float"):
        fastbn.set_num_threads(1.5)
    fastbn.set_num_threads(3)
    assert fastbn.get_num_threads() == 3
    fastbn.set_num_threads(None)
    assert fastbn.get_num_threads() >= 1


def test_concurrent_python_threads_match_serial(rng):
    inputs = [((1.0 + i) * rng.standard_normal((16, 6 + i, 40))).astype(np.float32)
              for i in range(8)]
    serial = [run_all(x, 1, rng_seed=i) for i, x in enumerate(inputs)]
    results = [None] * 8
    errors = []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for _ in range(5):
                results[i] = run_all(inputs[i], 1, rng_seed=i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s, r in zip(serial, results):
        assert_bitwise(s, r)


def test_openmp_was_not_lost():
    # A build that silently fell back to serial code would pass every other test.
    if os.environ.get("FASTBN_NO_OPENMP", "") not in ("", "0"):
        pytest.skip("FASTBN_NO_OPENMP is set: a serial build was requested")
    assert fastbn.openmp_enabled(), (
        "fastbn's kernels were built without OpenMP; install an OpenMP runtime (libgomp) and "
        "rebuild, or set FASTBN_NO_OPENMP=1 to request a serial build"
    )
