"""The CUDA backend: fastbn's verbs on CuPy arrays, run by the kernels of batch_norm.cu.

``fastbn.functional`` dispatches here when x is a CuPy array, after validating every argument
(``fastbn._validation``) and mapping x onto the canonical (outer, C, inner) view
(``fastbn._layout``, the same code as for NumPy). The verbs and their contracts are those of
the CPU backend (``fastbn._cpu``); results are CuPy arrays on x's device.

Precision: as on the CPU. float32 and float64 compute natively with float64 accumulation;
float16 is converted to float32 inside the kernels (loads and stores in half, no float32 copy
of the array) and rounded back to float16 on store. Statistics are float64; dweight and dbias
are in float32 for float16 input.

CuPy is imported on first use (``import fastbn.cuda.backend`` does not import it), and looked up
at every call rather than bound once, so that tests can substitute an emulated module.
"""
import numpy as np

from .. import _validation
from .._layout import update_running_arrays
from . import kernels as _k

name = "cupy"


def __getattr__(attr):
    if attr == "xp":
        return _cupy()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# Layout/Output cast CuPy's float16 arrays with CuPy (the CPU backend's convert is a kernel)
convert = None
scratch = None  # CuPy's memory pool already reuses device memory


def _cupy():
    import cupy

    return cupy


def _i64(v):
    return np.int64(v)


def _i32(v):
    return np.int32(v)


def _f64s(v):
    return np.float64(v)


def _coef_dtype(dtype):
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


# --------------------------------------------------------------------------- array handling

def array(a, name):
    return _validation.cuda_dtype(_validation.cupy_array(_cupy(), a, name), name)


def compute_dtype(dtype):
    """The kernels read and write float16 directly (computing in float32)."""
    return np.dtype(dtype)


def kernel_writable(a):
    return True  # CuPy arrays are always native-order and aligned


def same_view(a, b):
    return a.data.ptr == b.data.ptr and a.strides == b.strides and a.shape == b.shape


def chan(a):
    """A per-channel argument for the kernels: contiguous float64 (None stays None)."""
    return None if a is None else _cupy().ascontiguousarray(a, dtype=np.float64)


def zeros(C):
    return _cupy().zeros(C)


def invstd(var, eps):
    cp = _cupy()
    v = cp.asarray(var, dtype=cp.float64) + eps
    zero = v == 0
    v[zero] = 1.0
    inv = 1.0 / cp.sqrt(v)
    inv[zero] = 0.0
    return inv


# --------------------------------------------------------------------------- kernel drivers
# Arrays handed to the kernels are canonical (O, C, I) views and contiguous float64 vectors.
# Optional per-channel inputs are replaced by a valid placeholder array and a has_* flag (the
# kernels never see a NULL pointer).


def _partition(cp, O, C, I):
    """The fixed reduction partition of a canonical (O, C, I) array and its two partial arrays:
    (grid, nq, sc, sq, chunk, (tw, rb, ntiles) or Nones for NCL, partial1, partial2)."""
    if I > 1:
        grid, nq, sc, sq, chunk = _k.ncl_partition(O, C, I)
        npart, nlc = grid, (None, None, None)
    else:
        grid, tw, rb, ntiles, nq, sc, sq, chunk = _k.nlc_partition(O, C)
        npart, nlc = nq * C, (tw, rb, ntiles)
    part = cp.empty(2 * npart, dtype=cp.float64)
    return grid, nq, sc, sq, chunk, nlc, part[:npart], part[npart:]


