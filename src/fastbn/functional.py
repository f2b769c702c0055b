"""Functional batch normalization on NumPy arrays.

Every public function here validates all of its arguments before it allocates or writes
anything, moves the feature axis into a canonical (outer, C, inner) C-contiguous view, and calls
the kernels of ``fastbn._kernels`` with plain arrays and a thread count.

Memory layout: an input that is C-contiguous, or C-contiguous after a permutation of its axes
(Fortran order, PyTorch's channels_last strides, transposes), is used in place. Any other layout
(slices with gaps, negative strides) is copied once into C order. Outputs are allocated in the
input's own layout, so ``y.strides`` follow ``x.strides``; a caller's ``out=`` of a different
layout is filled from a temporary.

Precision: float32 and float64 compute natively, accumulating in float64. float16 inputs are
computed in float32 and the output is returned as float16. ``mean`` and ``invstd`` are returned
as float64 whatever the input dtype: they are what the kernels accumulated, and handing them back
at full precision keeps the backward accurate when |mean| >> std.
"""
import math
import operator

import numpy as np

from . import _backend, _checks, _kernels
from ._threads import get_num_threads

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "channel_moments",
    "normalize",
    "backward_sums",
    "backward_dx",
    "update_running_stats",
    "invstd_from_var",
    "forward_with_stats",
]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


# --------------------------------------------------------------------------- validation

def _as_input(x, name):
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__cuda_array_interface__"):
            raise TypeError(
                f"{name}: expected a NumPy array, got {type(x).__module__}.{type(x).__name__} "
                f"{_checks.MIXED}"
            )
        x = np.asarray(x)
    return _checks.float_dtype(x, name)


def _check_x(x, axis):
    x = _as_input(x, "x")
    return x, _checks.shape_axis(x, axis)


def _check_channel(a, name, C, *, writable=False):
    """A per-channel array: 1-D, length C, floating. Returns it as given (not converted)."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        if writable:
            raise TypeError(f"{name}: expected a writable NumPy array, got {type(a).__name__}")
        if hasattr(a, "__cuda_array_interface__"):
            raise TypeError(
                f"{name}: expected a NumPy array, got {type(a).__module__}.{type(a).__name__} "
                f"{_checks.MIXED}"
            )
        a = np.asarray(a)
    _checks.channel(a, name, C)
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return a


def _f64(a):
    if a is None or (a.dtype == _F64 and a.flags.c_contiguous):
        return a
    return np.ascontiguousarray(a, dtype=_F64)


def _chan(a):
    """A per-channel argument for the kernels: contiguous float32/float64 as is (the kernels
    read both), anything else converted to float64."""
    if a is None or (a.flags.c_contiguous and (a.dtype == _F64 or a.dtype == _F32)):
        return a
    return np.ascontiguousarray(a, dtype=_F64)


_check_eps = _checks.eps
_check_activation = _checks.activation


def _check_like(a, name, x):
    """An array that must match x in shape and dtype (dy, y)."""
    return _checks.like(_as_input(a, name), name, x)


def _check_out(out, x):
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a NumPy array, got {type(out).__name__}")
    _checks.out(out, x)
    if not out.flags.writeable:
        raise ValueError("out: expected a writable array, got a read-only one")
    return out


# --------------------------------------------------------------------------- layout

class _Layout:
    """How x maps onto the kernels' canonical (outer, C, inner) C-contiguous order."""

    __slots__ = ("perm", "inv", "shape", "O", "C", "I")

    def __init__(self, x, ax):
        perm = None
        shape = x.shape
        p = ax
        if not x.flags.c_contiguous:
            # A permutation of the axes by decreasing stride makes Fortran-ordered and
            # channels_last-strided arrays C-contiguous without a copy; other layouts are
            # copied to C order (perm stays None).
            order = sorted(range(x.ndim), key=lambda i: -abs(x.strides[i]))
            if x.transpose(order).flags.c_contiguous:
                perm = tuple(order)
                shape = tuple(x.shape[i] for i in perm)
                p = perm.index(ax)
        self.perm = perm
        self.inv = None if perm is None else tuple(int(i) for i in np.argsort(perm))
        self.shape = shape
        self.O = math.prod(shape[:p])
        self.C = shape[p]
        self.I = math.prod(shape[p + 1:])

    def canon(self, a):
        """a (shaped like x) in canonical order, C-contiguous: a view, or a copy if none exists."""
        t = a if self.perm is None else a.transpose(self.perm)
        return t if t.flags.c_contiguous else np.ascontiguousarray(t)

    def direct(self, a):
        """a in canonical order if that is a C-contiguous view of it, else None."""
        t = a if self.perm is None else a.transpose(self.perm)
        return t if t.flags.c_contiguous else None

    def empty(self, dtype):
        """A new array shaped like x, in x's layout: (the array, its canonical view)."""
        t = np.empty(self.shape, dtype)
        return (t, t) if self.perm is None else (t.transpose(self.inv), t)

    def to_user(self, t):
        """A canonical-order array viewed in x's axis order."""
        return t if self.perm is None else t.transpose(self.inv)


