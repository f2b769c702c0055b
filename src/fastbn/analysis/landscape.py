"""Santurkar et al. (2018)'s measures of the optimisation landscape, for the NumPy stack.

At a point W_t of training, with g = grad L(W_t) on the current batch (x, y) and step sizes
eta' in a range:

* loss variation: L(W_t - eta' g) for each eta' (plotted as a min/max band over the range);
* gradient predictiveness: ||grad L(W_t) - grad L(W_t - eta' g)||_2 for each eta';
* effective beta-smoothness: max over the range of ||grad L(W_t) - grad L(W_t - eta' g)||_2
  divided by the distance moved, ||eta' g||_2;
* internal covariate shift (ICS) at layer i: G = grad_{W_i} L(W^t) and G' = the same gradient
  after layers 1..i-1 have been moved to W^{t+1} (same batch); ||G - G'||_2 and cos(G, G').
* the largest Hessian eigenvalue of L at W_t (:func:`top_hessian_eigenvalue`): power iteration on
  Hessian-vector products taken as central differences of gradients; it is the local
  beta-smoothness that the effective beta above estimates along one direction.

"Noisy BN" (:class:`NoisyBN`, :func:`sample_noisy_bn`) is defined in :mod:`.nn` and re-exported
here.

Every probe evaluates the loss that training sees: training mode (batch statistics in BN, the
current draw of the BN noise) on the given batch, with all parameters, including BN's gamma and
beta, moved along the whole gradient. Probes leave the network exactly as they found it:
parameters, gradient accumulators, running statistics and mode are saved and restored.
"""
from dataclasses import dataclass

import numpy as np

from .. import _validation
from .nn import (
    NoisyBN,
    Sequential,
    loss_and_gradient,
    preserved_state,
    sample_noisy_bn,
)

__all__ = [
    "LandscapeProbe",
    "CovariateShift",
    "gradient_at",
    "probe_landscape",
    "loss_variation",
    "gradient_predictiveness",
    "effective_beta_smoothness",
    "internal_covariate_shift",
    "top_hessian_eigenvalue",
    "NoisyBN",
    "sample_noisy_bn",
]


@dataclass(frozen=True)
class LandscapeProbe:
    """The landscape along -g at one point of training; arrays are indexed like ``etas``."""

    etas: np.ndarray          # step sizes eta'
    loss: float               # L(W_t)
    grad_norm: float          # ||g||_2, g = grad L(W_t)
    losses: np.ndarray        # L(W_t - eta' g)
    grad_diffs: np.ndarray    # ||g - grad L(W_t - eta' g)||_2  (gradient predictiveness)
    beta_smoothness: float    # max over eta' of grad_diffs / ||eta' g||_2

    @property
    def loss_band(self):
        """(min, max) of L(W_t - eta' g) over the range."""
        return float(np.min(self.losses)), float(np.max(self.losses))

    @property
    def grad_diff_band(self):
        """(min, max) of the gradient predictiveness over the range."""
        return float(np.min(self.grad_diffs)), float(np.max(self.grad_diffs))


@dataclass(frozen=True)
class CovariateShift:
    """ICS per Linear layer (index 0 is the first layer, where it is 0 by definition)."""

    l2: np.ndarray            # ||G_i - G'_i||_2
    cosine: np.ndarray        # cos(G_i, G'_i); NaN where either gradient is exactly zero
    grad_norm: np.ndarray     # ||G_i||_2, for scale


def _check_net(net):
    if not isinstance(net, Sequential):
        raise TypeError(f"net: expected a fastbn.analysis.nn.Sequential, got {type(net).__name__}")


def _check_etas(etas):
    e = np.atleast_1d(_validation.real_array(etas, "etas", np.float64))
    if e.ndim != 1 or e.size == 0:
        raise ValueError(f"etas: expected a non-empty 1-D array of step sizes, got shape "
                         f"{np.shape(etas)}")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise ValueError(f"etas: expected finite step sizes > 0, got {e.tolist()}")
    return e


class _train_mode:
    """Training mode inside the block (the loss the optimizer sees), previous mode after."""

    def __init__(self, net):
        self.net = net

    def __enter__(self):
        self.was_training = self.net.training
        self.net.train()

    def __exit__(self, *exc):
        self.net.train(self.was_training)


def _gradient(net, x, labels):
    loss, _ = loss_and_gradient(net, x, labels)
    return loss, net.get_flat_grads()


def gradient_at(net, x, labels):
    """(L(W_t), grad L(W_t) as a flat float64 vector) on the batch; the net is left as found."""
    _check_net(net)
    with preserved_state(net), _train_mode(net):
        return _gradient(net, x, labels)


