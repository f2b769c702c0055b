"""Every argument rule of fastbn and its message, in one place.

The functional API, the layer, SyncBatchNorm, the CUDA backend and the analysis helpers all
call these functions; nothing else decides whether an argument is acceptable (the one-call fast
paths in ``_kernels`` only decide whether a call is *plain* enough to skip the general path, and
get their scalars from here). Each rule raises TypeError (wrong kind of object or dtype) or
ValueError (wrong shape or value) with a message that names the argument, what was expected and
what was received.

Arrays are converted here too, because what may be converted is itself a rule: array-likes
(lists, objects with ``__array__`` or ``__dlpack__``, torch tensors, including ones that require
grad) are read without copying where the memory allows; masked arrays are refused rather than
having their mask ignored; non-native byte order and misaligned memory are copied into native,
aligned arrays so that no kernel ever reads them as garbage. Arrays fastbn writes (``out=``,
running statistics) are never converted: they must be writable arrays of the caller's module.
"""
import math
import numbers
import operator

import numpy as np

from ._backend import is_cupy_array

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
FLOAT_NAMES = "float16, bfloat16, float32 or float64"
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
MIXED = "(pass every array argument from the same array module)"
_DEVICES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}


def is_bfloat16(dt):
    """ml_dtypes.bfloat16, recognised without importing ml_dtypes (it stays optional).

    NumPy sees it as a 2-byte void-kind dtype (``kind == 'V'``) named 'bfloat16' whose scalar
    type lives in ml_dtypes; ml_dtypes registers its casts to and from float32/float64, which
    is all fastbn uses. Any other 'V' dtype (raw void, structured, a bfloat16 in foreign byte
    order, which NumPy turns into plain 'V2') is not floating and stays refused.
    """
    return (dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16" and dt.isnative
            and getattr(dt.type, "__module__", "").split(".", 1)[0] == "ml_dtypes")


def is_half(dt):
    """float16 or bfloat16: the 2-byte floats fastbn reads and writes but computes in float32."""
    return dt.char == "e" or is_bfloat16(dt)


def _kind(value):
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


# --------------------------------------------------------------------------- scalars

def _real(value, name, expected):
    """value as a Python float if it is a real number (not a bool, str or array)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {_kind(value)}")
    return float(value)


def eps(value, name="eps"):
    """A finite float >= 0 (bool and str are refused, not converted)."""
    if type(value) is float and 0.0 <= value < math.inf:
        return value
    v = _real(value, name, "a finite non-negative float")
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"{name}: expected a finite non-negative float, got {v}")
    return v


def momentum(value, *, allow_none=False):
    """A float in [0, 1]; None too when ``allow_none`` (the layer's cumulative average)."""
    if type(value) is float and 0.0 <= value <= 1.0:
        return value
    hint = " or None (cumulative average)" if allow_none else ""
    if value is None and allow_none:
        return None
    v = _real(value, "momentum", f"a float in [0, 1]{hint}")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1]{hint}, got {v}")
    return v


def flag(value, name):
    """A bool (numpy.bool_ too); strings, ints and None are refused."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {_kind(value)}")


def integer(value, name, expected="an int"):
    """An int (numpy integers and objects with __index__ too), never a bool."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected {expected}, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected {expected}, got {_kind(value)}") from None


def num_features(value):
    """A positive int, or (several feature axes) a non-empty tuple/list of them -> a tuple."""
    if isinstance(value, (tuple, list)):
        if not value:
            raise ValueError("num_features: expected a positive int or a non-empty tuple of "
                             "them, got ()")
        return tuple(num_features(v) for v in value)
    n = integer(value, "num_features", "a positive int")
    if n < 1:
        raise ValueError(f"num_features: expected a positive int, got {n}")
    return n


def layer_axis(value, features):
    """A layer's axis: an int for an int num_features, a tuple of as many distinct ints as
    num_features has entries for a tuple one (normalised against x's ndim at each call)."""
    if isinstance(features, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(features):
            raise ValueError(f"axis: expected a tuple of {len(features)} feature axes for "
                             f"num_features={features}, got {value!r}")
        axes = tuple(integer(a, "axis") for a in value)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis: expected distinct feature axes, got {axes}")
        return axes
    if isinstance(value, (tuple, list)):
        raise TypeError(f"axis: expected an int for num_features={features!r} (several "
                        f"feature axes take num_features as a tuple of their sizes, e.g. "
                        f"BatchNorm((C, H), axis=(1, 2))), got {value!r}")
    return integer(value, "axis")


def count(value, name="count"):
    """A number of values: a finite real >= 0 (int or float; bool and str refused)."""
    v = _real(value, name, "a finite non-negative number of values")
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"{name}: expected a finite non-negative number of values, got {v}")
    return v


