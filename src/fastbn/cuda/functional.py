"""fastbn's functional API on CuPy arrays, running the CUDA kernels of batch_norm.cu.

Same functions, arguments, validation and semantics as :mod:`fastbn.functional` (which
dispatches here when ``x`` is a CuPy array); results are CuPy arrays on x's device. Every
argument is checked before anything is allocated or written; a NumPy array among the
arguments is refused with a TypeError naming it (move every array to one device first). Python
lists and scalars for the per-channel arguments are copied to the device, as NumPy's path
converts them with ``numpy.asarray``.

Layout: x is viewed as the canonical (outer, C, inner) C-contiguous array by the CPU's rule
(see ``_GpuLayout``): C-contiguous arrays, and arrays that are C-contiguous after a
permutation of their axes (channels_last strides, Fortran order), are used in place; any other
layout is copied once.

Precision: as on the CPU. float32 and float64 compute natively with float64 accumulation;
float16 is converted to float32 inside the kernels (loads and stores in half, no float32 copy
of the array) and rounded back to float16 on store. ``mean`` and ``invstd`` are float64.
"""
import math

import numpy as np

from .. import _checks
from ..functional import update_running_stats
from . import kernels as _k

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "channel_moments",
    "normalize",
    "backward_sums",
    "backward_dx",
    "invstd_from_var",
    "forward_with_stats",
]

_MIXED = _checks.MIXED


def _cupy():
    import cupy

    return cupy


def _i64(v):
    return np.int64(v)


def _i32(v):
    return np.int32(v)


def _f64s(v):
    return np.float64(v)


# --------------------------------------------------------------------------- validation

def _refuse_numpy(a, name):
    if isinstance(a, np.ndarray):
        raise TypeError(
            f"{name}: expected a CuPy array like x, got numpy.ndarray {_MIXED}"
        )


def _as_input(cp, x, name):
    if not isinstance(x, cp.ndarray):
        _refuse_numpy(x, name)
        x = cp.asarray(x)
    return _checks.float_dtype(x, name)


def _check_x(cp, x, axis):
    x = _as_input(cp, x, "x")
    return x, _checks.shape_axis(x, axis)


def _check_channel(cp, a, name, C, *, writable=False):
    """A per-channel array: 1-D, length C, floating, on the device."""
    if a is None:
        return None
    if not isinstance(a, cp.ndarray):
        _refuse_numpy(a, name)
        if writable:
            raise TypeError(f"{name}: expected a writable CuPy array, got {type(a).__name__}")
        a = cp.asarray(a)
    return _checks.channel(a, name, C)


_check_eps = _checks.eps
_check_activation = _checks.activation
_check_momentum = _checks.momentum


def _check_like(cp, a, name, x):
    return _checks.like(_as_input(cp, a, name), name, x)


def _check_out(cp, out, x):
    if out is None:
        return None
    if not isinstance(out, cp.ndarray):
        raise TypeError(f"out: expected a CuPy array, got {type(out).__name__}")
    return _checks.out(out, x)


def _check_relu_y(cp, y, x, relu):
    if relu:
        if y is None:
            raise _checks.relu_y_missing()
        return _check_like(cp, y, "y", x)
    return None


def _training_count(layout, x):
    outer, _C, inner = layout.shape3
    return _checks.training_count(outer * inner, x.shape)


def _f64(cp, a):
    return None if a is None else cp.ascontiguousarray(a, dtype=cp.float64)


def _compute_dtype(dtype):
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


# --------------------------------------------------------------------------- layout

class _GpuLayout:
    """How x maps onto the canonical (outer, C, inner) C-contiguous view (CuPy arrays).

    The rule is the CPU's (fastbn.functional._Layout): a C-contiguous x is used as is; an x
    that is C-contiguous after ordering its axes by decreasing stride (channels_last strides,
    Fortran order, transposes) is used through that permutation; anything else is copied to C
    order. Kept separate from the CPU class so that neither constrains the other's internals.
    """

    __slots__ = ("perm", "inv", "shape3")

    def __init__(self, x, ax):
        perm = None
        if not x.flags.c_contiguous:
            order = sorted(range(x.ndim), key=lambda i: -abs(x.strides[i]))
            if x.transpose(order).flags.c_contiguous:
                perm = tuple(order)
        shape = x.shape if perm is None else tuple(x.shape[i] for i in perm)
        p = ax if perm is None else perm.index(ax)
        self.perm = perm
        self.inv = None if perm is None else tuple(int(i) for i in np.argsort(perm))
        self.shape3 = (math.prod(shape[:p]), shape[p], math.prod(shape[p + 1:]))

    def view(self, a):
        """The canonical view of a (an array shaped like x), copying when there is none."""
        t = a if self.perm is None else a.transpose(self.perm)
        if not t.flags.c_contiguous:
            t = _cupy().ascontiguousarray(t)
        return t.reshape(self.shape3)

    def direct(self, a):
        """The canonical view of a if a has it without a copy, else None."""
        t = a if self.perm is None else a.transpose(self.perm)
        return t.reshape(self.shape3) if t.flags.c_contiguous else None

    def empty(self, shape, dtype):
        """A new array of x's shape, in x's layout; returns (array, canonical view)."""
        cp = _cupy()
        if self.perm is None:
            a = cp.empty(shape, dtype)
            return a, a.reshape(self.shape3)
        t = cp.empty(tuple(shape[i] for i in self.perm), dtype)
        return t.transpose(self.inv), t.reshape(self.shape3)


