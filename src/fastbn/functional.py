"""Functional batch normalization: the one front door of fastbn.

Every public function here validates all of its arguments (``fastbn._validation``) before it
allocates or writes anything, maps x onto the canonical (outer, C, inner) view once
(``fastbn._layout``), and calls a backend's verbs: ``fastbn._cpu`` for NumPy input, which runs
the Cython/OpenMP kernels, or ``fastbn.cuda.backend`` for CuPy input (loaded on first use). A
call whose every argument is plain (exact C-contiguous native float32/float64 ndarrays, no
``out=``) first tries the one-call fast path of ``_kernels``, which gives the same bits; its
scalars are validated here first, and it falls back here for anything else.

Array arguments: NumPy arrays, and anything ``numpy.asarray`` or ``numpy.from_dlpack`` reads
(lists, torch tensors, including ones that require grad, which are read and never written);
results are NumPy arrays (CuPy arrays for CuPy input). Masked arrays are refused. Arrays in
another byte order or misaligned are read correctly (through a native copy).

Memory layout: an input that is C-contiguous, or C-contiguous after a permutation of its axes
(Fortran order, PyTorch's channels_last strides, transposes), is used in place. Any other layout
(slices with gaps, negative strides) is copied once into C order. Outputs are allocated in the
input's own layout, so ``y.strides`` follow ``x.strides``; a caller's ``out=`` of a different
layout or byte order is filled from a temporary.

Precision: float32 and float64 compute natively, accumulating in float64. float16 inputs, and
bfloat16 ones (``ml_dtypes.bfloat16``, NumPy's usual bfloat16; CPU only), are computed in
float32 and the output is returned in the input's dtype. ``mean`` and ``invstd`` are returned
as float64 whatever the input dtype: they are what the kernels accumulated, and handing them back
at full precision keeps the backward accurate when |mean| >> std.

Empty batches (no value per channel: N = 0 or a zero spatial extent) behave as in PyTorch: the
output is empty, running statistics are left as they are, and the gradients of weight and bias
are zero. The statistics returned for them are mean 0, variance 0 (count 0).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from . import _cpu, _kernels
from . import _validation as V
from ._backend import is_cupy_array
from ._layout import Layout, Output
from ._threads import get_num_threads

if TYPE_CHECKING:
    from ._typing import Activation, Array, ArrayLike, F64Array

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


# --------------------------------------------------------------------------- arguments

def _backend(a):
    """The backend for a call whose leading array argument is a."""
    if is_cupy_array(a):
        from .cuda import backend

        return backend
    return _cpu


def _array(be, a, name) -> Array:
    return V.numpy_array(a, name) if be is _cpu else be.array(a, name)


def _input(be, x, axis) -> tuple[Array, Layout]:
    """x converted and checked, with its canonical layout."""
    x = V.batch(V.floating(_array(be, x, "x"), "x"))
    return x, Layout(be.xp, x, V.axis(axis, x.ndim, x.shape), be.convert, be.scratch)


def _chan(be, a, name, C):
    """An optional per-channel array (None stays None)."""
    return None if a is None else V.channel(_array(be, a, name), name, C)


def _required(be, a, name, C):
    return _chan(be, V.required(a, name, C), name, C)


def _running(be, a, name, C, written):
    """running_mean/running_var: read (eval), or updated in place (training)."""
    if a is None or not written:
        return _chan(be, a, name, C)
    return V.channel(V.writable(a, name, be.xp), name, C)


def _like(be, a, name, x) -> Array:
    return V.like(V.floating(_array(be, a, name), name), name, x)


def _relu_y(be, y, x, relu):
    if not relu:
        return None
    if y is None:
        raise V.relu_y_missing()
    return _like(be, y, "y", x)


def _out(be, out, x):
    if out is None:
        return None
    return V.like(V.floating(V.writable(out, "out", be.xp), "out"), "out", x)


def _grad_dtype(dtype):
    """dweight/dbias come back in the compute dtype: float32 for float16/bfloat16 input."""
    return _F32 if V.is_half(dtype) else dtype


def _empty(layout):
    return layout.count == 0 or layout.C == 0


# --------------------------------------------------------------------------- building blocks

def channel_moments(x: ArrayLike, *, axis: int = 1) -> tuple[int, F64Array, F64Array]:
    """Per-channel (count, mean, M2) of x, M2 = sum((x - mean)**2), all float64.

    The triple merges exactly across batches or processes (Chan et al.); ``var = M2 / count``.
    An empty batch gives count 0 and zeros. ``axis`` may be a tuple of feature axes (the
    statistics then have their shape).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.functional import channel_moments
    >>> channel_moments(np.array([[1.0, 2.0], [3.0, 6.0]]))
    (2, array([2., 4.]), array([2., 8.]))
    """
    if isinstance(axis, (tuple, list)):
        return _variants.axes_channel_moments(x, axis)
    be = _backend(x)
    x, layout = _input(be, x, axis)
    if _empty(layout):
        return layout.count, be.zeros(layout.C), be.zeros(layout.C)
    mean, m2 = be.stats(layout.canon(x, be.compute_dtype(x.dtype)))
    return layout.count, mean, m2


def normalize(x: ArrayLike, mean: ArrayLike, invstd: ArrayLike, weight: Optional[ArrayLike] = None,
              bias: Optional[ArrayLike] = None, *, axis: int = 1,
              activation: Activation = None, out: Optional[Array] = None) -> Array:
    """y = (x - mean) * invstd * weight + bias per channel (then ReLU), for given statistics."""
    if out is None:
        y = _kernels.normalize_fast(x, mean, invstd, weight, bias, axis, activation,
                                    get_num_threads())
        if y is not None:
            return y
    if isinstance(axis, (tuple, list)):
        return _variants.axes_normalize(x, mean, invstd, weight, bias, axis, activation, out)
    be = _backend(x)
    x, layout = _input(be, x, axis)
    C = layout.C
    mean = _required(be, mean, "mean", C)
    invstd = _required(be, invstd, "invstd", C)
    weight = _chan(be, weight, "weight", C)
    bias = _chan(be, bias, "bias", C)
    relu = V.activation(activation)
    out = _out(be, out, x)
    dest = Output(be, layout, x, out, (x,))
    if not _empty(layout):
        be.normalize(dest.source(x, be.compute_dtype(x.dtype)), dest.target, mean, invstd,
                     weight, bias, relu)
    return dest.finish()


def _grad_inputs(be, layout, dy, x, y, dest=None):
    """(dy, x, y) as canonical arrays in the compute dtype (y may be None); with dest (dx's
    Output), a cast copy of dy is also dx's target (the kernels' dx may be dy)."""
    cdt = be.compute_dtype(x.dtype)
    return (layout.canon(dy, cdt) if dest is None else dest.source(dy, cdt),
            layout.canon(x, cdt),
            None if y is None else layout.canon(y, cdt))


def backward_sums(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, *, axis: int = 1,
                  activation: Activation = None,
                  y: Optional[ArrayLike] = None) -> tuple[int, F64Array, F64Array]:
    """Per channel: (count, sum(g), sum(g * (x - mean))) with g = dy, or dy masked by y > 0."""
    be = _backend(x)
    x, layout = _input(be, x, axis)
    C = layout.C
    dy = _like(be, dy, "dy", x)
    mean = _required(be, mean, "mean", C)
    y = _relu_y(be, y, x, V.activation(activation))
    if _empty(layout):
        return layout.count, be.zeros(C), be.zeros(C)
    s1, s2 = be.backward_sums(*_grad_inputs(be, layout, dy, x, y), mean)
    return layout.count, s1, s2


def backward_dx(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                sum_dy: ArrayLike, sum_dy_xmu: ArrayLike, count: float,
                weight: Optional[ArrayLike] = None, *, axis: int = 1, training: bool = True,
                activation: Activation = None, y: Optional[ArrayLike] = None) -> Array:
    """dx of batch norm from per-channel sums (see backward_sums) taken over ``count`` values.

    ``count`` is the number of values the sums were taken over (more than this x holds when
    the sums are a whole batch's, as in SyncBatchNorm); it must be positive when training on a
    non-empty x.
    """
    be = _backend(x)
    x, layout = _input(be, x, axis)
    C = layout.C
    dy = _like(be, dy, "dy", x)
    mean = _required(be, mean, "mean", C)
    invstd = _required(be, invstd, "invstd", C)
    sum_dy = _required(be, sum_dy, "sum_dy", C)
    sum_dy_xmu = _required(be, sum_dy_xmu, "sum_dy_xmu", C)
    weight = _chan(be, weight, "weight", C)
    training = V.flag(training, "training")
    count = V.dx_count(count, x.size, training)
    y = _relu_y(be, y, x, V.activation(activation))
    dest = Output(be, layout, x, None, ())
    if not _empty(layout):
        dy3, x3, y3 = _grad_inputs(be, layout, dy, x, y, dest)
        be.backward_dx(dy3, x3, y3, dest.target, mean, invstd, weight, sum_dy, sum_dy_xmu,
                       count, training)
    return dest.finish()


def invstd_from_var(var: ArrayLike, eps: float) -> F64Array:
    """1/sqrt(var + eps) of a 1-D array of variances, in float64; 0 where var + eps == 0
    (x_hat = 0 there, as in the kernels)."""
    eps = V.eps(eps)
    inv = _kernels.invstd_fast(var, eps)
    if inv is not None:  # a plain 1-D float32/float64 NumPy var: one C loop, same values
        return inv
    be = _backend(var)
    var = _array(be, var, "var")
    V.vector(var, "var")
    return be.invstd(var, eps)


def update_running_stats(running_mean: Optional[Array], running_var: Optional[Array],
                         mean: ArrayLike, var: ArrayLike, count: float, momentum: float) -> None:
    """PyTorch's update, in place: running = (1 - momentum) * running + momentum * batch.

    The running variance takes the unbiased batch variance, var * count / (count - 1).
    Computed in float64 and rounded once into the buffers' dtype. Every argument is checked
    before either buffer is written; ``count`` must be at least 1 (an empty batch updates
    nothing: skip the call).
    """
    be = _backend(mean)
    mean = _array(be, V.required(mean, "mean", "C"), "mean")
    C = V.vector(mean, "mean")
    var = _required(be, var, "var", C)
    running_mean = _running(be, running_mean, "running_mean", C, True)
    running_var = _running(be, running_var, "running_var", C, True)
    count = V.update_count(count)
    momentum = V.momentum(momentum)
    be.update_running(running_mean, running_var, mean, var, count, momentum)


# --------------------------------------------------------------------------- public API

def batch_norm_forward(x: ArrayLike, weight: Optional[ArrayLike] = None,
                       bias: Optional[ArrayLike] = None, *, axis: int = 1, eps: float = 1e-5,
                       activation: Activation = None, out: Optional[Array] = None,
                       mask: Optional[ArrayLike] = None) -> tuple[Array, F64Array, F64Array]:
    """Training-mode batch norm: normalise x with its own batch statistics.

    Parameters
    ----------
    x : ndarray, float16/bfloat16/float32/float64, ndim >= 2
    weight, bias : (C,) arrays or None (gamma = 1, beta = 0)
    axis : the feature axis (1 for NCHW, -1 for channels-last); statistics reduce over the rest
    eps : added to the variance
    activation : None or "relu" (applied in the same pass)
    out : optional output array (x's shape and dtype; ``out=x`` works in place)
    mask : optional boolean array shaped like x without its feature axis (Keras's and Flax's
        ``mask``): only True positions count towards the mean and variance; y is computed
        everywhere. On the CPU the kernels compute it in one pass as the plain statistics;
        CuPy input goes through float64 array operations (docs/guide/variants.md).

    Returns
    -------
    y, mean, invstd : y has x's dtype; mean and invstd = 1/sqrt(var + eps) are float64 (C,).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> mean, invstd
    (array([ 2., 20.]), array([1. , 0.1]))
    >>> nhwc = np.ones((2, 4, 4, 3), np.float32)          # channels-last: name the axis
    >>> fastbn.batch_norm_forward(nhwc, axis=-1)[0].shape
    (2, 4, 4, 3)
    """
    if mask is not None:
        y, mean, invstd, _var, _n = _variants._masked_forward(x, weight, bias, axis, eps,
                                                              activation, out, mask)
        return y, mean, invstd
    y, mean, invstd, _var, _n = forward_with_stats(
        x, weight, bias, axis=axis, eps=eps, activation=activation, out=out
    )
    return y, mean, invstd


def forward_with_stats(x: ArrayLike, weight: Optional[ArrayLike] = None,
                       bias: Optional[ArrayLike] = None, *, axis: int = 1, eps: float = 1e-5,
                       activation: Activation = None, out: Optional[Array] = None
                       ) -> tuple[Array, F64Array, F64Array, F64Array, int]:
    """batch_norm_forward that also returns the biased batch variance and the count per channel.

    Returns (y, mean, invstd, var, count).
    """
    eps = V.eps(eps)
    if out is None:
        r = _kernels.forward_with_stats_fast(x, weight, bias, eps, axis, activation,
                                             get_num_threads())
        if r is not None:
            return r
    if isinstance(axis, (tuple, list)):
        return _variants.axes_forward_with_stats(x, weight, bias, axis, eps, activation, out)
    be = _backend(x)
    x, layout = _input(be, x, axis)
    C = layout.C
    weight = _chan(be, weight, "weight", C)
    bias = _chan(be, bias, "bias", C)
    relu = V.activation(activation)
    out = _out(be, out, x)
    n = V.training_count(layout.count, x.shape)
    return _forward_train(be, x, layout, weight, bias, eps, relu, out) + (n,)


def _forward_train(be, x, layout, weight, bias, eps, relu, out):
    """(y, mean, invstd, var) of validated arguments."""
    dest = Output(be, layout, x, out, (x,))
    if _empty(layout):
        var = be.zeros(layout.C)
        return dest.finish(), be.zeros(layout.C), be.invstd(var, eps), var
    mean, var, invstd = be.forward_train(dest.source(x, be.compute_dtype(x.dtype)),
                                         dest.target, weight, bias, eps, relu)
    return dest.finish(), mean, invstd, var


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                        weight: Optional[ArrayLike] = None, *, axis: int = 1,
                        training: bool = True, activation: Activation = None,
                        y: Optional[ArrayLike] = None,
                        mask: Optional[ArrayLike] = None) -> tuple[Array, Array, Array]:
    """Gradients of batch norm: returns (dx, dweight, dbias).

    ``mean`` and ``invstd`` are what the forward used: the batch statistics from
    batch_norm_forward (``training=True``), or running statistics (``training=False``, where
    they are constants and dx = dy * weight * invstd). With ``activation="relu"``, pass the
    forward's output as ``y``: the gradient flows where y > 0. dweight = sum(g * x_hat) and
    dbias = sum(g) are returned in x's compute dtype (float32 for float16/bfloat16 input) whether or
    not ``weight`` is given; they are zero for an empty batch. ``mask``: the forward's mask
    (statistics over its True positions only; dweight and dbias still sum over every position).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0], [3.0]], dtype=np.float64)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0)
    >>> dx, dweight, dbias = fastbn.batch_norm_backward(np.array([[1.0], [0.0]]), x, mean,
    ...                                                 invstd)
    >>> dx[:, 0], dweight, dbias
    (array([0., 0.]), array([-1.]), array([1.]))
    """
    training = V.flag(training, "training")
    if mask is not None:
        return _variants._masked_backward(dy, x, mean, invstd, weight, axis, training,
                                          activation, y, mask)
    grads = _kernels.batch_norm_backward_fast(dy, x, mean, invstd, weight, axis, training,
                                              activation, y, get_num_threads())
    if grads is not None:
        return grads
    if isinstance(axis, (tuple, list)):
        return _variants.axes_backward(dy, x, mean, invstd, weight, axis, training, activation,
                                       y)
    be = _backend(x)
    x, layout = _input(be, x, axis)
    C = layout.C
    dy = _like(be, dy, "dy", x)
    mean = _required(be, mean, "mean", C)
    invstd = _required(be, invstd, "invstd", C)
    weight = _chan(be, weight, "weight", C)
    y = _relu_y(be, y, x, V.activation(activation))
    if training:
        V.training_count(layout.count, x.shape)
    dest = Output(be, layout, x, None, ())
    if _empty(layout):
        gdt = _grad_dtype(x.dtype)
        return dest.finish(), be.zeros(C).astype(gdt), be.zeros(C).astype(gdt)
    dy3, x3, y3 = _grad_inputs(be, layout, dy, x, y, dest)
    dweight, dbias = be.backward(dy3, x3, y3, dest.target, mean, invstd, weight, training)
    return dest.finish(), dweight, dbias


def batch_norm(input: ArrayLike, running_mean: Optional[ArrayLike],
               running_var: Optional[ArrayLike], weight: Optional[ArrayLike] = None,
               bias: Optional[ArrayLike] = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: int = 1, activation: Activation = None,
               out: Optional[Array] = None) -> Array:
    """``torch.nn.functional.batch_norm``, with its positional order, defaults and semantics.

    Parameters
    ----------
    input : array, float16/bfloat16/float32/float64, ndim >= 2 (x)
    running_mean, running_var : (C,) arrays or None
        training=True: updated in place when given (unbiased batch variance, PyTorch's
        ``running = (1 - momentum) * running + momentum * batch``); an empty batch leaves them.
        training=False: the statistics normalised with; both required.
    weight, bias : (C,) arrays or None (gamma = 1, beta = 0)
    training : bool, default False (as PyTorch)
    momentum : float in [0, 1]
    eps : finite float >= 0, added to the variance
    axis : keyword only; the feature axis (1 for (N, C, ...), -1 for channels-last)
    activation : keyword only; None or "relu" (fused in the same pass)
    out : keyword only; optional output array (input's shape and dtype; ``out=input`` works)

    Returns
    -------
    y : array of input's shape and dtype (a NumPy array for any CPU input).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = fastbn.batch_norm(x, rm, rv, training=True)   # torch.nn.functional.batch_norm order
    >>> np.round(y[:, 0], 3)
    array([-1.342, -0.447,  0.447,  1.342], dtype=float32)
    >>> rm
    array([0.45, 0.55, 0.65], dtype=float32)
    """
    x = input
    training = V.flag(training, "training")
    eps = V.eps(eps)
    momentum = V.momentum(momentum)
    if out is None:
        y = _kernels.batch_norm_fast(x, weight, bias, running_mean, running_var, training,
                                     momentum, eps, axis, activation, get_num_threads())
        if y is not None:
            return y
    if isinstance(axis, (tuple, list)):
        return _variants.axes_batch_norm(x, running_mean, running_var, weight, bias, training,
                                         momentum, eps, axis, activation, out)
    be = _backend(x)
    x, layout = _input(be, x, axis)
    C = layout.C
    weight = _chan(be, weight, "weight", C)
    bias = _chan(be, bias, "bias", C)
    running_mean = _running(be, running_mean, "running_mean", C, training)
    running_var = _running(be, running_var, "running_var", C, training)
    relu = V.activation(activation)
    out = _out(be, out, x)
    if training:
        n = V.training_count(layout.count, x.shape)
        y, mean, _invstd, var = _forward_train(be, x, layout, weight, bias, eps, relu, out)
        if n > 0 and (running_mean is not None or running_var is not None):
            be.update_running(running_mean, running_var, mean, var, n, momentum)
        return y
    V.both_running(running_mean, running_var)
    dest = Output(be, layout, x, out, (x,))
    if not _empty(layout):
        be.normalize_running(dest.source(x, be.compute_dtype(x.dtype)), dest.target,
                             running_mean, running_var, eps, weight, bias, relu)
    return dest.finish()


# --------------------------------------------------------------------------- variants
# Implemented in fastbn.variants from the verbs above; this is their front door.
from . import variants as _variants  # noqa: E402
from .variants import (  # noqa: E402
    batch_norm_double_backward,
    batch_renorm_backward,
    batch_renorm_forward,
    fixed_batch_norm,
    fixed_batch_norm_backward,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
)

__all__ += ["fixed_batch_norm", "fixed_batch_norm_backward", "batch_renorm_forward",
            "batch_renorm_backward", "ghost_batch_norm_forward", "ghost_batch_norm_backward",
            "batch_norm_double_backward"]