def timeout(value):
    """Seconds to wait (SyncBatchNorm): a positive number, or None for ever."""
    if value is None:
        return None
    v = _real(value, "timeout", "a positive number of seconds or None")
    if not v > 0:
        raise ValueError(f"timeout: expected a positive number of seconds or None, got {v}")
    return v


def activation(value):
    """True for "relu", False for None."""
    if value is None:
        return False
    if type(value) is str and value == "relu":
        return True
    raise ValueError(f"activation: expected None or 'relu', got {value!r}")


def param_dtype(dtype):
    """The dtype of a layer's parameters: float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
    if dt not in PARAM_DTYPES:
        hint = (
            f" (for {dt} inputs keep float32 parameters: the layer computes them in float32 "
            f"and returns {dt})" if is_half(dt) else ""
        )
        raise TypeError(f"dtype: expected float32 or float64, got {dt}{hint}")
    return dt


def device(value):
    key = value.lower() if isinstance(value, str) else None
    if key not in _DEVICES:
        raise ValueError(f"device: expected 'cpu' or 'gpu' (alias 'cuda'), got {value!r}")
    return _DEVICES[key]


def axis(value, ndim, shape):
    """An int in [-ndim, ndim); returns it normalised to [0, ndim)."""
    ax = integer(value, "axis")
    if not -ndim <= ax < ndim:
        raise ValueError(
            f"axis: expected an int in [{-ndim}, {ndim - 1}] for x of shape {shape}, got {ax}"
        )
    return ax % ndim


def feature_axes(value, ndim, shape):
    """Several feature axes: a tuple or list of distinct ints in [-ndim, ndim), leaving at
    least one axis to reduce over; returns them normalised and sorted."""
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"axis: expected an int or a non-empty tuple of ints, got "
                        f"{_kind(value)}")
    axes = sorted(axis(a, ndim, shape) for a in value)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis: expected distinct feature axes, got {tuple(value)}")
    if len(axes) >= ndim:
        raise ValueError(f"axis: expected fewer feature axes than the {ndim} dimensions of x "
                         f"(statistics need an axis to reduce over), got {tuple(value)}")
    return tuple(axes)


def features(a, name, fshape):
    """A per-feature array over several feature axes: floating, shape fshape."""
    floating(a, name)
    if a.shape != tuple(fshape):
        raise ValueError(f"{name}: expected shape {tuple(fshape)} (one value per feature), got "
                         f"{a.shape}")
    return a


def unit_interval(value, name):
    """A float in [0, 1] (renorm_momentum)."""
    v = _real(value, name, "a float in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1], got {v}")
    return v


RENORM_KEYS = ("rmax", "rmin", "dmax")


def renorm_bound(value, name):
    """A clipping bound of batch renormalization: None (no clipping) or a real >= 0."""
    if value is None:
        return None
    v = _real(value, name, "a non-negative number or None (no clipping)")
    if not v >= 0.0:  # inf allowed: no clipping
        raise ValueError(f"{name}: expected a non-negative number or None, got {v}")
    return v


def renorm_bounds(rmax, rmin, dmax):
    rmax, rmin, dmax = (renorm_bound(v, k) for v, k in zip((rmax, rmin, dmax), RENORM_KEYS))
    if rmax is not None and rmin is not None and rmin > rmax:
        raise ValueError(f"rmin: expected rmin <= rmax, got rmin={rmin}, rmax={rmax}")
    return rmax, rmin, dmax


def renorm_clipping(value):
    """Keras's renorm_clipping: None or a mapping with keys among 'rmax', 'rmin', 'dmax'."""
    from collections.abc import Mapping

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"renorm_clipping: expected a dict with keys among {list(RENORM_KEYS)} "
                        f"or None, got {_kind(value)}")
    extra = [k for k in value if k not in RENORM_KEYS]
    if extra:
        raise ValueError(f"renorm_clipping: expected keys among {list(RENORM_KEYS)}, got "
                         f"{extra}")
    bounds = renorm_bounds(value.get("rmax"), value.get("rmin"), value.get("dmax"))
    return {k: v for k, v in zip(RENORM_KEYS, bounds) if v is not None}


