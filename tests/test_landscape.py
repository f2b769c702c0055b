"""Santurkar et al.'s landscape measures against direct computations of their definitions, the
noisy-BN draws against their specified distribution, and the analysis scripts' --quick mode."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn.analysis import landscape, nn

from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]
ETAS = np.array([0.05, 0.2, 0.7])
EPS = 1e-5


# --------------------------------------------------------------------------- a plain reference

def tiny(kind, seed=0):
    """mlp(3, 4, 3, depth 3) of the given kind, in training mode."""
    return nn.mlp(3, 4, 3, 3, batch_norm=kind != "standard", noisy_bn=kind == "noisy_bn",
                  seed=seed)


class Reference:
    """The tiny network's training-mode loss as a function of a flat parameter vector, written
    from the formulas, independently of the stack (layout: per hidden block W [, gamma, beta]
    or W, b; then the output W, b, as mlp builds it)."""

    def __init__(self, net, x, labels):
        self.kind_bn = any(isinstance(l, nn.BatchNorm1d) for l in net.layers)
        self.noise = [(l.scale.copy(), l.shift.copy()) for l in net.layers
                      if isinstance(l, nn.NoisyBN)]
        self.shapes = [p.shape for p in net.parameters()]
        self.x, self.labels = x, labels
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        # per Linear layer: the slices of its own parameters (W and b, or W, gamma and beta)
        per_layer = 3 if self.kind_bn else 2
        n_hidden = (len(self.shapes) - 2) // per_layer
        self.groups = [list(range(i * per_layer, (i + 1) * per_layer)) for i in range(n_hidden)]
        self.groups.append([len(self.shapes) - 2, len(self.shapes) - 1])

    def unpack(self, w):
        return [w[a:b].reshape(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def loss(self, w):
        p = self.unpack(w)
        h = self.x
        for i, g in enumerate(self.groups[:-1]):
            if self.kind_bn:
                W, gamma, beta = (p[j] for j in g)
                z = h @ W.T
                mean = z.mean(axis=0)
                var = ((z - mean) ** 2).mean(axis=0)
                z = gamma * (z - mean) / np.sqrt(var + EPS) + beta
                if self.noise:
                    s, m = self.noise[i]
                    z = s * z + m
            else:
                W, b = (p[j] for j in g)
                z = h @ W.T + b
            h = np.maximum(z, 0)
        W, b = (p[j] for j in self.groups[-1])
        logits = h @ W.T + b
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(logp[np.arange(len(self.labels)), self.labels])

    def grad(self, w, idx=None, h=1e-6):
        """Central differences of loss at w, over the entries idx (all by default)."""
        idx = np.arange(w.size) if idx is None else idx
        g = np.empty(len(idx))
        for k, i in enumerate(idx):
            e = np.zeros_like(w)
            e[i] = h
            g[k] = (self.loss(w + e) - self.loss(w - e)) / (2 * h)
        return g

    def indices(self, param):
        return np.arange(self.offsets[param], self.offsets[param + 1])


def setup(kind, rng):
    x = rng.standard_normal((10, 3)) * 1.3 + 0.2
    labels = rng.integers(0, 3, size=10)
    net = tiny(kind)
    nn.loss_and_gradient(net, x, labels)  # non-zero grads and running stats to be preserved
    return net, x, labels, Reference(net, x, labels)


KINDS = ["standard", "bn", "noisy_bn"]


# --------------------------------------------------------------------------- landscape measures

@pytest.mark.parametrize("kind", KINDS)
def test_reference_agrees_with_the_stack_at_w_t(kind, rng):
    net, x, labels, ref = setup(kind, rng)
    loss, g = landscape.gradient_at(net, x, labels)
    w = net.get_flat_params()
    assert loss == pytest.approx(ref.loss(w), rel=1e-13)
    assert rel_err(g, ref.grad(w)) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_loss_variation_is_loss_along_the_gradient(kind, rng):
    net, x, labels, ref = setup(kind, rng)
    w = net.get_flat_params()
    g = ref.grad(w)
    expected = [ref.loss(w - eta * g) for eta in ETAS]
    got = landscape.loss_variation(net, x, labels, ETAS)
    assert got.shape == ETAS.shape
    assert rel_err(got, expected) < 1e-7


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_predictiveness_is_gradient_change(kind, rng):
    net, x, labels, ref = setup(kind, rng)
    w = net.get_flat_params()
    g = ref.grad(w)
    expected = [np.linalg.norm(g - ref.grad(w - eta * g)) for eta in ETAS]
    got = landscape.gradient_predictiveness(net, x, labels, ETAS)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_effective_beta_smoothness_is_max_ratio(kind, rng):
    net, x, labels, ref = setup(kind, rng)
    w = net.get_flat_params()
    g = ref.grad(w)
    ratios = [np.linalg.norm(g - ref.grad(w - eta * g)) / np.linalg.norm(eta * g) for eta in ETAS]
    got = landscape.effective_beta_smoothness(net, x, labels, ETAS)
    assert got == pytest.approx(max(ratios), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_internal_covariate_shift_matches_definition(kind, rng):
    net, x, labels, ref = setup(kind, rng)
    opt = nn.SGD(net.parameters(), 0.3, momentum=0.9)
    opt.step(net.gradients())  # a first step, so the momentum buffer is not zero
    nn.loss_and_gradient(net, x, labels)
    next_params = opt.peek(net.gradients())
    w = net.get_flat_params()
    w_next = np.concatenate([p.ravel() for p in next_params])
    got = landscape.internal_covariate_shift(net, x, labels, next_params)
    assert got.l2.shape == got.cosine.shape == (len(ref.groups),)
    for i, group in enumerate(ref.groups):
        weight = ref.indices(group[0])
        mixed = w.copy()
        for earlier in ref.groups[:i]:
            for j in earlier:
                mixed[ref.indices(j)] = w_next[ref.indices(j)]
        G = ref.grad(w, weight)
        G2 = ref.grad(mixed, weight)
        assert got.l2[i] == pytest.approx(np.linalg.norm(G - G2), rel=1e-5, abs=1e-8)
        assert got.cosine[i] == pytest.approx(G @ G2 / np.linalg.norm(G) / np.linalg.norm(G2),
                                              rel=1e-6)
        assert got.grad_norm[i] == pytest.approx(np.linalg.norm(G), rel=1e-6)
    # layer 1 has no earlier layers: no shift by definition, and the probe computes it so
    assert got.l2[0] == 0 and got.cosine[0] == pytest.approx(1.0, abs=1e-15)
    assert np.all(got.l2[1:] > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_probes_leave_the_network_as_found(kind, rng):
    net, x, labels, _ = setup(kind, rng)
    net.eval()  # the probes still measure the training loss, and leave eval mode set
    before = (net.get_flat_params(), net.get_flat_grads(), net.buffers())
    probe = landscape.probe_landscape(net, x, labels, ETAS)
    landscape.internal_covariate_shift(net, x, labels, [p * 1.1 for p in net.get_params()])
    assert not net.training and all(not l.training for l in net.layers)
    assert np.array_equal(net.get_flat_params(), before[0])
    assert np.array_equal(net.get_flat_grads(), before[1])
    after = net.buffers()
    for k in before[2]:
        for name, value in before[2][k].items():
            assert np.array_equal(np.asarray(after[k][name]), np.asarray(value))
    ref = Reference(net, x, labels)
    assert probe.loss == pytest.approx(ref.loss(net.get_flat_params()), rel=1e-13)


def test_probe_bands_and_fields(rng):
    net, x, labels, _ = setup("bn", rng)
    probe = landscape.probe_landscape(net, x, labels, ETAS)
    assert probe.loss_band == (probe.losses.min(), probe.losses.max())
    assert probe.grad_diff_band == (probe.grad_diffs.min(), probe.grad_diffs.max())
    _, g = landscape.gradient_at(net, x, labels)
    assert probe.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-14)


def test_probe_errors(rng):
    net, x, labels, _ = setup("standard", rng)
    with pytest.raises(ValueError, match=r"etas: expected finite step sizes > 0"):
        landscape.probe_landscape(net, x, labels, [0.1, -0.1])
    with pytest.raises(ValueError, match=r"etas: expected a non-empty 1-D array"):
        landscape.probe_landscape(net, x, labels, [])
    with pytest.raises(TypeError, match=r"etas: expected a real numeric array"):
        landscape.probe_landscape(net, x, labels, ["a"])
    with pytest.raises(TypeError, match=r"net: expected a fastbn.analysis.nn.Sequential"):
        landscape.probe_landscape(object(), x, labels, ETAS)
    with pytest.raises(ValueError, match=r"next_params: expected 6 arrays"):
        landscape.internal_covariate_shift(net, x, labels, net.get_params()[:-1])
    bad = net.get_params()
    bad[0] = bad[0][:, :2]
    with pytest.raises(ValueError, match=r"next_params\[0\]: expected shape \(4, 3\)"):
        landscape.internal_covariate_shift(net, x, labels, bad)


# --------------------------------------------------------------------------- noisy BN

def test_noisy_bn_draws_follow_the_specified_distribution():
    rng = np.random.default_rng(2024)
    n_draws, units = 4000, 64
    mu = np.empty(n_draws)
    sigma = np.empty(n_draws)
    rel_shift = np.empty((n_draws, units))
    rel_scale = np.empty((n_draws, units))
    for t in range(n_draws):
        m, s, mu[t], sigma[t] = landscape.sample_noisy_bn(units, rng)
        rel_shift[t] = m - mu[t]
        rel_scale[t] = s - sigma[t]
    # hard ranges
    assert mu.min() >= -0.5 and mu.max() <= 0.5
    assert sigma.min() >= 1.0 and sigma.max() <= 1.25
    assert np.abs(rel_shift).max() <= 0.1
    # moments, within 5 standard errors: U(a, b) has mean (a+b)/2 and std (b-a)/sqrt(12)
    def close(sample, mean, std):
        assert abs(sample.mean() - mean) < 5 * std / np.sqrt(sample.size)
        # the sample std's standard error is about std / sqrt(2 size) for these shapes
        assert abs(sample.std() - std) < 5 * std / np.sqrt(sample.size / 2) + 1e-12

    close(mu, 0.0, 1 / np.sqrt(12))
    close(sigma, 1.125, 0.25 / np.sqrt(12))
    close(rel_shift, 0.0, 0.2 / np.sqrt(12))
    close(rel_scale, 0.0, 0.1)
    # the spread covers the ranges (not a degenerate sampler)
    assert mu.min() < -0.49 and mu.max() > 0.49 and sigma.min() < 1.01 and sigma.max() > 1.24
    # normal, not uniform, scale noise: about 4.6 % of N(0, 0.1) lies beyond 2 sigma
    assert 0.04 < np.mean(np.abs(rel_scale) > 0.2) < 0.052


def test_noisy_bn_is_per_layer_and_per_step():
    net = nn.mlp(3, 8, 2, 4, batch_norm=True, noisy_bn=True, seed=0, noise="per_step")
    noisy = [l for l in net.layers if isinstance(l, landscape.NoisyBN)]
    assert len(noisy) == 3
    first = [(l.mu_t, l.sigma_t) for l in noisy]
    assert len(set(first)) == 3  # each layer draws its own mu_t, sigma_t
    for l in noisy:
        m, s = l.shift, l.scale
        assert np.all(np.abs(m - l.mu_t) <= 0.1) and np.abs(s - l.sigma_t).max() < 0.6
    net.resample_noise()
    assert all((l.mu_t, l.sigma_t) != f for l, f in zip(noisy, first))


# --------------------------------------------------------------------------- the scripts

@pytest.mark.parametrize("script,figures", [
    ("noisy_bn.py", ["training_curves.png", "ics.png"]),
    ("landscape.py", ["landscape.png"]),
    ("lr_sweep.py", ["lr_sweep.png"]),
])
def test_script_quick_mode_writes_figures_and_summary(script, figures, tmp_path):
    for module in ("matplotlib", "sklearn", "tqdm"):
        pytest.importorskip(module, reason=f"the analysis scripts need {module}")
    # the child imports the fastbn this process imported (the source tree or an installed copy)
    here = str(Path(fastbn.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / script), str(out), "--quick"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in figures:
        png = out / name
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# ") and "|---" in summary
    table_rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(table_rows) >= 3