def _same_view(a, b):
    return a.data.ptr == b.data.ptr and a.strides == b.strides and a.shape == b.shape


class _Output:
    """Where a kernel writes its result: the caller's out, a new array, or a temporary.

    The kernels read and write x's dtype (float16 included), so unlike the CPU path no
    float32 temporary is needed for float16.
    """

    __slots__ = ("result", "target", "_final")

    def __init__(self, cp, layout, x, out, inputs):
        self._final = None
        if out is None:
            self.result, self.target = layout.empty(x.shape, x.dtype)
            return
        self.result = out
        direct = layout.direct(out)
        if direct is not None:
            # In place is safe when out is exactly one of the inputs (the last pass is
            # elementwise, each element read then written by one thread) or overlaps none.
            for a in inputs:
                if a is not None and cp.may_share_memory(out, a) and not _same_view(out, a):
                    direct = None
                    break
        if direct is not None:
            self.target = direct
        else:
            self._final = out
            self.target = cp.empty(layout.shape3, x.dtype)

    def finish(self, cp, layout):
        if self._final is not None:
            if layout.perm is None:
                cp.copyto(self._final, self.target.reshape(self._final.shape))
            else:
                shape = tuple(self._final.shape[i] for i in layout.perm)
                cp.copyto(self._final, self.target.reshape(shape).transpose(layout.inv))
        return self.result


# --------------------------------------------------------------------------- kernel drivers
# Arrays handed to the kernels are canonical (O, C, I) views and contiguous float64 vectors.
# Optional per-channel inputs are replaced by a valid placeholder array and a has_* flag (the
# kernels never see a NULL pointer).

def _coef_dtype(dtype):
    return _compute_dtype(dtype)


def _stats(cp, x3, *, finalize=False, eps=0.0, weight=None, bias=None):
    """Per-channel mean and M2 of x3; with finalize also (var, invstd, normalisation coefs).

    Requires O*I > 0 and C > 0.
    """
    O, C, I = (int(s) for s in x3.shape)
    dt = x3.dtype
    if I > 1:
        grid, nq, sc, sq, chunk = _k.ncl_partition(O, C, I)
        npart = grid
    else:
        grid, tw, rb, ntiles, nq, sc, sq, chunk = _k.nlc_partition(O, C)
        npart = nq * C
    part = cp.empty(2 * npart, dtype=cp.float64)
    pmean, pm2 = part[:npart], part[npart:]
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
    if I > 1:
        grid, nq, sc, sq, _chunk = _k.ncl_partition(O, C, I)
        npart = grid
    else:
        grid, tw, rb, ntiles, nq, sc, sq, _chunk = _k.nlc_partition(O, C)
        npart = nq * C
    part = cp.empty(2 * npart, dtype=cp.float64)
    p1, p2 = part[:npart], part[npart:]
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


def _run_dx(cp, dy3, x3, y3, coefs, training):
    O, C, I = (int(s) for s in x3.shape)
    total = O * C * I
    dx3 = cp.empty(x3.shape, dtype=x3.dtype)
    if total:
        has_y = y3 is not None
        _k.launch(cp, "backward_dx", x3.dtype, _k.elementwise_grid(cp, total),
                  (dy3, x3, y3 if has_y else x3, _i32(has_y), dx3, _i64(total), _i64(I),
                   _i32(C), coefs, _i32(training)))
    return dx3


def _unview(cp, layout, a3, shape):
    """An array of x's shape, in x's layout, holding the canonical a3 (a view, no copy)."""
    if layout.perm is None:
        return a3.reshape(shape)
    return a3.reshape(tuple(shape[i] for i in layout.perm)).transpose(layout.inv)


# --------------------------------------------------------------------------- building blocks

