"""Santurkar et al. (2018) helpers: Theorem 4.1 (identity vs the theorem as stated), the Hessian
power iteration, the deep linear network, the per-sample noisy BN and the data sets."""
import numpy as np
import pytest

from fastbn.analysis import landscape, nn, santurkar


def _batch(rng, n=32, d=5, k=3):
    return rng.standard_normal((n, d)) * 1.5 + 0.3, rng.integers(0, k, size=n)


def test_standard_twin_is_the_standard_mlp_at_init(rng):
    x, y = _batch(rng)
    bn = nn.mlp(5, 8, 3, 4, batch_norm=True, seed=3)
    plain = nn.mlp(5, 8, 3, 4, seed=3)
    twin = santurkar.standard_twin(bn)
    assert np.array_equal(twin.forward(x), plain.forward(x))


@pytest.mark.parametrize("depth", [2, 4])
def test_thm41_identity_is_exact(depth, rng):
    x, y = _batch(rng)
    net = nn.mlp(5, 8, 3, depth, batch_norm=True, seed=1)
    for layer in net.layers:  # non-trivial gamma, beta
        if isinstance(layer, nn.BatchNorm1d):
            layer.bn.weight[...] = rng.uniform(0.5, 2, 8)
            layer.bn.bias[...] = rng.standard_normal(8)
    res = santurkar.thm41_check(net, x, y)
    assert len(res.lhs) == depth - 1
    assert res.identity_max_rel() < 1e-10
    # the BN network's own gradient, recomputed through the stack
    nn.loss_and_gradient(net, x, y)
    assert res.identity_max_rel() < 1e-10


def test_thm41_stated_holds_when_the_downstream_gradients_agree(rng):
    # one BN layer whose output equals the standard layer's (gamma = sigma, beta = mu): then
    # dL_hat/dz = dL/dy and the stated bound must hold for every unit (with the 1/m term)
    x, y = _batch(rng, n=64)
    net = nn.mlp(5, 8, 3, 2, batch_norm=True, seed=2, bn_eps=0.0)
    lin = net.layers[0]
    pre = x @ lin.weight.T
    net.layers[1].bn.weight[...] = pre.std(axis=0)
    net.layers[1].bn.bias[...] = pre.mean(axis=0)
    res = santurkar.thm41_check(net, x, y)
    assert np.all(res.lhs[0] <= res.stated_rhs_m[0] * (1 + 1e-9))
    assert res.fraction_holding(printed=False) == 1.0
    assert np.allclose(res.stated_rhs_m[0], res.identity_rhs[0], rtol=1e-9)
    assert 0 < res.gradient_ratios()[0]


def test_thm41_rejects_noisy_and_plain_nets(rng):
    x, y = _batch(rng)
    with pytest.raises(ValueError, match="without NoisyBN"):
        santurkar.thm41_check(nn.mlp(5, 4, 3, 3, batch_norm=True, noisy_bn=True), x, y)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        santurkar.thm41_check(nn.mlp(5, 4, 3, 3), x, y)


@pytest.mark.parametrize("kind", ["standard", "bn"])
def test_top_hessian_eigenvalue_matches_dense_hessian(kind, rng):
    x, y = _batch(rng, n=16, d=3)
    net = nn.mlp(3, 4, 3, 3, batch_norm=kind == "bn", seed=0)
    w = net.get_flat_params()
    before = [p.copy() for p in net.parameters()]

    def grad(v):
        net.set_flat_params(v)
        nn.loss_and_gradient(net, x, y)
        return net.get_flat_grads()

    h = 1e-5
    H = np.array([(grad(w + h * e) - grad(w - h * e)) / (2 * h) for e in np.eye(w.size)])
    net.set_flat_params(w)
    H = (H + H.T) / 2
    ev = np.linalg.eigvalsh(H)
    top = ev[np.argmax(np.abs(ev))]
    lam, k = landscape.top_hessian_eigenvalue(net, x, y, iters=300, tol=1e-9)
    assert abs(lam - top) <= 1e-3 * abs(top)
    assert k <= 300
    assert all(np.array_equal(p, q) for p, q in zip(net.parameters(), before))


def test_deep_linear_network_structure_and_scale(rng):
    net = nn.mlp(20, 16, 10, 25, activation=None, seed=0)
    assert sum(isinstance(l, nn.Linear) for l in net.layers) == 25
    assert not any(isinstance(l, nn.ReLU) for l in net.layers)
    x = rng.standard_normal((256, 20))
    out = net.forward(x)
    # N(0, 1/in) weights keep the scale within an order of magnitude over 25 layers
    assert 0.05 < out.std() < 20
    bn = nn.mlp(20, 16, 10, 25, activation=None, batch_norm=True, seed=0)
    assert [type(l).__name__ for l in bn.layers[:3]] == ["Linear", "BatchNorm1d", "Linear"]
    with pytest.raises(ValueError, match="activation"):
        nn.mlp(20, 16, 10, 3, activation="tanh")


def test_mlp_noise_modes():
    net = nn.mlp(3, 4, 2, 3, batch_norm=True, noisy_bn=True)
    assert all(l.noise == "per_sample" for l in net.layers if isinstance(l, nn.NoisyBN))
    net = nn.mlp(3, 4, 2, 3, batch_norm=True, noisy_bn=True, noise="per_step")
    assert all(l.noise == "per_step" for l in net.layers if isinstance(l, nn.NoisyBN))
    with pytest.raises(ValueError, match="noise"):
        nn.mlp(3, 4, 2, 3, batch_norm=True, noisy_bn=True, noise="x")


def test_per_sample_noise_distribution():
    layer = nn.NoisyBN(50, seed=1)
    a = np.zeros((400, 50))
    shifts, scales = [], []
    for _ in range(30):
        layer.resample()
        layer.forward(a)
        shifts.append(layer.shift - layer.mu_t)
        scales.append(layer.scale - layer.sigma_t)
        assert -0.5 <= layer.mu_t <= 0.5 and 1 <= layer.sigma_t <= 1.25
    shifts, scales = np.array(shifts), np.array(scales)
    assert np.abs(shifts).max() <= 0.1
    assert abs(shifts.std() - 0.2 / np.sqrt(12)) < 0.003
    assert abs(scales.std() - 0.1) < 0.003


def test_per_sample_noise_gradients_match_finite_differences(rng):
    x, y = _batch(rng, n=12, d=3)
    net = nn.mlp(3, 4, 3, 3, batch_norm=True, noisy_bn=True, seed=0)
    nn.loss_and_gradient(net, x, y)
    g = net.get_flat_grads()
    w = net.get_flat_params()

    def loss(v):
        net.set_flat_params(v)
        return nn.loss_and_gradient(net, x, y)[0]

    h = 1e-6
    idx = rng.choice(w.size, 10, replace=False)
    fd = [(loss(w + h * e) - loss(w - h * e)) / (2 * h) for e in np.eye(w.size)[idx]]
    assert np.allclose(fd, g[idx], rtol=1e-5, atol=1e-8)


def test_gaussian_classes_and_hard_split():
    x, y = santurkar.gaussian_classes(200, 6, 4, seed=0)
    assert x.shape == (200, 6) and np.bincount(y).tolist() == [50] * 4
    pytest.importorskip("sklearn")
    xtr, ytr, xte, yte, name = santurkar.load_hard_split(source="sklearn")
    assert xtr.shape == (4000, 40) and xte.shape == (1000, 40) and set(ytr) == set(range(10))
    assert np.allclose(xtr.mean(axis=0), 0, atol=1e-10)
    with pytest.raises(ValueError, match="source"):
        santurkar.load_hard_split(source="cifar")