def _stats(cp, x3, *, finalize=False, eps=0.0, weight=None, bias=None):
    """Per-channel mean and M2 of x3; with finalize also (var, invstd, normalisation coefs).

    Requires O*I > 0 and C > 0.
    """
    O, C, I = (int(s) for s in x3.shape)
    dt = x3.dtype
    grid, nq, sc, sq, chunk, (tw, rb, ntiles), pmean, pm2 = _partition(cp, O, C, I)
    if I > 1:
        _k.launch(cp, "stats_ncl", dt, grid,
                  (x3, _i64(O), _i32(C), _i64(I), _i64(nq), pmean, pm2))
    else:
        _k.launch(cp, "stats_nlc", dt, grid,
                  (x3, _i64(O), _i32(C), _i32(tw), _i64(rb), _i32(ntiles), pmean, pm2))
    out = cp.empty(5 * C if finalize else 2 * C, dtype=cp.float64)
    mean, m2 = out[:C], out[C:2 * C]
    if finalize:
        var, invstd = out[2 * C:3 * C], out[3 * C:4 * C]
        coefs = cp.empty(4 * C, dtype=_coef_dtype(dt))
    else:
        var = invstd = mean
        coefs = cp.empty(1, dtype=_coef_dtype(dt))
    _k.launch(cp, "stats_merge", dt, _k.merge_grid(C),
              (pmean, pm2, _i32(C), _i64(nq), _i64(sc), _i64(sq), _i64(O * I), _i64(chunk),
               mean, m2, _i32(finalize), _f64s(eps),
               weight if weight is not None else mean, bias if bias is not None else mean,
               _i32(weight is not None), _i32(bias is not None), var, invstd, coefs))
    return mean, m2, var, invstd, coefs


def _run_normalize(cp, x3, y3, coefs, relu):
    O, C, I = (int(s) for s in x3.shape)
    total = O * C * I
    _k.launch(cp, "normalize", x3.dtype, _k.elementwise_grid(cp, total),
              (x3, y3, _i64(total), _i64(I), _i32(C), coefs, _i32(relu)))


def _norm_coefs(cp, dtype, mean, stat, *, from_var, eps, weight, bias):
    C = int(mean.shape[0])
    coefs = cp.empty(4 * C, dtype=_coef_dtype(dtype))
    _k.launch(cp, "norm_coefs", dtype, _k.coef_grid(C),
              (_i32(C), mean, stat, _i32(from_var), _f64s(eps),
               weight if weight is not None else mean, bias if bias is not None else mean,
               _i32(weight is not None), _i32(bias is not None), coefs))
    return coefs


def _bwd_sums(cp, dy3, x3, y3, mean, *, finalize=False, invstd=None, weight=None,
              count=0.0, training=True):
    """Per-channel sum(g), sum(g*(x - mean)); with finalize also dweight, dbias, dx coefs."""
    O, C, I = (int(s) for s in x3.shape)
    dt = x3.dtype
    has_y = y3 is not None
    yy = y3 if has_y else x3
    grid, nq, sc, sq, _chunk, (tw, rb, ntiles), p1, p2 = _partition(cp, O, C, I)
    if I > 1:
        _k.launch(cp, "bwd_ncl", dt, grid,
                  (dy3, x3, yy, _i32(has_y), _i64(O), _i32(C), _i64(I), _i64(nq), mean, p1, p2))
    else:
        _k.launch(cp, "bwd_nlc", dt, grid,
                  (dy3, x3, yy, _i32(has_y), _i64(O), _i32(C), _i32(tw), _i64(rb), _i32(ntiles),
                   mean, p1, p2))
    sums = cp.empty(2 * C, dtype=cp.float64)
    s1, s2 = sums[:C], sums[C:]
    ct = _coef_dtype(dt)
    if finalize:
        grads = cp.empty(2 * C, dtype=ct)
        dweight, dbias = grads[:C], grads[C:]
        coefs = cp.empty(5 * C, dtype=ct)
    else:
        dweight = dbias = coefs = cp.empty(1, dtype=ct)
    _k.launch(cp, "bwd_merge", dt, _k.merge_grid(C),
              (p1, p2, _i32(C), _i64(nq), _i64(sc), _i64(sq), s1, s2, _i32(finalize), mean,
               invstd if invstd is not None else mean, weight if weight is not None else mean,
               _i32(weight is not None), _f64s(count), _i32(training), dweight, dbias, coefs))
    return s1, s2, dweight, dbias, coefs


