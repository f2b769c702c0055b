"""asv benchmarks of the GPU path: fastbn on CuPy arrays beside PyTorch CUDA (cuDNN) and a
device-to-device copy of the same bytes (the bandwidth floor), on the same device arrays.

Every cell is skipped (NotImplementedError in ``setup``) without CuPy, without a CUDA device,
for PyTorch cells without a CUDA build of PyTorch, and on commits of fastbn that predate the
GPU path (asv runs this file against older commits too, so it uses the public API only).

Timing: asv's wall-clock timer around one call plus a device synchronisation, so each sample
is the whole GPU time of the call (launch latency included; it matters only for small rows).
Both sides allocate their outputs from their caching allocators, as a user's call does.
"""
import numpy as np

import fastbn

EPS = 1e-5
MOMENTUM = 0.1
SEED = 1234

# NCHW shapes of the suite; "channels_last" is the same data as (N, H, W, C) with axis=-1.
SHAPES = {
    "32x64x56x56": (32, 64, 56, 56),
    "8x3x224x224": (8, 3, 224, 224),
    "256x64x32x32": (256, 64, 32, 32),   # 67 MB in float32: the >= 64 MB floor row
}


def _cupy():
    try:
        import cupy
    except ImportError:
        raise NotImplementedError("CuPy is not installed") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise NotImplementedError("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise NotImplementedError(f"no usable CUDA device ({exc})") from None
    return cupy


def _torch_cuda():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise NotImplementedError("this PyTorch has no CUDA")
    return torch


class _GpuCase:
    params = (["fastbn", "torch", "copy"], ["float32", "float64"],
              ["channels_first", "channels_last"], list(SHAPES))
    param_names = ["impl", "dtype", "layout", "shape"]
    timeout = 300
    op = None

    def setup(self, impl, dtype, layout, shape):
        cp = _cupy()
        self.sync = cp.cuda.Device().synchronize
        rng = np.random.default_rng(SEED)
        n, c, h, w = SHAPES[shape]
        nhwc = layout == "channels_last"
        host_shape = (n, h, w, c) if nhwc else (n, c, h, w)
        self.axis = -1 if nhwc else 1
        x = cp.asarray((0.5 + rng.standard_normal(host_shape)).astype(dtype))
        dy = cp.asarray(rng.standard_normal(host_shape).astype(dtype))
        wt = cp.asarray(rng.uniform(0.5, 1.5, c).astype(dtype))
        b = cp.asarray(rng.standard_normal(c).astype(dtype))
        rm, rv = cp.zeros(c, dtype), cp.ones(c, dtype)
        if impl == "copy":
            # the floor: one copy moves |x| in and |x| out; the ops move 1 to 2.5 times that
            dst = cp.empty_like(x)

            def call():
                dst[...] = x
        elif impl == "fastbn":
            call = self._fastbn(x, dy, wt, b, rm, rv)
        else:
            call = self._torch(_torch_cuda(), x, dy, wt, b, rm, rv, nhwc)
        try:
            call()
        except TypeError as exc:  # a fastbn from before the GPU path refuses CuPy input
            raise NotImplementedError(f"this fastbn has no GPU path ({exc})") from None
        self.sync()
        self.call = call

    def _fastbn(self, x, dy, w, b, rm, rv):
        ax = self.axis
        if self.op == "forward":
            return lambda: fastbn.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM,
                                             eps=EPS, axis=ax)
        if self.op == "forward_eval":
            return lambda: fastbn.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=ax)
        y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=ax)
        return lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=ax)

    def _torch(self, torch, x, dy, w, b, rm, rv, nhwc):
        F = torch.nn.functional

        def t(a):
            v = torch.from_dlpack(a)
            return v.permute(0, 3, 1, 2) if nhwc and v.dim() == 4 else v
        tx, tdy, tw, tb, trm, trv = (t(a) for a in (x, dy, w, b, rm, rv))
        if self.op in ("forward", "forward_eval"):
            training = self.op == "forward"

            def fwd():
                with torch.no_grad():
                    return F.batch_norm(tx, trm, trv, tw, tb, training=training,
                                        momentum=MOMENTUM, eps=EPS)
            return fwd
        xg, wg, bg = (a.detach().requires_grad_(True) for a in (tx, tw, tb))
        y = F.batch_norm(xg, trm.clone(), trv.clone(), wg, bg, training=True, momentum=MOMENTUM,
                         eps=EPS)
        return lambda: torch.autograd.grad(y, (xg, wg, bg), tdy, retain_graph=True)

    def time_call(self, *params):
        self.call()
        self.sync()


class GpuBatchNormForward(_GpuCase):
    """Training forward (statistics, normalise, running-stat update); floor 1.5 copies."""
    op = "forward"


class GpuBatchNormForwardEval(_GpuCase):
    """Inference forward with running statistics; floor 1 copy."""
    op = "forward_eval"


class GpuBatchNormBackward(_GpuCase):
    """Training backward (dx, dweight, dbias); floor 2.5 copies."""
    op = "backward"
