"""A small NumPy training stack for the experiments of Santurkar et al. (2018).

Layers (``Linear``, ``ReLU``, ``BatchNorm1d`` around :class:`fastbn.BatchNorm`, ``NoisyBN``), a
``Sequential`` container, softmax cross-entropy, SGD with momentum and an ``mlp`` builder for
3-10 layer perceptrons with or without batch norm. Everything is plain NumPy so that the
landscape probes in :mod:`fastbn.analysis.landscape` can read and write every parameter.

Conventions (PyTorch's, so results can be checked against it):

* ``Linear.weight`` has shape (out_features, in_features) and ``y = x @ weight.T + bias``;
  weights are Kaiming-normal, N(0, 2 / in_features), the He initialisation for ReLU networks.
* ``backward(dy)`` returns dx and *accumulates* into the layer's gradient arrays, like
  ``.grad`` in PyTorch; ``zero_grad()`` clears them.
* Parameters and gradients are updated in place, never rebound, so references taken by an
  optimizer or a probe stay valid.
* float64 is the default (finite-difference checks need it); float32 is accepted.

Determinism: every random draw comes from a ``numpy.random.Generator`` built from an explicit
seed, so a network built and trained with the same seeds is the same bit for bit.
"""
import contextlib
import math
import numbers

import numpy as np

from .. import _validation

__all__ = [
    "Layer",
    "Linear",
    "ReLU",
    "BatchNorm1d",
    "NoisyBN",
    "Sequential",
    "SGD",
    "mlp",
    "sample_noisy_bn",
    "softmax_cross_entropy",
    "loss_and_gradient",
    "evaluate",
    "minibatches",
    "load_digits_split",
    "preserved_state",
    "NOISY_BN_RANGES",
    "NOISE_MODES",
]


# The "noisy BN" distribution (Santurkar et al., Sec. 2.1 and their appendix's constants): per
# step and layer mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25); per activation of each sample (or,
# with noise="per_step", per unit) m ~ U(mu_t - 0.1, mu_t + 0.1) and s ~ N(sigma_t, 0.1)
# (0.1 is the standard deviation).
NOISY_BN_RANGES = {
    "mu": (-0.5, 0.5),
    "sigma": (1.0, 1.25),
    "shift_half_width": 0.1,
    "scale_std": 0.1,
}


# --------------------------------------------------------------------------- validation

_check_dtype = _validation.param_dtype
_check_count = _validation.int_at_least
_check_real = _validation.real_where
_check_batch = _validation.float_batch


def _generator(seed, name="seed"):
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(
            f"{name}: expected an int, a numpy.random.Generator or None, got {type(seed).__name__}"
        )
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- layers

class Layer:
    """Base class: ``forward``/``backward``, parameters and gradients (both lists of arrays)."""

    training = True

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - interface
        raise NotImplementedError

    def parameters(self):
        """The trainable arrays, in a fixed order (updated in place by optimizers)."""
        return []

    def gradients(self):
        """The gradient accumulators, one per parameter, same order and shapes."""
        return []

    def zero_grad(self):
        for g in self.gradients():
            g[...] = 0

    def buffers(self):
        """Copies of the non-trainable state (running statistics); {} when there is none."""
        return {}

    def load_buffers(self, state):
        """Restore what :meth:`buffers` returned (in place)."""

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)


