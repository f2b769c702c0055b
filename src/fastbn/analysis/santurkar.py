"""Helpers for the Santurkar et al. (2018) reproduction beyond the landscape probes.

* :func:`load_hard_split`: a classification task on which depth and step size matter (MNIST-1D
  when the ``mnist1d`` package is installed, it generates its data locally; otherwise a hard
  scikit-learn ``make_classification`` problem), split and standardised.
* :func:`gaussian_classes`: synthetic Gaussian classes for the deep linear network of Fig. 5.
* :func:`thm41_check`: Theorem 4.1 on one batch, in two forms that must not be confused:

  - the **proof's identity** (exact for any network): with z = gamma * y_hat + beta the BN
    output of unit j, g = dL_hat/dz over the batch of m and sigma_j the batch std of the
    pre-BN activations y_j, ||dL_hat/dy_j||^2 = gamma^2 / sigma_j^2 (||g||^2 - <1, g>^2 / m -
    <g, y_hat>^2 / m) (at eps = 0; with eps the last term is <g, y_hat>^2 (2 m - ||y_hat||^2)
    / m^2, which is what is checked);
  - the **theorem as stated**: "for a BatchNorm network with loss L_hat and an identical
    non-BN network with (identical) loss L", ||grad_{y_j} L_hat||^2 <= gamma^2 / sigma_j^2
    (||grad_{y_j} L||^2 - <1, grad_{y_j} L>^2 / m - <grad_{y_j} L, y_hat_j>^2 / sqrt(m)),
    where grad_{y_j} L is the gradient of the *standard* network with the same weights on the
    same batch. It holds when the BN network's dL_hat/dz equals the standard network's
    dL/dy (the proof's assumption, "the loss is identical after the layer"); in a network
    with BN in every layer the two differ, so whether it holds is an empirical question.
    We check it with the 1/sqrt(m) printed in the statement and with the 1/m of the identity.
"""
from dataclasses import dataclass

import numpy as np

from .nn import BatchNorm1d, Linear, NoisyBN, ReLU, Sequential, softmax_cross_entropy

__all__ = ["load_hard_split", "gaussian_classes", "standard_twin", "thm41_check", "Thm41"]


def _standardise(x_tr, x_te, dtype):
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    return ((x_tr - mean) / std).astype(dtype), ((x_te - mean) / std).astype(dtype)


def load_hard_split(*, source="auto", dtype=np.float64):
    """(x_train, y_train, x_test, y_test, name): a 10-class task harder than digits.

    source "mnist1d": MNIST-1D (Greydanus 2020; 4000 / 1000 sequences of length 40, the
    package's default arguments, generated locally, no download). source "sklearn":
    ``make_classification`` with 5000 samples, 40 features (20 informative, 10 redundant),
    10 classes of 2 clusters each, class_sep 0.8, 5 % flipped labels; split 4000 / 1000.
    "auto": MNIST-1D if importable, else the scikit-learn problem. Features are standardised
    with the training set's statistics.
    """
    if source not in ("auto", "mnist1d", "sklearn"):
        raise ValueError(f"source: expected 'auto', 'mnist1d' or 'sklearn', got {source!r}")
    if source in ("auto", "mnist1d"):
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            if source == "mnist1d":
                raise
        else:
            state = np.random.get_state()  # make_dataset seeds numpy's global generator
            try:
                d = make_dataset(get_dataset_args())
            finally:
                np.random.set_state(state)
            x_tr, x_te = _standardise(np.asarray(d["x"], np.float64),
                                      np.asarray(d["x_test"], np.float64), dtype)
            return (x_tr, np.asarray(d["y"], np.int64), x_te,
                    np.asarray(d["y_test"], np.int64), "MNIST-1D")
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=5000, n_features=40, n_informative=20,
                               n_redundant=10, n_classes=10, n_clusters_per_class=2,
                               class_sep=0.8, flip_y=0.05, random_state=0)
    x_tr, x_te = _standardise(x[:4000], x[4000:], dtype)
    return x_tr, y[:4000].astype(np.int64), x_te, y[4000:].astype(np.int64), \
        "make_classification(40 features, 10 classes)"