def _compute_dtype(dtype):
    return _F32 if dtype.char == "e" else dtype


def _same_view(a, b):
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
    )


class _Output:
    """Where a kernel writes its result: the caller's out, a new array, or a temporary."""

    __slots__ = ("result", "target", "_final")

    def __init__(self, layout, x, out, inputs):
        cdt = _compute_dtype(x.dtype)
        self._final = None
        if out is None:
            self.result, self.target = layout.empty(x.dtype)
            if cdt is not x.dtype:  # float16: compute in float32, cast at the end
                self._final = self.result
                self.target = np.empty(layout.shape, cdt)
            return
        self.result = out
        direct = layout.direct(out) if cdt is x.dtype else None
        if direct is not None:
            # Writing straight into out is safe when it is exactly one of the inputs (the
            # kernels are elementwise in their last pass) or overlaps none of them.
            for a in inputs:
                if a is not None and np.may_share_memory(out, a) and not _same_view(out, a):
                    direct = None
                    break
        if direct is not None:
            self.target = direct
        else:
            self._final = out
            self.target = np.empty(layout.shape, cdt)

    def finish(self, layout):
        if self._final is not None:
            np.copyto(self._final, layout.to_user(self.target), casting="unsafe")
        return self.result


def _kernel_view(layout, a, cdt):
    v = layout.canon(a)
    return v if v.dtype is cdt else v.astype(cdt)


def _grad_views(layout, x, dy, y):
    """(dy, x, y) in canonical order and compute dtype for the backward kernels (y may be None)."""
    cdt = _compute_dtype(x.dtype)
    return (_kernel_view(layout, dy, cdt), _kernel_view(layout, x, cdt),
            None if y is None else _kernel_view(layout, y, cdt))


def _training_count(layout, x):
    return _checks.training_count(layout.O * layout.I, x.shape)


# --------------------------------------------------------------------------- building blocks

def channel_moments(x, *, axis=1):
    """Per-channel (count, mean, M2) of x, M2 = sum((x - mean)**2), all float64.

    The triple merges exactly across batches or processes (Chan et al.); ``var = M2 / count``.
    """
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.channel_moments(x, axis=axis)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    cdt = _compute_dtype(x.dtype)
    x3 = _kernel_view(layout, x, cdt)
    C = layout.C
    out = np.empty(2 * C)
    _kernels.channel_stats(x3, layout.O, C, layout.I, out, get_num_threads())
    return layout.O * layout.I, out[:C], out[C:]


def normalize(x, mean, invstd, weight=None, bias=None, *, axis=1, activation=None, out=None):
    """y = (x - mean) * invstd * weight + bias per channel (then ReLU), for given statistics."""
    if out is None:  # plain NumPy arguments: validated and run in one C call (_kernels)
        y = _kernels.normalize_fast(x, mean, invstd, weight, bias, axis, activation,
                                    get_num_threads())
        if y is not None:
            return y
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.normalize(x, mean, invstd, weight, bias, axis=axis, activation=activation,
                              out=out)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    C = layout.C
    mean = _check_channel(mean, "mean", C)
    invstd = _check_channel(invstd, "invstd", C)
    weight = _check_channel(weight, "weight", C)
    bias = _check_channel(bias, "bias", C)
    relu = _check_activation(activation)
    out = _check_out(out, x)
    return _normalize(x, layout, _chan(mean), _chan(invstd), _chan(weight), _chan(bias), relu, out)


def _normalize(x, layout, mean, invstd, weight, bias, relu, out):
    cdt = _compute_dtype(x.dtype)
    x3 = _kernel_view(layout, x, cdt)
    dest = _Output(layout, x, out, (x,))
    _kernels.normalize(x3, dest.target, layout.O, layout.C, layout.I, mean, invstd, weight, bias,
                       relu, get_num_threads())
    return dest.finish(layout)


def backward_sums(dy, x, mean, *, axis=1, activation=None, y=None):
    """Per channel: (count, sum(g), sum(g * (x - mean))) with g = dy, or dy masked by y > 0."""
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.backward_sums(dy, x, mean, axis=axis, activation=activation, y=y)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    C = layout.C
    dy = _check_like(dy, "dy", x)
    mean = _check_channel(mean, "mean", C)
    relu = _check_activation(activation)
    y = _check_relu_y(y, x, relu)
    dy3, x3, y3 = _grad_views(layout, x, dy, y)
    sums = np.empty(2 * C)
    _kernels.backward_sums(dy3, x3, y3, layout.O, C, layout.I, _chan(mean), sums,
                           get_num_threads())
    return layout.O * layout.I, sums[:C], sums[C:]


