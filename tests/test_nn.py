"""The NumPy training stack of fastbn.analysis.nn against finite differences, plain formulas and
PyTorch (when installed)."""
import numpy as np
import pytest

from fastbn.analysis import nn

from conftest import rel_err


def batch(rng, n=8, features=5, classes=3):
    x = rng.standard_normal((n, features)) * 1.5 + 0.3
    labels = rng.integers(0, classes, size=n)
    return x, labels


def central_differences(f, w, h=1e-6):
    """d f / d w by central differences, w a float64 vector."""
    grad = np.empty_like(w)
    for i in range(w.size):
        e = np.zeros_like(w)
        e[i] = h
        grad[i] = (f(w + e) - f(w - e)) / (2 * h)
    return grad


def net_loss(net, x, labels):
    loss, _ = nn.softmax_cross_entropy(net.forward(x), labels)
    return loss


NETS = {
    "standard": dict(batch_norm=False),
    "bn": dict(batch_norm=True),
    "noisy_bn": dict(batch_norm=True, noisy_bn=True),
}


@pytest.mark.parametrize("depth", [3, 5])
@pytest.mark.parametrize("kind", list(NETS))
def test_gradients_match_finite_differences(kind, depth, rng):
    x, labels = batch(rng)
    net = nn.mlp(5, 6, 3, depth, seed=3, **NETS[kind])
    net.train()
    loss, _ = nn.loss_and_gradient(net, x, labels)
    analytic = net.get_flat_grads()
    w0 = net.get_flat_params()
    buffers = net.buffers()

    def f(w):
        net.set_flat_params(w)
        return net_loss(net, x, labels)

    numeric = central_differences(f, w0)
    net.set_flat_params(w0)
    net.load_buffers(buffers)
    assert loss == pytest.approx(f(w0), rel=1e-14)
    assert rel_err(analytic, numeric) < 1e-6
    # dx too: the input gradient goes through every layer's backward
    dx = net.backward(nn.softmax_cross_entropy(net.forward(x), labels)[1])
    numeric_dx = central_differences(
        lambda v: net_loss(net, v.reshape(x.shape), labels), x.ravel()
    ).reshape(x.shape)
    assert rel_err(dx, numeric_dx) < 1e-6


def test_eval_mode_gradients_match_finite_differences(rng):
    # eval mode: BN uses the running statistics, which are constants for the gradient
    x, labels = batch(rng)
    net = nn.mlp(5, 6, 3, 4, batch_norm=True, seed=1)
    for _ in range(3):
        net.forward(batch(rng)[0])  # give the running statistics non-trivial values
    net.eval()
    nn.loss_and_gradient(net, x, labels)
    analytic = net.get_flat_grads()

    def f(w):
        net.set_flat_params(w)
        return net_loss(net, x, labels)

    numeric = central_differences(f, net.get_flat_params())
    assert rel_err(analytic, numeric) < 1e-6


def test_float32_gradients_close_to_float64(rng):
    x, labels = batch(rng, n=16)
    g = {}
    for dtype in (np.float64, np.float32):
        net = nn.mlp(5, 7, 3, 4, batch_norm=True, seed=2, dtype=dtype)
        nn.loss_and_gradient(net, x.astype(dtype), labels)
        assert all(p.dtype == dtype for p in net.parameters() + net.gradients())
        g[dtype] = net.get_flat_grads()
    assert rel_err(g[np.float32], g[np.float64]) < 1e-4


