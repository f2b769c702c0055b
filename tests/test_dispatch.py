"""CPU-or-GPU dispatch, tested on the CPU: module detection, mixed-module errors, routing of
every public function to the CUDA backend (fastbn.cuda.backend) for CuPy input, and no CuPy import at
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
# One functional layer serves both array modules: it validates, lays x out and calls a backend's
# verbs. These tests check which backend a call reaches and that the two backends offer the same
# verbs; the CUDA verbs themselves run in tests/test_cuda_compile.py (host emulation) and tests/gpu.

_VERBS = ["stats", "forward_train", "normalize", "normalize_running", "backward_sums",
          "backward_dx", "backward", "affine", "update_running", "invstd", "zeros", "chan",
          "compute_dtype", "kernel_writable", "same_view"]


def test_cupy_arrays_select_the_cuda_backend_and_numpy_the_cpu_one():
    from fastbn import _cpu
    from fastbn.cuda import backend as cuda_backend

    assert F._backend(_CupyLike()) is cuda_backend
    for a in (np.zeros((2, 3)), [[1.0, 2.0]], None):
        assert F._backend(a) is _cpu


@pytest.mark.parametrize("verb", _VERBS)
def test_both_backends_have_every_verb_with_one_signature(verb):
    from fastbn import _cpu
    from fastbn.cuda import backend as cuda_backend

    assert (inspect.signature(getattr(cuda_backend, verb))
            == inspect.signature(getattr(_cpu, verb)))


def test_numpy_input_never_reaches_the_cuda_backend(monkeypatch):
    from fastbn.cuda import backend as cuda_backend

    def boom(*args, **kwargs):
        raise AssertionError("the GPU path was taken for NumPy input")

    for verb in _VERBS:
        monkeypatch.setattr(cuda_backend, verb, boom)
    x = np.random.default_rng(0).standard_normal((6, 3, 2)).astype(np.float32)
    xs = x[:, :, ::2]  # not plain: the general path
    for a in (x, xs):
        y, mean, invstd = fastbn.batch_norm_forward(a)
        assert isinstance(y, np.ndarray)
        dx, dw, db = fastbn.batch_norm_backward(np.ones_like(a), a, mean, invstd)
        assert isinstance(dx, np.ndarray)


# --------------------------------------------------------------------------- no CuPy at import

def test_import_fastbn_does_not_import_cupy():
    run = _run_python(
        "import sys, numpy as np, fastbn\n"
        "x = np.ones((4, 3), np.float32)\n"
        "fastbn.batch_norm_forward(x); fastbn.batch_norm(x, None, None, training=True)\n"
        "import fastbn.cuda, fastbn.cuda.backend, fastbn.cuda.kernels\n"
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


@pytest.mark.parametrize("entry", [
    "from fastbn.cuda import bench\nsys.exit(bench.main(['--rows', 'nc-32x16']))\n",
    "from fastbn.__main__ import main\nsys.exit(main(['bench', '--gpu', '--rows', 'nc-32x16']))\n",
], ids=["fastbn.cuda.bench", "python -m fastbn bench --gpu"])
def test_gpu_bench_without_cupy_exits_with_the_reason(entry):
    run = _run_python("import sys; sys.modules['cupy'] = None\n" + entry)
    assert run.returncode == 2
    assert "fastbn GPU bench: CuPy is not installed" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
