"""What the benchmark ran on: CPU model, caches, thread counts, OpenMP runtimes, memory settings.

The OpenMP runtimes are the ones loaded in this process as threadpoolctl's
``threadpool_info()`` lists them (fastbn's kernels and PyTorch may share one libgomp); the
kernels' instruction-set level is ``fastbn._kernels.cpu_level()`` where the build has it.
"""
import os
import platform

import numpy as np

from .. import _kernels
from .._threads import get_num_threads, openmp_enabled


def cpu_model():
    """The CPU's model name: /proc/cpuinfo, else lscpu, else platform.

    /proc/cpuinfo's family and model numbers follow the name: a virtual machine may show a
    bare "AMD EPYC", which the numbers pin down (family 26 = Zen 5).
    """
    try:
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
        if fields.get("model name"):
            fam, mod = fields.get("cpu family"), fields.get("model")
            return fields["model name"] + (f" (family {fam} model {mod})"
                                           if fam and mod is not None else "")
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cache_sizes():
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            p = os.path.join(base, entry)
            try:
                with open(os.path.join(p, "level")) as f:
                    level = f.read().strip()
                with open(os.path.join(p, "type")) as f:
                    kind = f.read().strip()
                with open(os.path.join(p, "size")) as f:
                    size = f.read().strip()
            except OSError:
                continue
            if kind in ("Data", "Unified"):
                sizes[f"L{level}"] = size
    except OSError:
        pass
    return sizes


def openmp_runtimes():
    """The OpenMP runtimes loaded in this process: [{"filepath", "prefix", "version",
    "num_threads"}] from threadpoolctl's ``threadpool_info()``; None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    try:
        info = threadpool_info()
    except Exception:  # a report, not a failure
        return None
    return [{k: lib.get(k) for k in ("filepath", "prefix", "version", "num_threads")}
            for lib in info if lib.get("user_api") == "openmp"]


def usable_cpus():
    """CPUs this process may run on (its affinity mask), else the logical CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def kernels_cpu_level():
    """``fastbn._kernels.cpu_level()`` (the instruction-set level the kernels run, e.g.
    "x86-64-v4") where this build has it, else None."""
    f = getattr(_kernels, "cpu_level", None)
    if f is None:
        return None
    try:
        level = f() if callable(f) else f
    except Exception as e:  # a report, not a failure: say what went wrong
        return f"error ({type(e).__name__}: {e})"
    return None if level is None else str(level)


def machine_info(torch):
    """The machine and the process's settings, as the header and ``--json`` show them."""
    runtimes = openmp_runtimes()
    return {
        "cpu": cpu_model(),
        "kernels_cpu_level": kernels_cpu_level(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "fastbn_threads": get_num_threads(),
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "caches": _cache_sizes(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "fastbn_openmp": openmp_enabled(),
        "openmp_libraries": sorted({r["filepath"] for r in runtimes or () if r["filepath"]}),
        "openmp_runtimes": runtimes,
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "transparent_hugepages": _thp_mode(),
        "numpy_madvise_hugepage": _numpy_madvise_hugepage(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "load_average_start": _load_average(),
    }


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def _numpy_madvise_hugepage():
    # NumPy asks for huge pages on its large allocations (fewer page faults on a fresh output);
    # PyTorch's CPU allocator does only with THP_MEM_ALLOC_ENABLE=1.
    try:
        from numpy._core.multiarray import _get_madvise_hugepage
    except ImportError:
        try:
            from numpy.core.multiarray import _get_madvise_hugepage
        except ImportError:
            return None
    return bool(_get_madvise_hugepage())


def _load_average():
    # Other processes on the cores make multithreaded timings swing: say how busy it was.
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def device_info(cp, torch):
    """The CUDA device, CuPy and (when given) PyTorch/cuDNN of the GPU bench."""
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    info = {"device": name, "cupy": cp.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cpu": cpu_model()}
    if torch is not None:
        info["torch"] = torch.__version__
        info["cudnn"] = torch.backends.cudnn.version()
    return info