def probe_landscape(net, x, labels, etas):
    """All three landscape measures at the current point, from one set of passes.

    One forward/backward at W_t and one at each W_t - eta' g. Returns a :class:`LandscapeProbe`.
    The beta-smoothness is NaN when g = 0 (no direction to move in).
    """
    _check_net(net)
    etas = _check_etas(etas)
    with preserved_state(net), _train_mode(net):
        loss, g = _gradient(net, x, labels)
        w = net.get_flat_params()
        losses = np.empty(etas.size)
        diffs = np.empty(etas.size)
        for k, eta in enumerate(etas):
            net.set_flat_params(w - eta * g)
            losses[k], g_eta = _gradient(net, x, labels)
            diffs[k] = np.linalg.norm(g - g_eta)
    grad_norm = float(np.linalg.norm(g))
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = float(np.max(diffs / (etas * grad_norm))) if grad_norm > 0 else float("nan")
    return LandscapeProbe(etas=etas, loss=loss, grad_norm=grad_norm, losses=losses,
                          grad_diffs=diffs, beta_smoothness=beta)


def loss_variation(net, x, labels, etas):
    """L(W_t - eta' g) for each eta' (array like ``etas``): the loss along the gradient."""
    return probe_landscape(net, x, labels, etas).losses


def gradient_predictiveness(net, x, labels, etas):
    """||grad L(W_t) - grad L(W_t - eta' g)||_2 for each eta' (array like ``etas``)."""
    return probe_landscape(net, x, labels, etas).grad_diffs


def effective_beta_smoothness(net, x, labels, etas):
    """max over eta' of ||grad L(W_t) - grad L(W_t - eta' g)||_2 / ||eta' g||_2."""
    return probe_landscape(net, x, labels, etas).beta_smoothness


def internal_covariate_shift(net, x, labels, next_params):
    """Santurkar et al.'s ICS at every Linear layer of ``net``.

    ``next_params`` are the parameters after this step, W^{t+1} (a list like
    ``net.get_params()``, e.g. ``SGD.peek(grads)``). For layer i, G' is the gradient of the
    loss with respect to layer i's weight matrix when the parameters of layers 1..i-1 (their
    weights, biases and BN gamma/beta, see ``Sequential.layer_groups``) are at W^{t+1} and the
    rest at W^t, on the same batch. Returns a :class:`CovariateShift`.
    """
    _check_net(net)
    current = net.get_params()
    next_params = list(next_params)
    if len(next_params) != len(current):
        raise ValueError(f"next_params: expected {len(current)} arrays (one per parameter), "
                         f"got {len(next_params)}")
    for i, (p, q) in enumerate(zip(current, next_params)):
        if np.shape(q) != p.shape:
            raise ValueError(f"next_params[{i}]: expected shape {p.shape}, got {np.shape(q)}")
    groups = net.layer_groups()
    l2 = np.empty(len(groups))
    cosine = np.empty(len(groups))
    norms = np.empty(len(groups))
    with preserved_state(net), _train_mode(net):
        loss_and_gradient(net, x, labels)
        base = [g.astype(np.float64) for g in net.gradients()]
        for i, (weight_index, _) in enumerate(groups):
            mixed = list(current)
            for _, members in groups[:i]:
                for j in members:
                    mixed[j] = next_params[j]
            net.set_params(mixed)
            loss_and_gradient(net, x, labels)
            G = base[weight_index].ravel()
            G2 = net.gradients()[weight_index].astype(np.float64).ravel()
            l2[i] = np.linalg.norm(G - G2)
            norms[i] = np.linalg.norm(G)
            denom = norms[i] * np.linalg.norm(G2)
            cosine[i] = float(G @ G2) / denom if denom > 0 else float("nan")
    return CovariateShift(l2=l2, cosine=cosine, grad_norm=norms)


def top_hessian_eigenvalue(net, x, labels, *, iters=20, h=1e-4, tol=1e-3, seed=0):
    """The Hessian eigenvalue of largest magnitude of the training-mode loss at W_t.

    Power iteration v <- Hv / ||Hv|| from a random unit vector (``seed``), with
    Hv ~ (grad L(W + h v) - grad L(W - h v)) / (2 h); stops when the Rayleigh quotient v'Hv
    changes by less than ``tol`` (relative) or after ``iters`` products. Returns
    (eigenvalue as v'Hv, number of Hessian-vector products). Two gradient passes per product;
    the network is left as found.
    """
    _check_net(net)
    iters = _validation.int_at_least(iters, "iters")
    h = _validation.real_where(h, "h", "a finite number > 0", lambda v: v > 0)
    rng = np.random.default_rng(seed)
    with preserved_state(net), _train_mode(net):
        w = net.get_flat_params()
        v = rng.standard_normal(w.size)
        v /= np.linalg.norm(v)
        lam = float("nan")
        k = 0
        for k in range(1, iters + 1):
            net.set_flat_params(w + h * v)
            _, g_plus = _gradient(net, x, labels)
            net.set_flat_params(w - h * v)
            _, g_minus = _gradient(net, x, labels)
            hv = (g_plus - g_minus) / (2 * h)
            new = float(v @ hv)
            norm = np.linalg.norm(hv)
            if not np.isfinite(norm) or norm == 0:
                return new, k
            v = hv / norm
            if np.isfinite(lam) and abs(new - lam) <= tol * abs(new):
                lam = new
                break
            lam = new
    return lam, k
