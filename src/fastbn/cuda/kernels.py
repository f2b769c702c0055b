"""Load ``batch_norm.cu`` with ``cupy.RawModule`` and launch its kernels.

Nothing here imports CuPy at module import: the source is compiled (by NVRTC, through CuPy) the
first time a kernel is asked for on a device, once per process and device, and the kernel
handles are cached. CuPy also keeps the compiled binary in its on-disk kernel cache, so later
processes skip the compilation.

The launch geometry of the reductions is fixed by the shape alone (never by the device), which
is what makes the statistics bitwise reproducible; the elementwise kernels may use any grid.
The constants below must agree with the ``#define`` lines of batch_norm.cu
(tests/test_cuda_compile.py checks them).
"""
import math
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("batch_norm.cu")

THREADS = 256        # FBN_THREADS: every kernel is launched with blocks of this size
NCL_CHUNK = 4096     # FBN_NCL_CHUNK: values of one channel per NCL statistics block
ROW_ITEMS = 16       # FBN_ROW_ITEMS: rows per row-lane of one channels-last block
UNROLL = 4           # FBN_UNROLL: elements per thread per grid stride, elementwise kernels
NLC_TILE = 32        # channels per channels-last tile when C > THREADS (a warp's worth)
MERGE_CHANNELS = THREADS // 32   # channels per block of the merge kernels (a warp each)

KERNELS = (
    "stats_ncl", "stats_nlc", "stats_merge", "norm_coefs", "normalize",
    "bwd_ncl", "bwd_nlc", "bwd_merge", "dx_coefs", "backward_dx",
)
SUFFIXES = {"float32": "f32", "float64": "f64", "float16": "f16"}

_lock = threading.Lock()
_modules: dict = {}     # device id -> cupy.RawModule
_functions: dict = {}   # (device id, kernel name) -> cupy.RawKernel
_sm_counts: dict = {}   # device id -> multiprocessor count


def kernel_names():
    """Every extern "C" kernel symbol the Python side launches."""
    return [f"fbn_{k}_{s}" for s in SUFFIXES.values() for k in KERNELS]


def source():
    return SOURCE.read_text()


def _device_id(cupy):
    return cupy.cuda.runtime.getDevice()


def get(cupy, kernel, dtype):
    """The RawKernel ``fbn_<kernel>_<dtype suffix>`` for the current device (compiled once)."""
    dev = _device_id(cupy)
    name = f"fbn_{kernel}_{SUFFIXES[np.dtype(dtype).name]}"
    fn = _functions.get((dev, name))
    if fn is None:
        with _lock:
            module = _modules.get(dev)
            if module is None:
                module = cupy.RawModule(code=source())
                _modules[dev] = module
            fn = module.get_function(name)
            _functions[(dev, name)] = fn
    return fn


def sm_count(cupy):
    dev = _device_id(cupy)
    n = _sm_counts.get(dev)
    if n is None:
        try:
            n = int(cupy.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
        except (KeyError, AttributeError):
            n = 80
        _sm_counts[dev] = n
    return n


def launch(cupy, kernel, dtype, grid, args):
    """Launch a kernel with 1-D blocks of THREADS threads on the current stream."""
    get(cupy, kernel, dtype)((int(grid),), (THREADS,), args)


def elementwise_grid(cupy, total):
    """Blocks for an elementwise kernel: enough for one unrolled pass, at most 16 waves' worth
    of resident blocks (the kernels stride over the rest)."""
    need = -(-total // (THREADS * UNROLL))
    return max(1, min(need, 16 * sm_count(cupy)))


# --------------------------------------------------------------------------- partitions

def ncl_partition(O, C, I):
    """NCL reductions: nq blocks of NCL_CHUNK values per channel, partial index c*nq + q.

    Returns (grid, nq, sc, sq, chunk): the merge reads partial (c, q) at c*sc + q*sq and
    counts min(M, (q+1)*chunk) - q*chunk values in it.
    """
    nq = -(-(O * I) // NCL_CHUNK)
    return C * nq, nq, nq, 1, NCL_CHUNK


def nlc_partition(R, C):
    """Channels-last reductions over (R, C): tiles of tw channels x blocks of rb rows.

    tw = C when a block can hold whole rows (C <= THREADS): a warp then reads consecutive
    addresses whatever C is (3 channels included); otherwise 32-channel tiles.
    Returns (grid, tw, rb, ntiles, nq, sc, sq, chunk) with partial (c, q) at q*C + c.
    """
    tw = C if C <= THREADS else NLC_TILE
    rb = (THREADS // tw) * ROW_ITEMS
    ntiles = -(-C // tw)
    nb = -(-R // rb)
    return nb * ntiles, tw, rb, ntiles, nb, 1, C, rb


def merge_grid(C):
    return max(1, math.ceil(C / MERGE_CHANNELS))


def coef_grid(C):
    return max(1, math.ceil(C / THREADS))
