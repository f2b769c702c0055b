"""Issue 18: each variant against PyTorch, where PyTorch can express it.

PyTorch ships none of these variants as an op (except the double backward, tested in
test_variants_double_backward.py and test_torch_module.py), so each reference here is
PyTorch's own batch norm applied the way the variant's definition says (per sub-batch, on a
reshaped view, on the gathered masked-in values) or autograd of the variant's formula written
in torch. Both are independent of fastbn's code. float64, so the tolerances are tight.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn  # noqa: E402
from fastbn import functional as F  # noqa: E402

TF = torch.nn.functional
TOL = dict(rtol=1e-10, atol=1e-11)


def _t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def _close(ours, theirs, what):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), **TOL, err_msg=what)


def _case(shape, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    return (rng.standard_normal(shape) * 1.7 + 0.4, rng.standard_normal(shape),
            rng.uniform(0.5, 1.5, C), rng.standard_normal(C))


def test_ghost_batches_are_torch_batch_norm_per_virtual_batch():
    x, dy, w, b = _case((12, 3, 5))
    v = 4
    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    yt = torch.cat([TF.batch_norm(c, None, None, wt, bt, training=True, eps=1e-5)
                    for c in xt.split(v)])
    gx, gw, gb = torch.autograd.grad(yt, (xt, wt, bt), _t(dy))
    y, mean, invstd = F.ghost_batch_norm_forward(x, w, b, virtual_batch_size=v)
    dx, dw, db = F.ghost_batch_norm_backward(dy, x, mean, invstd, w, virtual_batch_size=v)
    for ours, theirs, what in ((y, yt, "y"), (dx, gx, "dx"), (dw, gw, "dweight"),
                               (db, gb, "dbias")):
        _close(ours, theirs, what)


def test_ghost_layer_running_statistics_follow_torch_per_virtual_batch():
    """The layer's running statistics after one ghost step equal torch's after the same
    virtual batches, each batch's unbiased variance averaged: checked against the definition
    (mean over virtual batches of torch's per-batch statistics) with PyTorch's momentum."""
    x, _dy, _w, _b = _case((12, 3, 5), 1)
    bn = fastbn.BatchNorm(3, virtual_batch_size=4, dtype=np.float64)
    bn(x, training=True)
    chunks = _t(x).split(4)
    means = torch.stack([c.mean(dim=(0, 2)) for c in chunks])
    varsu = torch.stack([c.var(dim=(0, 2), unbiased=True) for c in chunks])
    _close(bn.running_mean, 0.1 * means.mean(0), "running_mean")
    _close(bn.running_var, 0.9 + 0.1 * varsu.mean(0), "running_var")


@pytest.mark.parametrize("axis, merged", [((1, 2), (6, 12, 5)), ((2, 3), None)])
def test_several_feature_axes_are_torch_batch_norm_on_the_merged_channels(axis, merged):
    """Statistics per (C, H): torch's batch norm on x viewed as (N, C*H, W) (or, for NHWC's
    (H, W), on the features moved to axis 1)."""
    shape = (6, 3, 4, 5) if merged else (6, 5, 3, 4)
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal(shape) + 0.3, rng.standard_normal(shape)
    fshape = tuple(shape[a] for a in axis)
    w, b = rng.uniform(0.5, 1.5, fshape), rng.standard_normal(fshape)
    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    C = int(np.prod(fshape))
    if merged:
        yt = TF.batch_norm(xt.reshape(merged), None, None, wt.reshape(C), bt.reshape(C),
                           training=True).reshape(shape)
    else:  # (N, W, H', W') with features (H', W'): move them first, merge, move back
        moved = xt.permute(0, 2, 3, 1).reshape(shape[0], C, shape[1])
        yt = TF.batch_norm(moved, None, None, wt.reshape(C), bt.reshape(C), training=True)
        yt = yt.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    gx, gw, gb = torch.autograd.grad(yt, (xt, wt, bt), _t(dy))
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    assert mean.shape == invstd.shape == dw.shape == fshape
    for ours, theirs, what in ((y, yt, "y"), (dx, gx, "dx"), (dw, gw, "dweight"),
                               (db, gb, "dbias")):
        _close(ours, theirs, what)


@pytest.mark.parametrize("axis", [1, -1])
def test_masked_statistics_are_torch_batch_norm_of_the_masked_in_values(axis):
    """Mean and variance: torch's batch norm statistics of the gathered True positions. y and
    every gradient: autograd of y = (x - mean_m) * rsqrt(var_m + eps) * w + b written in torch,
    with mean_m/var_m over the True positions only (Keras/Flax semantics)."""
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((5, 3, 7)) * 2 + 1, rng.standard_normal((5, 3, 7))
    mask = rng.random((5, 7)) < 0.6
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    if axis == -1:
        x, dy = np.ascontiguousarray(x.transpose(0, 2, 1)), np.ascontiguousarray(dy.transpose(0, 2, 1))
    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    xc = xt if axis == 1 else xt.transpose(1, 2)        # (N, C, L) view
    m = _t(mask)[:, None, :]
    n = m.sum()
    mean = (xc * m).sum(dim=(0, 2)) / n
    var = (((xc - mean[None, :, None]) ** 2) * m).sum(dim=(0, 2)) / n
    yc = (xc - mean[None, :, None]) * torch.rsqrt(var + 1e-5)[None, :, None] * wt[None, :, None] \
        + bt[None, :, None]
    yt = yc if axis == 1 else yc.transpose(1, 2)
    gathered = xc.detach().permute(1, 0, 2)[:, torch.tensor(mask)]   # (C, n) True values
    ref_mean, ref_var = gathered.mean(dim=1), gathered.var(dim=1, unbiased=False)
    gx, gw, gb = torch.autograd.grad(yt, (xt, wt, bt), _t(dy))
    y, mu, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, mask=mask)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mu, invstd, w, axis=axis, mask=mask)
    _close(mu, ref_mean, "mean")
    _close(1 / invstd ** 2 - 1e-5, ref_var, "var")
    for ours, theirs, what in ((y, yt, "y"), (dx, gx, "dx"), (dw, gw, "dweight"),
                               (db, gb, "dbias")):
        _close(ours, theirs, what)


def test_frozen_statistics_gradients_are_torch_autograd_of_the_formula():
    """Chainer's fixed_batch_normalization: every gradient, the statistics' included, from
    autograd of y = (x - mean) / sqrt(var + eps) * w + b in torch."""
    rng = np.random.default_rng(4)
    x, dy, w, b = _case((4, 3, 6), 4)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    ts = [_t(a, True) for a in (x, mean, var, w, b)]
    xt, mt, vt, wt, bt = ts
    yt = (xt - mt[None, :, None]) / torch.sqrt(vt + 1e-3)[None, :, None] * wt[None, :, None] \
        + bt[None, :, None]
    grads = torch.autograd.grad(yt, ts, _t(dy))
    y = F.fixed_batch_norm(x, mean, var, w, b, eps=1e-3)
    dx, dmean, dvar, dw, db = F.fixed_batch_norm_backward(dy, x, mean, var, w, eps=1e-3)
    _close(y, yt, "y")
    for ours, theirs, what in zip((dx, dmean, dvar, dw, db), grads,
                                  ("dx", "dmean", "dvar", "dweight", "dbias")):
        _close(ours, theirs, what)


def test_batch_renorm_is_torch_autograd_with_r_and_d_stopped():
    """Ioffe (2017) as Keras computes it: r and d from the clipped ratios, held constant
    (detached) in the backward; the batch statistics differentiated."""
    x, dy, w, b = _case((6, 3, 5), 5)
    rmean, rstd = np.array([0.1, 2.0, -1.0]), np.array([1.0, 0.3, 4.0])
    rmax, rmin, dmax, eps = 1.5, 0.5, 0.4, 1e-5
    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    mean = xt.mean(dim=(0, 2))
    std = torch.sqrt(xt.var(dim=(0, 2), unbiased=False) + eps)
    ref = torch.clamp(_t(rstd), min=np.sqrt(eps))
    r = torch.clamp(std / ref, rmin, rmax).detach()
    d = torch.clamp((mean - _t(rmean)) / ref, -dmax, dmax).detach()
    xhat = (xt - mean[None, :, None]) / std[None, :, None]
    yt = wt[None, :, None] * (xhat * r[None, :, None] + d[None, :, None]) + bt[None, :, None]
    gx, gw, gb = torch.autograd.grad(yt, (xt, wt, bt), _t(dy))
    y, mu, invstd, rr, dd = F.batch_renorm_forward(x, rmean, rstd, w, b, eps=eps, rmax=rmax,
                                                   rmin=rmin, dmax=dmax)
    dx, dw, db = F.batch_renorm_backward(dy, x, mu, invstd, rr, dd, w)
    assert np.any(rr == rmax) or np.any(rr == rmin), "the case should clip r somewhere"
    _close(rr, r, "r")
    _close(dd, d, "d")
    for ours, theirs, what in ((y, yt, "y"), (dx, gx, "dx"), (dw, gw, "dweight"),
                               (db, gb, "dbias")):
        _close(ours, theirs, what)
