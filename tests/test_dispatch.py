"""CPU-or-GPU dispatch, tested on the CPU: module detection, mixed-module errors, routing of
every public function to fastbn.cuda.functional for CuPy input, and no CuPy import at
``import fastbn``. (The GPU functions themselves run in tests/test_cuda_compile.py under a host
emulation of the kernels, and on a real GPU in tests/gpu.)
"""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn import _backend
from fastbn import functional as F


class _CupyLike:
    """Looks like a CuPy array to fastbn: its type lives in a module named cupy."""

    def __init__(self, shape=(4, 3), dtype=np.float32):
        self.shape = shape
        self.dtype = np.dtype(dtype)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False),
                "version": 3}


_CupyLike.__module__ = "cupy._core.core"


class _OtherDeviceArray(_CupyLike):
    """A device array of another library (Numba, PyTorch...): not CuPy, not NumPy."""


_OtherDeviceArray.__module__ = "numba.cuda.cudadrv.devicearray"


def _run_python(code):
    env = dict(os.environ, PYTHONPATH=str(Path(fastbn.__file__).parents[1]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


# --------------------------------------------------------------------------- detection

def test_is_cupy_array_looks_at_the_type_module_only():
    assert _backend.is_cupy_array(_CupyLike())
    assert not _backend.is_cupy_array(np.zeros(3))
    assert not _backend.is_cupy_array(_OtherDeviceArray())
    assert not _backend.is_cupy_array([1.0, 2.0])
    assert not _backend.is_cupy_array(None)


def test_get_array_module_numpy_without_cupy():
    assert _backend.get_array_module(np.zeros(3), None, np.ones(2)) is np
    assert _backend.get_array_module() is np


def test_get_array_module_returns_cupy_for_cupy_arrays(monkeypatch):
    fake = type(sys)("cupy")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert _backend.get_array_module(_CupyLike(), None, _CupyLike()) is fake


@pytest.mark.parametrize("order", ["numpy_first", "cupy_first"])
def test_get_array_module_refuses_mixed_modules(order):
    args = [np.zeros(3), _CupyLike()]
    if order == "cupy_first":
        args.reverse()
    pattern = (r"argument 1: expected a (NumPy|CuPy) array like the first array argument, "
               r"got a (CuPy|NumPy) array")
    with pytest.raises(TypeError, match=pattern):
        _backend.get_array_module(*args)


# ------------------------------------------------------------------ device arrays, CPU path

@pytest.mark.parametrize("device_array", [_CupyLike, _OtherDeviceArray])
def test_numpy_path_refuses_device_arrays_with_their_name(device_array):
    x = np.ones((4, 3), np.float32)
    dev = device_array((3,))
    mod = type(dev).__module__
    with pytest.raises(TypeError, match=rf"weight: expected a NumPy array, got {mod}"):
        fastbn.batch_norm_forward(x, dev)
    with pytest.raises(TypeError, match=rf"dy: expected a NumPy array, got {mod}"):
        fastbn.batch_norm_backward(device_array((4, 3)), x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match=rf"running_mean: expected a NumPy array, got {mod}"):
        fastbn.batch_norm(x, running_mean=dev, running_var=np.ones(3, np.float32),
                          training=False)


def test_numpy_path_refuses_a_foreign_device_x():
    with pytest.raises(TypeError, match=r"x: expected a NumPy array, got numba\.cuda"):
        fastbn.batch_norm_forward(_OtherDeviceArray((4, 3)))


# --------------------------------------------------------------------------- routing

_PUBLIC = ["batch_norm_forward", "forward_with_stats", "batch_norm_backward", "batch_norm",
           "channel_moments", "normalize", "backward_sums", "backward_dx", "invstd_from_var"]


def _sample_args(name):
    x = _CupyLike()
    c = [object() for _ in range(8)]  # opaque stand-ins: the dispatch must pass them through
    return {
        "batch_norm_forward": ((x, c[0], c[1]), dict(axis=-1, eps=0.5, activation="relu",
                                                     out=c[2])),
        "forward_with_stats": ((x, c[0], c[1]), dict(axis=-1, eps=0.5, activation="relu",
                                                     out=c[2])),
        "batch_norm_backward": ((c[0], x, c[1], c[2], c[3]), dict(axis=-1, training=False,
                                                                  activation="relu", y=c[4])),
        "batch_norm": ((x, c[0], c[1], c[2], c[3]), dict(training=False, momentum=0.5, eps=0.5,
                                                         axis=-1, activation="relu",
                                                         out=c[4])),
        "channel_moments": ((x,), dict(axis=-1)),
        "normalize": ((x, c[0], c[1], c[2], c[3]), dict(axis=-1, activation="relu", out=c[4])),
        "backward_sums": ((c[0], x, c[1]), dict(axis=-1, activation="relu", y=c[2])),
        "backward_dx": ((c[0], x, c[1], c[2], c[3], c[4], 7, c[5]),
                        dict(axis=-1, training=False, activation="relu", y=c[6])),
        "invstd_from_var": ((_CupyLike((3,)), 0.5), {}),  # the layer's eval mode uses it
    }[name]


@pytest.mark.parametrize("name", _PUBLIC)
def test_cupy_input_goes_to_the_gpu_function_with_every_argument(name, monkeypatch):
    from fastbn.cuda import functional as G

    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return "from-gpu"

    monkeypatch.setattr(G, name, record)
    args, kwargs = _sample_args(name)
    assert getattr(F, name)(*args, **kwargs) == "from-gpu"
    assert len(calls) == 1
    # Bind both calls to the public signature: every argument arrives, by position or name.
    sig = inspect.signature(getattr(F, name))
    got = sig.bind(*calls[0][0], **calls[0][1]).arguments
    want = sig.bind(*args, **kwargs).arguments
    assert got.keys() == want.keys()
    assert all(got[k] is want[k] for k in want)


@pytest.mark.parametrize("name", _PUBLIC)
def test_gpu_functions_have_the_cpu_signatures(name):
    from fastbn.cuda import functional as G

    assert inspect.signature(getattr(G, name)) == inspect.signature(getattr(F, name))


def test_numpy_input_stays_on_the_cpu(monkeypatch):
    from fastbn.cuda import functional as G

    def boom(*args, **kwargs):
        raise AssertionError("the GPU path was taken for NumPy input")

    for name in _PUBLIC:
        monkeypatch.setattr(G, name, boom)
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert isinstance(y, np.ndarray)
    dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert isinstance(dx, np.ndarray)


# --------------------------------------------------------------------------- no CuPy at import

def test_import_fastbn_does_not_import_cupy():
    run = _run_python(
        "import sys, numpy as np, fastbn\n"
        "x = np.ones((4, 3), np.float32)\n"
        "fastbn.batch_norm_forward(x); fastbn.batch_norm(x)\n"
        "import fastbn.cuda, fastbn.cuda.functional, fastbn.cuda.kernels\n"
        "assert 'cupy' not in sys.modules, sorted(m for m in sys.modules if 'cupy' in m)\n"
    )
    assert run.returncode == 0, run.stderr


def test_gpu_availability_says_why_not_without_cupy():
    run = _run_python(
        "import sys; sys.modules['cupy'] = None  # as if CuPy were not installed\n"
        "import fastbn.cuda as c\n"
        "assert not c.is_available()\n"
        "print(c.unavailable_reason())\n"
    )
    assert run.returncode == 0, run.stderr
    assert "CuPy is not installed" in run.stdout and "cupy-cuda12x" in run.stdout


def test_gpu_bench_without_cupy_exits_with_the_reason():
    run = _run_python(
        "import sys; sys.modules['cupy'] = None\n"
        "from fastbn.cuda import bench\n"
        "sys.exit(bench.main(['--rows', 'nc-32x16']))\n"
    )
    assert run.returncode == 2
    assert "fastbn GPU bench: CuPy is not installed" in run.stderr
