"""The BatchNorm layer: parameters, gradients, running statistics, train/eval, state.

The layer follows ``torch.nn.BatchNorm{1,2,3}d`` (same running-statistics rule, same
``state_dict`` keys, same train/eval behaviour) with Keras's freedom of ``axis``. It holds state
and decides *which* statistics to use; all arithmetic on x is done by ``fastbn.functional``.

State changes are transactional: a call that raises (bad input, bad state dict, one value per
channel in training) leaves every attribute, the running statistics, the gradients and the
forward cache used by ``backward`` exactly as they were.
"""
import numbers
import operator
from collections import namedtuple
from collections.abc import Mapping

import numpy as np

from ._backend import is_cupy_array
from .functional import (
    batch_norm_backward,
    forward_with_stats,
    invstd_from_var,
    normalize,
    update_running_stats,
)

__all__ = ["BatchNorm", "IncompatibleKeys"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DEVICES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
_CHANNEL_STATE = ("weight", "bias", "running_mean", "running_var")


class _Context:
    """What backward needs from the last successful forward.

    ``weight`` is a copy taken at forward time, so an optimizer step between forward and
    backward does not change the gradient of the computation that actually ran.
    """

    __slots__ = ("x", "y", "mean", "invstd", "weight", "training", "axis", "activation")

    def __init__(self, x, y, mean, invstd, weight, training, axis, activation):
        self.x = x
        self.y = y
        self.mean = mean
        self.invstd = invstd
        self.weight = weight
        self.training = training
        self.axis = axis
        self.activation = activation


# --------------------------------------------------------------------------- validation

def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _check_num_features(n):
    if isinstance(n, (bool, np.bool_)):
        raise TypeError("num_features: expected a positive int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"num_features: expected a positive int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"num_features: expected a positive int, got {n}")
    return n


def _check_axis(axis):
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis: expected an int, got bool")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}") from None


def _check_eps(eps):
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a finite non-negative float, got {type(eps).__name__}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps: expected a finite non-negative float, got {eps}")
    return eps


def _check_momentum(momentum):
    if momentum is None:
        return None
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"momentum: expected a float in [0, 1] or None (cumulative average), "
            f"got {type(momentum).__name__}"
        )
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum: expected a float in [0, 1] or None (cumulative average), got {momentum}"
        )
    return momentum


def _check_activation(activation):
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    return activation


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
    if dt not in _PARAM_DTYPES:
        hint = (
            " (for float16 inputs keep float32 parameters: the layer computes them in float32 "
            "and returns float16)" if dt == np.float16 else ""
        )
        raise TypeError(f"dtype: expected float32 or float64, got {dt}{hint}")
    return dt


def _check_device(device):
    key = device.lower() if isinstance(device, str) else None
    if key not in _DEVICES:
        raise ValueError(f"device: expected 'cpu' or 'gpu' (alias 'cuda'), got {device!r}")
    return _DEVICES[key]


def _import_cupy(what):
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            f"{what}: the GPU path needs CuPy, which could not be imported ({exc}). Install the "
            "wheel matching your CUDA driver, e.g. `pip install cupy-cuda12x`."
        ) from exc
    return cupy


