"""Issue 18, parameter options: Keras's center=/scale= beside affine, PyTorch's bias=False."""
import pickle

import numpy as np
import pytest

import fastbn


def ref_forward(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    m = x.mean(axis=(0, 2))[None, :, None]
    v = ((x - m) ** 2).mean(axis=(0, 2))[None, :, None]
    y = (x - m) / np.sqrt(v + eps)
    if w is not None:
        y = y * np.asarray(w, np.float64)[None, :, None]
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None]
    return y


@pytest.mark.parametrize("kw, names", [
    (dict(), ["weight", "bias"]),
    (dict(center=False), ["weight"]),
    (dict(bias=False), ["weight"]),
    (dict(scale=False), ["bias"]),
    (dict(scale=False, center=False), []),
    (dict(affine=False, scale=True), []),
])
def test_parameters_follow_the_switches(kw, names):
    rng = np.random.default_rng(0)
    bn = fastbn.BatchNorm(3, **kw)
    assert [n for n, _ in bn.named_parameters()] == names
    assert [n for n, _ in bn.named_grads()] == names
    assert [k for k in bn.state_dict() if k in ("weight", "bias")] == names
    assert (bn.weight is not None) == ("weight" in names) == bn.scale
    assert (bn.bias is not None) == ("bias" in names) == bn.center
    if bn.weight is not None:
        bn.weight = rng.uniform(0.5, 2, 3)
    if bn.bias is not None:
        bn.bias = rng.standard_normal(3)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    y = bn(x)
    np.testing.assert_allclose(y, ref_forward(x, bn.weight, bn.bias), atol=1e-5)
    bn.backward(np.ones_like(y))
    assert (bn.grad_weight is not None) == ("weight" in names)
    assert (bn.grad_bias is not None) == ("bias" in names)
    bn.zero_grad(set_to_none=False)
    assert (bn.grad_weight is not None) == ("weight" in names)
    # round trips: state dict (strict), pickle
    other = fastbn.BatchNorm(3, **kw)
    other.load_state_dict(bn.state_dict())
    clone = pickle.loads(pickle.dumps(bn))
    assert repr(clone) == repr(bn)
    np.testing.assert_array_equal(clone(x), other(x))


def test_missing_parameter_is_named_on_assignment():
    with pytest.raises(AttributeError, match="bias: this layer has none"):
        fastbn.BatchNorm(3, center=False).bias = np.zeros(3)
    with pytest.raises(AttributeError, match="weight: this layer has none"):
        fastbn.BatchNorm(3, scale=False).weight = np.zeros(3)


@pytest.mark.parametrize("name", ["center", "scale", "bias"])
def test_switches_must_be_bools(name):
    with pytest.raises(TypeError, match=name):
        fastbn.BatchNorm(3, **{name: "no"})


def test_repr_names_the_switches():
    assert repr(fastbn.BatchNorm(3, center=False)).endswith("center=False)")
    assert "scale=False" in repr(fastbn.BatchNorm(3, scale=False))


def test_matches_torch_bias_false():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    tb = torch.nn.BatchNorm2d(3, bias=False)
    bn = fastbn.BatchNorm(3, bias=False)
    with torch.no_grad():
        tb.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
    bn.weight = tb.weight.detach().numpy()
    xt = torch.tensor(x, requires_grad=True)
    yt = tb(xt)
    y = bn(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(bn.grad_weight, tb.weight.grad.numpy(), rtol=1e-4)
    assert sorted(bn.state_dict()) == sorted(k for k in tb.state_dict())
    bn2 = fastbn.BatchNorm(3, bias=False)
    bn2.load_state_dict({k: v for k, v in tb.state_dict().items()})
    np.testing.assert_allclose(bn2.weight, bn.weight)