def renorm_reference(std_ref, eps):
    """max(renorm_std, sqrt(eps)) (Keras) must be positive and finite to divide by."""
    xp = _module_of(std_ref)
    ref = xp.maximum(std_ref.astype(xp.float64), math.sqrt(eps))
    if not bool(xp.all(xp.isfinite(ref) & (ref > 0))):
        raise ValueError("renorm_std: expected finite values > 0 (or eps > 0: values below "
                         "sqrt(eps) are raised to it)")
    return ref


def virtual_batch_size(value, shape, ax):
    """Ghost batches: an int >= 1 dividing the batch (axis 0), which is not the feature axis."""
    if value is None:
        return None
    v = integer(value, "virtual_batch_size", "a positive int or None")
    if v < 1:
        raise ValueError(f"virtual_batch_size: expected a positive int or None, got {v}")
    if shape is None:
        return v
    if ax == 0:
        raise ValueError("virtual_batch_size: ghost batches split axis 0, which is the feature "
                         "axis here (axis=0)")
    if shape[0] % v:
        raise ValueError(f"virtual_batch_size: expected a divisor of the batch size "
                         f"{shape[0]} (axis 0 of x, shape {shape}), got {v}")
    return v


def ghost_stats(a, name, G, C):
    """Per-sub-batch statistics of ghost batch norm: shape (G, C)."""
    floating(a, name)
    if a.shape != (G, C):
        raise ValueError(f"{name}: expected shape ({G}, {C}) (one row per virtual batch), got "
                         f"{a.shape}")
    return a


def exclusive(options):
    """Variants that do not combine: at most one of the named options is on."""
    on = [k for k, v in options.items() if v]
    if len(on) > 1:
        raise ValueError(f"{', '.join(on)}: these variants do not combine; choose one")


def mask(a, shape, ax):
    """A boolean mask shaped like x without its feature axis (True = counts)."""
    if a.dtype.kind != "b":
        raise TypeError(f"mask: expected a boolean array (True = counts), got dtype {a.dtype}")
    want = shape[:ax] + shape[ax + 1:]
    if a.shape != want:
        raise ValueError(f"mask: expected shape {want} (x's shape {shape} without its feature "
                         f"axis {ax}), got {a.shape}")
    return a


def mask_count(n, size):
    """Training on masked statistics needs more than one masked-in position (as PyTorch's rule
    for one value per channel); an empty x is allowed."""
    if size > 0 and n < 2:
        raise ValueError(f"mask: expected more than 1 True position when training, got {n}")
    return n


def _module_of(a):
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


def not_sync(layer, option):
    """Variants are BatchNorm's own forward; a subclass that replaces the batch statistics
    (SyncBatchNorm) does not run them."""
    from .layer import BatchNorm

    if type(layer)._batch_forward is not BatchNorm._batch_forward:
        raise ValueError(f"{option}: not supported by {type(layer).__name__} (a BatchNorm "
                         "option only)")


# --------------------------------------------------------------------------- array conversion

def _torch_readable(a, name):
    """A torch tensor as something NumPy reads without a copy (detached: read, never written)."""
    if getattr(a, "requires_grad", False):
        a = a.detach()
    dev = getattr(getattr(a, "device", None), "type", "cpu")
    if dev != "cpu":
        raise TypeError(
            f"{name}: expected a CPU array, got a torch.Tensor on device {dev!r} (move it with "
            ".cpu(), or pass a CuPy array for the GPU path)"
        )
    return a