def _array_kind(a):
    return "a CuPy array (GPU)" if is_cupy_array(a) else "a NumPy array (CPU)"


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
    track_running_stats : bool
        Keep ``running_mean`` (zeros), ``running_var`` (ones, unbiased) and
        ``num_batches_tracked`` and normalise with them in eval mode. When False they are None
        and batch statistics are used in both modes.
    activation : None or "relu"
        "relu" fuses a ReLU into the forward; the backward masks with the forward's output.
    dtype : float32 or float64
        dtype of the parameters and running statistics. Inputs must have this dtype, or be
        float16 (mixed precision as in PyTorch: computed in float32, returned as float16).

    Notes
    -----
    ``forward`` keeps references to its input (and, with ReLU, its output) for ``backward``
    until the next successful forward: do not modify them in place in between. ``backward``
    may be called several times on one forward; each call accumulates. A forward that raises
    leaves the previous forward's cache in place (it is neither cleared nor changed).
    Pickling, ``copy.deepcopy`` and a change of device drop the cache.
    """

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, activation=None, dtype=np.float32):
        self._num_features = _check_num_features(num_features)
        self._axis = _check_axis(axis)
        self._eps = _check_eps(eps)
        self._momentum = _check_momentum(momentum)
        self._affine = _check_bool(affine, "affine")
        self._track = _check_bool(track_running_stats, "track_running_stats")
        self._activation = _check_activation(activation)
        self._dtype = _check_dtype(dtype)
        self.training = True
        self._device = "cpu"
        C, dt = self._num_features, self._dtype
        self._weight = np.ones(C, dt) if self._affine else None
        self._bias = np.zeros(C, dt) if self._affine else None
        self._running_mean = np.zeros(C, dt) if self._track else None
        self._running_var = np.ones(C, dt) if self._track else None
        self._num_batches_tracked = 0 if self._track else None
        self.grad_weight = None
        self.grad_bias = None
        self._ctx = None

    # ----------------------------------------------------------------- options

    num_features = property(lambda self: self._num_features, doc="C (read-only).")
    affine = property(lambda self: self._affine, doc="Whether weight/bias exist (read-only).")
    track_running_stats = property(
        lambda self: self._track, doc="Whether running statistics exist (read-only)."
    )
    dtype = property(lambda self: self._dtype, doc="Parameter dtype (read-only).")

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
        self._axis = _check_axis(value)

    @property
    def eps(self):
        return self._eps

    @eps.setter
    def eps(self, value):
        self._eps = _check_eps(value)

    @property
    def momentum(self):
        """Running-statistics factor in [0, 1], or None for a cumulative average."""
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._momentum = _check_momentum(value)

    @property
    def activation(self):
        return self._activation

    @activation.setter
    def activation(self, value):
        self._activation = _check_activation(value)

    # ----------------------------------------------------------------- per-channel state

    def _assign_channel(self, name, value):
        """Copy value into the existing (C,) array `name`, keeping its identity.

        In place, like PyTorch's ``param.copy_``: an optimizer or caller holding the array keeps
        seeing the layer's values, and the array stays contiguous, writable, of the layer's
        dtype and on the layer's device whatever was assigned.
        """
        current = getattr(self, "_" + name)
        if current is None:
            option = "affine" if name in ("weight", "bias") else "track_running_stats"
            raise AttributeError(f"{name}: this layer has none ({option}=False)")
        current[...] = self._stage_channel(name, value)

    def _stage_channel(self, name, value):
        """Validate value as the (C,) array `name` and bring it to the layer's device."""
        if value is None:
            raise TypeError(f"{name}: expected an array of shape ({self._num_features},), got None")
        a = self._to_own_module(name, value)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name}: expected a real (floating-point) array, got dtype {a.dtype}")
        if a.shape != (self._num_features,):
            raise ValueError(
                f"{name}: expected shape ({self._num_features},) (num_features), got {a.shape}"
            )
        return a

    def _to_own_module(self, name, value):
        gpu = self._device == "gpu"
        if is_cupy_array(value):
            if gpu:
                return value
            return _import_cupy(name).asnumpy(value)
        try:
            a = np.asarray(value)
        except Exception as exc:  # e.g. a CUDA torch tensor
            raise TypeError(
                f"{name}: expected a NumPy or CuPy array, got {type(value).__name__} ({exc})"
            ) from None
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

    @property
    def num_batches_tracked(self):
        """Training batches seen (a Python int), or None without running statistics."""
        return self._num_batches_tracked

    @num_batches_tracked.setter
    def num_batches_tracked(self, value):
        self._num_batches_tracked = self._stage_count(value)

    def _stage_count(self, value):
        name = "num_batches_tracked"
        if not self._track:
            raise AttributeError(f"{name}: this layer has none (track_running_stats=False)")
        if is_cupy_array(value):
            value = _import_cupy(name).asnumpy(value)
        try:
            a = np.asarray(value)
        except Exception as exc:
            raise TypeError(
                f"{name}: expected an int, got {type(value).__name__} ({exc})"
            ) from None
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected an integer, got dtype {a.dtype}")
        if a.shape != ():
            raise ValueError(f"{name}: expected a scalar (shape ()), got shape {a.shape}")
        n = int(a)
        if n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n}")
        return n

    # ----------------------------------------------------------------- modes

    def train(self, mode=True):
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = _check_bool(mode, "mode")
        return self

    def eval(self):
        """Evaluation mode (running statistics when tracked); returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """Reset grad_weight/grad_bias: to None (PyTorch's default) or, in place, to zeros."""
        if set_to_none:
            self.grad_weight = None
            self.grad_bias = None
        else:
            for name in ("grad_weight", "grad_bias"):
                g = getattr(self, name)
                if g is not None:
                    g[...] = 0
                elif self._affine:
                    setattr(self, name, self._xp().zeros(self._num_features, self._dtype))

    def _xp(self):
        return _import_cupy("BatchNorm") if self._device == "gpu" else np

    # ----------------------------------------------------------------- forward / backward

    def _check_input(self, x):
        gpu = is_cupy_array(x)
        if gpu != (self._device == "gpu"):
            move = ".to('gpu')" if gpu else ".to('cpu')"
            own = "a CuPy array (GPU)" if self._device == "gpu" else "a NumPy array (CPU)"
            raise TypeError(
                f"x: expected {own} "
                f"like the layer's parameters, got {_array_kind(x)} "
                f"(move the input, or the layer with {move})"
            )
        if not gpu and not isinstance(x, np.ndarray):
            if hasattr(x, "__cuda_array_interface__"):
                raise TypeError(
                    f"x: expected a NumPy array like the layer's parameters, got "
                    f"{type(x).__module__}.{type(x).__name__}"
                )
            x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(
                f"x: expected a floating-point array (float16, float32 or float64), "
                f"got dtype {x.dtype}"
            )
        if x.dtype != self._dtype and x.dtype != np.float16:
            raise TypeError(
                f"x: expected dtype {self._dtype} (the layer's dtype) or float16, got {x.dtype} "
                f"(convert x, or create the layer with dtype={x.dtype})"
            )
        if x.ndim < 2:
            raise ValueError(
                f"x: expected an array with at least 2 dimensions (batch and features), "
                f"got shape {x.shape}"
            )
        if not -x.ndim <= self._axis < x.ndim:
            raise ValueError(
                f"axis: expected an int in [{-x.ndim}, {x.ndim - 1}] for x of shape {x.shape}, "
                f"got {self._axis}"
            )
        if x.shape[self._axis] != self._num_features:
            raise ValueError(
                f"x: expected {self._num_features} features (num_features) on axis {self._axis}, "
                f"got shape {x.shape}"
            )
        return x

    def forward(self, x):
        """Normalise x; in training mode also update the running statistics.

        Training mode, or ``track_running_stats=False``: batch statistics. Eval mode with
        running statistics: those. Returns y with x's shape and dtype.
        """
        x = self._check_input(x)
        w, b = self._weight, self._bias
        batch_stats = self.training or not self._track
        if batch_stats:
            # Raises (one value per channel, ...) before any state below is touched.
            y, mean, invstd, var, count = forward_with_stats(
                x, w, b, axis=self._axis, eps=self._eps, activation=self._activation
            )
        else:
            mean = self._running_mean.astype(np.float64)
            invstd = invstd_from_var(self._running_var, self._eps)
            y = normalize(x, mean, invstd, w, b, axis=self._axis, activation=self._activation)
        if self.training and self._track:
            n_batches = self._num_batches_tracked + 1
            factor = 1.0 / n_batches if self._momentum is None else self._momentum
            update_running_stats(self._running_mean, self._running_var, mean, var, count, factor)
            self._num_batches_tracked = n_batches
        self._ctx = _Context(
            x, y if self._activation == "relu" else None, mean, invstd,
            None if w is None else w.copy(), batch_stats, self._axis, self._activation,
        )
        return y

    __call__ = forward

    def backward(self, dy):
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
        if is_cupy_array(dy) != is_cupy_array(ctx.x):
            raise TypeError(
                f"dy: expected {_array_kind(ctx.x)} like the forward's input, got {_array_kind(dy)}"
            )
        dx, dweight, dbias = batch_norm_backward(
            dy, ctx.x, ctx.mean, ctx.invstd, ctx.weight, axis=ctx.axis, training=ctx.training,
            activation=ctx.activation, y=ctx.y,
        )
        if self._affine:
            self.grad_weight = self._accumulate(self.grad_weight, dweight)
            self.grad_bias = self._accumulate(self.grad_bias, dbias)
        return dx

    def _accumulate(self, grad, delta):
        if grad is None:
            return delta.astype(self._dtype, copy=True)
        grad += delta
        return grad

    # ----------------------------------------------------------------- state

    def _state_keys(self):
        keys = []
        if self._affine:
            keys += ["weight", "bias"]
        if self._track:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self):
        """Copies of the state under PyTorch's keys, as arrays of the layer's device.

        ``num_batches_tracked`` is a 0-d int64 array, as ``module.state_dict()`` converted
        with ``.numpy()`` gives it. Unlike PyTorch's, the arrays do not share memory with the
        layer: the result is a snapshot.
        """
        xp = self._xp()
        out = {}
        for k in self._state_keys():
            if k == "num_batches_tracked":
                out[k] = xp.asarray(self._num_batches_tracked, dtype=xp.int64)
            else:
                out[k] = getattr(self, "_" + k).copy()
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Load state saved by ``state_dict()`` here or by a PyTorch BatchNorm (as arrays).

        Values are copied into the existing arrays (cast to the layer's dtype, moved to its
        device). With ``strict`` (the default) missing or unexpected keys raise ValueError;
        without, they are reported in the returned ``IncompatibleKeys(missing_keys,
        unexpected_keys)``. Shapes and dtypes are always checked. Everything is validated
        before anything is assigned: a failed call changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict: expected a mapping (dict) of arrays, got {type(state_dict).__name__}"
            )
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict: expected exactly the keys {expected}; missing {missing}, "
                f"unexpected {unexpected} (pass strict=False to load the keys that match)"
            )
        staged = {}
        for k in expected:
            if k not in state_dict:
                continue
            if k == "num_batches_tracked":
                staged[k] = self._stage_count(state_dict[k])
            else:
                staged[k] = self._stage_channel(k, state_dict[k])
        for k, v in staged.items():
            if k == "num_batches_tracked":
                self._num_batches_tracked = v
            else:
                getattr(self, "_" + k)[...] = v
        return IncompatibleKeys(missing, unexpected)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ctx"] = None  # the cached input is activation memory, not layer state
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # ----------------------------------------------------------------- device

    def to(self, device):
        """Move every array (parameters, gradients, running statistics) to 'cpu' or 'gpu'.

        Returns self. 'gpu' needs CuPy (ImportError otherwise). A move drops the forward cache.
        Nothing changes if any transfer fails.
        """
        target = _check_device(device)
        if target == self._device:
            return self
        cupy = _import_cupy(f"BatchNorm.to({device!r})")
        move = cupy.asarray if target == "gpu" else cupy.asnumpy
        names = ("_weight", "_bias", "_running_mean", "_running_var", "grad_weight", "grad_bias")
        moved = {n: None if getattr(self, n) is None else move(getattr(self, n)) for n in names}
        for n, a in moved.items():
            setattr(self, n, a)
        self._device = target
        self._ctx = None
        return self

    def __repr__(self):
        s = (
            f"BatchNorm({self._num_features}, axis={self._axis}, eps={self._eps}, "
            f"momentum={self._momentum}, affine={self._affine}, "
            f"track_running_stats={self._track}"
        )
        if self._activation is not None:
            s += f", activation={self._activation!r}"
        if self._dtype != np.float32:
            s += f", dtype={self._dtype.name}"
        return s + ")"
