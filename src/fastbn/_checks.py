"""Argument checks shared by the NumPy path (fastbn.functional) and the CuPy path (fastbn.cuda).

Only the rules and their messages live here; each path first makes sure an argument is an
array of its own module (converting array-likes, refusing the other module's arrays) and then
calls these, so the two paths cannot drift apart. Messages name the argument, the expected and
the received.
"""
import math
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
MIXED = "(pass every array argument from the same array module)"


def float_dtype(a, name):
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point array (float16, float32 or float64), "
            f"got dtype {a.dtype}"
        )
    return a


def shape_axis(x, axis):
    """x has a batch and a feature axis; returns `axis` normalised to [0, ndim)."""
    if x.ndim < 2:
        raise ValueError(
            f"x: expected an array with at least 2 dimensions (batch and features), "
            f"got shape {x.shape}"
        )
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}") from None
    if not -x.ndim <= ax < x.ndim:
        raise ValueError(
            f"axis: expected an int in [{-x.ndim}, {x.ndim - 1}] for x of shape {x.shape}, "
            f"got {axis}"
        )
    return ax % x.ndim


def channel(a, name, C):
    """A per-channel array: floating, shape (C,)."""
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},) (one value per channel), got {a.shape}")
    return a


def like(a, name, x):
    """An array that must match x in shape and dtype (dy, y)."""
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} (the shape of x), got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {a.dtype}")
    return a


def out(o, x):
    if o.shape != x.shape:
        raise ValueError(f"out: expected shape {x.shape} (the shape of x), got {o.shape}")
    if o.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} (the dtype of x), got {o.dtype}")
    return o


def eps(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"eps: expected a non-negative float, got {type(value).__name__}"
        ) from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"eps: expected a finite non-negative float, got {value}")
    return value


def activation(value):
    """True for "relu", False for None."""
    if value not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {value!r}")
    return value == "relu"


def momentum(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"momentum: expected a float in [0, 1], got {type(value).__name__} "
            "(BatchNorm(momentum=None) gives a cumulative average)"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {value}")
    return value


def relu_y_missing():
    return ValueError("y: expected the forward's output when activation='relu', got None")


def training_count(n, shape):
    """Training needs more than one value per channel (as PyTorch); returns n."""
    if n <= 1:
        raise ValueError(
            f"x: expected more than 1 value per channel when training, got input shape "
            f"{shape} ({n} value(s) per channel)"
        )
    return n
