"""The CPU backend: fastbn's verbs on NumPy arrays, run by the Cython/OpenMP kernels.

``fastbn.functional`` validates every argument (``_validation``) and maps x onto the canonical
(outer, C, inner) view (``_layout``) before it calls a verb here; the verbs only hand plain
arrays to ``_kernels``. The CUDA backend (``fastbn.cuda.backend``) has the same verbs.

Per-channel arrays reach the verbs as validated NumPy arrays of any float dtype (or None where
optional); ``chan`` makes them what the kernels read. Statistics and sums come back as float64
(C,) arrays.
"""
import numpy as np

from . import _kernels
from ._layout import update_running_arrays
from ._threads import get_num_threads
from ._validation import is_half

name = "numpy"
xp = np
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def compute_dtype(dtype):
    """The dtype the kernels compute x in: float16 and bfloat16 are computed in float32."""
    return _F32 if is_half(dtype) else dtype


def kernel_ready(a):
    """An array the kernels can read or write in place: exact, C-contiguous, native, aligned,
    float32/float64."""
    return (type(a) is np.ndarray and a.flags.c_contiguous and a.flags.aligned
            and a.dtype in (_F32, _F64))


def kernel_writable(a):
    return a.dtype.isnative and a.flags.aligned


def same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def chan(a):
    """A per-channel argument for the kernels: contiguous float32/float64 as is (the kernels
    read both), anything else converted to float64; None stays None."""
    if a is None or kernel_ready(a):
        return a
    return np.ascontiguousarray(a, dtype=_F64)


def _f64(a):
    return np.ascontiguousarray(a, dtype=_F64)


def convert(src, dst):
    """dst[...] = src between float16/bfloat16 and float32 (either way) with the kernels, when
    both are C-contiguous, aligned, native-order ndarrays of the same size that do not overlap;
    True when done, False (nothing written) for anything else, which the caller casts with
    NumPy. Bit for bit NumPy's (ml_dtypes') astype, in a tenth of its time and on every thread
    (see _kernels.half_to_float)."""
    if not (type(src) is np.ndarray and type(dst) is np.ndarray and src.size == dst.size):
        return False
    for a in (src, dst):
        if not (a.flags.c_contiguous and a.flags.aligned and a.dtype.isnative):
            return False
    if not dst.flags.writeable or np.may_share_memory(src, dst):
        return False
    if src.dtype == _F32 and is_half(dst.dtype):
        _kernels.float_to_half(src, dst, dst.dtype.char != "e", get_num_threads())
    elif dst.dtype == _F32 and is_half(src.dtype):
        _kernels.half_to_float(src, dst, src.dtype.char != "e", get_num_threads())
    else:
        return False
    return True


def zeros(C):
    return np.zeros(C)


def invstd(var, eps):
    """1/sqrt(var + eps), 0 where var + eps == 0, in float64 (var: a validated (C,) array).

    The NumPy formula that ``_kernels.invstd_fast`` reproduces value for value."""
    v = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.sqrt(v)
    inv[v == 0] = 0.0
    return inv


def stats(x3):
    """Per-channel (mean, M2) of a canonical x3 with at least one value per channel."""
    O, C, I = x3.shape
    out = np.empty(2 * C)
    _kernels.channel_stats(x3, O, C, I, out, get_num_threads())
    return out[:C], out[C:]


def forward_train(x3, y3, weight, bias, eps, relu):
    """y3 = batch-normalised x3; returns (mean, var (biased), invstd)."""
    O, C, I = x3.shape
    s = np.empty(3 * C)
    _kernels.forward_train(x3, y3, O, C, I, chan(weight), chan(bias), eps, relu, s,
                           get_num_threads())
    return s[:C], s[C:2 * C], s[2 * C:]


def normalize(x3, y3, mean, invstd, weight, bias, relu):
    O, C, I = x3.shape
    _kernels.normalize(x3, y3, O, C, I, chan(mean), chan(invstd), chan(weight), chan(bias), relu,
                       get_num_threads())


def normalize_running(x3, y3, running_mean, running_var, eps, weight, bias, relu):
    O, C, I = x3.shape
    _kernels.normalize_running(x3, y3, O, C, I, chan(running_mean), chan(running_var), eps,
                               chan(weight), chan(bias), relu, get_num_threads())


def backward_sums(dy3, x3, y3, mean):
    """Per channel (sum(g), sum(g * (x - mean))), g = dy3 masked by y3 > 0 when y3 is given."""
    O, C, I = x3.shape
    sums = np.empty(2 * C)
    _kernels.backward_sums(dy3, x3, y3, O, C, I, chan(mean), sums, get_num_threads())
    return sums[:C], sums[C:]


def backward_dx(dy3, x3, y3, dx3, mean, invstd, weight, sum_dy, sum_dy_xmu, count, training):
    O, C, I = x3.shape
    _kernels.backward_dx(dy3, x3, y3, dx3, O, C, I, chan(mean), chan(invstd), chan(weight),
                         chan(sum_dy), chan(sum_dy_xmu), count, training, get_num_threads())


def affine(a3, b3, out3, a, k, m, c):
    """out3 = a*a3 - k*(b3 - m) + c per channel (out3 may be a3), in a3's dtype: one pass."""
    O, C, I = a3.shape
    _kernels.affine(a3, b3, out3, O, C, I, chan(a), chan(k), chan(m), chan(c),
                    get_num_threads())

def backward(dy3, x3, y3, dx3, mean, invstd, weight, training):
    """dx3 of this batch; returns (dweight, dbias) in x3's dtype."""
    O, C, I = x3.shape
    sums = np.empty(2 * C)
    inv = chan(invstd)
    _kernels.backward(dy3, x3, y3, dx3, O, C, I, chan(mean), inv, chan(weight), training, sums,
                      get_num_threads())
    return ((sums[C:] * inv).astype(x3.dtype, copy=False),
            sums[:C].astype(x3.dtype, copy=False))


def update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update in place, every argument validated (count >= 1, momentum in [0, 1]).

    Buffers the kernels can write are updated there (in double, rounded once); others (float16,
    bfloat16, strided, another byte order) by NumPy, computing both new values before writing
    either.
    """
    if all(r is None or kernel_ready(r) for r in (running_mean, running_var)):
        _kernels.update_running(running_mean, running_var, _f64(mean), _f64(var), count,
                                momentum)
        return
    update_running_arrays(running_mean, running_var, np.asarray(mean), np.asarray(var), count,
                          momentum)