class Linear(Layer):
    """Fully connected layer, y = x @ weight.T + bias, weights N(0, gain / in_features).

    gain = 2 (the default) is Kaiming-normal, for ReLU networks; gain = 1 for linear networks.
    """

    def __init__(self, in_features, out_features, *, bias=True, seed=None, dtype=np.float64,
                 gain=2.0):
        self.in_features = _check_count(in_features, "in_features")
        self.out_features = _check_count(out_features, "out_features")
        self.dtype = _check_dtype(dtype)
        gain = _check_real(gain, "gain", "a finite number > 0", lambda v: v > 0)
        rng = _generator(seed)
        # N(0, gain / in_features): gain 2 is He's for ReLU, 1 keeps a linear net's scale
        std = math.sqrt(gain / self.in_features)
        # drawn in float64 then cast, so the float32 net starts from the rounded float64 one
        w = rng.standard_normal((self.out_features, self.in_features)) * std
        self.weight = w.astype(self.dtype)
        self.bias = np.zeros(self.out_features, self.dtype) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias) if bias else None
        self._x = None

    def forward(self, x):
        x = _check_batch(x, self.in_features).astype(self.dtype, copy=False)
        self._x = x
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy):
        if self._x is None:
            raise RuntimeError("Linear.backward: call forward first")
        dy = _check_batch(dy, self.out_features, "dy")
        if dy.shape[0] != self._x.shape[0]:
            raise ValueError(f"dy: expected shape {(self._x.shape[0], self.out_features)}, "
                             f"got {dy.shape}")
        self.grad_weight += dy.T @ self._x
        if self.bias is not None:
            self.grad_bias += dy.sum(axis=0)
        return dy @ self.weight

    def parameters(self):
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def gradients(self):
        return [self.grad_weight] if self.bias is None else [self.grad_weight, self.grad_bias]

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype.name})")


class ReLU(Layer):
    """max(x, 0); the gradient at exactly 0 is taken as 0, as in PyTorch."""

    def __init__(self):
        self._mask = None

    def forward(self, x):
        x = np.asarray(x)
        self._mask = x > 0
        return np.where(self._mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy):
        if self._mask is None:
            raise RuntimeError("ReLU.backward: call forward first")
        if np.shape(dy) != self._mask.shape:
            raise ValueError(f"dy: expected shape {self._mask.shape}, got {np.shape(dy)}")
        return np.where(self._mask, dy, 0).astype(np.asarray(dy).dtype, copy=False)

    def __repr__(self):
        return "ReLU()"