def channel_moments(x, *, axis=1):
    """Per-channel (count, mean, M2) of x, M2 = sum((x - mean)**2), float64 CuPy arrays."""
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    O, C, I = layout.shape3
    if O * I == 0 or C == 0:
        return O * I, cp.zeros(C), cp.zeros(C)
    mean, m2, _v, _i, _c = _stats(cp, layout.view(x))
    return O * I, mean, m2


def normalize(x, mean, invstd, weight=None, bias=None, *, axis=1, activation=None, out=None):
    """y = (x - mean) * invstd * weight + bias per channel (then ReLU), for given statistics."""
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    C = layout.shape3[1]
    mean = _check_channel(cp, mean, "mean", C)
    invstd = _check_channel(cp, invstd, "invstd", C)
    weight = _check_channel(cp, weight, "weight", C)
    bias = _check_channel(cp, bias, "bias", C)
    relu = _check_activation(activation)
    out = _check_out(cp, out, x)
    return _normalize(cp, x, layout, _f64(cp, mean), _f64(cp, invstd), _f64(cp, weight),
                      _f64(cp, bias), relu, out, from_var=False, eps=0.0)


def _normalize(cp, x, layout, mean, stat, weight, bias, relu, out, *, from_var, eps):
    dest = _Output(cp, layout, x, out, (x,))
    if x.size:
        coefs = _norm_coefs(cp, x.dtype, mean, stat, from_var=from_var, eps=eps,
                            weight=weight, bias=bias)
        _run_normalize(cp, layout.view(x), dest.target, coefs, relu)
    return dest.finish(cp, layout)


def backward_sums(dy, x, mean, *, axis=1, activation=None, y=None):
    """Per channel: (count, sum(g), sum(g * (x - mean))) with g = dy, or dy masked by y > 0."""
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    O, C, I = layout.shape3
    dy = _check_like(cp, dy, "dy", x)
    mean = _check_channel(cp, mean, "mean", C)
    relu = _check_activation(activation)
    y = _check_relu_y(cp, y, x, relu)
    if O * I == 0 or C == 0:
        return O * I, cp.zeros(C), cp.zeros(C)
    s1, s2, _dw, _db, _c = _bwd_sums(
        cp, layout.view(dy), layout.view(x), None if y is None else layout.view(y),
        _f64(cp, mean))
    return O * I, s1, s2


def backward_dx(dy, x, mean, invstd, sum_dy, sum_dy_xmu, count, weight=None, *, axis=1,
                training=True, activation=None, y=None):
    """dx of batch norm from per-channel sums (see backward_sums) taken over ``count`` values."""
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    C = layout.shape3[1]
    dy = _check_like(cp, dy, "dy", x)
    mean = _check_channel(cp, mean, "mean", C)
    invstd = _check_channel(cp, invstd, "invstd", C)
    sum_dy = _check_channel(cp, sum_dy, "sum_dy", C)
    sum_dy_xmu = _check_channel(cp, sum_dy_xmu, "sum_dy_xmu", C)
    weight = _check_channel(cp, weight, "weight", C)
    relu = _check_activation(activation)
    y = _check_relu_y(cp, y, x, relu)
    count = float(count)
    training = bool(training)
    x3 = layout.view(x)
    if x.size == 0:
        return _unview(cp, layout, cp.empty(x3.shape, x.dtype), x.shape)
    coefs = cp.empty(5 * C, dtype=_coef_dtype(x.dtype))
    mean = _f64(cp, mean)
    _k.launch(cp, "dx_coefs", x.dtype, _k.coef_grid(C),
              (_i32(C), mean, _f64(cp, invstd), _f64(cp, weight) if weight is not None else mean,
               _i32(weight is not None), _f64(cp, sum_dy), _f64(cp, sum_dy_xmu), _f64s(count),
               _i32(training), coefs))
    dx3 = _run_dx(cp, layout.view(dy), x3, None if y is None else layout.view(y), coefs,
                  training)
    return _unview(cp, layout, dx3, x.shape)


def invstd_from_var(var, eps):
    """1/sqrt(var + eps), and 0 where var + eps == 0 (x_hat = 0 there, as in the kernels)."""
    cp = _cupy()
    v = cp.asarray(var, dtype=cp.float64) + eps
    zero = v == 0
    v[zero] = 1.0
    inv = 1.0 / cp.sqrt(v)
    inv[zero] = 0.0
    return inv


# --------------------------------------------------------------------------- public API

