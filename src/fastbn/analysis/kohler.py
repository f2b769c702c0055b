"""Length-direction decoupled gradient descent (Kohler et al., AISTATS 2019, arXiv 1805.10694).

Kohler, Daneshmand, Lucchi, Zhou, Neymeyr and Hofmann, "Exponential convergence rates for batch
normalization: the power of length-direction decoupling in non-convex optimization". Batch norm
writes a unit's weights as w̃ = g w / ||w||_S with ||w||_S = sqrt(wᵀ S w), S = E[x xᵀ] (see
:mod:`.reparam`); the paper optimises the direction w by gradient steps with a special step
size and the length g separately by bisection, and proves linear ("exponential") rates.

What this module implements, and how it relates to the paper (we had no copy of the paper at
hand while writing this; section and theorem numbers are as best we recall them, and every
formula below was re-derived and is checked by the tests rather than copied):

* **Problems** (population objectives, i.e. exact expectations, as in the paper's analysis):

  - :func:`ols_problem` -- ordinary least squares, Sec. 3: f(w̃) = E[(y - xᵀw̃)²] up to a
    constant, = w̃ᵀ S w̃ + 2 uᵀ w̃ with u = -E[y x]; minimum f* = -uᵀ S⁻¹ u.
  - :func:`halfspace_problem` -- learning halfspaces, Sec. 4: f(w̃) = E[φ(zᵀ w̃)] with
    z = -y x ~ N(u, S) (the paper's Gaussian assumption) and **φ = softplus**, φ(t) = log(1+eᵗ),
    i.e. the logistic loss (our choice; the paper allows any smooth loss with bounded
    derivatives). With this φ the problem is convex in w̃ but not in (w, g). Expectations
    over zᵀw̃ ~ N(uᵀw̃, w̃ᵀSw̃) are computed by Gauss-Hermite quadrature (:data:`GH_NODES`
    nodes), and the quadrature objective is what is minimised (its gradient is exact for it).

  Inputs: S has eigenvalues geometrically spaced in [μ, L] = [1, κ] under a random rotation
  (:func:`anisotropic_covariance`).

* **The direction step.** Both problems' directional part is the generalised Rayleigh quotient
  ρ(w) = -(uᵀw)² / ||w||²_S (the minimum of f over g for OLS; for halfspaces, Stein's lemma
  gives ∇f(w̃) = c₁(w̃) u + c₂(w̃) S w̃ with c₁ = E[φ'(zᵀw̃)], so the S w̃ part is projected out
  of ∇_w and w's critical points are those of ρ: w ∝ S⁻¹u). GDNP (the paper's Algorithm 1)
  takes w_{t+1} = w_t - s_t ∇_w f(w_t, g_t) with

      s_t = ||w_t||³_S / (L g_t h(w_t, g_t)),   h(w, g) = -c₁(w̃) uᵀw     (c₁ = 2 for OLS),

  which makes the update independent of g_t:
  w_{t+1} = w_t + (1/L)(||w_t||²_S / (uᵀw_t) · u - S w_t), a preconditioned inverse iteration
  (PINVIT) step for the pencil (u uᵀ, S); for OLS it is GD on ρ with step ||w||²_S/(2L|ρ(w)|).
  The paper's bound (Thm 3.? for OLS, the direction term of Thm 4.? for halfspaces) is

      ρ(w_t) - ρ* <= (1 - μ/L)^{2t} (ρ(w_0) - ρ*).

  Deviation to note: we wrote h with the sign that makes s_t ∇_w f the descent step for any
  sign of g_t; the paper's constant factors (a 2 here or there) could differ from ours -- what
  we guarantee, and test, is that our iterates satisfy the bound above.

* **The length**, :func:`bisection` -- the paper's "Bisection" routine: T_s halvings of a
  bracket [a, b] on the sign of ∂f/∂g (f is convex in g for both problems), so
  |g - g*| <= 2^{-T_s} (b - a). The paper bisects once after T_d direction steps; we bisect
  after every direction step so that the suboptimality f(w_t, g_t) - f* can be recorded at every
  t. For S-normalisation this changes nothing in the w iterates (the update is independent of
  g). The bracket: [-B, B], B doubled from 1 until ∂f/∂g changes sign (our rule).

* **Baselines**: :func:`plain_gd` (GD on w̃ with step 1/L_f, L_f = 2L for OLS and
  λ_max(S + uuᵀ)/4 for the logistic halfspace, the usual smoothness constants; for OLS the
  textbook bound is the same (1 - μ/L)^{2t}); and weight-normalised GD (:func:`decoupled_gd`
  with ``norm="I"``: the same algorithm with ||·||_S replaced by the Euclidean norm in w̃ and in
  s_t, L unchanged -- our reading of "S = I"; the paper gives no rate for it).

* **One hidden layer** (:func:`train_mlp`, the paper's Sec. 5 extension): F(x) = Σ_i θ_i
  tanh(BN(xᵀw_i)) with :class:`fastbn.BatchNorm` (γ_i = g_i, β = 0 held fixed), squared loss
  on a finite Gaussian sample with a tanh teacher. "decoupled": a direction step on every w_i
  with s_i = η ||w_i||²_S / |γ_i| (a scale-free step: the paper's h has no closed form here, so
  this is our substitute), then each γ_i by bisection on ∂f/∂γ_i (units in turn, the others
  fixed; f need not be convex in γ_i here, bisection then finds a stationary point in the
  bracket), then a GD step on θ with step 1/λ_max(HᵀH/n), exact for the quadratic in θ.
  Compared with plain GD on (W, θ) without BN and with plain GD on (W, γ, θ) with BN.

Everything is float64 and deterministic given the seeds.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.polynomial.hermite import hermgauss
from scipy.special import expit

__all__ = [
    "GH_NODES", "Problem", "anisotropic_covariance", "ols_problem", "halfspace_problem",
    "bisection", "decoupled_gd", "plain_gd", "Run", "fit_rate", "bound_rate",
    "mlp_data", "train_mlp",
]

GH_NODES = 120
_x, _w = hermgauss(GH_NODES)
_XI = math.sqrt(2.0) * _x          # nodes for E over xi ~ N(0, 1)
_WQ = _w / math.sqrt(math.pi)


def _softplus(t):
    return np.logaddexp(0.0, t)


def anisotropic_covariance(d, kappa, rng):
    """S = Q diag(λ) Qᵀ with λ geometric from 1 to kappa (μ = 1, L = kappa), Q random orthogonal."""
    if d < 1 or kappa < 1:
        raise ValueError(f"need d >= 1 and kappa >= 1, got d={d}, kappa={kappa}")
    lam = np.geomspace(1.0, kappa, d) if d > 1 else np.array([1.0])
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))
    return (q * lam) @ q.T


@dataclasses.dataclass
class Problem:
    """A population objective f(w̃) with Gaussian inputs: S (covariance), u, μ, L."""

    kind: str           # "ols" or "halfspace"
    S: np.ndarray
    u: np.ndarray

    def __post_init__(self):
        lam = np.linalg.eigvalsh(self.S)
        self.mu, self.L = float(lam[0]), float(lam[-1])
        self.w_star = np.linalg.solve(self.S, self.u)       # the optimal direction, ∝ S⁻¹u
        self.rho_star = -float(self.u @ self.w_star)        # min of ρ = -||u||²_{S⁻¹}
        if self.kind == "ols":
            self.f_star = self.rho_star
            self.L_f = 2.0 * self.L
        elif self.kind == "halfspace":
            self.L_f = float(np.linalg.eigvalsh(self.S + np.outer(self.u, self.u))[-1]) / 4.0
            g = self.best_length(self.w_star, tol_steps=200)
            self.f_star = self.loss(g * self.w_star / self.s_norm(self.w_star))
        else:
            raise ValueError(f"kind must be 'ols' or 'halfspace', got {self.kind!r}")

    # -- the objective in the original parameters
    def s_norm(self, w):
        return math.sqrt(float(w @ self.S @ w))

    def loss(self, wt):
        if self.kind == "ols":
            return float(wt @ self.S @ wt + 2.0 * self.u @ wt)
        m, s = float(self.u @ wt), self.s_norm(wt)
        return float(_WQ @ _softplus(m + s * _XI))

    def grad(self, wt):
        """∇f(w̃) (exact for the quadrature objective in the halfspace case)."""
        if self.kind == "ols":
            return 2.0 * (self.S @ wt + self.u)
        m, s = float(self.u @ wt), self.s_norm(wt)
        p = expit(m + s * _XI)
        c1 = float(_WQ @ p)
        if s == 0.0:
            return c1 * self.u
        return c1 * self.u + float(_WQ @ (p * _XI)) / s * (self.S @ wt)

    def c1(self, wt):
        """The coefficient of u in ∇f(w̃) (Stein's lemma): 2 for OLS, E[φ'(zᵀw̃)] otherwise."""
        if self.kind == "ols":
            return 2.0
        return float(_WQ @ expit(float(self.u @ wt) + self.s_norm(wt) * _XI))

    def rho(self, w):
        """The generalised Rayleigh quotient ρ(w) = -(uᵀw)²/||w||²_S, scale invariant."""
        return -float(self.u @ w) ** 2 / float(w @ self.S @ w)

    # -- the length subproblem
    def dloss_dg(self, w, g, M):
        n = math.sqrt(float(w @ M @ w))
        return float(self.grad(g * w / n) @ w) / n

    def best_length(self, w, *, M=None, tol_steps=60):
        M = self.S if M is None else M
        a, b = length_bracket(lambda g: self.dloss_dg(w, g, M))
        return bisection(lambda g: self.dloss_dg(w, g, M), a, b, tol_steps)


def ols_problem(d=10, kappa=10.0, seed=0):
    """OLS with x ~ N(0, S), y = xᵀw_true + noise, ||w_true||_S = 1; cond(S) = kappa."""
    rng = np.random.default_rng(seed)
    S = anisotropic_covariance(d, kappa, rng)
    w_true = rng.standard_normal(d)
    w_true /= math.sqrt(float(w_true @ S @ w_true))
    return Problem("ols", S, -S @ w_true)


def halfspace_problem(d=10, kappa=10.0, seed=0, margin=1.5):
    """Logistic halfspace learning with z = -y x ~ N(u, S), ||u||_{S⁻¹} = margin; cond(S) = kappa."""
    rng = np.random.default_rng(seed)
    S = anisotropic_covariance(d, kappa, rng)
    v = rng.standard_normal(d)
    v *= margin / math.sqrt(float(v @ S @ v))
    return Problem("halfspace", S, -S @ v)


# --------------------------------------------------------------------------- bisection

def length_bracket(dfun, start=1.0, max_doublings=60):
    """[-B, B] with dfun(-B) <= 0 <= dfun(B), B doubled from ``start`` (dfun increasing)."""
    B = float(start)
    for _ in range(max_doublings):
        if dfun(-B) <= 0.0 <= dfun(B):
            return -B, B
        B *= 2.0
    raise RuntimeError("no sign change of the derivative found: is the objective convex in g?")


def bisection(dfun, a, b, steps):
    """The paper's Bisection(T_s, a, b): ``steps`` halvings of [a, b] on the sign of dfun.

    Assumes dfun(a) <= 0 <= dfun(b) (a convex 1-D objective whose derivative is dfun); returns the
    midpoint of the final bracket, within 2**-(steps+1) * (b - a) of a root in [a, b].
    """
    a, b = float(a), float(b)
    if not a <= b:
        raise ValueError(f"need a <= b, got [{a}, {b}]")
    for _ in range(int(steps)):
        c = 0.5 * (a + b)
        if dfun(c) > 0.0:
            b = c
        else:
            a = c
    return 0.5 * (a + b)


# --------------------------------------------------------------------------- the algorithms

@dataclasses.dataclass
class Run:
    """One run: per iteration t, the suboptimality f(w̃_t) - f*, ρ(w_t) - ρ* and the length."""

    method: str
    subopt: np.ndarray
    rho_gap: np.ndarray
    lengths: np.ndarray
    w: np.ndarray


def decoupled_gd(problem, w0, steps, *, norm="S", length_steps=50):
    """BN-GD / GDNP (``norm="S"``) or weight-normalised GD (``norm="I"``); see the module doc.

    Per iteration t: g_t = Bisection(length_steps) on f(w_t, ·), record f(w̃_t) - f*, then the
    direction step w_{t+1} = w_t - s_t ∇_w f(w_t, g_t), s_t = ||w_t||³_M / (L g_t h(w_t, g_t)),
    M = S or I. Returns a :class:`Run` with steps + 1 entries.
    """
    if norm not in ("S", "I"):
        raise ValueError(f"norm must be 'S' or 'I', got {norm!r}")
    P = problem
    M = P.S if norm == "S" else np.eye(len(P.u))
    w = np.array(w0, dtype=np.float64, copy=True)
    sub, gaps, lens = [], [], []
    for t in range(steps + 1):
        g = P.best_length(w, M=M, tol_steps=length_steps)
        n = math.sqrt(float(w @ M @ w))
        wt = g * w / n
        sub.append(P.loss(wt) - P.f_star)
        gaps.append(P.rho(w) - P.rho_star)
        lens.append(g)
        if t == steps:
            break
        grad_w = (g / n) * (P.grad(wt) - (M @ w) * (float(P.grad(wt) @ w) / n ** 2))
        h = -P.c1(wt) * float(P.u @ w)
        w = w - n ** 3 / (P.L * g * h) * grad_w
    return Run("BN-GD (S-norm)" if norm == "S" else "WN-GD (S = I)",
               np.array(sub), np.array(gaps), np.array(lens), w)


def plain_gd(problem, w0, steps, lr=None):
    """Gradient descent on w̃ with step 1/L_f (see the module doc); records f(w̃_t) - f*."""
    P = problem
    lr = 1.0 / P.L_f if lr is None else float(lr)
    wt = np.array(w0, dtype=np.float64, copy=True)
    sub, gaps, lens = [], [], []
    for t in range(steps + 1):
        sub.append(P.loss(wt) - P.f_star)
        gaps.append(P.rho(wt) - P.rho_star)
        lens.append(P.s_norm(wt))
        if t < steps:
            wt = wt - lr * P.grad(wt)
    return Run("GD", np.array(sub), np.array(gaps), np.array(lens), wt)


def bound_rate(problem):
    """The paper's per-iteration contraction factor of ρ(w_t) - ρ*: (1 - μ/L)²."""
    return (1.0 - problem.mu / problem.L) ** 2


