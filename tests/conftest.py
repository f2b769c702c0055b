import os
from pathlib import Path

import numpy as np
import pytest


def pytest_report_header(config):
    try:
        import fastbn
    except ImportError as exc:  # the import error itself is reported by the tests
        return f"fastbn: import failed ({exc})"
    return (
        f"fastbn {fastbn.__version__}: OpenMP {'on' if fastbn.openmp_enabled() else 'OFF'}, "
        f"{fastbn.get_num_threads()} thread(s), numpy {np.__version__}"
    )


def rel_err(actual, expected, scale=None):
    """max |actual - expected| / scale in float64; scale defaults to max |expected|.

    Pass the magnitude of the terms that were summed when the result can cancel to ~0 (the
    backward of a 2-sample batch is ~0 while its terms are O(|weight * invstd * dy|)).
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = float(np.max(np.abs(e))) if e.size else 0.0
    scale = max(scale, 1e-30)
    return float(np.max(np.abs(a - e))) / scale if e.size else 0.0


TOL = {np.float64: 1e-12, np.float32: 2e-6, np.float16: 2e-3}


def _cpu_levels():
    try:
        from fastbn import _kernels
    except ImportError:  # reported by the tests themselves, as in pytest_report_header
        return ["baseline"]
    return list(_kernels.cpu_levels())


@pytest.fixture(params=_cpu_levels())
def level(request):
    """Each ISA level this CPU runs, made the kernels' level for the test (restored after)."""
    from fastbn import _kernels

    prev = _kernels.set_cpu_level(request.param)
    try:
        yield request.param
    finally:
        _kernels.set_cpu_level(prev)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def subprocess_env(**extra):
    """Environment for a child Python that must import the same fastbn as these tests.

    The tests may run against the source tree (PYTHONPATH=src after an in-place build) or an
    installed copy (CI: `pip install .`, where src/ holds no compiled kernels): the child gets
    the directory of the fastbn this process imported first on its path.
    """
    import fastbn

    here = str(Path(fastbn.__file__).resolve().parents[1])
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def numerical_gradient(loss, args, k, h):
    """Central differences of the scalar loss(*args) with respect to args[k] (step h)."""
    num = np.zeros_like(args[k])
    for i in np.ndindex(args[k].shape):
        hi = [a.copy() for a in args]
        lo = [a.copy() for a in args]
        hi[k][i] += h
        lo[k][i] -= h
        num[i] = (loss(*hi) - loss(*lo)) / (2 * h)
    return num
