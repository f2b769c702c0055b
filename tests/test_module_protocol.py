"""BatchNorm's module protocol and checkpoints both ways (issue 16): named parameters, buffers
and gradients, freezing, reset methods, a per-call training override, state dicts that PyTorch
loads and that load from a PyTorch model's dict by prefix."""
import numpy as np
import pytest

import fastbn
from fastbn import select_state_dict


def _x(shape=(8, 3, 4), seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return (1.0 + 2.0 * r.standard_normal(shape)).astype(dtype)


# --------------------------------------------------------------------------- protocol

def test_named_parameters_buffers_and_grads_are_the_layers_own():
    bn = fastbn.BatchNorm(3)
    params = dict(bn.named_parameters())
    assert list(params) == ["weight", "bias"]
    assert params["weight"] is bn.weight and params["bias"] is bn.bias
    assert [p is q for p, q in zip(bn.parameters(), params.values())] == [True, True]
    buffers = dict(bn.named_buffers(prefix="bn."))
    assert list(buffers) == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert buffers["bn.running_mean"] is bn.running_mean
    assert buffers["bn.num_batches_tracked"].dtype == np.int64
    assert dict(bn.named_grads()) == {"weight": None, "bias": None}
    bn(_x())
    bn.backward(_x(seed=1))
    grads = dict(bn.named_grads())
    assert grads["weight"] is bn.grad_weight and grads["bias"] is bn.grad_bias
    assert int(dict(bn.named_buffers())["num_batches_tracked"]) == 1


def test_names_match_pytorchs():
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm1d(3)
    bn = fastbn.BatchNorm(3)
    assert [n for n, _ in bn.named_parameters()] == [n for n, _ in tbn.named_parameters()]
    assert [n for n, _ in bn.named_buffers()] == [n for n, _ in tbn.named_buffers()]
    assert list(bn.state_dict()) == list(tbn.state_dict())
    plain = fastbn.BatchNorm(3, affine=False, track_running_stats=False)
    tplain = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    assert list(plain.named_parameters()) == list(tplain.named_parameters()) == []
    assert [n for n, _ in plain.named_buffers()] == [n for n, _ in tplain.named_buffers()]


def test_an_sgd_loop_over_named_parameters_trains_as_pytorch():
    torch = pytest.importorskip("torch")
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    tbn = torch.nn.BatchNorm1d(3).double()
    opt = torch.optim.SGD(tbn.parameters(), lr=0.1)
    for step in range(4):
        x, dy = _x(seed=step, dtype=np.float64), _x(seed=10 + step, dtype=np.float64)
        bn(x)
        bn.backward(dy)
        for (_name, p), (_n, g) in zip(bn.named_parameters(), bn.named_grads()):
            p -= 0.1 * g
        bn.zero_grad()
        opt.zero_grad()
        tbn(torch.from_numpy(x)).backward(torch.from_numpy(dy))
        opt.step()
    for name, p in bn.named_parameters():
        np.testing.assert_allclose(p, getattr(tbn, name).detach().numpy(), rtol=1e-12)


def test_a_frozen_layer_returns_dx_and_accumulates_nothing():
    bn = fastbn.BatchNorm(3)
    ref = fastbn.BatchNorm(3)
    x, dy = _x(), _x(seed=1)
    assert bn.requires_grad_(False) is bn and not bn.requires_grad
    bn(x)
    ref(x)
    assert np.array_equal(bn.backward(dy), ref.backward(dy))
    assert bn.grad_weight is None and bn.grad_bias is None
    assert "requires_grad=False" in repr(bn)
    bn.requires_grad_()
    bn.backward(dy)
    assert np.array_equal(bn.grad_weight, ref.grad_weight)
    with pytest.raises(TypeError, match="requires_grad: expected a bool"):
        bn.requires_grad_("no")


def test_reset_methods_as_pytorch():
    torch = pytest.importorskip("torch")
    bn = fastbn.BatchNorm(3)
    tbn = torch.nn.BatchNorm1d(3)
    bn.weight = [2.0, 3.0, 4.0]
    bn(_x())
    rm = bn.running_mean
    bn.reset_running_stats()
    tbn.reset_running_stats()
    assert bn.running_mean is rm and np.all(rm == 0) and np.all(bn.running_var == 1)
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked) == 0
    assert np.all(bn.weight == 2.0 * np.array([1, 1.5, 2]))  # parameters untouched
    bn.reset_parameters()
    assert np.all(bn.weight == 1) and np.all(bn.bias == 0)


