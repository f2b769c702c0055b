"""The BatchNorm layer: parameters, gradients, running statistics, train/eval, state.

The layer follows ``torch.nn.BatchNorm{1,2,3}d`` (same running-statistics rule, same
``state_dict`` keys, same train/eval behaviour) with Keras's freedom of ``axis``. It holds state
and decides *which* statistics to use; all arithmetic on x is done by ``fastbn.functional``.

State changes are transactional: a call that raises (bad input, bad state dict, one value per
channel in training) leaves every attribute, the running statistics, the gradients and the
forward cache used by ``backward`` exactly as they were. Every argument rule and message is in
``fastbn._validation``.

Threads: the forward cache that ``backward`` differentiates is kept per thread, so two threads
sharing one layer each differentiate their own forward. The parameters, gradients and running
statistics are shared: concurrent training steps on one layer race on them (the running
statistics and the accumulated gradients then depend on the interleaving), as they would in
PyTorch; use one layer per thread, or a lock, to train concurrently. Concurrent eval-mode
forwards on one layer are safe.
"""
from __future__ import annotations

import threading
from collections import namedtuple
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import numpy as np

from . import _validation as V
from ._backend import is_cupy_array
from . import functional as _functional
from . import variants as _variants
from .functional import (
    batch_norm_backward,
    forward_with_stats,
    invstd_from_var,
    normalize,
    update_running_stats,
)

if TYPE_CHECKING:
    from ._typing import Activation, Array, ArrayLike