def fit_rate(values, *, floor=1e-11, burn_in=0.1):
    """Least-squares line through log10(values) over the iterations where values > floor·values[0]
    (and values > 1e-14 absolute: rounding), skipping the first ``burn_in`` fraction.

    Returns (rate, r2, (start, stop)): rate = 10**slope is the measured per-iteration
    contraction factor, r2 the coefficient of determination (1 = exactly linear).
    """
    v = np.asarray(values, dtype=np.float64)
    ok = (v > max(floor * v[0], 1e-14)) & np.isfinite(v)
    stop = int(np.argmin(ok)) if not ok.all() else len(v)
    start = min(int(burn_in * stop), max(stop - 3, 0))
    if stop - start < 3:
        return float("nan"), float("nan"), (start, stop)
    t = np.arange(start, stop, dtype=np.float64)
    y = np.log10(v[start:stop])
    slope, icept = np.polyfit(t, y, 1)
    resid = y - (slope * t + icept)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
    return float(10.0 ** slope), r2, (start, stop)


# --------------------------------------------------------------------------- one hidden layer

def mlp_data(n=256, d=8, kappa=20.0, teacher_units=3, seed=0):
    """x ~ N(0, S) (cond kappa), y = Σ_j θ*_j tanh(xᵀv_j) with ||v_j||_S = 1.5, θ*_j ~ N(0,1)."""
    rng = np.random.default_rng(seed)
    S = anisotropic_covariance(d, kappa, rng)
    X = rng.multivariate_normal(np.zeros(d), S, size=n)
    V = rng.standard_normal((d, teacher_units))
    V *= 1.5 / np.sqrt(np.einsum("ij,ik,kj->j", V, S, V))
    theta = rng.standard_normal(teacher_units)
    return X, np.tanh(X @ V) @ theta


