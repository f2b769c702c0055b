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
from ._scratch import empty as scratch  # noqa: F401 (a backend verb: Layout's temporaries)
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


# --------------------------------------------------------------------------- masked statistics

def mask_rows(mask3):
    """A canonical (O, 1, I) boolean mask as the kernels' (O, I) uint8 rows (a view of the bool
    bytes, which are 0 or 1; copied only when not C-contiguous: O * I bytes, x.size / C)."""
    O, _one, I = mask3.shape
    return np.ascontiguousarray(mask3).reshape(O, I).view(np.uint8)


def _careful_masked(x3, mk, idx, mean, m2):
    """mean[idx], m2[idx] recomputed over the masked-in values of channels idx (those the
    kernel's one-pass sums could not vouch for), in float64: scaled by a power of two bringing
    max |x| near 1 (no overflow or underflow of squares), then two passes (centred before
    squaring, with the residual sum folded back in). A constant channel is exact; one with NaN
    or inf gets mean sum(x) / n and M2 NaN, as the kernels' careful path does. The result
    depends only on the channel's values, never on the thread count."""
    sel = np.moveaxis(x3[:, idx, :], 1, -1)[mk.view(bool)].astype(np.float64)  # (n, nf)
    n = sel.shape[0]
    with np.errstate(all="ignore"):
        finite = np.isfinite(sel).all(axis=0)
        amax = np.where(finite, np.abs(sel).max(axis=0), 1.0)
        sc = np.ldexp(1.0, np.clip(-np.frexp(amax)[1], -1022, 1023))
        s = sel * sc
        mu = s.mean(axis=0)
        d = s - mu
        sd = d.sum(axis=0)
        q = np.maximum((d * d).sum(axis=0) - sd * (sd / n), 0.0)
        mean_c = (mu + sd / n) / sc
        m2_c = q / sc / sc
        const = finite & (sel.min(axis=0) == sel.max(axis=0))
        mean_c[const] = sel[0, const]
        m2_c[const] = 0.0
        mean_c[~finite] = sel[:, ~finite].sum(axis=0) / n
        m2_c[~finite] = np.nan
    mean[idx] = mean_c
    m2[idx] = m2_c


def masked_forward_train(x3, y3, mk, weight, bias, eps, relu):
    """y3 = x3 normalised by statistics over the positions where mk (O, I uint8 rows) is set;
    returns (mean, var (biased), invstd). One kernel call; a channel the one-pass sums could not
    vouch for is recomputed carefully first, and y3 then normalised by a second call."""
    O, C, I = x3.shape
    s = np.empty(5 * C)
    n = _kernels.masked_forward_train(x3, y3, mk, O, C, I, chan(weight), chan(bias), eps, relu,
                                      s, get_num_threads())
    if n > 0:
        return s[:C], s[3 * C:4 * C], s[4 * C:]
    mean, m2 = s[:C], s[C:2 * C]
    _careful_masked(x3, mk, np.flatnonzero(s[2 * C:3 * C]), mean, m2)
    var = m2 / -n
    inv = invstd(var, eps)
    normalize(x3, y3, mean, inv, weight, bias, relu)
    return mean, var, inv


def masked_backward(dy3, x3, y3, mk, dx3, mean, invstd, weight):
    """dx3 of masked statistics (mk: (O, I) uint8 rows, as masked_forward_train); returns (dweight,
    dbias) in x3's dtype: sums over every position, as the plain backward's."""
    O, C, I = x3.shape
    sums = np.empty(2 * C)
    inv = chan(invstd)
    _kernels.masked_backward(dy3, x3, y3, mk, dx3, O, C, I, chan(mean), inv, chan(weight), sums,
                             get_num_threads())
    return ((sums[C:] * inv).astype(x3.dtype, copy=False),
            sums[:C].astype(x3.dtype, copy=False))
