"""Batch norm as a reparameterisation of the weights (Kohler et al.), and weight normalisation.

For a linear unit z = X w followed by training-mode batch norm with batch statistics,
var(z) = wᵀ S w where S is the biased covariance of the batch X, so

    BN(X W) = (X - mu) Ŵ + beta,    ŵ_j = gamma_j w_j / sqrt(w_jᵀ S w_j + eps).

Batch norm is therefore a linear layer whose weights are normalised in the S-norm; weight
normalisation (Salimans & Kingma) is the same map with S = I. This module computes these
quantities and checks the identities numerically against fastbn's kernels: each ``check_*``
function returns a :class:`CheckResult` with the largest absolute and relative differences
between the batch-norm side (fastbn kernels, chained through X W) and the reparameterised side
(plain NumPy from the formulas).

Arrays are computed in float64 unless ``dtype=numpy.float32`` is given; a float32 check runs
both sides in float32 (fastbn's float32 kernels, NumPy in float32) and compares them in float64.
Integer inputs are accepted and converted; complex, boolean and object arrays are refused. No
input is modified.
"""
from dataclasses import dataclass, field
import operator

import numpy as np

from .. import _validation
from ..functional import batch_norm_backward, forward_with_stats

__all__ = [
    "CheckResult",
    "Comparison",
    "check_forward",
    "check_gradient",
    "check_projection",
    "check_scale_invariance",
    "check_weight_norm",
    "column_angles",
    "covariance",
    "format_table",
    "kohler_weights",
    "report_lines",
    "run_checks",
    "s_norm",
    "weight_norm",
    "weight_norm_backward",
    "whiten",
]



# --------------------------------------------------------------------------- validation

_check_dtype = _validation.param_dtype
_as_real = _validation.real_array
_check_eps = _validation.eps


def _per_unit(a, name, k, dt):
    """A per-unit (per-column) vector of length k; a scalar is broadcast."""
    arr = _as_real(a, name, dt)
    if arr.ndim == 0:
        return np.full(k, arr, dtype=dt)
    if arr.shape != (k,):
        raise ValueError(
            f"{name}: expected shape ({k},) (one value per column of W), got {arr.shape}"
        )
    return arr


def _check_W_S(W, S, dt):
    W = _as_real(W, "W", dt)
    if W.ndim not in (1, 2):
        raise ValueError(f"W: expected a 1-D (d,) or 2-D (d, k) array, got shape {W.shape}")
    d = W.shape[0]
    S = _as_real(S, "S", dt, 2)
    if S.shape != (d, d):
        raise ValueError(f"S: expected shape ({d}, {d}) (W has d = {d} rows), got {S.shape}")
    return W, S


def _inv_sqrt(q):
    """1/sqrt(q), and 0 where q == 0: a direction of zero variance normalises to 0 (as fastbn)."""
    q = np.maximum(q, 0)  # wᵀSw can round to -1e-17 when w lies in S's null space
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.sqrt(q)
    return np.where(q == 0, 0, inv).astype(q.dtype, copy=False)


# --------------------------------------------------------------------------- the maps

def covariance(X, *, center=True, dtype=np.float64):
    """Biased covariance of the rows of X: S = (X - mu)ᵀ (X - mu) / n, shape (d, d).

    This is the S of BN(XW): the batch variance of unit j is w_jᵀ S w_j. ``center=False`` gives
    the second moment XᵀX / n, which equals S for zero-mean inputs.
    """
    dt = _check_dtype(dtype)
    X = _as_real(X, "X", dt, 2)
    n = X.shape[0]
    if n < 1:
        raise ValueError(f"X: expected at least 1 row (sample), got shape {X.shape}")
    Xc = X - X.mean(axis=0) if center else X
    S = (Xc.T @ Xc) / dt.type(n)
    # A gemm of AᵀA need not be exactly symmetric; symmetric S keeps wᵀSw consistent.
    return (S + S.T) * dt.type(0.5)