def _torch_bfloat16(a, name):
    """A torch.bfloat16 CPU tensor as an ml_dtypes.bfloat16 NumPy view of its memory (NumPy
    has no bfloat16 of its own, and torch's __array__ and DLPack refuse it)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            f"{name}: expected a tensor NumPy can read, got a torch.bfloat16 tensor (reading "
            "bfloat16 needs ml_dtypes: pip install ml_dtypes, or convert with .float())"
        ) from None
    import torch

    return a.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def numpy_array(a, name):
    """An array-like as a native-order, aligned NumPy ndarray (a view when possible)."""
    if type(a) is not np.ndarray:
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(
                f"{name}: expected an array without a mask, got a numpy.ma.MaskedArray (its mask "
                "would be ignored; pass a.filled(value) or a.compressed() as you intend)"
            )
        if a is None:
            raise TypeError(f"{name}: expected an array, got None")
        if hasattr(a, "__cuda_array_interface__") or is_cupy_array(a):
            raise TypeError(f"{name}: expected a NumPy array, got {_kind(a)} {MIXED}")
        if type(a).__module__.split(".", 1)[0] == "torch":
            a = _torch_readable(a, name)
            if str(getattr(a, "dtype", "")) == "torch.bfloat16":
                a = _torch_bfloat16(a, name)
        if isinstance(a, np.ndarray):  # a subclass (np.matrix, memmap, ...): its data as is
            a = a.view(np.ndarray)
        else:
            try:
                if hasattr(a, "__dlpack__") and not hasattr(a, "__array__") \
                        and not hasattr(a, "__array_interface__"):
                    a = np.from_dlpack(a)
                else:
                    a = np.asarray(a)
            except (TypeError, ValueError, BufferError, RuntimeError) as exc:
                raise ValueError(
                    f"{name}: expected an array or a (rectangular) nested sequence of numbers, "
                    f"got {_kind(a)} that NumPy cannot convert ({exc})"
                ) from None
    if not (a.dtype.isnative and a.flags.aligned):
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="K")
    return a


def cupy_array(cp, a, name):
    """An array-like as a CuPy ndarray on the current device; NumPy arrays are refused."""
    if isinstance(a, cp.ndarray):
        return a
    if a is None:
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a CuPy array like x, got numpy.ndarray {MIXED}")
    try:
        return cp.asarray(a)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name}: expected a CuPy array or a nested sequence of numbers, got {_kind(a)} "
            f"({exc})"
        ) from None


def cuda_dtype(a, name):
    """The CUDA kernels read float16, float32 and float64: bfloat16 is CPU-only."""
    if is_bfloat16(a.dtype):
        raise TypeError(f"{name}: expected a float16, float32 or float64 CuPy array (bfloat16 "
                        "runs on the CPU path only), got dtype bfloat16")
    return a


def writable(a, name, module):
    """An array fastbn writes into: an ndarray of `module` (numpy or cupy), writable, no mask."""
    if module is np:
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name}: expected a writable NumPy array without a mask, got a "
                            "numpy.ma.MaskedArray")
        if not isinstance(a, np.ndarray):
            what = MIXED if is_cupy_array(a) else "(fastbn writes into it)"
            raise TypeError(f"{name}: expected a writable NumPy array, got {_kind(a)} {what}")
        if not a.flags.writeable:
            raise ValueError(f"{name}: expected a writable array, got a read-only one")
    elif not isinstance(a, module.ndarray):
        what = MIXED if isinstance(a, np.ndarray) else "(fastbn writes into it)"
        raise TypeError(f"{name}: expected a writable CuPy array, got {_kind(a)} {what}")
    return a


# --------------------------------------------------------------------------- array rules

def floating(a, name):
    # byte order aside: arrays fastbn writes are checked as given, never converted
    dt = a.dtype
    if dt not in FLOAT_DTYPES and dt.newbyteorder("=") not in FLOAT_DTYPES \
            and not is_bfloat16(dt):
        raise TypeError(
            f"{name}: expected a floating-point array ({FLOAT_NAMES}), got dtype {dt}"
        )
    return a


def batch(a):
    """x has a batch and a feature axis."""
    if a.ndim < 2:
        raise ValueError(
            f"x: expected an array with at least 2 dimensions (batch and features), "
            f"got shape {a.shape}"
        )
    return a


def channel(a, name, C):
    """A per-channel array: floating, shape (C,)."""
    floating(a, name)
    if a.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},) (one value per channel), got {a.shape}")
    return a


def vector(a, name):
    """A 1-D per-channel array on its own (no x to take C from); returns its length."""
    floating(a, name)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (one value per channel), got shape "
                         f"{a.shape}")
    return a.shape[0]


def like(a, name, x):
    """An array that must match x in shape and dtype (dy, y, out)."""
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} (the shape of x), got {a.shape}")
    if a.dtype.newbyteorder("=") != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {a.dtype}")
    return a


def required(a, name, C):
    if a is None:
        raise TypeError(f"{name}: expected an array of shape ({C},), got None")
    return a


def relu_y_missing():
    return ValueError("y: expected the forward's output when activation='relu', got None")


def training_count(n, shape):
    """Training needs more than one value per channel (as PyTorch); an empty batch is allowed."""
    if n == 1:
        raise ValueError(
            f"x: expected more than 1 value per channel when training, got input shape "
            f"{shape} (1 value per channel)"
        )
    return n


def dx_count(n, batch_values, training):
    """backward_dx's count: the values the sums were taken over, > 0 for a non-empty batch."""
    n = count(n)
    if training and batch_values > 0 and n == 0:
        raise ValueError("count: expected a positive number of values for a non-empty batch "
                         "when training, got 0.0")
    return n


def update_count(n):
    """update_running_stats's count: at least one value (an empty batch updates nothing)."""
    n = count(n)
    if n < 1:
        raise ValueError(f"count: expected at least 1 value per channel, got {n}")
    return n