class _Net:
    """F(x) = Σ θ_i tanh(z_i), z = BN(XW) (fastbn.BatchNorm, β = 0 fixed) or z = XW."""

    def __init__(self, X, y, W, theta, batch_norm):
        import fastbn

        self.X, self.y, self.W, self.theta = X, y, W, theta
        self.bn = fastbn.BatchNorm(W.shape[1], dtype=np.float64) if batch_norm else None
        if self.bn is not None:
            self.bn.zero_grad(set_to_none=False)

    @property
    def gamma(self):
        return self.bn.weight

    def loss_and_grads(self):
        X, n = self.X, len(self.y)
        z = X @ self.W
        if self.bn is not None:
            z = self.bn.forward(z, training=True)
        h = np.tanh(z)
        r = h @ self.theta - self.y
        loss = 0.5 * float(r @ r) / n
        dF = r / n
        d_theta = h.T @ dF
        dz = np.outer(dF, self.theta) * (1.0 - h * h)
        d_gamma = None
        if self.bn is not None:
            self.bn.zero_grad(set_to_none=False)
            dz = self.bn.backward(dz)
            d_gamma = np.array(dict(self.bn.named_grads())["weight"])
        return loss, X.T @ dz, d_gamma, d_theta, h


def train_mlp(method, X, y, *, hidden=4, steps=200, lr=0.5, length_steps=25, seed=0):
    """Train the one-hidden-layer net with ``method`` in {"GD", "BN + GD", "BN-GD (decoupled)"}.

    Same initial W (N(0, 1/d)) and θ (N(0, 1/hidden)) for every method given the seed; γ starts
    at 1. ``lr`` is the plain-GD step, or η in the decoupled direction step. Returns the loss
    per iteration (steps + 1 entries; inf from the first non-finite value on).
    """
    rng = np.random.default_rng(seed)
    d = X.shape[1]
    W = rng.standard_normal((d, hidden)) / math.sqrt(d)
    theta = rng.standard_normal(hidden) / math.sqrt(hidden)
    if method not in ("GD", "BN + GD", "BN-GD (decoupled)"):
        raise ValueError(f"unknown method {method!r}")
    net = _Net(X, y, W, theta, batch_norm=method != "GD")
    Xc = X - X.mean(axis=0)
    S = Xc.T @ Xc / len(X)  # the batch covariance BN normalises with
    losses = []
    with np.errstate(over="ignore", invalid="ignore"):
        _train_loop(net, method, S, steps, lr, length_steps, hidden, y, losses)
    out = np.full(steps + 1, np.inf)
    out[:len(losses)] = losses
    return out