def s_norm(W, S, *, dtype=np.float64):
    """The S-norm of each column of W: sqrt(w_jᵀ S w_j), shape (k,) (a scalar for 1-D W)."""
    dt = _check_dtype(dtype)
    W, S = _check_W_S(W, S, dt)
    q = np.sum(W * (S @ W), axis=0)
    return np.sqrt(np.maximum(q, 0))


def kohler_weights(W, S, gamma, eps=0.0, *, dtype=np.float64):
    """Kohler et al.'s reparameterised weights: ŵ_j = gamma_j w_j / sqrt(w_jᵀ S w_j + eps).

    W is (d, k), one column per unit (a 1-D (d,) W is one unit); gamma is (k,) or a scalar.
    With S the biased covariance of a batch X and the same eps as batch norm,
    BN_train(X W) = (X - mu) Ŵ + beta. A column with w_jᵀ S w_j + eps == 0 maps to 0, as
    fastbn normalises a zero-variance channel to 0.
    """
    dt = _check_dtype(dtype)
    W, S = _check_W_S(W, S, dt)
    k = 1 if W.ndim == 1 else W.shape[1]
    g = _per_unit(gamma, "gamma", k, dt)
    eps = _check_eps(eps)
    q = np.sum(W * (S @ W), axis=0) + dt.type(eps)
    scale = g * _inv_sqrt(np.atleast_1d(q))
    return W * (scale[0] if W.ndim == 1 else scale)


def whiten(X, *, dtype=np.float64):
    """Zero-mean rows with covariance exactly I (to rounding): ZCA whitening of the batch X.

    Computed from the SVD of the centred batch, X - mu = U Σ Vᵀ, as sqrt(n) U Vᵀ: its
    covariance is UᵀU = I to the orthogonality of U (~1e-15), rather than through S^-1/2,
    which would square X's condition number. Needs n > d and X - mu of full column rank.
    """
    dt = _check_dtype(dtype)
    X = _as_real(X, "X", np.float64, 2)
    n, d = X.shape
    if n <= d:
        raise ValueError(
            f"X: whitening needs more samples than features (n > d) so that the covariance can "
            f"be I, got shape {X.shape}"
        )
    Xc = X - X.mean(axis=0)
    U, sv, Vt = np.linalg.svd(Xc, full_matrices=False)
    if sv[-1] <= max(n, d) * np.finfo(np.float64).eps * sv[0]:
        raise ValueError(
            f"X: whitening needs a full-rank centred batch, got singular values from {sv[0]:.3g} "
            f"down to {sv[-1]:.3g} (drop constant or collinear features)"
        )
    return (np.sqrt(n) * (U @ Vt)).astype(dt, copy=False)


def _wn_layout(v, g, dim, dt):
    """Validated (v, g reshaped to broadcast against v, reduction axes, g's given shape)."""
    v = _as_real(v, "v", dt)
    if v.ndim < 1:
        raise ValueError(f"v: expected an array with at least 1 dimension, got shape {v.shape}")
    g = _as_real(g, "g", dt)
    if dim is None:
        if g.size != 1:
            raise ValueError(f"g: expected a single value when dim=None, got shape {g.shape}")
        return v, g.reshape((1,) * v.ndim), tuple(range(v.ndim)), g.shape
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"dim: expected an int or None, got {type(dim).__name__}") from None
    if dim < 0:
        # torch.nn.utils.weight_norm encodes dim=None as -1, so -1 is ambiguous between the
        # PyTorch and the NumPy readings; refuse it rather than guess.
        raise ValueError(
            f"dim: expected None or an int in [0, {v.ndim - 1}], got {dim} (negative dims are "
            "ambiguous: PyTorch reads -1 as None, the whole tensor; pass None for that, or "
            f"{v.ndim - 1} for the last axis)"
        )
    if dim >= v.ndim:
        raise ValueError(f"dim: expected None or an int in [0, {v.ndim - 1}] for v of shape "
                         f"{v.shape}, got {dim}")
    keep = [1] * v.ndim
    keep[dim] = v.shape[dim]
    if g.shape != tuple(keep) and g.shape != (v.shape[dim],):
        raise ValueError(
            f"g: expected shape {tuple(keep)} or ({v.shape[dim]},) (one value per slice of v "
            f"along dim={dim}), got {g.shape}"
        )
    return v, g.reshape(keep), tuple(i for i in range(v.ndim) if i != dim), g.shape