def _check_relu_y(y, x, relu):
    if relu:
        if y is None:
            raise _checks.relu_y_missing()
        return _check_like(y, "y", x)
    return None


def backward_dx(dy, x, mean, invstd, sum_dy, sum_dy_xmu, count, weight=None, *, axis=1,
                training=True, activation=None, y=None):
    """dx of batch norm from per-channel sums (see backward_sums) taken over ``count`` values."""
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.backward_dx(dy, x, mean, invstd, sum_dy, sum_dy_xmu, count, weight,
                                axis=axis, training=training, activation=activation, y=y)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    C = layout.C
    dy = _check_like(dy, "dy", x)
    mean = _check_channel(mean, "mean", C)
    invstd = _check_channel(invstd, "invstd", C)
    sum_dy = _check_channel(sum_dy, "sum_dy", C)
    sum_dy_xmu = _check_channel(sum_dy_xmu, "sum_dy_xmu", C)
    weight = _check_channel(weight, "weight", C)
    relu = _check_activation(activation)
    y = _check_relu_y(y, x, relu)
    dy3, x3, y3 = _grad_views(layout, x, dy, y)
    dest = _Output(layout, x, None, ())
    _kernels.backward_dx(dy3, x3, y3, dest.target, layout.O, C, layout.I, _chan(mean),
                         _chan(invstd), _chan(weight), _chan(sum_dy), _chan(sum_dy_xmu),
                         float(count), bool(training), get_num_threads())
    return dest.finish(layout)


