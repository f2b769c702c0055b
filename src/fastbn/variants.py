"""The batch-norm variants other frameworks offer, built from fastbn's functional verbs.

Re-exported by ``fastbn.functional`` (import them from there). Every function validates its
arguments with ``fastbn._validation`` before it allocates or writes anything, as the rest of the
functional API does, and then composes the existing verbs (``normalize``, ``channel_moments``,
``batch_norm_backward``, ...) so that each variant inherits their layouts, dtypes, threading and
bitwise thread-count invariance. See docs/guide/variants.md for the peers each one follows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from . import _cpu, _kernels
from . import _validation as V
from . import functional as F
from ._layout import Output
from ._threads import get_num_threads

if TYPE_CHECKING:
    from ._typing import Array, ArrayLike, F64Array

__all__ = ["fixed_batch_norm", "fixed_batch_norm_backward", "batch_renorm_forward",
           "batch_renorm_backward", "ghost_batch_norm_forward", "ghost_batch_norm_backward",
           "batch_norm_double_backward"]


# --------------------------------------------------------------------------- frozen statistics

def _fixed_args(x, mean, var, weight, axis, eps):
    be = F._backend(x)
    x, layout = F._input(be, x, axis)
    C = layout.C
    mean = F._required(be, mean, "mean", C)
    var = F._required(be, var, "var", C)
    weight = F._chan(be, weight, "weight", C)
    eps = V.eps(eps)
    return be, x, C, mean, var, weight, F.invstd_from_var(var, eps)


def fixed_batch_norm(x: ArrayLike, mean: ArrayLike, var: ArrayLike,
                     weight: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, *,
                     axis: int = 1, eps: float = 1e-5) -> Array:
    """Batch norm with given statistics: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Chainer's ``fixed_batch_normalization``: the statistics are inputs (not x's), so the
    gradient also flows to them (``fixed_batch_norm_backward``). One pass over x.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.functional import fixed_batch_norm
    >>> fixed_batch_norm(np.array([[1.0, 4.0]]), np.array([0.0, 2.0]), np.array([1.0, 4.0]),
    ...                  eps=0.0)
    array([[1., 1.]])
    """
    be, x, C, mean, var, weight, invstd = _fixed_args(x, mean, var, weight, axis, eps)
    bias = F._chan(be, bias, "bias", C)
    return F.normalize(x, mean, invstd, weight, bias, axis=axis)


def fixed_batch_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, var: ArrayLike,
                              weight: Optional[ArrayLike] = None, *, axis: int = 1,
                              eps: float = 1e-5
                              ) -> tuple[Array, Array, Array, Array, Array]:
    """Gradients of ``fixed_batch_norm``: (dx, dmean, dvar, dweight, dbias).

    With s = 1/sqrt(var + eps) and g = dy: dx = g * weight * s, dbias = sum(g),
    dweight = sum(g * (x - mean) * s), dmean = -weight * s * sum(g) and
    dvar = -weight * s**2 * dweight / 2 (per channel). Two passes over x (the sums, then dx).
    dmean, dvar, dweight and dbias come back in x's compute dtype (float32 for float16). Where
    var + eps == 0, s is taken as 0 (as in the forward), and so are dx, dmean and dvar.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.functional import fixed_batch_norm_backward
    >>> x = np.array([[1.0], [3.0]])
    >>> dx, dmean, dvar, dw, db = fixed_batch_norm_backward(np.ones_like(x), x, np.array([1.0]),
    ...                                                     np.array([4.0]), eps=0.0)
    >>> dx[:, 0], dmean, dvar, dw, db
    (array([0.5, 0.5]), array([-1.]), array([-0.125]), array([1.]), array([2.]))
    """
    return _fixed_batch_norm_backward(dy, x, mean, var, weight, axis, eps)


def _fixed_batch_norm_backward(dy, x, mean, var, weight, axis, eps):
    _be, x, _C, mean, var, weight, invstd = _fixed_args(x, mean, var, weight, axis, eps)
    dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                               training=False)
    gdt = dweight.dtype
    w = 1.0 if weight is None else weight.astype(invstd.dtype)
    dmean = (-(w * invstd) * dbias).astype(gdt)
    dvar = (-0.5 * w * invstd * invstd * dweight).astype(gdt)
    return dx, dmean, dvar, dweight, dbias


# --------------------------------------------------------------------------- batch renormalization

def _renorm_forward(x, renorm_mean, renorm_std, weight, bias, axis, eps, rmax, rmin, dmax):
    """(y, mean, invstd, var, count, r, d) of batch renormalization, arguments validated here."""
    be = F._backend(x)
    x, layout = F._input(be, x, axis)
    C = layout.C
    renorm_mean = F._required(be, renorm_mean, "renorm_mean", C)
    renorm_std = F._required(be, renorm_std, "renorm_std", C)
    weight = F._chan(be, weight, "weight", C)
    bias = F._chan(be, bias, "bias", C)
    eps = V.eps(eps)
    rmax, rmin, dmax = V.renorm_bounds(rmax, rmin, dmax)
    ref = V.renorm_reference(renorm_std, eps)
    n = V.training_count(layout.count, x.shape)
    xp = be.xp
    if n == 0:
        var = be.zeros(C)
        y = F.normalize(x, var, var, weight, bias, axis=axis)
        return y, be.zeros(C), be.invstd(var, eps), var, 0, xp.ones(C), be.zeros(C)
    _n, mean, m2 = F.channel_moments(x, axis=axis)
    var = m2 / n
    invstd = F.invstd_from_var(var, eps)
    r = xp.sqrt(var + eps) / ref
    d = (mean - renorm_mean.astype(xp.float64)) / ref
    if rmin is not None or rmax is not None:
        r = xp.clip(r, rmin, rmax)
    if dmax is not None:
        d = xp.clip(d, -dmax, dmax)
    gamma = 1.0 if weight is None else weight.astype(xp.float64)
    beta = 0.0 if bias is None else bias.astype(xp.float64)
    y = F.normalize(x, mean, invstd * r, weight, beta + gamma * d, axis=axis)
    return y, mean, invstd, var, n, r, d


def batch_renorm_forward(x: ArrayLike, renorm_mean: ArrayLike, renorm_std: ArrayLike,
                         weight: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None,
                         *, axis: int = 1, eps: float = 1e-5, rmax: Optional[float] = None,
                         rmin: Optional[float] = None, dmax: Optional[float] = None
                         ) -> tuple[Array, F64Array, F64Array, F64Array, F64Array]:
    """Batch renormalization (Ioffe 2017) in training: returns (y, mean, invstd, r, d).

    With the batch's mean and std = sqrt(var + eps) and the reference statistics
    ``renorm_mean``/``renorm_std`` (Keras's ``renorm_mean``/``renorm_stddev`` moving averages;
    values below sqrt(eps) are raised to it, as Keras does): ref = max(renorm_std, sqrt(eps)),
    r = clip(std / ref, rmin, rmax), d = clip((mean - renorm_mean) / ref, -dmax, dmax), and
    y = weight * ((x - mean) * invstd * r + d) + bias. A bound left None does not clip
    (Keras's defaults: rmin 0, rmax and dmax infinite; the paper clips r to [1/rmax, rmax]:
    pass ``rmin=1/rmax``). Two passes over x, as plain batch norm: the statistics, then
    ``normalize``. r and d (float64) are constants for the backward
    (``batch_renorm_backward``). Nothing is updated: the layer (``BatchNorm(renorm=True)``)
    keeps the moving statistics.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.functional import batch_renorm_forward
    >>> x = np.array([[0.0], [4.0]])
    >>> y, mean, invstd, r, d = batch_renorm_forward(x, np.array([0.0]), np.array([1.0]),
    ...                                              eps=0.0, rmax=3.0, dmax=1.0)
    >>> y[:, 0], r, d
    (array([-1.,  3.]), array([2.]), array([1.]))
    """
    y, mean, invstd, _var, _n, r, d = _renorm_forward(x, renorm_mean, renorm_std, weight, bias,
                                                      axis, eps, rmax, rmin, dmax)
    return y, mean, invstd, r, d


def batch_renorm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                          r: ArrayLike, d: ArrayLike, weight: Optional[ArrayLike] = None, *,
                          axis: int = 1) -> tuple[Array, Array, Array]:
    """Gradients of ``batch_renorm_forward`` with r and d held constant: (dx, dweight, dbias).

    dx is batch norm's training backward with weight * r; dweight = r * sum(g * x_hat) +
    d * sum(g), dbias = sum(g) (x_hat = (x - mean) * invstd). Two passes, as plain backward.
    """
    return _batch_renorm_backward(dy, x, mean, invstd, r, d, weight, axis)


def _batch_renorm_backward(dy, x, mean, invstd, r, d, weight, axis):
    be = F._backend(x)
    x, layout = F._input(be, x, axis)
    C = layout.C
    r = F._required(be, r, "r", C)
    d = F._required(be, d, "d", C)
    weight = F._chan(be, weight, "weight", C)
    xp = be.xp
    w_eff = r.astype(xp.float64) if weight is None else weight.astype(xp.float64) * r
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w_eff, axis=axis, training=True)
    dweight = (r * dw + d * db).astype(dw.dtype)
    return dx, dweight, db


# --------------------------------------------------------------------------- ghost batches

def _ghost_args(be, x, axis, virtual_batch_size):
    x, layout = F._input(be, x, axis)
    ax = V.axis(axis, x.ndim, x.shape)
    v = V.virtual_batch_size(V.required(virtual_batch_size, "virtual_batch_size", "1"),
                             x.shape, ax)
    return x, layout, v, (x.shape[0] // v if v else 0)


def _ghost_views(be, layout, v, *arrays):
    """Canonical (O, C, I) views of x-like arrays whose virtual batches are consecutive row
    blocks of O, for the kernels to run on directly; None where that takes a copy (float16,
    CuPy, a layout whose outermost memory axis is not the batch axis, foreign byte order).

    Each virtual batch's block is then the very view forward_with_stats / batch_norm_backward
    canonicalise x[g*v:(g+1)*v] to, so the kernels compute bitwise the same results.
    """
    if be is not _cpu or (layout.perm is not None and layout.perm[0] != 0):
        return None
    views = []
    for a in arrays:
        if (type(a) is not np.ndarray or a.dtype not in (np.float32, np.float64)
                or a.dtype != arrays[0].dtype or not a.dtype.isnative or not a.flags.aligned):
            return None
        t = a if layout.perm is None else a.transpose(layout.perm)
        if not t.flags.c_contiguous:
            return None
        views.append(t.reshape(layout.shape3))
    return views


def _ghost_forward(x, weight, bias, axis, eps, virtual_batch_size):
    """(y, mean (G, C), invstd (G, C), var (G, C), count per virtual batch)."""
    be = F._backend(x)
    x, layout, v, G = _ghost_args(be, x, axis, virtual_batch_size)
    C = layout.C
    weight = F._chan(be, weight, "weight", C)
    bias = F._chan(be, bias, "bias", C)
    eps = V.eps(eps)
    n = V.training_count(layout.count // G if G else 0, x[:v].shape)
    xp = be.xp
    y = xp.empty_like(x)  # x's layout; each x[g*v:(g+1)*v] and y[...] is a view, no copy
    views = _ghost_views(be, layout, v, x, y) if G and C and layout.count else None
    if views is not None:
        # The kernel straight on each virtual batch's block of the canonical views: no
        # per-batch validation, no out= staging, the statistics written in place.
        x3, y3 = views
        Og = layout.O // G
        w, b = _cpu.chan(weight), _cpu.chan(bias)
        nt = get_num_threads()
        stats = np.empty((G, 3 * C))
        for g in range(G):
            sl = slice(g * Og, (g + 1) * Og)
            _kernels.forward_train(x3[sl], y3[sl], Og, C, layout.I, w, b, eps, False,
                                   stats[g], nt)
        return (y, stats[:, :C].copy(), stats[:, 2 * C:].copy(), stats[:, C:2 * C].copy(), n)
    mean, invstd, var = (xp.zeros((G, C)) for _ in range(3))
    for g in range(G):
        sl = slice(g * v, (g + 1) * v)
        _y, mean[g], invstd[g], var[g], _n = F.forward_with_stats(x[sl], weight, bias,
                                                                  axis=axis, eps=eps, out=y[sl])
    return y, mean, invstd, var, n


def ghost_batch_norm_forward(x: ArrayLike, weight: Optional[ArrayLike] = None,
                             bias: Optional[ArrayLike] = None, *, virtual_batch_size: int,
                             axis: int = 1, eps: float = 1e-5
                             ) -> tuple[Array, F64Array, F64Array]:
    """Ghost batch norm (Hoffer et al. 2017; Keras's ``virtual_batch_size``).

    Axis 0 of x is split into N / virtual_batch_size consecutive virtual batches, each
    normalised with its own statistics (a view of x: no copy). Returns (y, mean, invstd) with
    mean and invstd shaped (G, C), one row per virtual batch. N must be a multiple of
    ``virtual_batch_size`` and axis 0 must not be the feature axis (ValueError otherwise).
    """
    y, mean, invstd, _var, _n = _ghost_forward(x, weight, bias, axis, eps, virtual_batch_size)
    return y, mean, invstd


def ghost_batch_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                              weight: Optional[ArrayLike] = None, *, virtual_batch_size: int,
                              axis: int = 1) -> tuple[Array, Array, Array]:
    """Gradients of ``ghost_batch_norm_forward``: (dx, dweight, dbias), the training backward
    of each virtual batch with its own statistics; dweight and dbias are summed over them."""
    return _ghost_batch_norm_backward(dy, x, mean, invstd, weight, virtual_batch_size, axis)


def _ghost_batch_norm_backward(dy, x, mean, invstd, weight, virtual_batch_size, axis):
    be = F._backend(x)
    x, layout, v, G = _ghost_args(be, x, axis, virtual_batch_size)
    C = layout.C
    dy = F._like(be, dy, "dy", x)
    mean = V.ghost_stats(F._array(be, mean, "mean"), "mean", G, C)
    invstd = V.ghost_stats(F._array(be, invstd, "invstd"), "invstd", G, C)
    weight = F._chan(be, weight, "weight", C)
    V.training_count(layout.count // G if G else 0, x[:v].shape)
    xp = be.xp
    dx = xp.empty_like(x)
    dweight, dbias = xp.zeros(C), xp.zeros(C)
    gdt = F._grad_dtype(x.dtype)
    views = _ghost_views(be, layout, v, x, dy, dx) if G and C and layout.count else None
    if views is not None:
        # Each virtual batch's dx written by the kernel into its block of dx (no fresh dx per
        # batch copied over), dweight/dbias per batch rounded to x's dtype as the fast path
        # rounds them, then summed.
        x3, dy3, dx3 = views
        Og = layout.O // G
        w = _cpu.chan(weight)
        nt = get_num_threads()
        sums = np.empty(2 * C)
        dt = x.dtype
        for g in range(G):
            sl = slice(g * Og, (g + 1) * Og)
            inv = _cpu.chan(invstd[g])
            _kernels.backward(dy3[sl], x3[sl], None, dx3[sl], Og, C, layout.I,
                              _cpu.chan(mean[g]), inv, w, True, sums, nt)
            dweight += (sums[C:] * inv).astype(dt)
            dbias += sums[:C].astype(dt)
        return dx, dweight.astype(gdt), dbias.astype(gdt)
    for g in range(G):
        sl = slice(g * v, (g + 1) * v)
        dx[sl], dw, db = F.batch_norm_backward(dy[sl], x[sl], mean[g], invstd[g], weight,
                                               axis=axis)
        dweight += dw
        dbias += db
    return dx, dweight.astype(gdt), dbias.astype(gdt)


# --------------------------------------------------------------------------- double backward

def batch_norm_double_backward(ddx: Optional[ArrayLike], ddweight: Optional[ArrayLike],
                               ddbias: Optional[ArrayLike], dy: ArrayLike, x: ArrayLike,
                               mean: ArrayLike, invstd: ArrayLike,
                               weight: Optional[ArrayLike] = None, *, axis: int = 1,
                               training: bool = True) -> tuple[Array, Array, Array]:
    """The gradient of ``batch_norm_backward``: returns (ddy, dx, dweight).

    ``batch_norm_backward`` maps (dy, x, weight) to (dx, dweight, dbias); given the gradients
    ``ddx``, ``ddweight``, ``ddbias`` of a loss with respect to those three outputs (any may be
    None: zero), this returns that loss's gradients with respect to dy, x and weight, as
    PyTorch's ``batchnorm_double_backward`` (``torch.autograd.grad(..., create_graph=True)``).
    ``mean``/``invstd`` are the forward's: x's batch statistics when ``training`` (they are
    then differentiated as functions of x), constants otherwise. Without ``weight`` gamma = 1
    and dweight is the gradient with respect to that implicit gamma.

    Computed by the backend's kernels in x's compute dtype (float32 for float16), with the
    per-channel sums in float64: three reduction passes over two x-sized arrays and three
    elementwise passes (two without ``ddx``), about three times the first backward. ddy and dx
    come back in x's dtype and layout, dweight in its compute dtype.
    """
    return _batch_norm_double_backward(ddx, ddweight, ddbias, dy, x, mean, invstd, weight, axis,
                                       training)


def _batch_norm_double_backward(ddx, ddweight, ddbias, dy, x, mean, invstd, weight, axis,
                                training):
    be = F._backend(x)
    x, layout = F._input(be, x, axis)
    C = layout.C
    xp = be.xp
    dy = F._like(be, dy, "dy", x)
    ddx = None if ddx is None else F._like(be, ddx, "ddx", x)
    ddweight = F._chan(be, ddweight, "ddweight", C)
    ddbias = F._chan(be, ddbias, "ddbias", C)
    mean = F._required(be, mean, "mean", C)
    invstd = F._required(be, invstd, "invstd", C)
    weight = F._chan(be, weight, "weight", C)
    training = V.flag(training, "training")
    if training:
        V.training_count(layout.count, x.shape)
    n = layout.count
    gdt = F._grad_dtype(x.dtype)
    ddy_dest = Output(be, layout, x, None, ())
    dx_dest = Output(be, layout, x, None, ())
    if n == 0 or C == 0:
        ddy_dest.target[...] = 0
        dx_dest.target[...] = 0
        return ddy_dest.finish(), dx_dest.finish(), be.zeros(C).astype(gdt)
    cdt = be.compute_dtype(x.dtype)
    x3, g3 = layout.canon(x, cdt), layout.canon(dy, cdt)
    dd3 = None if ddx is None else layout.canon(ddx, cdt)
    ddy3, dx3 = ddy_dest.target, dx_dest.target
    f8 = xp.float64
    zero = be.zeros(C)
    m = mean.astype(f8)
    s = invstd.astype(f8)
    w = xp.ones(C) if weight is None else weight.astype(f8)
    ddw = zero if ddweight is None else ddweight.astype(f8)
    ddb = zero if ddbias is None else ddbias.astype(f8)
    ws = w * s
    # Every output is linear in (ddx, dy, x) with per-channel coefficients formed from five
    # per-channel sums, so the work is the kernels' reductions (three passes over two arrays)
    # and their elementwise form out = a*A - k*(B - m) + c (one pass per output, plus one to
    # add the ddx term of dx): about 3x the first backward, against ~10 float64 passes before.
    if dd3 is None:
        sd = sdx = sdg = zero
    else:
        sd, sdx = be.backward_sums(dd3, x3, None, m)   # sum(dd), sum(dd * (x - mean))
        sdg = be.backward_sums(dd3, g3, None, zero)[1]  # sum(dd * dy)
    if not training:
        # ddy = w*s*ddx + ddw*s*(x - mean) + ddb; dx = ddw*s*dy; dweight = s*sum(ddx*dy)
        be.affine(x3 if dd3 is None else dd3, x3, ddy3, zero if dd3 is None else ws, -ddw * s,
                  m, ddb)
        be.affine(g3, g3, dx3, ddw * s, zero, zero, zero)
        return ddy_dest.finish(), dx_dest.finish(), (s * sdg).astype(gdt)
    # With x_hat = (x - mean)*s and P a = a - mean(a) - x_hat*mean(a*x_hat) per channel:
    #   ddy = ddb + ddw*x_hat + w*s*P(ddx)
    #   dx  = -(w*s^2/n)*(x_hat*inner + dw*P(ddx) + t*P(dy)) + ddw*s*P(dy)
    #   dweight = s*inner, inner = sum(ddx*dy) - sum(ddx)*sum(dy)/n - t*dw/n
    # where dw = sum(dy*x_hat) and t = sum(ddx*x_hat).
    sg, sgx = be.backward_sums(g3, x3, None, m)
    dw, t = s * sgx, s * sdx
    be.affine(x3 if dd3 is None else dd3, x3, ddy3, zero if dd3 is None else ws,
              -(ddw * s - ws * s * t / n), m, ddb - ws * sd / n)
    inner = sdg - sd * sg / n - t * dw / n
    K = -ws * s / n
    P = K * t + ddw * s
    be.affine(g3, x3, dx3, P, -s * (K * inner - K * dw * t / n - P * dw / n), m,
              -K * dw * sd / n - P * sg / n)
    if dd3 is not None:
        be.affine(dx3, dd3, dx3, xp.ones(C), -K * dw, zero, zero)  # dx += K*dw*ddx
    return ddy_dest.finish(), dx_dest.finish(), (s * inner).astype(gdt)


# --------------------------------------------------------------------------- masked statistics

# The CPU backend runs the masked kernels (_kernels.masked_channel_stats, masked_backward: the
# plain kernels' passes over x, the mask read as one byte per (outer, inner) position); other
# backends (CuPy) compose array operations in float64 below.

def _mask3(be, layout, mask, x, ax):
    """mask (x's shape without axis ax) as a (O, 1, I) array in x's canonical order: the CPU
    kernels' (O, I) uint8 rows (see _cpu.mask_rows), else float64; and its count of True."""
    xp = be.xp
    mask = V.mask(F._array(be, mask, "mask"), x.shape, ax)
    mk = xp.expand_dims(mask, ax)
    if layout.perm is not None:
        mk = mk.transpose(layout.perm)
    n = int(xp.count_nonzero(mask)) if mask.size else 0
    if be is _cpu:
        return _cpu.mask_rows(mk.reshape(layout.O, 1, layout.I)), n
    return xp.ascontiguousarray(mk, dtype=xp.float64).reshape(layout.O, 1, layout.I), n


def _masked_forward(x, weight, bias, axis, eps, activation, out, mask):
    """(y, mean, invstd, var, count) with statistics over the masked-in positions only."""
    be = F._backend(x)
    x, layout = F._input(be, x, axis)
    ax = V.axis(axis, x.ndim, x.shape)
    C = layout.C
    weight = F._chan(be, weight, "weight", C)
    bias = F._chan(be, bias, "bias", C)
    eps = V.eps(eps)
    relu = V.activation(activation)
    out = F._out(be, out, x)
    mk, n = _mask3(be, layout, mask, x, ax)
    xp = be.xp
    V.mask_count(n, x.size)
    dest = Output(be, layout, x, out, (x,))
    if x.size == 0:
        var = be.zeros(C)
        return dest.finish(), be.zeros(C), be.invstd(var, eps), var, 0
    if be is _cpu:  # masked one-pass statistics, then the plain normalising pass
        x3 = layout.canon(x, be.compute_dtype(x.dtype))
        mean, var, invstd = be.masked_forward_train(x3, dest.target, mk, weight, bias, eps, relu)
        return dest.finish(), mean, invstd, var, n
    x3 = layout.canon(x, xp.float64)
    mean = (x3 * mk).sum(axis=(0, 2)) / n
    xc = x3 - mean.reshape(1, C, 1)
    var = (xc * xc * mk).sum(axis=(0, 2)) / n  # two-pass: centred before squaring
    invstd = be.invstd(var, eps)
    scale = invstd if weight is None else invstd * weight.astype(xp.float64)
    y3 = xc * scale.reshape(1, C, 1)
    if bias is not None:
        y3 += bias.astype(xp.float64).reshape(1, C, 1)
    if relu:
        xp.maximum(y3, 0, out=y3)
    dest.target[...] = y3
    return dest.finish(), mean, invstd, var, n


def _masked_backward(dy, x, mean, invstd, weight, axis, training, activation, y, mask):
    be = F._backend(x)
    x, layout = F._input(be, x, axis)
    ax = V.axis(axis, x.ndim, x.shape)
    C = layout.C
    dy = F._like(be, dy, "dy", x)
    mean = F._required(be, mean, "mean", C)
    invstd = F._required(be, invstd, "invstd", C)
    weight = F._chan(be, weight, "weight", C)
    y = F._relu_y(be, y, x, V.activation(activation))
    mk, n = _mask3(be, layout, mask, x, ax)
    xp = be.xp
    gdt = F._grad_dtype(x.dtype)
    if not training:  # the statistics are constants: the mask plays no part
        return F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, training=False,
                                     activation=activation, y=y)
    V.mask_count(n, x.size)
    dest = Output(be, layout, x, None, ())
    if x.size == 0:
        return dest.finish(), be.zeros(C).astype(gdt), be.zeros(C).astype(gdt)
    if be is _cpu:  # sums over every position, then the masked dx pass
        dy3, x3, y3 = F._grad_inputs(be, layout, dy, x, y)
        dweight, dbias = be.masked_backward(dy3, x3, y3, mk, dest.target, mean, invstd, weight)
        return dest.finish(), dweight, dbias
    f8 = xp.float64
    g = layout.canon(dy, f8)
    if y is not None:
        g = g * (layout.canon(y, f8) > 0)
    s = invstd.astype(f8).reshape(1, C, 1)
    xhat = (layout.canon(x, f8) - mean.astype(f8).reshape(1, C, 1)) * s
    sg = g.sum(axis=(0, 2))
    sgx = (g * xhat).sum(axis=(0, 2))
    ws = s if weight is None else s * weight.astype(f8).reshape(1, C, 1)
    corr = (sg.reshape(1, C, 1) + xhat * sgx.reshape(1, C, 1)) * (mk / n)
    dest.target[...] = ws * (g - corr)
    return dest.finish(), sgx.astype(gdt), sg.astype(gdt)


# --------------------------------------------------------------------------- several feature axes
# Chainer's reduced axes / Keras 2's list of axes: gamma, beta and the statistics shaped over
# several axes, e.g. (C, H). The feature axes are brought together (a transposed view) and
# merged into one (a reshape: a view when the array is contiguous in that order, as adjacent
# axes of a C-contiguous x are, else one copy); the single-axis functions then run on the
# merged view and their results are split back.

class _FeatureAxes:
    """How x's feature axes map onto one merged axis."""

    def __init__(self, x, axis):
        axes = V.feature_axes(axis, x.ndim, x.shape)
        others = [i for i in range(x.ndim) if i not in axes]
        self.pos = axes[0]  # every axis before the first feature axis is a reduced one
        self.perm = tuple(others[:self.pos]) + axes + tuple(others[self.pos:])
        self.inv = tuple(self.perm.index(i) for i in range(x.ndim))
        self.fshape = tuple(x.shape[a] for a in axes)
        self.moved = tuple(x.shape[p] for p in self.perm)
        k = len(axes)
        self.merged = self.moved[:self.pos] + (int(_prod(self.fshape)),) + self.moved[self.pos + k:]

    def merge(self, a):
        return None if a is None else a.transpose(self.perm).reshape(self.merged)

    def split(self, a):
        return a.reshape(self.moved).transpose(self.inv)

    def flat(self, be, a, name):
        """A per-feature array (shape fshape) as the merged axis's 1-D array (a view if
        contiguous)."""
        if a is None:
            return None
        return V.features(F._array(be, a, name), name, self.fshape).reshape(-1)

    def unflat(self, v):
        return v.reshape(self.fshape)


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _axes_input(x, axis):
    be = F._backend(x)
    x = V.batch(V.floating(F._array(be, x, "x"), "x"))
    return be, x, _FeatureAxes(x, axis)


def _write_out(be, out, x, y):
    """y into the caller's out= (checked like the single-axis functions' out)."""
    if out is None:
        return y
    out = F._out(be, out, x)
    out[...] = y
    return out


def axes_forward_with_stats(x, weight, bias, axis, eps, activation, out):
    """forward_with_stats over several feature axes (statistics shaped like them)."""
    be, x, fa = _axes_input(x, axis)
    w, b = fa.flat(be, weight, "weight"), fa.flat(be, bias, "bias")
    if out is not None:
        F._out(be, out, x)
    y, mean, invstd, var, n = F.forward_with_stats(fa.merge(x), w, b, axis=fa.pos, eps=eps,
                                                   activation=activation)
    return (_write_out(be, out, x, fa.split(y)), fa.unflat(mean), fa.unflat(invstd),
            fa.unflat(var), n)


def axes_normalize(x, mean, invstd, weight, bias, axis, activation, out):
    be, x, fa = _axes_input(x, axis)
    args = [fa.flat(be, a, n) for a, n in ((mean, "mean"), (invstd, "invstd"),
                                           (weight, "weight"), (bias, "bias"))]
    for a, n in zip(args[:2], ("mean", "invstd")):
        V.required(a, n, fa.fshape)
    if out is not None:
        F._out(be, out, x)
    y = F.normalize(fa.merge(x), *args, axis=fa.pos, activation=activation)
    return _write_out(be, out, x, fa.split(y))


def axes_channel_moments(x, axis):
    be, x, fa = _axes_input(x, axis)
    n, mean, m2 = F.channel_moments(fa.merge(x), axis=fa.pos)
    return n, fa.unflat(mean), fa.unflat(m2)


def axes_backward(dy, x, mean, invstd, weight, axis, training, activation, y):
    be, x, fa = _axes_input(x, axis)
    dy = F._like(be, dy, "dy", x)
    mean = V.required(fa.flat(be, mean, "mean"), "mean", fa.fshape)
    invstd = V.required(fa.flat(be, invstd, "invstd"), "invstd", fa.fshape)
    w = fa.flat(be, weight, "weight")
    if y is not None:
        y = F._like(be, y, "y", x)
    dx, dw, db = F.batch_norm_backward(fa.merge(dy), fa.merge(x), mean, invstd, w, axis=fa.pos,
                                       training=training, activation=activation,
                                       y=fa.merge(y))
    return fa.split(dx), fa.unflat(dw), fa.unflat(db)


def axes_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                    activation, out):
    be, x, fa = _axes_input(x, axis)
    w, b = fa.flat(be, weight, "weight"), fa.flat(be, bias, "bias")
    running = []
    for a, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if a is None:
            running.append((None, None))
            continue
        if training:  # written in place: through a flat view, or a copy written back
            a = V.features(V.writable(a, name, be.xp), name, fa.fshape)
            flat = a.reshape(-1)
            running.append((a, flat))
        else:
            running.append((None, fa.flat(be, a, name)))
    if out is not None:
        F._out(be, out, x)
    y = F.batch_norm(fa.merge(x), running[0][1], running[1][1], w, b, training, momentum, eps,
                     axis=fa.pos, activation=activation)
    for a, flat in running:
        if a is not None and not be.xp.shares_memory(a, flat):
            a[...] = flat.reshape(a.shape)
    return _write_out(be, out, x, fa.split(y))
