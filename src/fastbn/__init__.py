"""fastbn: fast, numerically stable batch normalization for NumPy.

Public API (see README.md): batch_norm_forward, batch_norm_backward, batch_norm, BatchNorm,
set_num_threads, get_num_threads; fastbn.analysis and fastbn.distributed load on first use.
"""
try:
    from . import _kernels
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        "fastbn: could not load its compiled kernels (fastbn._kernels): "
        f"{exc}. The usual causes are a build that did not run (in a source checkout: "
        "`python setup.py build_ext --inplace` and PYTHONPATH=src, or `pip install .` and import "
        "from outside the checkout, whose src/ would shadow the installed copy) or a missing "
        "OpenMP runtime "
        "(install libgomp1 on Debian/Ubuntu, libomp on macOS)."
    ) from exc

from ._threads import get_num_threads, openmp_enabled, set_num_threads
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layer import BatchNorm, select_state_dict

from ._version import __version__

__all__ = [
    "BatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "get_num_threads",
    "openmp_enabled",
    "select_state_dict",
    "set_num_threads",
]


def __getattr__(name):
    # Subpackages with heavier dependencies (SciPy, mpi4py) load on first use.
    if name in ("analysis", "distributed"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastbn' has no attribute {name!r}")