def _wn_norm(v, axes):
    nrm = np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
    if np.any(nrm == 0):
        raise ValueError(
            "v: weight normalisation is undefined for a slice of zero norm, got "
            f"{int(np.count_nonzero(nrm == 0))} such slice(s)"
        )
    return nrm


def weight_norm(v, g, dim=0, *, dtype=np.float64):
    """Weight normalisation w = g v / ||v||, with ``torch._weight_norm``'s ``dim`` convention.

    The norm is taken over every axis of v except ``dim`` (one norm per slice along ``dim``);
    ``dim=None`` takes it over the whole tensor. g has shape (v.shape[dim],) or PyTorch's
    keep-dims shape (1, ..., v.shape[dim], ..., 1); a single value when dim=None. For W of
    shape (d, k) with a column per unit (fastbn.analysis's layout) use dim=1; a PyTorch Linear
    weight is (k, d) and uses dim=0. Negative ``dim`` is refused (see the error's text).
    Weight normalisation is Kohler's map with S = I and eps = 0.
    """
    dt = _check_dtype(dtype)
    v, gk, axes, _ = _wn_layout(v, g, dim, dt)
    return v * (gk / _wn_norm(v, axes))


def weight_norm_backward(dw, v, g, dim=0, *, dtype=np.float64):
    """Gradients of weight_norm: given dL/dw, returns (dL/dv, dL/dg); dg has g's shape.

    With r = ||v|| per slice and s = <dw, v> per slice: dg = s / r and
    dv = (g / r) (dw - v s / r²), the component of dw orthogonal to v, scaled by g / r.
    """
    dt = _check_dtype(dtype)
    v, gk, axes, g_shape = _wn_layout(v, g, dim, dt)
    dw = _as_real(dw, "dw", dt)
    if dw.shape != v.shape:
        raise ValueError(f"dw: expected shape {v.shape} (the shape of v), got {dw.shape}")
    r = _wn_norm(v, axes)
    s = np.sum(dw * v, axis=axes, keepdims=True)
    dg = s / r
    dv = (gk / r) * (dw - v * (s / (r * r)))
    return dv, dg.reshape(g_shape)