class BatchNorm1d(Layer):
    """:class:`fastbn.BatchNorm` over (n, features) batches (feature axis 1).

    Training mode normalises with the batch statistics and updates the running statistics;
    eval mode uses the running statistics. ``self.bn`` is the wrapped fastbn layer.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, dtype=np.float64):
        from ..layer import BatchNorm  # imported here: the analysis stack loads without it

        self.num_features = _check_count(num_features, "num_features")
        self.dtype = _check_dtype(dtype)
        self.bn = BatchNorm(self.num_features, axis=1, eps=eps, momentum=momentum,
                            dtype=self.dtype)
        # Zeros rather than None (fastbn's default, like PyTorch's .grad): the accumulators
        # must exist before the first backward and keep their identity for gradients().
        self.bn.zero_grad(set_to_none=False)
        self.training = self.bn.training

    def forward(self, x):
        x = _check_batch(x, self.num_features).astype(self.dtype, copy=False)
        return self.bn(x)

    def backward(self, dy):
        dy = _check_batch(dy, self.num_features, "dy").astype(self.dtype, copy=False)
        return self.bn.backward(dy)

    # fastbn.BatchNorm's module protocol: its parameters, their gradients beside them, and its
    # buffers (running statistics)
    def parameters(self):
        return list(self.bn.parameters())

    def gradients(self):
        return [g for _name, g in self.bn.named_grads()]

    def zero_grad(self):
        self.bn.zero_grad(set_to_none=False)

    def buffers(self):
        return {k: np.array(v, copy=True) for k, v in self.bn.named_buffers()}

    def load_buffers(self, state):
        # Written in place (not via load_state_dict) so that no array is rebound.
        for name in ("running_mean", "running_var"):
            if name in state:
                getattr(self.bn, name)[...] = state[name]
        if "num_batches_tracked" in state:
            self.bn.num_batches_tracked = int(state["num_batches_tracked"])

    def train(self, mode=True):
        self.training = bool(mode)
        self.bn.train(self.training)
        return self

    def __repr__(self):
        return f"BatchNorm1d({self.num_features}, dtype={self.dtype.name})"


NOISE_MODES = ("per_sample", "per_step")


def sample_noisy_bn(num_features, rng, *, batch_size=None):
    """One draw of the "noisy BN" perturbation for one layer and step.

    Returns (shift m, scale s, mu_t, sigma_t): mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25), then
    m ~ U(mu_t - 0.1, mu_t + 0.1) and s ~ N(sigma_t, 0.1), i.i.d. per entry. m and s are
    float64 of shape (num_features,), or (batch_size, num_features) when batch_size is given
    (one draw per activation of each sample, the paper's noise).
    """
    n = _check_count(num_features, "num_features")
    shape = (n,) if batch_size is None else (_check_count(batch_size, "batch_size"), n)
    rng = _generator(rng, "rng")
    mu_t = rng.uniform(*NOISY_BN_RANGES["mu"])
    sigma_t = rng.uniform(*NOISY_BN_RANGES["sigma"])
    h = NOISY_BN_RANGES["shift_half_width"]
    shift = rng.uniform(mu_t - h, mu_t + h, size=shape)
    scale = rng.normal(sigma_t, NOISY_BN_RANGES["scale_std"], size=shape)
    return shift, scale, float(mu_t), float(sigma_t)


class NoisyBN(Layer):
    """Santurkar et al.'s distributional noise after a BN layer: a <- s * a + m.

    Santurkar et al. (2018), Sec. 2.1: "we add time-varying, non-stationary random noise [...]
    each activation for each sample in the batch is perturbed using i.i.d. noise sampled with
    a non-zero mean and non-unit variance distribution, where the noise distribution changes
    at each time step"; their appendix gives the constants of :data:`NOISY_BN_RANGES` (per
    step and layer mu_t ~ U(-0.5, 0.5) and sigma_t ~ U(1, 1.25); per entry m ~ U(mu_t -
    0.1, mu_t + 0.1), s ~ N(sigma_t, 0.1)).

    ``noise="per_sample"`` (default, the paper's): m and s have shape (batch, features), one
    i.i.d. draw per activation of each sample. ``noise="per_step"``: one (m, s) per unit,
    shared by the whole batch (this package's earlier, weaker variant, kept for comparison).

    A draw stays fixed until :meth:`resample`, which the training loop calls once per step:
    the probes of one step then see one loss function. With per-sample noise the draw is made
    at the first training-mode forward of a batch size after :meth:`resample` (the layer does
    not know the batch size before) and reused for that size until the next resample.
    In eval mode the layer applies the noise's expectation, a <- E[s] a + E[m] = 1.125 a
    (E[m] = 0), as dropout does at inference: the identity would shrink every activation by
    1/1.125 against what training saw.
    """

    def __init__(self, num_features, *, seed=None, dtype=np.float64, noise="per_sample"):
        self.num_features = _check_count(num_features, "num_features")
        self.dtype = _check_dtype(dtype)
        if noise not in NOISE_MODES:
            raise ValueError(f"noise: expected one of {NOISE_MODES}, got {noise!r}")
        self.noise = noise
        self.rng = _generator(seed)
        self.mean_scale = float(np.mean(NOISY_BN_RANGES["sigma"]))  # E[s] = E[sigma_t]
        self.mean_shift = float(np.mean(NOISY_BN_RANGES["mu"]))     # E[m] = E[mu_t]
        self._factor = None
        self.resample()

    def resample(self):
        """A new step: new mu_t, sigma_t (and, per step, new m and s)."""
        self._per_size = {}
        if self.noise == "per_step":
            shift, scale, self.mu_t, self.sigma_t = sample_noisy_bn(self.num_features, self.rng)
            self.shift = shift.astype(self.dtype)
            self.scale = scale.astype(self.dtype)
        else:
            self.mu_t = float(self.rng.uniform(*NOISY_BN_RANGES["mu"]))
            self.sigma_t = float(self.rng.uniform(*NOISY_BN_RANGES["sigma"]))
            self.shift = self.scale = None  # drawn at the first forward (needs the batch size)

    def _draw(self, n):
        if self.noise == "per_step":
            return self.shift, self.scale
        if n not in self._per_size:
            h = NOISY_BN_RANGES["shift_half_width"]
            shape = (n, self.num_features)
            shift = self.rng.uniform(self.mu_t - h, self.mu_t + h, size=shape)
            scale = self.rng.normal(self.sigma_t, NOISY_BN_RANGES["scale_std"], size=shape)
            self._per_size[n] = (shift.astype(self.dtype), scale.astype(self.dtype))
        self.shift, self.scale = self._per_size[n]
        return self.shift, self.scale

    def forward(self, x):
        x = _check_batch(x, self.num_features)
        if self.training:
            shift, scale = self._draw(x.shape[0])
            self._factor = scale
            return x * scale + shift
        self._factor = self.mean_scale
        return (x * self.mean_scale + self.mean_shift).astype(x.dtype, copy=False)

    def backward(self, dy):
        if self._factor is None:
            raise RuntimeError("NoisyBN.backward: call forward first")
        dy = _check_batch(dy, self.num_features, "dy")
        if np.ndim(self._factor) == 2 and dy.shape != self._factor.shape:
            raise ValueError(f"dy: expected shape {self._factor.shape}, got {dy.shape}")
        return (dy * self._factor).astype(dy.dtype, copy=False)

    def __repr__(self):
        return f"NoisyBN({self.num_features}, noise={self.noise!r})"


class Sequential(Layer):
    """Layers applied in order; parameters, gradients and buffers are the layers' in order."""

    def __init__(self, layers):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}]: expected a fastbn.analysis.nn.Layer, "
                                f"got {type(layer).__name__}")
        dtypes = {layer.dtype for layer in self.layers if hasattr(layer, "dtype")}
        if len(dtypes) > 1:
            raise ValueError(f"layers: expected one dtype, got {sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float64)

    def forward(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")
        x = x.astype(self.dtype, copy=False)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def gradients(self):
        return [g for layer in self.layers for g in layer.gradients()]

    def parameter_names(self):
        """Names like ``"0.weight"`` (layer index, attribute), in parameters() order."""
        names = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                names += [f"{i}.weight"] + ([f"{i}.bias"] if layer.bias is not None else [])
            elif isinstance(layer, BatchNorm1d):
                names += [f"{i}.weight", f"{i}.bias"]
            else:
                names += [f"{i}.p{j}" for j in range(len(layer.parameters()))]
        return names

    def zero_grad(self):
        for layer in self.layers:
            layer.zero_grad()

    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def buffers(self):
        return {i: b for i, layer in enumerate(self.layers) if (b := layer.buffers())}

    def load_buffers(self, state):
        for i, b in state.items():
            self.layers[i].load_buffers(b)

    def resample_noise(self):
        """Draw new noise in every NoisyBN layer (once per training step)."""
        for layer in self.layers:
            if isinstance(layer, NoisyBN):
                layer.resample()

    # ---- parameter access for the probes

    def get_params(self):
        """Copies of all parameters, in parameters() order."""
        return [p.copy() for p in self.parameters()]

    def set_params(self, values):
        """Write ``values`` (a list like get_params()) into the parameters, in place."""
        params = self.parameters()
        if len(values) != len(params):
            raise ValueError(f"values: expected {len(params)} arrays, got {len(values)}")
        for i, (p, v) in enumerate(zip(params, values)):
            if np.shape(v) != p.shape:
                raise ValueError(f"values[{i}]: expected shape {p.shape}, got {np.shape(v)}")
        for p, v in zip(params, values):
            p[...] = v

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def get_flat_params(self):
        """All parameters concatenated into one float64 vector (a copy)."""
        return _flatten(self.parameters())

    def set_flat_params(self, flat):
        """Write a vector like get_flat_params() into the parameters, in place."""
        flat = np.asarray(flat)
        n = self.num_parameters()
        if flat.shape != (n,):
            raise ValueError(f"flat: expected shape ({n},), got {flat.shape}")
        offset = 0
        for p in self.parameters():
            p[...] = flat[offset:offset + p.size].reshape(p.shape)
            offset += p.size

    def get_flat_grads(self):
        """All gradient accumulators concatenated into one float64 vector (a copy)."""
        return _flatten(self.gradients())

    def layer_groups(self):
        """Parameter indices per "layer" as Santurkar et al. count them.

        One group per Linear layer: its weight and bias, and the parameters of every layer up
        to the next Linear (its BatchNorm's gamma and beta). Returns a list of
        (index of the Linear weight in parameters(), [indices of the group's parameters]).
        """
        groups = []
        index = 0
        for layer in self.layers:
            n = len(layer.parameters())
            if isinstance(layer, Linear):
                groups.append((index, list(range(index, index + n))))
            elif n and groups:
                groups[-1][1].extend(range(index, index + n))
            elif n:
                raise ValueError("layer_groups: parameters before the first Linear layer")
            index += n
        return groups

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"


def _flatten(arrays):
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def mlp(in_features, hidden, out_features, depth, *, batch_norm=False, noisy_bn=False,
        seed=0, dtype=np.float64, bn_eps=1e-5, bn_momentum=0.1, noise="per_sample",
        activation="relu"):
    """A perceptron with ``depth`` Linear layers (depth - 1 hidden layers of ``hidden``).

    Each hidden block is Linear -> [BatchNorm1d -> [NoisyBN]] -> ReLU; the last Linear gives
    the logits. With batch norm the hidden Linear layers have no bias (BN's beta replaces it).
    Linear ``i`` is seeded with ``seed + i``, so the standard and the BN network built with
    one seed start from the same weights. NoisyBN layers draw from ``seed + 1000 + i`` with
    the given ``noise`` mode (see :class:`NoisyBN`). ``activation=None`` builds a deep
    *linear* network (no ReLU; weights N(0, 1/in) so that the signal keeps its scale), as in
    Santurkar et al.'s Fig. 5.
    """
    in_features = _check_count(in_features, "in_features")
    hidden = _check_count(hidden, "hidden")
    out_features = _check_count(out_features, "out_features")
    depth = _check_count(depth, "depth", minimum=2)
    seed = _check_count(seed, "seed", minimum=0)
    if noisy_bn and not batch_norm:
        raise ValueError("noisy_bn: expected batch_norm=True with noisy_bn=True "
                         "(the noise is injected after each BN layer), got batch_norm=False")
    if activation not in ("relu", None):
        raise ValueError(f"activation: expected 'relu' or None, got {activation!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise: expected one of {NOISE_MODES}, got {noise!r}")
    dtype = _check_dtype(dtype)
    gain = 2.0 if activation == "relu" else 1.0
    layers = []
    width = in_features
    for i in range(depth - 1):
        layers.append(Linear(width, hidden, bias=not batch_norm, seed=seed + i, dtype=dtype,
                             gain=gain))
        if batch_norm:
            layers.append(BatchNorm1d(hidden, eps=bn_eps, momentum=bn_momentum, dtype=dtype))
            if noisy_bn:
                layers.append(NoisyBN(hidden, seed=seed + 1000 + i, dtype=dtype, noise=noise))
        if activation == "relu":
            layers.append(ReLU())
        width = hidden
    layers.append(Linear(width, out_features, seed=seed + depth - 1, dtype=dtype, gain=gain))
    return Sequential(layers)


# --------------------------------------------------------------------------- loss, optimizer

def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the batch and its gradient with respect to the logits.

    logits: (n, k) floating; labels: (n,) ints in [0, k). Returns (loss as a Python float,
    dlogits with logits' dtype). The log-sum-exp is shifted by the row maximum so that large
    logits do not overflow.
    """
    logits = np.asarray(logits)
    if logits.dtype.kind != "f":
        raise TypeError(f"logits: expected a floating-point array, got dtype {logits.dtype}")
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits: expected shape (n, k) with n >= 1, got {logits.shape}")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels: expected an integer array, got dtype {labels.dtype}")
    n, k = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels: expected values in [0, {k}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(n)
    loss = float(np.mean(logsumexp - z[rows, labels]))
    p = np.exp(z - logsumexp[:, None])
    p[rows, labels] -= 1.0
    return loss, (p / n).astype(logits.dtype)


def loss_and_gradient(net, x, labels):
    """One forward/backward pass in the net's current mode.

    Clears the gradients first, so afterwards ``net.gradients()`` hold exactly this batch's
    gradient. Returns (loss, logits). In training mode BN layers update their running
    statistics, as a training step does; wrap in :func:`preserved_state` for a probe.
    """
    net.zero_grad()
    logits = net.forward(x)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    net.backward(dlogits)
    return loss, logits


def evaluate(net, x, labels):
    """(loss, accuracy) in eval mode (running statistics, the noise's mean); restores the mode."""
    was_training = net.training
    net.eval()
    try:
        logits = net.forward(x)
    finally:
        net.train(was_training)
    loss, _ = softmax_cross_entropy(logits, labels)
    return loss, float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


@contextlib.contextmanager
def preserved_state(net):
    """Restore parameters, gradients and buffers (running statistics) on exit.

    The landscape probes move the weights and run training-mode passes; inside this block they
    leave the network exactly as they found it.
    """
    params = net.get_params()
    grads = [g.copy() for g in net.gradients()]
    buffers = net.buffers()
    try:
        yield net
    finally:
        net.set_params(params)
        for g, saved in zip(net.gradients(), grads):
            g[...] = saved
        net.load_buffers(buffers)


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum, PyTorch's update rule.

    d = g + weight_decay * p;  v <- momentum * v + d;  p <- p - lr * v.
    """

    def __init__(self, params, lr, *, momentum=0.0, weight_decay=0.0):
        self.params = list(params)
        self.lr = _check_real(lr, "lr", "a finite number > 0", lambda v: v > 0)
        self.momentum = _check_real(momentum, "momentum", "a number in [0, 1)",
                                    lambda v: 0 <= v < 1)
        self.weight_decay = _check_real(weight_decay, "weight_decay", "a finite number >= 0",
                                        lambda v: v >= 0)
        self.velocity = [np.zeros_like(p) for p in self.params]

    def _check_grads(self, grads):
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} arrays, got {len(grads)}")
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if np.shape(g) != p.shape:
                raise ValueError(f"grads[{i}]: expected shape {p.shape}, got {np.shape(g)}")
        return grads

    def _velocities(self, grads):
        out = []
        for p, g, v in zip(self.params, grads, self.velocity):
            d = g + self.weight_decay * p if self.weight_decay else g
            out.append(self.momentum * v + d)
        return out

    def peek(self, grads):
        """The parameters one step would give (new arrays); nothing is changed."""
        grads = self._check_grads(grads)
        return [p - self.lr * v for p, v in zip(self.params, self._velocities(grads))]

    def step(self, grads):
        """Update the parameters and the momentum buffers in place."""
        grads = self._check_grads(grads)
        for p, v_old, v in zip(self.params, self.velocity, self._velocities(grads)):
            v_old[...] = v
            p -= (self.lr * v).astype(p.dtype, copy=False)


# --------------------------------------------------------------------------- data

def minibatches(n, batch_size, rng):
    """Index arrays of one epoch over ``n`` samples, shuffled by ``rng``.

    The last partial batch is dropped, so every batch has ``batch_size`` >= 2 rows (BN in
    training mode needs two samples per feature).
    """
    n = _check_count(n, "n")
    batch_size = _check_count(batch_size, "batch_size", minimum=2)
    if batch_size > n:
        raise ValueError(f"batch_size: expected at most n = {n}, got {batch_size}")
    order = _generator(rng, "rng").permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


def load_digits_split(*, test_fraction=0.25, seed=0, dtype=np.float64):
    """scikit-learn's bundled 8x8 digits (1797 x 64, 10 classes), split and standardised.

    A stratified split with ``seed``; features are standardised with the training set's mean
    and standard deviation (constant pixels are left centred at 0). Returns
    (x_train, y_train, x_test, y_test). Needs scikit-learn (the ``analysis`` extra).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits_split needs scikit-learn: pip install fastbn[analysis]"
                          ) from exc
    test_fraction = _check_real(test_fraction, "test_fraction", "a number in (0, 1)",
                                lambda v: 0 < v < 1)
    dtype = _check_dtype(dtype)
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed,
        stratify=data.target)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    return (((x_tr - mean) / std).astype(dtype), y_tr.astype(np.int64),
            ((x_te - mean) / std).astype(dtype), y_te.astype(np.int64))
