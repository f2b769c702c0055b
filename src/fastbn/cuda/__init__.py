"""fastbn's GPU path: the functional API on CuPy arrays, with CUDA kernels of our own.

You do not call this package directly: ``fastbn.batch_norm_forward(x)`` and the other
functions of :mod:`fastbn.functional` dispatch here when ``x`` is a CuPy array, and return CuPy
arrays. ``batch_norm.cu`` holds the kernels; :mod:`fastbn.cuda.kernels` compiles it with
``cupy.RawModule`` on first use (once per process and device). Importing this package does not
import CuPy.
"""

__all__ = ["is_available", "unavailable_reason"]


def unavailable_reason():
    """None when CuPy and a CUDA device are usable, else why not (a sentence)."""
    try:
        import cupy
    except ImportError as exc:
        return (f"CuPy is not installed ({exc}); install cupy-cuda12x or cupy-cuda13x, "
                "whichever matches your CUDA driver")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when there is no driver or no device
        return f"CuPy is installed but cannot reach a CUDA device ({exc})"
    if n < 1:
        return "CuPy is installed but there is no CUDA device"
    return None


def is_available():
    """True when CuPy is installed and a CUDA device is present."""
    return unavailable_reason() is None