def batch_norm_forward(x, weight=None, bias=None, *, axis=1, eps=1e-5, activation=None,
                       out=None):
    """Training-mode batch norm on the GPU; see fastbn.functional.batch_norm_forward.

    Returns (y, mean, invstd): y has x's dtype, mean and invstd are float64 (C,) CuPy arrays.
    """
    y, mean, invstd, _var, _n = forward_with_stats(
        x, weight, bias, axis=axis, eps=eps, activation=activation, out=out
    )
    return y, mean, invstd


def forward_with_stats(x, weight=None, bias=None, *, axis=1, eps=1e-5, activation=None,
                       out=None):
    """batch_norm_forward that also returns the biased batch variance and the count per channel.

    Returns (y, mean, invstd, var, count).
    """
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    C = layout.shape3[1]
    weight = _check_channel(cp, weight, "weight", C)
    bias = _check_channel(cp, bias, "bias", C)
    eps = _check_eps(eps)
    relu = _check_activation(activation)
    out = _check_out(cp, out, x)
    n = _training_count(layout, x)
    return _forward_train(cp, x, layout, _f64(cp, weight), _f64(cp, bias), eps, relu,
                          out) + (n,)


def _forward_train(cp, x, layout, weight, bias, eps, relu, out):
    dest = _Output(cp, layout, x, out, (x,))
    C = layout.shape3[1]
    if C == 0:
        empty = cp.empty(0)
        return dest.finish(cp, layout), empty, empty, empty
    x3 = layout.view(x)
    mean, _m2, var, invstd, coefs = _stats(cp, x3, finalize=True, eps=eps, weight=weight,
                                           bias=bias)
    _run_normalize(cp, x3, dest.target, coefs, relu)
    return dest.finish(cp, layout), mean, invstd, var


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, training=True,
                        activation=None, y=None):
    """Gradients of batch norm on the GPU: returns (dx, dweight, dbias).

    See fastbn.functional.batch_norm_backward. dweight = sum(g * x_hat) and dbias = sum(g)
    are in x's compute dtype (float32 for float16 input).
    """
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    O, C, I = layout.shape3
    dy = _check_like(cp, dy, "dy", x)
    mean = _check_channel(cp, mean, "mean", C)
    invstd = _check_channel(cp, invstd, "invstd", C)
    weight = _check_channel(cp, weight, "weight", C)
    relu = _check_activation(activation)
    y = _check_relu_y(cp, y, x, relu)
    training = bool(training)
    if training:
        _training_count(layout, x)
    ct = _coef_dtype(x.dtype)
    if O * I == 0 or C == 0:
        dx = _unview(cp, layout, cp.empty(layout.shape3, x.dtype), x.shape)
        return dx, cp.zeros(C, dtype=ct), cp.zeros(C, dtype=ct)
    x3, dy3 = layout.view(x), layout.view(dy)
    y3 = None if y is None else layout.view(y)
    _s1, _s2, dweight, dbias, coefs = _bwd_sums(
        cp, dy3, x3, y3, _f64(cp, mean), finalize=True, invstd=_f64(cp, invstd),
        weight=_f64(cp, weight), count=float(O * I), training=training)
    dx3 = _run_dx(cp, dy3, x3, y3, coefs, training)
    return _unview(cp, layout, dx3, x.shape), dweight, dbias


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
               momentum=0.1, eps=1e-5, axis=1, activation=None, out=None):
    """Batch norm with PyTorch's ``torch.nn.functional.batch_norm`` semantics, on the GPU.

    training=True normalises with the batch statistics and, when running_mean/running_var are
    given (CuPy arrays), updates them in place; training=False normalises with them.
    """
    cp = _cupy()
    x, ax = _check_x(cp, x, axis)
    layout = _GpuLayout(x, ax)
    C = layout.shape3[1]
    weight = _check_channel(cp, weight, "weight", C)
    bias = _check_channel(cp, bias, "bias", C)
    running_mean = _check_channel(cp, running_mean, "running_mean", C, writable=training)
    running_var = _check_channel(cp, running_var, "running_var", C, writable=training)
    eps = _check_eps(eps)
    relu = _check_activation(activation)
    out = _check_out(cp, out, x)
    if training:
        momentum = _check_momentum(momentum)
        n = _training_count(layout, x)
        y, mean, _invstd, var = _forward_train(
            cp, x, layout, _f64(cp, weight), _f64(cp, bias), eps, relu, out
        )
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean, running_var: expected both arrays when training=False, got "
            f"{type(running_mean).__name__} and {type(running_var).__name__}"
        )
    return _normalize(cp, x, layout, _f64(cp, running_mean), _f64(cp, running_var),
                      _f64(cp, weight), _f64(cp, bias), relu, out, from_var=True, eps=eps)