def both_running(running_mean, running_var):
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean, running_var: expected both arrays when training=False, got "
            f"{type(running_mean).__name__} and {type(running_var).__name__}"
        )


# --------------------------------------------------------------------------- the layer

def layer_device(x, device):
    """x is an array of the layer's device: 'cpu' (NumPy) or 'gpu' (CuPy)."""
    gpu = is_cupy_array(x)
    if gpu != (device == "gpu"):
        move = ".to('gpu')" if gpu else ".to('cpu')"
        own = "a CuPy array (GPU)" if device == "gpu" else "a NumPy array (CPU)"
        got = "a CuPy array (GPU)" if gpu else f"{_kind(x)} (CPU)"
        raise TypeError(
            f"x: expected {own} like the layer's parameters, got {got} "
            f"(move the input, or the layer with {move})"
        )


def same_device(a, name, ref, what):
    if is_cupy_array(a) != is_cupy_array(ref):
        kinds = ("a NumPy array (CPU)", "a CuPy array (GPU)")
        raise TypeError(f"{name}: expected {kinds[is_cupy_array(ref)]} like {what}, got "
                        f"{kinds[is_cupy_array(a)]}")


def assigned_channel(a, name, C):
    """A value assigned to a layer's per-feature array: real (integers too), shape (C,), or
    num_features itself when that is a tuple (several feature axes)."""
    if a.dtype.kind not in "fiu" and not is_bfloat16(a.dtype):
        raise TypeError(f"{name}: expected a real (floating-point) array, got dtype {a.dtype}")
    shape = C if isinstance(C, tuple) else (C,)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (num_features), got {a.shape}")
    return a


def batches_tracked(value):
    """num_batches_tracked: a non-negative integer scalar (0-d arrays too)."""
    name = "num_batches_tracked"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int, got bool")
    a = numpy_array(value, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer, got dtype {a.dtype}")
    if a.shape != ():
        raise ValueError(f"{name}: expected a scalar (shape ()), got shape {a.shape}")
    n = int(a)
    if n < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {n}")
    return n


def state_mapping(state_dict):
    from collections.abc import Mapping

    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping (dict) of arrays, got {_kind(state_dict)}"
        )
    return state_dict


def layer_input(x, dtype, num_features, ax):
    """x for a BatchNorm of `dtype` and `num_features` features on axis `ax` (x converted)."""
    if x.dtype.kind != "f":
        floating(x, "x")
    if x.dtype != dtype and not is_half(x.dtype):
        raise TypeError(
            f"x: expected dtype {dtype} (the layer's dtype), float16 or bfloat16, got {x.dtype} "
            f"(convert x, or create the layer with dtype={x.dtype})"
        )
    batch(x)
    if isinstance(num_features, tuple):
        axes = feature_axes(ax, x.ndim, x.shape)
        # the parameters are laid out in x's axis order (axes sorted), whatever order ax has
        if tuple(x.shape[a] for a in axes) != num_features:
            raise ValueError(f"x: expected {num_features} features (num_features) on axes "
                             f"{tuple(ax)}, got shape {x.shape}")
        return x
    a = axis(ax, x.ndim, x.shape)
    if x.shape[a] != num_features:
        raise ValueError(
            f"x: expected {num_features} features (num_features) on axis {ax}, "
            f"got shape {x.shape}"
        )
    return x


# --------------------------------------------------------------------------- fastbn.analysis

def real_array(a, name, dtype, ndim=None):
    """An analysis input: a real (integer or floating) array, converted to `dtype`."""
    if hasattr(a, "__cuda_array_interface__") or is_cupy_array(a):
        raise TypeError(f"{name}: expected a NumPy array (fastbn.analysis is CPU-only), got "
                        f"{_kind(a)}")
    arr = numpy_array(a, name)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric array (integer or floating point), "
                        f"got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def int_at_least(value, name, minimum=1):
    n = integer(value, name, f"an int >= {minimum}")
    if n < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {n}")
    return n


def real_where(value, name, expected, ok):
    """A finite real number for which ok(v) holds; `expected` describes it for the message."""
    v = _real(value, name, expected)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return v


def float_batch(x, features, name="x"):
    """A 2-D floating (n, features) array; lists are converted."""
    x = numpy_array(x, name)
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != features:
        raise ValueError(f"{name}: expected shape (n, {features}), got {x.shape}")
    return x


def single_axis(features, option):
    """An option that works over one feature axis only."""
    if isinstance(features, tuple):
        raise ValueError(f"{option}: not supported with several feature axes "
                         f"(num_features={features})")