__all__ = ["BatchNorm", "IncompatibleKeys", "select_state_dict"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_CHANNEL_STATE = ("weight", "bias", "running_mean", "running_var")

# Attributes added after 0.2, filled in when an older pickle is loaded.
_OPTION_DEFAULTS: dict[str, Any] = {
    "_scale": lambda bn: bn._affine,
    "_center": lambda bn: bn._affine,
    "_renorm": lambda bn: False,
    "_renorm_clipping": lambda bn: {},
    "_renorm_momentum": lambda bn: 0.99,
    "_renorm_mean": lambda bn: None,
    "_renorm_std": lambda bn: None,
    "_virtual_batch_size": lambda bn: None,
}


class _Context:
    """What backward needs from the last successful forward.

    ``weight`` is a copy taken at forward time, so an optimizer step between forward and
    backward does not change the gradient of the computation that actually ran.
    """

    __slots__ = ("x", "y", "mean", "invstd", "weight", "training", "axis", "activation", "count",
                 "variant")

    def __init__(self, x, y, mean, invstd, weight, training, axis, activation, count=None,
                 variant=None):
        self.x = x
        self.y = y
        self.mean = mean
        self.invstd = invstd
        self.weight = weight
        self.training = training
        self.axis = axis
        self.activation = activation
        self.count = count  # values per channel of the batch (SyncBatchNorm: the whole batch's)
        self.variant = variant  # None, or (kind, ...) what a variant's backward needs


# --------------------------------------------------------------------------- helpers

def select_state_dict(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a model's state dict under ``prefix`` (``"layer1.0.bn1."``), with the
    prefix stripped: what one layer's ``load_state_dict`` takes. ``prefix=""`` gives them all."""
    V.state_mapping(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if isinstance(k, str) and k.startswith(prefix)}


def _import_cupy(what):
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            f"{what}: the GPU path needs CuPy, which could not be imported ({exc}). Install the "
            "wheel matching your CUDA driver, e.g. `pip install cupy-cuda12x`."
        ) from exc
    return cupy


# --------------------------------------------------------------------------- the layer

class BatchNorm:
    """Batch normalization over the feature axis ``axis``, with PyTorch's semantics.

    Parameters
    ----------
    num_features : int
        C, the size of the feature (channel) axis.
    axis : int
        The feature axis of the inputs: 1 for (N, C, ...) as in PyTorch, -1 for channels-last.
        Statistics reduce over every other axis; inputs may have any ndim >= 2.
    eps : float
        Added to the variance before the square root.
    momentum : float in [0, 1] or None
        ``running = (1 - momentum) * running + momentum * batch`` (PyTorch's convention, the
        complement of Keras's). None gives a cumulative average (factor 1/num_batches_tracked).
    affine : bool
        Learn a per-channel ``weight`` (gamma, ones) and ``bias`` (beta, zeros). When False
        both, and their gradients, are None.
    scale, center : bool
        Keras's switches beside ``affine``: ``scale=False`` has no ``weight`` (gamma = 1),
        ``center=False`` no ``bias`` (beta = 0); the parameter, its gradient, its
        ``state_dict`` key and its entry in ``named_parameters`` are absent.
    bias : bool
        PyTorch's spelling (``torch.nn.BatchNorm2d(C, bias=False)``): the same as
        ``center=False``.
    renorm, renorm_clipping, renorm_momentum
        Keras's batch renormalization (Ioffe 2017): in training, y = gamma * (x_hat * r + d)
        + beta with r and d (clipped by ``renorm_clipping``, a dict with keys among "rmax",
        "rmin", "dmax") computed against the buffers ``renorm_mean`` (zeros) and
        ``renorm_std`` (ones), which follow the batch mean and std = sqrt(var + eps) with
        Keras's convention ``renorm = renorm_momentum * renorm + (1 - renorm_momentum) *
        batch``. ``running_mean``/``running_var`` keep PyTorch's rule and serve eval mode.
        See ``fastbn.functional.batch_renorm_forward``.
    virtual_batch_size : int or None
        Ghost batch norm (Keras 2's option): batch statistics per consecutive sub-batch of
        this many samples along axis 0; the running statistics move towards the mean of the
        sub-batches' means and of their (biased) variances, as Keras 2 does, each sub-batch
        counting ``virtual_batch_size`` samples for the unbiased correction. See
        ``fastbn.functional.ghost_batch_norm_forward``.
    track_running_stats : bool
        Keep ``running_mean`` (zeros), ``running_var`` (ones, unbiased) and
        ``num_batches_tracked`` and normalise with them in eval mode. When False they are None
        and batch statistics are used in both modes.
    activation : None or "relu"
        "relu" fuses a ReLU into the forward; the backward masks with the forward's output.
    dtype : float32 or float64
        dtype of the parameters and running statistics. Inputs must have this dtype, or be
        float16 or bfloat16 (mixed precision as in PyTorch: computed in float32, returned in x's
        dtype; bfloat16 is ``ml_dtypes.bfloat16``, CPU only).

    Notes
    -----
    ``forward`` keeps references to its input (and, with ReLU, its output) for ``backward``
    until the next successful forward: do not modify them in place in between. ``backward``
    may be called several times on one forward; each call accumulates. A forward that raises
    leaves the previous forward's cache in place (it is neither cleared nor changed).
    Pickling, ``copy.deepcopy`` and a change of device drop the cache. The cache is kept per
    thread; parameters, gradients and running statistics are shared by all threads.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    >>> y = bn(x)                                  # training mode: batch statistics
    >>> bn.num_batches_tracked, np.round(bn.running_mean, 2)
    (1, array([0.95, 1.15, 1.35], dtype=float32))
    >>> dx = bn.backward(np.ones_like(y))          # accumulates grad_weight, grad_bias
    >>> bn.grad_bias
    array([8., 8., 8.], dtype=float32)
    >>> [name for name, _ in bn.named_parameters()]
    ['weight', 'bias']
    >>> y_eval = bn.eval()(x)                      # running statistics from now on
    """

    def __init__(self, num_features: int, *, axis: int = 1, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: Activation = None,
                 dtype: Any = np.float32, center: bool = True, scale: bool = True,
                 bias: bool = True, renorm: bool = False,
                 renorm_clipping: Optional[Mapping[str, float]] = None,
                 renorm_momentum: float = 0.99,
                 virtual_batch_size: Optional[int] = None) -> None:
        self._num_features = V.num_features(num_features)
        self._axis = V.layer_axis(axis, self._num_features)
        self._eps = V.eps(eps)
        self._momentum = V.momentum(momentum, allow_none=True)
        self._affine = V.flag(affine, "affine")
        self._scale = self._affine and V.flag(scale, "scale")
        self._center = self._affine and V.flag(center, "center") and V.flag(bias, "bias")
        self._track = V.flag(track_running_stats, "track_running_stats")
        V.activation(activation)
        self._activation = activation
        self._dtype = V.param_dtype(dtype)
        self._renorm = V.flag(renorm, "renorm")
        self._renorm_clipping = V.renorm_clipping(renorm_clipping)
        self._renorm_momentum = V.unit_interval(renorm_momentum, "renorm_momentum")
        self._virtual_batch_size = V.virtual_batch_size(virtual_batch_size, None, None)
        V.exclusive({"renorm": self._renorm, "virtual_batch_size": self._virtual_batch_size})
        for option in ("renorm", "virtual_batch_size"):
            if getattr(self, "_" + option):
                V.not_sync(self, option)
                V.single_axis(self._num_features, option)
        if isinstance(self._num_features, tuple):
            V.not_sync(self, "num_features")
        self.training = True
        self._device = "cpu"
        C, dt = self._num_features, self._dtype
        # NumPy arrays, or CuPy arrays after .to("gpu"); None where the options say so
        self._weight: Any = np.ones(C, dt) if self._scale else None
        self._bias: Any = np.zeros(C, dt) if self._center else None
        self._running_mean: Any = np.zeros(C, dt) if self._track else None
        self._running_var: Any = np.ones(C, dt) if self._track else None
        self._num_batches_tracked: Any = 0 if self._track else None
        self._renorm_mean: Any = np.zeros(C, dt) if self._renorm else None
        self._renorm_std: Any = np.ones(C, dt) if self._renorm else None
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        self._requires_grad = True
        self._local = threading.local()

    # ----------------------------------------------------------------- options

    num_features = property(lambda self: self._num_features,
                            doc="C, or the feature shape for several feature axes (read-only).")
    affine = property(lambda self: self._affine,
                      doc="The affine option (read-only); see scale and center for which exist.")
    scale = property(lambda self: self._scale, doc="Whether weight (gamma) exists (read-only).")
    center = property(lambda self: self._center, doc="Whether bias (beta) exists (read-only).")
    track_running_stats = property(
        lambda self: self._track, doc="Whether running statistics exist (read-only)."
    )
    dtype = property(lambda self: self._dtype, doc="Parameter dtype (read-only).")
    renorm = property(lambda self: self._renorm, doc="Batch renormalization (read-only).")
    virtual_batch_size = property(lambda self: self._virtual_batch_size,
                                  doc="Ghost batch size, or None (read-only).")
    renorm_clipping = property(lambda self: dict(self._renorm_clipping),
                               doc="The renorm clipping bounds given (a copy; read-only).")
    renorm_momentum = property(lambda self: self._renorm_momentum,
                               doc="Keras-convention factor of the renorm buffers (read-only).")

    @property
    def device(self):
        """'cpu' (NumPy arrays) or 'gpu' (CuPy arrays): where the parameters live."""
        return self._device

    @property
    def axis(self):
        """The feature axis of the inputs."""
        return self._axis

    @axis.setter
    def axis(self, value):
        self._axis = V.layer_axis(value, self._num_features)

    @property
    def eps(self):
        return self._eps

    @eps.setter
    def eps(self, value):
        self._eps = V.eps(value)

    @property
    def momentum(self):
        """Running-statistics factor in [0, 1], or None for a cumulative average."""
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._momentum = V.momentum(value, allow_none=True)

    @property
    def activation(self):
        return self._activation

    @activation.setter
    def activation(self, value):
        V.activation(value)
        self._activation = value

    # ----------------------------------------------------------------- per-channel state

    def _assign_channel(self, name, value):
        """Copy value into the existing (C,) array `name`, keeping its identity.

        In place, like PyTorch's ``param.copy_``: an optimizer or caller holding the array keeps
        seeing the layer's values, and the array stays contiguous, writable, of the layer's
        dtype and on the layer's device whatever was assigned.
        """
        current = getattr(self, "_" + name)
        if current is None:
            option = {"weight": "affine=False or scale", "bias": "affine=False or center",
                      "renorm_mean": "renorm", "renorm_std": "renorm"}.get(
                name, "track_running_stats")
            raise AttributeError(f"{name}: this layer has none ({option}=False)")
        current[...] = self._stage_channel(name, value)

    def _stage_channel(self, name, value):
        """Validate value as the (C,) array `name` and bring it to the layer's device."""
        V.required(value, name, self._num_features)
        a = self._to_own_module(name, value)
        return V.assigned_channel(a, name, self._num_features)

    def _to_own_module(self, name, value):
        gpu = self._device == "gpu"
        if is_cupy_array(value):
            return value if gpu else _import_cupy(name).asnumpy(value)
        a = V.numpy_array(value, name)
        return _import_cupy(name).asarray(a) if gpu else a

    weight = property(lambda self: self._weight,
                      lambda self, v: self._assign_channel("weight", v),
                      doc="gamma, (C,) or None; assignment copies into the existing array.")
    bias = property(lambda self: self._bias,
                    lambda self, v: self._assign_channel("bias", v),
                    doc="beta, (C,) or None; assignment copies into the existing array.")
    running_mean = property(lambda self: self._running_mean,
                            lambda self, v: self._assign_channel("running_mean", v),
                            doc="(C,) or None; assignment copies into the existing array.")
    running_var = property(lambda self: self._running_var,
                           lambda self, v: self._assign_channel("running_var", v),
                           doc="Unbiased, (C,) or None; assignment copies into the existing array.")
    renorm_mean = property(lambda self: self._renorm_mean,
                           lambda self, v: self._assign_channel("renorm_mean", v),
                           doc="(C,) or None (renorm=False); Keras's renorm_mean.")
    renorm_std = property(lambda self: self._renorm_std,
                          lambda self, v: self._assign_channel("renorm_std", v),
                          doc="(C,) or None (renorm=False); Keras's renorm_stddev.")

    @property
    def num_batches_tracked(self):
        """Training batches seen (a Python int), or None without running statistics."""
        return self._num_batches_tracked

    @num_batches_tracked.setter
    def num_batches_tracked(self, value):
        self._num_batches_tracked = self._stage_count(value)

    def _stage_count(self, value):
        if not self._track:
            raise AttributeError(
                "num_batches_tracked: this layer has none (track_running_stats=False)"
            )
        if is_cupy_array(value):
            value = _import_cupy("num_batches_tracked").asnumpy(value)
        return V.batches_tracked(value)

    # ----------------------------------------------------------------- modes

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = V.flag(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Evaluation mode (running statistics when tracked); returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset grad_weight/grad_bias: to None (PyTorch's default) or, in place, to zeros."""
        if V.flag(set_to_none, "set_to_none"):
            self.grad_weight = None
            self.grad_bias = None
        else:
            for name, present in (("grad_weight", self._scale), ("grad_bias", self._center)):
                g = getattr(self, name)
                if g is not None:
                    g[...] = 0
                elif present:
                    setattr(self, name, self._xp().zeros(self._num_features, self._dtype))

    def _xp(self):
        return _import_cupy("BatchNorm") if self._device == "gpu" else np

    # ----------------------------------------------------------------- module protocol
    # Shaped like torch.nn.Module's, so that training loops written against it (optimizers
    # iterating named parameters, checkpointing buffers) work on fastbn layers as they are.

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        """(name, array) for ``weight`` and ``bias`` (none when ``affine=False``): the layer's
        own arrays, which an optimizer updates in place; ``scale=False`` leaves out weight and
        ``center=False`` (``bias=False``) bias."""
        if self._scale:
            yield prefix + "weight", self._weight
        if self._center:
            yield prefix + "bias", self._bias

    def parameters(self) -> Iterator[Array]:
        """The arrays of :meth:`named_parameters`."""
        for _name, p in self.named_parameters():
            yield p

    def named_grads(self, prefix: str = "") -> Iterator[tuple[str, Optional[Array]]]:
        """(name, gradient) beside each parameter, in the same order: ``grad_weight`` and
        ``grad_bias``, None until a backward has accumulated into them (like ``.grad``)."""
        if self._scale:
            yield prefix + "weight", self.grad_weight
        if self._center:
            yield prefix + "bias", self.grad_bias

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        """(name, value) of the running statistics (none when ``track_running_stats=False``):
        ``running_mean`` and ``running_var`` are the layer's own arrays; ``num_batches_tracked``
        is a 0-d int64 array holding the count (a copy: the layer keeps a Python int)."""
        if self._track:
            yield prefix + "running_mean", self._running_mean
            yield prefix + "running_var", self._running_var
            yield prefix + "num_batches_tracked", self._xp().asarray(
                self._num_batches_tracked, dtype=np.int64)
        if self._renorm:
            yield prefix + "renorm_mean", self._renorm_mean
            yield prefix + "renorm_std", self._renorm_std

    def buffers(self) -> Iterator[Array]:
        """The values of :meth:`named_buffers`."""
        for _name, b in self.named_buffers():
            yield b

    @property
    def requires_grad(self) -> bool:
        """Whether ``backward`` accumulates into ``grad_weight``/``grad_bias`` (False: frozen)."""
        return self._requires_grad

    def requires_grad_(self, requires_grad: bool = True) -> BatchNorm:
        """Freeze (False) or unfreeze weight and bias, as torch's ``Module.requires_grad_``:
        a frozen layer's backward still returns dx but accumulates no parameter gradient.
        Returns self."""
        self._requires_grad = V.flag(requires_grad, "requires_grad")
        return self

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (in place); with renorm,
        renorm_mean = 0 and renorm_std = 1."""
        if self._track:
            self._running_mean[...] = 0
            self._running_var[...] = 1
            self._num_batches_tracked = 0
        if self._renorm:
            self._renorm_mean[...] = 0
            self._renorm_std[...] = 1

    def reset_parameters(self) -> None:
        """The running statistics reset, weight = 1 and bias = 0 (in place), as PyTorch's."""
        self.reset_running_stats()
        if self._scale:
            self._weight[...] = 1
        if self._center:
            self._bias[...] = 0

    # ----------------------------------------------------------------- forward / backward

    @property
    def _ctx(self):
        """The calling thread's last successful forward (None before the first)."""
        return getattr(self._local, "ctx", None)

    @_ctx.setter
    def _ctx(self, ctx):
        self._local.ctx = ctx

    def _check_input(self, x):
        V.layer_device(x, self._device)
        x = self._to_own_module("x", x)
        return V.layer_input(x, self._dtype, self._num_features, self._axis)

    def forward(self, x: ArrayLike, *, training: Optional[bool] = None,
                mask: Optional[ArrayLike] = None) -> Array:
        """Normalise x; in training mode also update the running statistics.

        Training mode, or ``track_running_stats=False``: batch statistics. Eval mode with
        running statistics: those. ``training=True``/``False`` overrides the layer's mode for
        this call only (Keras's ``layer(x, training=...)``); None uses ``self.training``.
        Returns y with x's shape and dtype. An empty batch (no value per channel) returns an
        empty y and, in training, counts in ``num_batches_tracked`` but leaves the running
        statistics as they are (PyTorch's behaviour). ``mask`` (Keras's and Flax's): a boolean
        array shaped like x without its feature axis; when batch statistics are used only its
        True positions count towards them (and the running statistics); y is computed
        everywhere. Running statistics in eval mode ignore it, as Keras does.
        """
        training = self.training if training is None else V.flag(training, "training")
        w, b = self._weight, self._bias
        batch_stats = training or not self._track
        variant: Any = None
        if batch_stats:
            # Raises (bad x, one value per channel, ...) before any state below is touched.
            if mask is not None:
                V.exclusive({"mask": True, "renorm": self._renorm and training,
                             "virtual_batch_size": self._virtual_batch_size})
                x = self._check_input(x)
                y, mean, invstd, var, count = _variants._masked_forward(
                    x, w, b, self._axis, self._eps, self._activation, None, mask)
                variant = ("mask", mask)
            elif training and self._renorm:
                x = self._check_input(x)
                c = self._renorm_clipping
                y, mean, invstd, var, count, r, d = _variants._renorm_forward(
                    x, self._renorm_mean, self._renorm_std, w, b, self._axis, self._eps,
                    c.get("rmax"), c.get("rmin"), c.get("dmax"))
                if self._activation == "relu":
                    y = self._xp().maximum(y, 0, out=y)
                variant = ("renorm", r, d)
            elif self._virtual_batch_size is not None:
                x = self._check_input(x)
                y, mean, invstd, var, count = _variants._ghost_forward(
                    x, w, b, self._axis, self._eps, self._virtual_batch_size)
                if self._activation == "relu":
                    y = self._xp().maximum(y, 0, out=y)
                variant = ("ghost", self._virtual_batch_size, mean, invstd)
                # the running statistics follow the mean of the virtual batches' (Keras 2)
                mean, var = mean.mean(axis=0), var.mean(axis=0)
                invstd = invstd_from_var(var, self._eps)
            else:
                x, y, mean, invstd, var, count = self._batch_forward(x, training)
        else:
            x = self._check_input(x)
            mean = self._running_mean.astype(np.float64)
            invstd = invstd_from_var(self._running_var.reshape(-1), self._eps).reshape(
                self._running_var.shape)
            var = count = None
            y = normalize(x, mean, invstd, w, b, axis=self._axis, activation=self._activation)
        if training and self._track:
            self._update_running(mean, var, count)
        if variant is not None and variant[0] == "renorm" and count > 0:
            self._update_renorm(mean, var)
        self._ctx = _Context(
            x, y if self._activation == "relu" else None, mean, invstd,
            None if w is None else w.copy(), batch_stats, self._axis, self._activation, count,
            variant,
        )
        return y

    def _batch_forward(self, x, training):
        """(x checked, y, mean, invstd, var, count) with this batch's statistics.

        The one thing SyncBatchNorm overrides: its statistics are the whole batch's, across
        processes."""
        x = self._check_input(x)
        return (x,) + forward_with_stats(x, self._weight, self._bias, axis=self._axis,
                                         eps=self._eps, activation=self._activation)

    def _update_running(self, mean, var, count):
        """PyTorch's running-statistics policy for one training batch of `count` values."""
        n_batches = self._num_batches_tracked + 1
        if count > 0:  # an empty batch is counted but moves nothing
            factor = 1.0 / n_batches if self._momentum is None else self._momentum
            # flat views: a layer over several feature axes keeps (C, H, ...) arrays
            update_running_stats(self._running_mean.reshape(-1), self._running_var.reshape(-1),
                                 mean.reshape(-1), var.reshape(-1), count, factor)
        self._num_batches_tracked = n_batches

    def _update_renorm(self, mean, var):
        """Keras's update of renorm_mean/renorm_std (momentum is the weight of the old value)."""
        xp, m = self._xp(), self._renorm_momentum
        std = xp.sqrt(var + self._eps)
        self._renorm_mean[...] = m * self._renorm_mean.astype(np.float64) + (1 - m) * mean
        self._renorm_std[...] = m * self._renorm_std.astype(np.float64) + (1 - m) * std

    # Callable[..., Array]: subclasses (SyncBatchNorm) alias their own forward, without mask
    __call__: Callable[..., Array] = forward

    def backward(self, dy: ArrayLike) -> Array:
        """Gradient through the last successful forward: returns dx, accumulates parameter grads.

        dx has x's dtype. ``grad_weight``/``grad_bias`` (the layer's dtype) are None until the
        first backward, then accumulate across calls like PyTorch's ``.grad`` until
        ``zero_grad()``. After an eval-mode forward with running statistics this is the
        inference-mode gradient (the statistics are constants, dx = dy * weight * invstd).
        """
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(
                "BatchNorm.backward: no forward to differentiate; call the layer on an input "
                "first (pickling, deepcopy and .to() drop the cached forward)"
            )
        V.same_device(dy, "dy", ctx.x, "the forward's input")
        if ctx.variant is not None:
            dx, dweight, dbias = self._variant_backward(ctx, dy)
        else:
            dx, dweight, dbias = batch_norm_backward(
                dy, ctx.x, ctx.mean, ctx.invstd, ctx.weight, axis=ctx.axis,
                training=ctx.training, activation=ctx.activation, y=ctx.y,
            )
        self._accumulate_grads(dweight, dbias)
        return dx

    def _variant_backward(self, ctx, dy):
        kind = ctx.variant[0]
        if ctx.activation == "relu" and kind != "mask":  # the masked path fuses its ReLU
            # the ReLU after a variant's forward is its own pass; its mask is applied here
            be = _functional._backend(ctx.x)
            dy = _functional._like(be, _functional._array(be, dy, "dy"), "dy", ctx.x)
            dy = self._xp().where(ctx.y > 0, dy, 0).astype(ctx.x.dtype)
        if kind == "renorm":
            _kind, r, d = ctx.variant
            return _variants.batch_renorm_backward(dy, ctx.x, ctx.mean, ctx.invstd, r, d,
                                                   ctx.weight, axis=ctx.axis)
        if kind == "mask":
            return batch_norm_backward(dy, ctx.x, ctx.mean, ctx.invstd, ctx.weight,
                                       axis=ctx.axis, training=True, activation=ctx.activation,
                                       y=ctx.y, mask=ctx.variant[1])
        if kind == "ghost":
            _kind, v, mean, invstd = ctx.variant
            return _variants.ghost_batch_norm_backward(
                dy, ctx.x, mean, invstd, ctx.weight, virtual_batch_size=v, axis=ctx.axis)
        raise AssertionError(kind)  # pragma: no cover

    def _accumulate_grads(self, dweight, dbias):
        """Add this backward's parameter gradients (nothing when frozen or not affine)."""
        if self._requires_grad:
            if self._scale:
                self.grad_weight = self._accumulate(self.grad_weight, dweight)
            if self._center:
                self.grad_bias = self._accumulate(self.grad_bias, dbias)

    def _accumulate(self, grad, delta):
        if grad is None:
            return delta.astype(self._dtype, copy=True)
        grad += delta
        return grad

    # ----------------------------------------------------------------- state

    def _state_keys(self):
        keys = []
        if self._scale:
            keys.append("weight")
        if self._center:
            keys.append("bias")
        if self._track:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        if self._renorm:
            keys += ["renorm_mean", "renorm_std"]
        return keys

    def state_dict(self, *, destination: Optional[dict[str, Any]] = None,
                   prefix: str = "") -> dict[str, Any]:
        """Copies of the state under PyTorch's keys, as arrays of the layer's device.

        ``num_batches_tracked`` is a 0-d int64 array, as ``module.state_dict()`` converted
        with ``.numpy()`` gives it. Unlike PyTorch's, the arrays do not share memory with the
        layer: the result is a snapshot. ``prefix`` is put before every key and
        ``destination`` (a dict) is filled and returned instead of a new one, as in torch, so
        that a model's layers build one dict. For torch's ``load_state_dict`` convert the
        arrays to tensors: ``{k: torch.from_numpy(v) for k, v in bn.state_dict().items()}``
        (or ``fastbn.torch.state_dict_to_torch``).
        """
        out = {} if destination is None else destination
        for k, v in self.named_parameters(prefix):
            out[k] = v.copy()
        for k, v in self.named_buffers(prefix):
            out[k] = v.copy()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, *,
                        prefix: str = "") -> IncompatibleKeys:
        """Load state saved by ``state_dict()`` here or by a PyTorch BatchNorm (tensors or
        arrays).

        Values are copied into the existing arrays (cast to the layer's dtype, moved to its
        device). ``prefix`` selects this layer's keys out of a model's dict (``"layer1.0.bn1."``):
        keys that do not start with it are ignored. With ``strict`` (the default) missing or
        unexpected keys (among those with the prefix) raise ValueError; without, they are
        reported in the returned ``IncompatibleKeys(missing_keys, unexpected_keys)``. A dict
        without ``num_batches_tracked`` (PyTorch's version-1 checkpoints) loads under
        ``strict`` and keeps the layer's count, as PyTorch does. Shapes and dtypes are always
        checked. Everything is validated before anything is assigned: a failed call changes
        nothing.
        """
        V.state_mapping(state_dict)
        strict = V.flag(strict, "strict")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        own = select_state_dict(state_dict, prefix)
        expected = self._state_keys()
        optional = ("num_batches_tracked",)  # filled in from the layer, as torch does
        missing = [prefix + k for k in expected if k not in own and k not in optional]
        unexpected = [prefix + k for k in own if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict: expected exactly the keys {[prefix + k for k in expected]}; "
                f"missing {missing}, unexpected {unexpected} (pass strict=False to load the "
                "keys that match)"
            )
        staged = {}
        for k in expected:
            if k not in own:
                continue
            if k == "num_batches_tracked":
                staged[k] = self._stage_count(own[k])
            else:
                staged[k] = self._stage_channel(prefix + k, own[k])
        for k, v in staged.items():
            if k == "num_batches_tracked":
                self._num_batches_tracked = v
            else:
                getattr(self, "_" + k)[...] = v
        return IncompatibleKeys(missing, unexpected)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_local"]  # the cached forwards are activation memory, not layer state
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name, default in _OPTION_DEFAULTS.items():  # layers pickled before the option
            if name not in self.__dict__:
                setattr(self, name, default(self))
        self._local = threading.local()

    # ----------------------------------------------------------------- device

    def to(self, device: str) -> BatchNorm:
        """Move every array (parameters, gradients, running statistics) to 'cpu' or 'gpu'.

        Returns self. 'gpu' needs CuPy (ImportError otherwise). A move drops the forward cache.
        Nothing changes if any transfer fails.
        """
        target = V.device(device)
        if target == self._device:
            return self
        cupy = _import_cupy(f"BatchNorm.to({device!r})")
        move = cupy.asarray if target == "gpu" else cupy.asnumpy
        names = ("_weight", "_bias", "_running_mean", "_running_var", "grad_weight", "grad_bias",
                 "_renorm_mean", "_renorm_std")
        moved = {n: None if getattr(self, n) is None else move(getattr(self, n)) for n in names}
        for n, a in moved.items():
            setattr(self, n, a)
        self._device = target
        self._local = threading.local()
        return self

    def __repr__(self):
        s = (
            f"BatchNorm({self._num_features}, axis={self._axis}, eps={self._eps}, "
            f"momentum={self._momentum}, affine={self._affine}, "
            f"track_running_stats={self._track}"
        )
        if self._affine and not self._scale:
            s += ", scale=False"
        if self._affine and not self._center:
            s += ", center=False"
        if self._virtual_batch_size is not None:
            s += f", virtual_batch_size={self._virtual_batch_size}"
        if self._renorm:
            s += f", renorm=True, renorm_clipping={self._renorm_clipping}, "
            s += f"renorm_momentum={self._renorm_momentum}"
        if self._activation is not None:
            s += f", activation={self._activation!r}"
        if self._dtype != np.float32:
            s += f", dtype={self._dtype.name}"
        if self._device != "cpu":
            s += f", device={self._device!r}"
        if not self._requires_grad:
            s += ", requires_grad=False"
        return s + ")"