def _run_dx(cp, dy3, x3, y3, dx3, coefs, training):
    O, C, I = (int(s) for s in x3.shape)
    total = O * C * I
    if total:
        has_y = y3 is not None
        _k.launch(cp, "backward_dx", x3.dtype, _k.elementwise_grid(cp, total),
                  (dy3, x3, y3 if has_y else x3, _i32(has_y), dx3, _i64(total), _i64(I),
                   _i32(C), coefs, _i32(training)))


# --------------------------------------------------------------------------- verbs
# Each takes canonical (O, C, I) arrays with O*I > 0 and C > 0 (fastbn.functional answers empty
# inputs itself) and validated per-channel arrays.

def stats(x3):
    mean, m2, _v, _i, _c = _stats(_cupy(), x3)
    return mean, m2


def forward_train(x3, y3, weight, bias, eps, relu):
    cp = _cupy()
    mean, _m2, var, invstd, coefs = _stats(cp, x3, finalize=True, eps=eps, weight=chan(weight),
                                           bias=chan(bias))
    _run_normalize(cp, x3, y3, coefs, relu)
    return mean, var, invstd


def normalize(x3, y3, mean, invstd, weight, bias, relu):
    cp = _cupy()
    coefs = _norm_coefs(cp, x3.dtype, chan(mean), chan(invstd), from_var=False, eps=0.0,
                        weight=chan(weight), bias=chan(bias))
    _run_normalize(cp, x3, y3, coefs, relu)


def normalize_running(x3, y3, running_mean, running_var, eps, weight, bias, relu):
    cp = _cupy()
    coefs = _norm_coefs(cp, x3.dtype, chan(running_mean), chan(running_var), from_var=True,
                        eps=eps, weight=chan(weight), bias=chan(bias))
    _run_normalize(cp, x3, y3, coefs, relu)


def backward_sums(dy3, x3, y3, mean):
    s1, s2, _dw, _db, _c = _bwd_sums(_cupy(), dy3, x3, y3, chan(mean))
    return s1, s2


def backward_dx(dy3, x3, y3, dx3, mean, invstd, weight, sum_dy, sum_dy_xmu, count, training):
    cp = _cupy()
    C = x3.shape[1]
    coefs = cp.empty(5 * C, dtype=_coef_dtype(x3.dtype))
    mean = chan(mean)
    _k.launch(cp, "dx_coefs", x3.dtype, _k.coef_grid(C),
              (_i32(C), mean, chan(invstd), chan(weight) if weight is not None else mean,
               _i32(weight is not None), chan(sum_dy), chan(sum_dy_xmu), _f64s(count),
               _i32(training), coefs))
    _run_dx(cp, dy3, x3, y3, dx3, coefs, training)


def affine(a3, b3, out3, a, k, m, c):
    """out3 = a*a3 - k*(b3 - m) + c per channel (out3 may be a3): CuPy array arithmetic in
    float32 for float16 arrays (as the kernels compute them), else in the arrays' dtype."""
    cp = _cupy()
    C = a3.shape[1]
    ct = np.dtype(np.float32) if a3.dtype == np.float16 else a3.dtype
    if ct != a3.dtype:
        a3, b3 = a3.astype(ct), b3.astype(ct)

    def col(v):
        return cp.asarray(v, dtype=cp.float64).astype(ct).reshape(1, C, 1)

    res = col(a) * a3 - col(k) * (b3 - col(m)) + col(c)
    out3[...] = res


def backward(dy3, x3, y3, dx3, mean, invstd, weight, training):
    cp = _cupy()
    O, _C, I = x3.shape
    _s1, _s2, dweight, dbias, coefs = _bwd_sums(
        cp, dy3, x3, y3, chan(mean), finalize=True, invstd=chan(invstd), weight=chan(weight),
        count=float(O * I), training=training)
    _run_dx(cp, dy3, x3, y3, dx3, coefs, training)
    return dweight, dbias


def update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update in place (validated arguments), both new values formed before writing."""
    update_running_arrays(running_mean, running_var, mean, var, count, momentum)