def test_whole_stack_matches_pytorch(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is the optional cross-check")
    x, labels = batch(rng, n=12)
    net = nn.mlp(5, 6, 3, 4, batch_norm=True, seed=4)
    loss, _ = nn.loss_and_gradient(net, x, labels)

    modules = []
    for layer in net.layers:
        if isinstance(layer, nn.Linear):
            m = torch.nn.Linear(layer.in_features, layer.out_features,
                                bias=layer.bias is not None, dtype=torch.float64)
            m.weight.data = torch.from_numpy(layer.weight.copy())
            if layer.bias is not None:
                m.bias.data = torch.from_numpy(layer.bias.copy())
        elif isinstance(layer, nn.BatchNorm1d):
            m = torch.nn.BatchNorm1d(layer.num_features, dtype=torch.float64)
        else:
            m = torch.nn.ReLU()
        modules.append(m)
    tnet = torch.nn.Sequential(*modules)
    tloss = torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)),
                                              torch.from_numpy(labels))
    tloss.backward()
    tgrads = np.concatenate([p.grad.numpy().ravel() for p in tnet.parameters()])
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    assert rel_err(net.get_flat_grads(), tgrads) < 1e-10
    running = [m.running_var.numpy() for m in modules if isinstance(m, torch.nn.BatchNorm1d)]
    ours = [b["running_var"] for b in net.buffers().values()]
    for r, o in zip(running, ours):
        assert rel_err(o, r) < 1e-12


def test_softmax_cross_entropy_matches_formula(rng):
    logits = rng.standard_normal((7, 4)) * 3
    labels = rng.integers(0, 4, size=7)
    loss, d = nn.softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(np.mean(-np.log(p[np.arange(7), labels])), rel=1e-14)
    onehot = np.eye(4)[labels]
    assert rel_err(d, (p - onehot) / 7) < 1e-14
    # shifted logits: no overflow, same loss (softmax is shift invariant)
    loss_big, _ = nn.softmax_cross_entropy(logits + 1e4, labels)
    assert loss_big == pytest.approx(loss, rel=1e-9)


def test_linear_is_kaiming_normal_and_deterministic():
    a = nn.Linear(400, 300, seed=7)
    b = nn.Linear(400, 300, seed=7)
    c = nn.Linear(400, 300, seed=8)
    assert np.array_equal(a.weight, b.weight)
    assert not np.array_equal(a.weight, c.weight)
    # 120000 draws: the sample std is within ~0.2 % of sqrt(2 / fan_in)
    assert np.std(a.weight) == pytest.approx(np.sqrt(2 / 400), rel=0.01)
    assert abs(np.mean(a.weight)) < 5 * np.sqrt(2 / 400) / np.sqrt(a.weight.size)
    assert np.all(a.bias == 0)


def test_same_seed_same_training_bitwise(rng):
    x, labels = batch(rng, n=32)

    def run():
        net = nn.mlp(5, 8, 3, 4, batch_norm=True, noisy_bn=True, seed=5)
        opt = nn.SGD(net.parameters(), 0.1, momentum=0.9)
        for step in range(5):
            net.resample_noise()
            nn.loss_and_gradient(net, x, labels)
            opt.step(net.gradients())
        return net.get_flat_params(), net.buffers()

    (w1, b1), (w2, b2) = run(), run()
    assert np.array_equal(w1, w2)
    for k in b1:
        for name in b1[k]:
            assert np.array_equal(b1[k][name], b2[k][name])


def test_standard_and_bn_nets_share_linear_weights():
    plain = nn.mlp(5, 6, 3, 4, seed=9)
    bn = nn.mlp(5, 6, 3, 4, batch_norm=True, seed=9)
    lin = lambda net: [l.weight for l in net.layers if isinstance(l, nn.Linear)]  # noqa: E731
    for a, b in zip(lin(plain), lin(bn)):
        assert np.array_equal(a, b)


def test_mlp_structure():
    net = nn.mlp(5, 6, 3, 3, batch_norm=True, noisy_bn=True)
    kinds = [type(l).__name__ for l in net.layers]
    assert kinds == ["Linear", "BatchNorm1d", "NoisyBN", "ReLU"] * 2 + ["Linear"]
    assert net.parameter_names() == ["0.weight", "1.weight", "1.bias", "4.weight", "5.weight",
                                     "5.bias", "8.weight", "8.bias"]
    # one group per Linear layer, holding its BN's gamma and beta
    assert net.layer_groups() == [(0, [0, 1, 2]), (3, [3, 4, 5]), (6, [6, 7])]
    plain = nn.mlp(5, 6, 3, 3)
    assert plain.layer_groups() == [(0, [0, 1]), (2, [2, 3]), (4, [4, 5])]