def gaussian_classes(n=2000, dim=20, classes=10, *, sep=1.0, seed=0, dtype=np.float64):
    """Synthetic Gaussian classes: class means ~ N(0, sep^2 I), samples = mean + N(0, I).

    Returns (x, labels) with x of shape (n, dim) and balanced labels in [0, classes).
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim)) * sep
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    x = means[labels] + rng.standard_normal((n, dim))
    return x.astype(dtype), labels.astype(np.int64)


def standard_twin(bn_net):
    """The standard network with ``bn_net``'s Linear weights: BN (and noise) layers removed,
    the hidden Linear layers given zero biases; the output layer is copied with its bias."""
    layers = []
    for layer in bn_net.layers:
        if isinstance(layer, Linear):
            twin = Linear(layer.in_features, layer.out_features, bias=True, dtype=layer.dtype)
            twin.weight[...] = layer.weight
            twin.bias[...] = 0 if layer.bias is None else layer.bias
            layers.append(twin)
        elif isinstance(layer, ReLU):
            layers.append(ReLU())
        elif not isinstance(layer, (BatchNorm1d, NoisyBN)):
            raise TypeError(f"standard_twin: unexpected layer {layer!r}")
    return Sequential(layers)


def _record(net, x, labels):
    """Forward and backward layer by layer; (outputs, grads) with grads[k] = dL/d outputs[k]."""
    outs = []
    h = np.asarray(x, dtype=net.dtype)
    for layer in net.layers:
        h = layer.forward(h)
        outs.append(h)
    _, dy = softmax_cross_entropy(outs[-1], labels)
    grads = [None] * len(net.layers)
    for k in range(len(net.layers) - 1, -1, -1):
        grads[k] = dy
        dy = net.layers[k].backward(dy)
    net.zero_grad()
    return outs, grads


@dataclass(frozen=True)
class Thm41:
    """Per BN layer (list index = hidden layer, 0-based), arrays over the layer's units."""

    lhs: list            # ||grad_{y_j} L_hat||^2 in the BN network
    identity_rhs: list   # the proof's identity from the BN network's own dL_hat/dz
    stated_rhs: list     # the theorem's bound from the standard network's grad_{y_j} L (1/sqrt m)
    stated_rhs_m: list   # the same with 1/m in the last term
    standard_sq: list    # ||grad_{y_j} L||^2 in the standard network

    def identity_max_rel(self):
        return max(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300)))
                   for a, b in zip(self.lhs, self.identity_rhs))

    def fraction_holding(self, printed=True, rtol=1e-9):
        """Fraction of units where lhs <= bound (1 + rtol): equality counts as holding."""
        rhs = self.stated_rhs if printed else self.stated_rhs_m
        ok = np.concatenate([a <= b + rtol * np.abs(b) for a, b in zip(self.lhs, rhs)])
        return float(np.mean(ok))

    def layer_ratios(self, printed=False):
        """Per layer: sum over units of lhs / sum of the bound (the bound summed over j)."""
        rhs = self.stated_rhs if printed else self.stated_rhs_m
        return np.array([a.sum() / b.sum() for a, b in zip(self.lhs, rhs)])

    def gradient_ratios(self):
        """Per layer: ||grad_y L_hat|| / ||grad_y L|| (BN network over standard network)."""
        return np.array([np.sqrt(a.sum() / s.sum()) for a, s in zip(self.lhs, self.standard_sq)])


def thm41_check(bn_net, x, labels):
    """Theorem 4.1 on the batch (x, labels) at ``bn_net``'s weights (training-mode BN).

    ``bn_net``: an :func:`~fastbn.analysis.nn.mlp` with batch_norm=True (noisy BN layers are
    not allowed: the theorem is about plain BN). The standard network is
    :func:`standard_twin`. Nothing in ``bn_net`` changes except BN's running statistics (wrap
    the call in :func:`~fastbn.analysis.nn.preserved_state` to keep them).
    """
    if any(isinstance(l, NoisyBN) for l in bn_net.layers):
        raise ValueError("bn_net: expected a BN network without NoisyBN layers")
    bn_idx = [k for k, l in enumerate(bn_net.layers) if isinstance(l, BatchNorm1d)]
    if not bn_idx:
        raise ValueError("bn_net: expected a network with BatchNorm1d layers")
    twin = standard_twin(bn_net)
    was = bn_net.training
    bn_net.train()
    try:
        outs, grads = _record(bn_net, x, labels)
    finally:
        bn_net.train(was)
    s_outs, s_grads = _record(twin, x, labels)
    lin_twin = [k for k, l in enumerate(twin.layers) if isinstance(l, Linear)]
    m = np.asarray(x).shape[0]
    res = dict(lhs=[], identity_rhs=[], stated_rhs=[], stated_rhs_m=[], standard_sq=[])
    for i, k in enumerate(bn_idx):
        layer = bn_net.layers[k]
        y = outs[k - 1].astype(np.float64)
        g_y = grads[k - 1].astype(np.float64)
        g_z = grads[k].astype(np.float64)
        mu = y.mean(axis=0)
        sigma = np.sqrt(((y - mu) ** 2).mean(axis=0) + layer.bn.eps)
        y_hat = (y - mu) / sigma
        gamma = np.asarray(layer.bn.weight, dtype=np.float64)
        f = gamma ** 2 / sigma ** 2
        yy = (y_hat ** 2).sum(axis=0)
        dot = (g_z * y_hat).sum(axis=0)
        res["lhs"].append((g_y ** 2).sum(axis=0))
        res["identity_rhs"].append(f * ((g_z ** 2).sum(axis=0) - g_z.sum(axis=0) ** 2 / m
                                        - dot ** 2 * (2 * m - yy) / m ** 2))
        g_s = s_grads[lin_twin[i]].astype(np.float64)
        base = (g_s ** 2).sum(axis=0) - g_s.sum(axis=0) ** 2 / m
        ds = (g_s * y_hat).sum(axis=0) ** 2
        res["stated_rhs"].append(f * (base - ds / np.sqrt(m)))
        res["stated_rhs_m"].append(f * (base - ds / m))
        res["standard_sq"].append((g_s ** 2).sum(axis=0))
    return Thm41(**res)