def _train_loop(net, method, S, steps, lr, length_steps, hidden, y, losses):
    for t in range(steps + 1):
        loss, dW, dg, dth, h = net.loss_and_grads()
        losses.append(loss if np.isfinite(loss) else np.inf)
        if not np.isfinite(loss) or t == steps:
            break
        if method != "BN-GD (decoupled)":
            net.W -= lr * dW
            net.theta -= lr * dth
            if dg is not None:
                net.gamma[...] -= lr * dg
            continue
        # direction step: s_i = η ||w_i||²_S / |γ_i|, per unit
        sn2 = np.einsum("ij,ik,kj->j", net.W, S, net.W)
        net.W -= dW * (lr * sn2 / np.maximum(np.abs(net.gamma), 1e-2))
        # lengths: bisection on ∂f/∂γ_i, units in turn
        for i in range(hidden):
            def dfun(g, i=i):
                net.gamma[i] = g
                return float(net.loss_and_grads()[2][i])
            a, b = -4.0, 4.0
            if dfun(a) <= 0.0 <= dfun(b):
                net.gamma[i] = bisection(dfun, a, b, length_steps)
            else:  # no sign change in the bracket: keep the better end
                vals = []
                for g in (a, b):
                    net.gamma[i] = g
                    vals.append(net.loss_and_grads()[0])
                net.gamma[i] = (a, b)[int(np.argmin(vals))]
        # output layer: one exact-smoothness GD step
        loss, dW, dg, dth, h = net.loss_and_grads()
        if not np.all(np.isfinite(h)):
            losses.append(np.inf)
            break
        L_theta = float(np.linalg.eigvalsh(h.T @ h / len(y))[-1])
        if not (np.isfinite(L_theta) and np.all(np.isfinite(dth))):
            losses.append(np.inf)
            break
        net.theta -= dth / max(L_theta, 1e-12)