def test_sgd_matches_plain_update_rule(rng):
    params = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ref = [p.copy() for p in params]
    vel = [np.zeros_like(p) for p in params]
    opt = nn.SGD(params, 0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        grads = [rng.standard_normal(p.shape) for p in params]
        peeked = opt.peek(grads)
        for i in range(2):
            vel[i] = 0.9 * vel[i] + grads[i] + 0.01 * ref[i]
            ref[i] = ref[i] - 0.05 * vel[i]
        before = [p.copy() for p in params]
        opt.step(grads)
        for p, r, q in zip(params, ref, peeked):
            assert rel_err(p, r) < 1e-14
            assert np.array_equal(p, q)  # peek predicted the step exactly
        assert not any(np.array_equal(p, b) for p, b in zip(params, before))


def test_sgd_matches_pytorch(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is the optional cross-check")
    p = rng.standard_normal(5)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = nn.SGD([p], 0.1, momentum=0.8, weight_decay=0.001)
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.8, weight_decay=0.001)
    for _ in range(3):
        g = rng.standard_normal(5)
        opt.step([g])
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    assert rel_err(p, tp.detach().numpy()) < 1e-14


def test_flat_and_list_parameter_access(rng):
    net = nn.mlp(5, 6, 3, 4, batch_norm=True)
    params = net.parameters()
    flat = net.get_flat_params()
    assert flat.shape == (net.num_parameters(),)
    new = rng.standard_normal(flat.size)
    net.set_flat_params(new)
    assert np.array_equal(net.get_flat_params(), new)
    assert all(a is b for a, b in zip(params, net.parameters()))  # written in place
    saved = net.get_params()
    net.set_flat_params(np.zeros_like(new))
    net.set_params(saved)
    assert np.array_equal(net.get_flat_params(), new)
    with pytest.raises(ValueError, match=r"flat: expected shape"):
        net.set_flat_params(new[:-1])
    with pytest.raises(ValueError, match=r"values: expected"):
        net.set_params(saved[:-1])


def test_preserved_state_restores_everything(rng):
    x, labels = batch(rng)
    net = nn.mlp(5, 6, 3, 4, batch_norm=True)
    nn.loss_and_gradient(net, x, labels)
    params, grads, buffers = net.get_flat_params(), net.get_flat_grads(), net.buffers()
    with nn.preserved_state(net):
        net.set_flat_params(rng.standard_normal(params.size))
        nn.loss_and_gradient(net, x + 1.0, labels)
    assert np.array_equal(net.get_flat_params(), params)
    assert np.array_equal(net.get_flat_grads(), grads)
    after = net.buffers()
    for k in buffers:
        for name in buffers[k]:
            assert np.array_equal(np.asarray(after[k][name]), np.asarray(buffers[k][name]))


def test_noisy_bn_per_sample_forward_backward(rng):
    layer = nn.NoisyBN(6, seed=0)
    assert layer.noise == "per_sample"
    a = rng.standard_normal((4, 6))
    y = layer.forward(a)
    assert layer.scale.shape == layer.shift.shape == (4, 6)
    assert np.array_equal(y, a * layer.scale + layer.shift)
    # every activation of every sample has its own draw
    assert len(np.unique(layer.scale)) == 24 and len(np.unique(layer.shift)) == 24
    assert np.all(np.abs(layer.shift - layer.mu_t) <= 0.1)
    dy = rng.standard_normal((4, 6))
    assert np.array_equal(layer.backward(dy), dy * layer.scale)
    # fixed within a step (probes see one loss), new after resample
    assert np.array_equal(layer.forward(a), y)
    layer.resample()
    assert not np.array_equal(layer.forward(a), y)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 6\)"):
        layer.backward(dy[:3])
    layer.eval()
    assert np.array_equal(layer.forward(a), a * 1.125)
    with pytest.raises(ValueError, match=r"noise: expected one of"):
        nn.NoisyBN(6, noise="per_unit")