def invstd_from_var(var, eps):
    """1/sqrt(var + eps), and 0 where var + eps == 0 (x_hat = 0 there, as in the kernels)."""
    inv = _kernels.invstd_fast(var, eps)
    if inv is not None:  # a plain 1-D float32/float64 NumPy var: one C loop, same values
        return inv
    if _backend.is_cupy_array(var):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.invstd_from_var(var, eps)
    v = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.sqrt(v)
    inv[v == 0] = 0.0
    return inv


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, in place: running = (1 - momentum) * running + momentum * batch.

    The running variance takes the unbiased batch variance, var * count / (count - 1).
    Computed in float64 and rounded once into the buffers' dtype.
    """
    if _kernel_buffer(running_mean) and _kernel_buffer(running_var):
        _kernels.update_running(running_mean, running_var, _f64(mean), _f64(var), float(count),
                                float(momentum))
        return
    unbiased = var * (count / (count - 1)) if count > 1 else var
    for run, batch in ((running_mean, mean), (running_var, unbiased)):
        if run is not None:
            run[...] = (1.0 - momentum) * run.astype(np.float64) + momentum * batch


def _kernel_buffer(a):
    return a is None or (
        type(a) is np.ndarray and a.flags.c_contiguous and a.dtype in (_F32, _F64)
    )


# --------------------------------------------------------------------------- public API

def batch_norm_forward(x, weight=None, bias=None, *, axis=1, eps=1e-5, activation=None,
                       out=None):
    """Training-mode batch norm: normalise x with its own batch statistics.

    Parameters
    ----------
    x : ndarray, float16/float32/float64, ndim >= 2
    weight, bias : (C,) arrays or None (gamma = 1, beta = 0)
    axis : the feature axis (1 for NCHW, -1 for channels-last); statistics reduce over the rest
    eps : added to the variance
    activation : None or "relu" (applied in the same pass)
    out : optional output array (x's shape and dtype; ``out=x`` works in place)

    Returns
    -------
    y, mean, invstd : y has x's dtype; mean and invstd = 1/sqrt(var + eps) are float64 (C,).
    """
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.batch_norm_forward(x, weight, bias, axis=axis, eps=eps, activation=activation,
                                        out=out)
    y, mean, invstd, _var, _n = forward_with_stats(
        x, weight, bias, axis=axis, eps=eps, activation=activation, out=out
    )
    return y, mean, invstd


def forward_with_stats(x, weight=None, bias=None, *, axis=1, eps=1e-5, activation=None,
                       out=None):
    """batch_norm_forward that also returns the biased batch variance and the count per channel.

    Returns (y, mean, invstd, var, count).
    """
    if out is None:  # plain NumPy arguments: validated and run in one C call (_kernels)
        r = _kernels.forward_with_stats_fast(x, weight, bias, eps, axis, activation,
                                             get_num_threads())
        if r is not None:
            return r
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.forward_with_stats(x, weight, bias, axis=axis, eps=eps, activation=activation,
                                        out=out)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    C = layout.C
    weight = _check_channel(weight, "weight", C)
    bias = _check_channel(bias, "bias", C)
    eps = _check_eps(eps)
    relu = _check_activation(activation)
    out = _check_out(out, x)
    n = _training_count(layout, x)
    return _forward_train(x, layout, _chan(weight), _chan(bias), eps, relu, out) + (n,)


def _forward_train(x, layout, weight, bias, eps, relu, out):
    cdt = _compute_dtype(x.dtype)
    C = layout.C
    x3 = _kernel_view(layout, x, cdt)
    dest = _Output(layout, x, out, (x,))
    stats = np.empty(3 * C)
    _kernels.forward_train(x3, dest.target, layout.O, C, layout.I, weight, bias, eps, relu, stats,
                           get_num_threads())
    return dest.finish(layout), stats[:C], stats[2 * C:], stats[C:2 * C]


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, training=True,
                        activation=None, y=None):
    """Gradients of batch norm: returns (dx, dweight, dbias).

    ``mean`` and ``invstd`` are what the forward used: the batch statistics from
    batch_norm_forward (``training=True``), or running statistics (``training=False``, where
    they are constants and dx = dy * weight * invstd). With ``activation="relu"``, pass the
    forward's output as ``y``: the gradient flows where y > 0. dweight = sum(g * x_hat) and
    dbias = sum(g) are returned in x's compute dtype (float32 for float16 input) whether or
    not ``weight`` is given.
    """
    grads = _kernels.batch_norm_backward_fast(dy, x, mean, invstd, weight, axis, training,
                                              activation, y, get_num_threads())
    if grads is not None:  # plain NumPy arguments: validated and run in one C call
        return grads
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, training=training,
                                         activation=activation, y=y)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    C = layout.C
    dy = _check_like(dy, "dy", x)
    mean = _check_channel(mean, "mean", C)
    invstd = _check_channel(invstd, "invstd", C)
    weight = _check_channel(weight, "weight", C)
    relu = _check_activation(activation)
    y = _check_relu_y(y, x, relu)
    if training:
        _training_count(layout, x)
    dy3, x3, y3 = _grad_views(layout, x, dy, y)
    dest = _Output(layout, x, None, ())
    sums = np.empty(2 * C)
    _kernels.backward(dy3, x3, y3, dest.target, layout.O, C, layout.I, _chan(mean),
                      _chan(invstd), _chan(weight), bool(training), sums, get_num_threads())
    cdt = x3.dtype
    return (dest.finish(layout), (sums[C:] * invstd).astype(cdt, copy=False),
            sums[:C].astype(cdt, copy=False))


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
               momentum=0.1, eps=1e-5, axis=1, activation=None, out=None):
    """Batch norm with PyTorch's ``torch.nn.functional.batch_norm`` semantics.

    training=True normalises with the batch statistics and, when running_mean/running_var are
    given, updates them in place (unbiased variance, PyTorch's momentum convention).
    training=False normalises with running_mean/running_var, which are then required.
    """
    if out is None:  # plain NumPy arguments: validated and run in one C call (_kernels)
        y = _kernels.batch_norm_fast(x, weight, bias, running_mean, running_var, training,
                                     momentum, eps, axis, activation, get_num_threads())
        if y is not None:
            return y
    if _backend.is_cupy_array(x):  # CuPy input: the GPU path (fastbn.cuda)
        from .cuda import functional as _gpu

        return _gpu.batch_norm(x, weight, bias, running_mean, running_var, training=training,
                                momentum=momentum, eps=eps, axis=axis, activation=activation,
                                out=out)
    x, ax = _check_x(x, axis)
    layout = _Layout(x, ax)
    C = layout.C
    weight = _check_channel(weight, "weight", C)
    bias = _check_channel(bias, "bias", C)
    running_mean = _check_channel(running_mean, "running_mean", C, writable=training)
    running_var = _check_channel(running_var, "running_var", C, writable=training)
    eps = _check_eps(eps)
    relu = _check_activation(activation)
    out = _check_out(out, x)
    if training:
        momentum = _checks.momentum(momentum)
        n = _training_count(layout, x)
        y, mean, _invstd, var = _forward_train(
            x, layout, _chan(weight), _chan(bias), eps, relu, out
        )
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean, running_var: expected both arrays when training=False, got "
            f"{type(running_mean).__name__} and {type(running_var).__name__}"
        )
    cdt = _compute_dtype(x.dtype)
    dest = _Output(layout, x, out, (x,))
    _kernels.normalize_running(_kernel_view(layout, x, cdt), dest.target, layout.O, C, layout.I,
                               _chan(running_mean), _chan(running_var), eps, _chan(weight),
                               _chan(bias), relu, get_num_threads())
    return dest.finish(layout)
