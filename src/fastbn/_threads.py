"""Thread count of the fastbn kernels.

By default the kernels use OpenMP's current setting, read at every call, so OMP_NUM_THREADS and
threadpoolctl's ``threadpool_limits`` take effect. ``set_num_threads(n)`` overrides that for the
whole process until ``set_num_threads(None)``. Results do not depend on the thread count.
"""
from __future__ import annotations

import operator

from . import _kernels

_num_threads = None


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads in fastbn's kernels (``None``: follow OpenMP's setting again)."""
    global _num_threads
    if n is None:
        _num_threads = None
        return
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(
            f"n: expected a positive int or None, got {type(n).__name__}"
        ) from None
    if n < 1:
        raise ValueError(f"n: expected a positive int or None, got {n}")
    _num_threads = n


def get_num_threads() -> int:
    """The number of threads the next fastbn call will use."""
    return _num_threads if _num_threads is not None else _kernels.omp_max_threads()


def openmp_enabled() -> bool:
    """True when the installed kernels were compiled with OpenMP (else they run serially)."""
    return _kernels.openmp_enabled()