def test_noisy_bn_layer_forward_backward(rng):
    layer = nn.NoisyBN(6, seed=0, noise="per_step")
    a = rng.standard_normal((4, 6))
    y = layer.forward(a)
    assert np.array_equal(y, a * layer.scale + layer.shift)
    dy = rng.standard_normal((4, 6))
    assert np.array_equal(layer.backward(dy), dy * layer.scale)
    old = layer.shift.copy()
    layer.resample()
    assert not np.array_equal(old, layer.shift)
    # eval mode: the noise's expectation, E[s] = E[sigma_t] = 1.125 and E[m] = E[mu_t] = 0
    layer.eval()
    assert np.array_equal(layer.forward(a), a * 1.125)
    assert np.array_equal(layer.backward(dy), dy * 1.125)


def test_minibatches_cover_an_epoch_and_drop_the_remainder():
    batches = list(nn.minibatches(10, 3, np.random.default_rng(0)))
    assert [b.size for b in batches] == [3, 3, 3]
    assert len(np.unique(np.concatenate(batches))) == 9
    again = list(nn.minibatches(10, 3, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_load_digits_split():
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    x_tr, y_tr, x_te, y_te = nn.load_digits_split(test_fraction=0.25, seed=0)
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert set(np.unique(y_tr)) == set(range(10))
    assert np.allclose(x_tr.mean(axis=0), 0, atol=1e-12)
    stds = x_tr.std(axis=0)
    assert np.all((np.abs(stds - 1) < 1e-12) | (stds == 0))


def test_errors_name_the_argument(rng):
    with pytest.raises(TypeError, match=r"dtype: expected float32 or float64, got float16"):
        nn.Linear(3, 2, dtype=np.float16)
    with pytest.raises(ValueError, match=r"in_features: expected an int >= 1, got 0"):
        nn.Linear(0, 2)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 3\), got \(4, 2\)"):
        nn.Linear(3, 2).forward(np.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"x: expected a floating-point array, got dtype int"):
        nn.mlp(3, 4, 2, 3).forward(np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\)"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match=r"labels: expected an integer array"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"noisy_bn: expected batch_norm=True"):
        nn.mlp(3, 4, 2, 3, noisy_bn=True)
    with pytest.raises(ValueError, match=r"depth: expected an int >= 2, got 1"):
        nn.mlp(3, 4, 2, 1)
    with pytest.raises(ValueError, match=r"lr: expected a finite number > 0, got 0.0"):
        nn.SGD([np.zeros(2)], 0.0)
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\), got 1.0"):
        nn.SGD([np.zeros(2)], 0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"grads\[0\]: expected shape \(2,\), got \(3,\)"):
        nn.SGD([np.zeros(2)], 0.1).step([np.zeros(3)])
    with pytest.raises(ValueError, match=r"batch_size: expected an int >= 2, got 1"):
        list(nn.minibatches(10, 1, rng))


def test_inputs_are_not_modified(rng):
    x, labels = batch(rng)
    x0, labels0 = x.copy(), labels.copy()
    net = nn.mlp(5, 6, 3, 4, batch_norm=True, noisy_bn=True)
    logits = net.forward(x)
    dlogits = nn.softmax_cross_entropy(logits, labels)[1]
    d0 = dlogits.copy()
    net.backward(dlogits)
    assert np.array_equal(x, x0) and np.array_equal(labels, labels0)
    assert np.array_equal(dlogits, d0)


def test_failed_calls_change_nothing(rng):
    params = [rng.standard_normal(3), rng.standard_normal(2)]
    before = [p.copy() for p in params]
    opt = nn.SGD(params, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        opt.step([np.ones(3), np.ones(5)])  # the first array is fine: still nothing written
    assert all(np.array_equal(p, b) for p, b in zip(params, before))
    assert all(not v.any() for v in opt.velocity)
    net = nn.mlp(3, 4, 2, 3)
    w = net.get_flat_params()
    bad = net.get_params()
    bad[-1] = np.zeros(7)
    with pytest.raises(ValueError, match=r"values\[5\]: expected shape \(2,\), got \(7,\)"):
        net.set_params([p + 1 for p in bad[:-1]] + [bad[-1]])
    assert np.array_equal(net.get_flat_params(), w)