def test_a_per_call_training_override_leaves_the_mode():
    bn = fastbn.BatchNorm(3).eval()
    x = _x()
    y = bn(x, training=True)
    assert bn.training is False and bn.num_batches_tracked == 1
    assert np.array_equal(y, fastbn.batch_norm_forward(x)[0])
    rm = bn.running_mean.copy()
    bn.train()
    y = bn(x, training=False)
    assert bn.training is True and bn.num_batches_tracked == 1
    assert np.array_equal(bn.running_mean, rm)
    assert np.array_equal(y, fastbn.batch_norm(x, bn.running_mean, bn.running_var))
    # the backward differentiates the call as it ran: the inference-mode gradient
    dy = _x(seed=2)
    inv = 1 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    np.testing.assert_allclose(bn.backward(dy), dy * inv[None, :, None], rtol=1e-6)
    with pytest.raises(TypeError, match="training: expected a bool"):
        bn(x, training="False")
    assert bn.num_batches_tracked == 1


# --------------------------------------------------------------------------- checkpoints

def test_a_fastbn_state_dict_loads_into_pytorch_after_one_line():
    torch = pytest.importorskip("torch")
    bn = fastbn.BatchNorm(3)
    for s in range(3):
        bn(_x(seed=s))
    tbn = torch.nn.BatchNorm1d(3)
    result = tbn.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    assert not result.missing_keys and not result.unexpected_keys
    assert int(tbn.num_batches_tracked) == 3
    bn.eval()
    tbn.eval()
    x = _x(seed=9)
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-6)


def test_a_layer_loads_its_keys_out_of_a_pytorch_models_dict_by_prefix():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    model.train()
    for s in range(2):
        model(torch.randn(4, 2, 5, 5))
    sd = model.state_dict()
    bn = fastbn.BatchNorm(3)
    assert bn.load_state_dict(sd, prefix="1.") == ([], [])
    assert bn.num_batches_tracked == 2
    np.testing.assert_array_equal(bn.running_mean, model[1].running_mean.numpy())
    sub = select_state_dict(sd, "1.")
    assert set(sub) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    fastbn.BatchNorm(3).load_state_dict(sub)
    with pytest.raises(ValueError, match=r"missing \['2.weight'"):
        fastbn.BatchNorm(3).load_state_dict(sd, prefix="2.")
    with pytest.raises(TypeError, match="prefix: expected a str"):
        bn.load_state_dict(sd, prefix=1)


def test_state_dict_prefix_and_destination_build_a_model_dict():
    a, b = fastbn.BatchNorm(3), fastbn.BatchNorm(4)
    d = a.state_dict(prefix="a.")
    assert b.state_dict(destination=d, prefix="b.") is d
    assert sorted(d) == sorted([f"{p}.{k}" for p in "ab" for k in
                                ("weight", "bias", "running_mean", "running_var",
                                 "num_batches_tracked")])
    assert b.load_state_dict(d, prefix="b.") == ([], [])


def test_a_version_1_checkpoint_without_num_batches_tracked_loads_as_in_pytorch():
    torch = pytest.importorskip("torch")
    bn, tbn = fastbn.BatchNorm(3), torch.nn.BatchNorm1d(3)
    bn(_x())
    tbn(torch.from_numpy(_x()))
    old = {k: v for k, v in torch.nn.BatchNorm1d(3).state_dict().items()
           if k != "num_batches_tracked"}
    assert bn.load_state_dict(old) == ([], [])  # strict
    tbn.load_state_dict(old)
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked) == 1  # kept, as torch


def test_sync_batch_norm_has_the_same_protocol():
    pytest.importorskip("mpi4py", reason="SyncBatchNorm needs mpi4py (the mpi extra)")
    from fastbn.distributed import SyncBatchNorm

    sbn = SyncBatchNorm(3)
    assert [n for n, _ in sbn.named_parameters()] == ["weight", "bias"]
    sbn.requires_grad_(False)
    sbn(_x(), training=True)
    sbn.backward(_x(seed=1))
    assert sbn.grad_weight is None
    assert sbn.num_batches_tracked == 1
