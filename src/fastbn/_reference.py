"""Plain float64 NumPy batch norm, written directly from the formulas.

This is the reference the tests and ``python -m fastbn`` compare the kernels against. It is
deliberately naive: two-pass statistics in float64, no layout tricks, no fusion.
"""
import numpy as np


def _axes(x, axis):
    ax = axis % x.ndim
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return tuple(i for i in range(x.ndim) if i != ax), tuple(shape)


def _invstd(var, eps):
    v = var + eps
    with np.errstate(divide="ignore"):
        return np.where(v == 0, 0.0, 1.0 / np.sqrt(v))


def forward(x, weight=None, bias=None, *, axis=1, eps=1e-5, activation=None,
            mean=None, var=None):
    """Returns (y, mean, var, invstd) in float64; batch statistics unless mean/var are given."""
    x = np.asarray(x, dtype=np.float64)
    red, shape = _axes(x, axis)
    if mean is None:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    invstd = _invstd(var, eps)
    y = (x - mean.reshape(shape)) * invstd.reshape(shape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(shape)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean, var, invstd


def backward(dy, x, mean, invstd, weight=None, *, axis=1, training=True, y=None):
    """Returns (dx, dweight, dbias) in float64. ``y`` given: ReLU mask y > 0 applied to dy."""
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(dy, dtype=np.float64)
    if y is not None:
        g = np.where(np.asarray(y) > 0, g, 0.0)
    red, shape = _axes(x, axis)
    n = x.size // x.shape[axis % x.ndim]
    mean = np.asarray(mean, dtype=np.float64).reshape(shape)
    invstd = np.asarray(invstd, dtype=np.float64).reshape(shape)
    w = 1.0 if weight is None else np.asarray(weight, dtype=np.float64).reshape(shape)
    xhat = (x - mean) * invstd
    dbias = g.sum(axis=red)
    dweight = (g * xhat).sum(axis=red)
    if training:
        dx = w * invstd * (g - dbias.reshape(shape) / n - xhat * dweight.reshape(shape) / n)
    else:
        dx = g * w * invstd
    return dx, dweight, dbias