def column_angles(A, B):
    """Angle in degrees between corresponding columns of A and B (d, k), or two vectors.

    Uses 2·atan2(|â - b̂|, |â + b̂|), accurate for angles near 0 and 180° where arccos of
    the cosine is not (arccos resolves nothing below ~1e-6 degrees in float64).
    """
    A = _as_real(A, "A", np.float64)
    B = _as_real(B, "B", np.float64)
    if A.shape != B.shape or A.ndim not in (1, 2):
        raise ValueError(f"A, B: expected two arrays of the same shape (d,) or (d, k), got "
                         f"{A.shape} and {B.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        a = A / np.linalg.norm(A, axis=0)
        b = B / np.linalg.norm(B, axis=0)
    ang = 2.0 * np.arctan2(np.linalg.norm(a - b, axis=0), np.linalg.norm(a + b, axis=0))
    return np.degrees(ang)


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Comparison:
    """One compared quantity: max |got - ref|, and that divided by a scale.

    The scale is max |ref|, or the size of the terms that were added to make ref when larger:
    a gradient that cancels to ~0 by construction (d = 1, or n = 2, where BN's output does not
    depend on w at all) would otherwise divide rounding noise by rounding noise. For an
    identity of the form a = 0 (orthogonality), max_abs is max |a| and max_rel divides each
    |a| by the product of the norms that make it up (a cosine).
    """

    quantity: str
    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one equivalence check on one problem (n, d, k, eps, dtype).

    ``check`` is a short id ("forward", "gradient", "scale", "weight_norm", "projection"),
    ``title`` a readable name, ``comparisons`` one :class:`Comparison` per quantity, ``notes``
    the check's extra settings (kohler_eps, c, whitened). ``max_abs``/``max_rel`` are the
    largest over the comparisons; ``report()`` renders them as Markdown.
    """

    check: str
    title: str
    comparisons: tuple
    n: int
    d: int
    k: int
    eps: float
    dtype: str
    notes: dict = field(default_factory=dict)

    @property
    def max_abs(self):
        return max(c.max_abs for c in self.comparisons)

    @property
    def max_rel(self):
        # nan (from a poisoned input) must surface, so no plain max()
        vals = [c.max_rel for c in self.comparisons]
        return float("nan") if any(np.isnan(vals)) else max(vals)

    def ok(self, rtol=None):
        """True when every relative difference is within rtol (1e-10 float64, 1e-5 float32).

        Both defaults leave a wide margin over what rounding gives (~1e-15 and ~1e-7).
        """
        if rtol is None:
            rtol = 1e-10 if self.dtype == "float64" else 1e-5
        return bool(self.max_rel <= rtol)

    def as_dict(self):
        return {
            "check": self.check, "title": self.title, "n": self.n, "d": self.d, "k": self.k,
            "eps": self.eps, "dtype": self.dtype, "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "comparisons": [vars(c).copy() for c in self.comparisons],
            **({"notes": dict(self.notes)} if self.notes else {}),
        }

    def report(self):
        """The comparisons as a Markdown table under a one-line heading."""
        head = (f"**{self.title}** (n={self.n}, d={self.d}, k={self.k}, eps={self.eps:g}, "
                f"{self.dtype})")
        lines = [head, "", "| quantity | max abs diff | max rel diff |", "|---|---:|---:|"]
        lines += [f"| {c.quantity} | {c.max_abs:.2e} | {c.max_rel:.2e} |" for c in self.comparisons]
        return "\n".join(lines)


def format_table(results):
    """Several CheckResults as one Markdown table, one row per compared quantity."""
    lines = ["| check | n | d | k | eps | dtype | quantity | max abs diff | max rel diff |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in results:
        for c in r.comparisons:
            lines.append(f"| {r.title} | {r.n} | {r.d} | {r.k} | {r.eps:g} | {r.dtype} | "
                         f"{c.quantity} | {c.max_abs:.2e} | {c.max_rel:.2e} |")
    return "\n".join(lines)


def _diff(quantity, got, ref, terms=0.0):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, float(terms))
    if np.isnan(err) or np.isnan(scale):
        rel = float("nan")
    elif scale > 0:
        rel = err / scale
    else:
        rel = 0.0 if err == 0 else float("inf")
    return Comparison(quantity, err, rel)


def _zero(quantity, value, norm_product):
    value = np.abs(np.asarray(value, dtype=np.float64))
    norm_product = np.asarray(norm_product, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(value == 0, 0.0, value / norm_product)
    return Comparison(quantity, float(np.max(value)), float(np.max(rel)))


# --------------------------------------------------------------------------- the checks

_DEFAULT_DY_SEED = 20190527  # fixed, so that the default upstream gradient is reproducible


class _Problem:
    """Validated inputs of a check, all of dtype dt."""

    def __init__(self, X, W, gamma, beta, eps, dy, dtype):
        self.dt = dt = _check_dtype(dtype)
        self.X = X = _as_real(X, "X", dt, 2)
        n, d = X.shape
        if n < 2:
            raise ValueError(
                f"X: expected at least 2 rows (samples): batch norm in training needs more than "
                f"one value per channel, got shape {X.shape}"
            )
        if d < 1:
            raise ValueError(f"X: expected at least 1 column (feature), got shape {X.shape}")
        self.W = W = _as_real(W, "W", dt, 2)
        if W.shape[0] != d or W.shape[1] < 1:
            raise ValueError(
                f"W: expected shape ({d}, k) with k >= 1 (one column per unit; X has d = {d} "
                f"features), got {W.shape}"
            )
        k = W.shape[1]
        self.gamma = _per_unit(gamma, "gamma", k, dt)
        self.beta = np.zeros(k, dt) if beta is None else _per_unit(beta, "beta", k, dt)
        self.eps = _check_eps(eps)
        if dy is None:
            dy = np.random.default_rng(_DEFAULT_DY_SEED).standard_normal((n, k))
        self.dy = _as_real(dy, "dy", dt, 2)
        if self.dy.shape != (n, k):
            raise ValueError(f"dy: expected shape ({n}, {k}) (the shape of X @ W), got "
                             f"{self.dy.shape}")
        self.n, self.d, self.k = n, d, k

    def with_X(self, X):
        p = object.__new__(_Problem)
        p.__dict__.update(self.__dict__)
        p.X = X
        return p

    def result(self, check, title, comparisons, eps, **notes):
        return CheckResult(check, title, tuple(comparisons), self.n, self.d, self.k, float(eps),
                           self.dt.name, notes)


def _terms(p, W, bn, eps):
    """Sizes of the terms summed to make each compared quantity: the scales of its rounding.

    Rounding in a sum grows with the sum of the magnitudes of its terms, not with its result,
    and several results here cancel by construction: dL/dW is projected off S w (it is exactly 0
    when d = 1 or n = 2), dL/dW = Xᵀ dL/dz and the batch mean sum uncentred values, and x_hat is
    (z - mean)/sigma, so an input whose mean is large against its spread loses digits before any
    comparison is made. Each check divides by max(max |ref|, these sizes).
    """
    X = p.X.astype(np.float64)
    Z = np.abs(bn["Z"].astype(np.float64))
    dy = p.dy.astype(np.float64)
    gamma = np.abs(p.gamma.astype(np.float64))
    W = np.asarray(W, dtype=np.float64)
    inv_r = _inv_sqrt(np.asarray(bn["var"], dtype=np.float64) + eps)
    u = (X - X.mean(axis=0)).T @ dy
    return {
        "y": float(np.max(gamma * inv_r * np.max(Z, axis=0) + np.abs(p.beta))),
        "mean": float(np.max(np.abs(X).mean(axis=0) @ np.abs(W))),
        # (gamma/r) u before the projection; Xᵀ dL/dz with X uncentred
        "dW": max(float(np.max(gamma * inv_r * np.abs(u))),
                  float(np.max(np.abs(X).T @ np.abs(bn["dZ"].astype(np.float64))))),
        # wᵀu / r, and BN's sum(dy * x_hat) with x_hat's uncentred numerator
        "dgamma": max(float(np.max(np.linalg.norm(W, axis=0) * np.linalg.norm(u, axis=0) * inv_r)),
                      float(np.max(np.sum(np.abs(dy) * Z, axis=0) * inv_r))),
    }


def _bn_path(p, W, eps):
    """BN_train(X W) and its gradients through fastbn's kernels, chained through z = X W."""
    Z = p.X @ W
    y, mean, invstd, var, _ = forward_with_stats(Z, p.gamma, p.beta, axis=1, eps=eps)
    dZ, dgamma, _dbeta = batch_norm_backward(p.dy, Z, mean, invstd, p.gamma, axis=1)
    return {"Z": Z, "y": y, "mean": mean, "var": var, "dZ": dZ, "dW": p.X.T @ dZ,
            "dgamma": dgamma}


def _kohler_path(p, S, eps):
    """(X - mu) Ŵ + beta and its analytic gradients, written from the formulas."""
    dt = p.dt
    mu = p.X.mean(axis=0)
    Xc = p.X - mu
    SW = S @ p.W
    q = np.sum(p.W * SW, axis=0)
    r2 = q + dt.type(eps)
    inv_r = _inv_sqrt(r2)
    W_hat = p.W * (p.gamma * inv_r)
    u = Xc.T @ p.dy                      # dL/dŴ
    wu = np.sum(p.W * u, axis=0)
    # dL/dw = (gamma/r)(I - S w wᵀ / r²) u per column, r² = wᵀ S w + eps
    dW = (p.gamma * inv_r) * (u - SW * (wu * inv_r * inv_r))
    return {"mean": mu @ p.W, "var": q, "y": Xc @ W_hat + p.beta, "W_hat": W_hat, "dW": dW,
            "dgamma": wu * inv_r, "u": u}


def check_forward(X, W, gamma, beta=None, eps=1e-5, *, S=None, kohler_eps=None,
                  dtype=np.float64):
    """Check 1: BN_train(X W) (fastbn kernels) against (X - mu) Ŵ + beta.

    Ŵ = kohler_weights(W, S, gamma, kohler_eps) with S = covariance(X) and kohler_eps = eps by
    default; passing another S or kohler_eps is how the negative controls break the identity.
    Also compares the batch mean of X W with mu W and its batch variance with diag(WᵀSW).
    """
    p = _Problem(X, W, gamma, beta, eps, None, dtype)
    S = covariance(p.X, dtype=p.dt) if S is None else _check_W_S(p.W, S, p.dt)[1]
    keps = p.eps if kohler_eps is None else _check_eps(kohler_eps, "kohler_eps")
    bn = _bn_path(p, p.W, p.eps)
    ko = _kohler_path(p, S, keps)
    terms = _terms(p, p.W, bn, p.eps)
    return p.result("forward", "(1) BN(XW) = (X-mu)W_hat + beta", [
        _diff("y", bn["y"], ko["y"], terms["y"]),
        _diff("batch mean of XW vs μW", bn["mean"], ko["mean"], terms["mean"]),
        _diff("batch var of XW vs wᵀSw", bn["var"], ko["var"]),
    ], p.eps, kohler_eps=keps)


def check_gradient(X, W, gamma, beta=None, eps=1e-5, *, dy=None, S=None, kohler_eps=None,
                   dtype=np.float64):
    """Check 2: the gradient of L = sum(dy * BN(X W)) with respect to W and gamma.

    Batch-norm side: fastbn.batch_norm_backward on z = X W, then dL/dW = Xᵀ dL/dz. Kohler side:
    dL/dw_j = (gamma_j / r_j)(I - S w_j w_jᵀ / r_j²)(X - mu)ᵀ dy_j with r_j² = w_jᵀ S w_j + eps,
    and dL/dgamma_j = w_jᵀ (X - mu)ᵀ dy_j / r_j (against BN's sum(dy * x_hat)).
    dy defaults to a fixed standard-normal draw.
    """
    p = _Problem(X, W, gamma, beta, eps, dy, dtype)
    S = covariance(p.X, dtype=p.dt) if S is None else _check_W_S(p.W, S, p.dt)[1]
    keps = p.eps if kohler_eps is None else _check_eps(kohler_eps, "kohler_eps")
    bn = _bn_path(p, p.W, p.eps)
    ko = _kohler_path(p, S, keps)
    terms = _terms(p, p.W, bn, p.eps)
    return p.result("gradient", "(2) grad through BN = grad through W_hat(W)", [
        _diff("dL/dW", bn["dW"], ko["dW"], terms["dW"]),
        _diff("dL/dγ", bn["dgamma"], ko["dgamma"], terms["dgamma"]),
    ], p.eps, kohler_eps=keps)


def check_scale_invariance(X, W, gamma, beta=None, eps=0.0, *, c=2.5, dy=None,
                           dtype=np.float64):
    """Check 3: at eps = 0, BN(X cW) = BN(X W), dL/dW at cW = (dL/dW at W) / c, wᵀ dL/dw = 0.

    c is a positive scalar or one positive value per column. For eps > 0 these hold only up
    to O(eps / var), which is what the script plots.
    """
    p = _Problem(X, W, gamma, beta, eps, dy, dtype)
    c_arr = _per_unit(c, "c", p.k, np.float64)
    if not np.all(np.isfinite(c_arr) & (c_arr > 0)):
        raise ValueError(f"c: expected positive finite scale(s), got {c!r}")
    c_arr = c_arr.astype(p.dt)
    a = _bn_path(p, p.W, p.eps)
    b = _bn_path(p, p.W * c_arr, p.eps)
    terms = _terms(p, p.W, a, p.eps)
    W64 = p.W.astype(np.float64)
    wg = np.sum(W64 * a["dW"], axis=0)
    # a cosine against the unprojected gradient: the projected one may be 0 by construction
    norms = np.linalg.norm(W64, axis=0) * max(np.max(np.linalg.norm(a["dW"], axis=0)),
                                              terms["dW"])
    return p.result("scale", "(3) scale invariance", [
        _diff("y(cW) vs y(W)", b["y"], a["y"], terms["y"]),
        _diff("c · dL/dW at cW vs dL/dW at W", b["dW"].astype(np.float64) * c_arr, a["dW"],
              terms["dW"]),
        _zero("wᵀ dL/dw = 0", wg, norms),
    ], p.eps, c=c)


def check_weight_norm(X, W, gamma, beta=None, eps=0.0, *, dy=None, whiten_batch=True,
                      dtype=np.float64):
    """Check 4: on a whitened batch (covariance I), BN is weight normalisation.

    With X_w = whiten(X), BN_train(X_w W) = (X_w - mu) weight_norm(W, gamma, dim=1) + beta, and
    BN's gradients (dL/dW, dL/dgamma) equal weight_norm_backward's (dL/dv, dL/dg). Needs
    n > d. The identity is exact at eps = 0. ``whiten_batch=False`` uses X as given (a negative
    control unless X's covariance is already I).
    """
    p = _Problem(X, W, gamma, beta, eps, dy, dtype)
    Xw = whiten(p.X, dtype=p.dt) if whiten_batch else p.X
    q = p.with_X(Xw)
    bn = _bn_path(q, q.W, q.eps)
    Xc = Xw - Xw.mean(axis=0)
    w_eff = weight_norm(q.W, q.gamma, dim=1, dtype=q.dt)
    dv, dg = weight_norm_backward(Xc.T @ q.dy, q.W, q.gamma, dim=1, dtype=q.dt)
    terms = _terms(q, q.W, bn, q.eps)
    title = "(4) BN on whitened X = weight norm" if whiten_batch else \
        "(4) BN on X (not whitened) vs weight norm"
    return p.result("weight_norm", title, [
        _diff("cov(X) vs I", covariance(Xw), np.eye(p.d)),
        _diff("y", bn["y"], Xc @ w_eff + q.beta, terms["y"]),
        _diff("dL/dW vs dL/dv", bn["dW"], dv, terms["dW"]),
        _diff("dL/dγ vs dL/dg", bn["dgamma"], dg, terms["dgamma"]),
    ], p.eps, whitened=bool(whiten_batch))


def check_projection(X, W, gamma, beta=None, eps=0.0, *, dy=None, dtype=np.float64):
    """Check 5: Santurkar et al.'s Theorem 4.1 identity for BN's backward, at eps = 0.

    Per channel j of z = X W, with g = dL/dy_j, m = n and sigma² the batch variance,
    ||dL/dz_j||² = (gamma_j² / sigma²)(||g||² - <1, g>²/m - <g, x_hat>²/m): the backward
    projects g off 1 and x_hat (both orthogonal to dL/dz, also checked) and scales by
    gamma/sigma. dL/dz is fastbn's; the right side is plain float64 NumPy from z. For eps > 0
    sigma² is taken as var + eps and the identity holds only to O(eps / var).
    """
    p = _Problem(X, W, gamma, beta, eps, dy, dtype)
    bn = _bn_path(p, p.W, p.eps)
    z = bn["Z"].astype(np.float64)
    m = p.n
    zc = z - z.mean(axis=0)
    inv = _inv_sqrt(np.mean(zc * zc, axis=0) + p.eps)
    x_hat = zc * inv
    g = p.dy.astype(np.float64)
    gamma = p.gamma.astype(np.float64)
    rhs = (gamma * inv) ** 2 * (np.sum(g * g, axis=0) - np.sum(g, axis=0) ** 2 / m
                                - np.sum(g * x_hat, axis=0) ** 2 / m)
    dz = bn["dZ"].astype(np.float64)
    # dL/dz is g scaled by |gamma|/sigma and projected: it can vanish (n = 2), so the scales
    # are those of the unprojected g
    g_norm = np.abs(gamma) * inv * np.linalg.norm(g, axis=0)
    return p.result("projection", "(5) Santurkar Thm 4.1 projection", [
        _diff("‖dL/dz‖² vs formula", np.sum(dz * dz, axis=0), rhs, np.max(g_norm ** 2)),
        _zero("⟨dL/dz, 1⟩ = 0", np.sum(dz, axis=0), g_norm * np.sqrt(m)),
        _zero("⟨dL/dz, x̂⟩ = 0", np.sum(dz * x_hat, axis=0),
              g_norm * np.linalg.norm(x_hat, axis=0)),
    ], p.eps)


def run_checks(X, W, gamma, beta=None, eps=1e-5, *, dy=None, dtype=np.float64):
    """All five checks on one problem: (1) and (2) at ``eps``; (3)-(5), exact identities only at
    eps = 0, at eps = 0. (4) is left out when the batch cannot be whitened (n <= d or rank
    deficient). Returns a list of CheckResult."""
    results = [
        check_forward(X, W, gamma, beta, eps, dtype=dtype),
        check_gradient(X, W, gamma, beta, eps, dy=dy, dtype=dtype),
        check_scale_invariance(X, W, gamma, beta, 0.0, dy=dy, dtype=dtype),
    ]
    try:
        results.append(check_weight_norm(X, W, gamma, beta, 0.0, dy=dy, dtype=dtype))
    except ValueError as exc:
        # every argument passed the checks above, so only the whitening can refuse here
        if "whitening needs" not in str(exc):
            raise
    results.append(check_projection(X, W, gamma, beta, 0.0, dy=dy, dtype=dtype))
    return results


def _demo_problem(seed, n=64, d=6, k=4):
    rng = np.random.default_rng(seed)
    # Correlated, anisotropic, off-centre inputs so that S is far from I and mu from 0.
    A = rng.standard_normal((d, d)) * np.logspace(0, 1, d)
    X = rng.standard_normal((n, d)) @ A + rng.standard_normal(d)
    W = rng.standard_normal((d, k))
    gamma = rng.uniform(0.5, 2.0, k)
    beta = rng.standard_normal(k)
    return X, W, gamma, beta


def report_lines(seed=0):
    """A few lines summarising the five checks on a small embedded random problem.

    For ``python -m fastbn``'s report: (1) and (2) at eps = 1e-5, (3)-(5) at eps = 0, in
    float64 and float32; runs in tens of milliseconds.
    """
    X, W, gamma, beta = _demo_problem(seed)
    eps = 1e-5
    f64 = run_checks(X, W, gamma, beta, eps, dtype=np.float64)
    f32 = {r.check: r for r in run_checks(X, W, gamma, beta, eps, dtype=np.float32)}
    n, d = X.shape
    lines = [f"Kohler equivalence on random X ({n}x{d}), {W.shape[1]} units; "
             "max rel diff float64 / float32:"]
    for r in f64:
        r32 = f32[r.check]
        eps_note = f"eps={r.eps:g}"
        verdict = "ok" if r.ok() and r32.ok() else "MISMATCH"
        lines.append(f"  {r.title:<44} {eps_note:<10} {r.max_rel:8.1e} / {r32.max_rel:8.1e}  "
                     f"{verdict}")
    return lines
