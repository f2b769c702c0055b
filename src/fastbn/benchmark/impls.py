"""The implementations the benchmark times, each as zero-argument callables on a row's arrays.

CPU (:func:`make_calls`): fastbn, PyTorch CPU (``torch.native_batch_norm`` and
``aten.native_batch_norm_backward``: what ``F.batch_norm`` and autograd call, minus the Python
layer), plain NumPy, and the floor probe (``fastbn._kernels.stream_copy``). All of them read
the very same memory: PyTorch gets ``torch.from_numpy`` views (channels-last rows as an NCHW
view with channels_last strides).

GPU (:func:`make_gpu_calls`): fastbn on CuPy arrays and PyTorch CUDA (cuDNN) on the same
device memory through DLPack; the floor is a device-to-device copy (:func:`copy_bandwidth`).

Allocation: by default every implementation allocates its outputs as a user's call does;
``reuse`` hands preallocated outputs to the forward ops of all three CPU implementations
(fastbn ``out=``, PyTorch's ``native_batch_norm.out``, NumPy ufunc ``out=``). fastbn's
backward has no ``out=``, so it allocates dx on every side in both modes.
"""
import gc
import os
import sys
import tracemalloc

import numpy as np

from .. import _kernels
from ..functional import batch_norm, batch_norm_backward, batch_norm_forward
from .suites import EPS, GHOST_BATCH, MOMENTUM, SEED, VARIANT_OPS
from .timing import cuda_event_clock

IMPLS = ("fastbn", "torch", "numpy")
GPU_IMPLS = ("fastbn", "torch")
PROBE = "copy"
GPU_MAX_LOOPS = 1 << 16  # calls per sample at most on the GPU


class RowData:
    """The arrays of one row, shared by every implementation (PyTorch views NumPy's memory)."""

    def __init__(self, row, torch=None):
        rng = np.random.default_rng(SEED)
        dt = row.dtype
        self.row = row
        self.axis = row.axis % len(row.shape)
        C = row.channels
        # Activation-like data: a mean away from 0 and a scale away from 1.
        self.x = (rng.standard_normal(row.shape, dtype=dt) * 2 + 0.5).astype(dt, copy=False)
        self.dy = rng.standard_normal(row.shape, dtype=dt)
        self.w = rng.uniform(0.5, 1.5, C).astype(dt)
        self.b = rng.standard_normal(C).astype(dt)
        self.y_relu, _, _ = batch_norm_forward(self.x, self.w, self.b, axis=self.axis,
                                               eps=EPS, activation="relu")
        _, self.mean, self.invstd = batch_norm_forward(self.x, self.w, self.b, axis=self.axis,
                                                       eps=EPS)
        # Inference uses the batch statistics as running statistics, so every side's output
        # is a real normalisation that the check can compare.
        self.rm_eval = self.mean.astype(dt)
        self.rv_eval = (1.0 / self.invstd**2 - EPS).astype(dt)
        self.axes = tuple(i for i in range(len(row.shape)) if i != self.axis)
        self.bshape = tuple(C if i == self.axis else 1 for i in range(len(row.shape)))
        # The probe copies x's bytes into a buffer whose pages are already touched.
        self.copy_src = self.x.reshape(-1).view(np.uint8)
        self.copy_dst = np.ones_like(self.copy_src)
        self.t = None if torch is None else _TorchData(self, torch)

    def to_row_layout(self, a):
        """A NumPy array in the row's layout from a PyTorch result (NCHW logical order)."""
        a = a.detach().numpy() if hasattr(a, "detach") else a
        return a.transpose(0, 2, 3, 1) if self.row.layout == "nhwc" else a


class _TorchData:
    def __init__(self, d, torch):
        def t(a):
            ta = torch.from_numpy(a)
            # The (N, H, W, C) array seen as NCHW *is* PyTorch's channels_last tensor: same
            # memory, no copy, so both libraries read the very same bytes.
            return ta.permute(0, 3, 1, 2) if d.row.layout == "nhwc" else ta

        self.x, self.dy, self.y_relu = t(d.x), t(d.dy), t(d.y_relu)
        if d.row.layout == "nhwc":
            assert self.x.is_contiguous(memory_format=torch.channels_last)
        self.w, self.b = torch.from_numpy(d.w), torch.from_numpy(d.b)
        self.rm_eval = torch.from_numpy(d.rm_eval.copy())
        self.rv_eval = torch.from_numpy(d.rv_eval.copy())
        _, self.save_mean, self.save_invstd = torch.native_batch_norm(
            self.x, self.w, self.b, None, None, True, MOMENTUM, EPS)


# --------------------------------------------------------------------------- implementations

def _fastbn_call(d, op, reuse):
    x, w, b, ax = d.x, d.w, d.b, d.axis
    out = np.ones_like(x) if reuse and op.startswith("fwd") else None
    if op in ("fwd-train", "fwd-relu"):
        act = "relu" if op == "fwd-relu" else None
        rm = np.zeros_like(w)
        rv = np.ones_like(w)
        return lambda: batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS,
                                  axis=ax, activation=act, out=out)
    if op == "fwd-eval":
        rm, rv = d.rm_eval, d.rv_eval
        return lambda: batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=ax, out=out)
    dy, mean, invstd = d.dy, d.mean, d.invstd
    if op == "bwd-relu":
        y = d.y_relu
        return lambda: batch_norm_backward(dy, x, mean, invstd, w, axis=ax, activation="relu",
                                           y=y)[0]
    return lambda: batch_norm_backward(dy, x, mean, invstd, w, axis=ax)[0]


def _torch_call(d, op, reuse, torch):
    # torch.native_batch_norm is the binding under F.batch_norm minus its Python layer: the
    # fastest way into PyTorch's CPU kernel, so the tiny rows compare against its best.
    t = d.t
    x, w, b = t.x, t.w, t.b
    bn = torch.native_batch_norm
    if op in ("fwd-train", "fwd-relu"):
        rm = torch.zeros_like(w)
        rv = torch.ones_like(w)
        if reuse:
            y, sm, si = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)
            bn_out = torch.ops.aten.native_batch_norm.out

            def fwd():
                return bn_out(x, w, b, rm, rv, True, MOMENTUM, EPS, out=y, save_mean=sm,
                              save_invstd=si)[0]
        else:
            def fwd():
                return bn(x, w, b, rm, rv, True, MOMENTUM, EPS)[0]
        if op == "fwd-train":
            return fwd
        # In place, as nn.ReLU(inplace=True) after a BatchNorm: no extra output for PyTorch.
        return lambda: torch.relu_(fwd())
    if op == "fwd-eval":
        rm, rv = t.rm_eval, t.rv_eval
        if reuse:
            y, sm, si = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)
            bn_out = torch.ops.aten.native_batch_norm.out
            return lambda: bn_out(x, w, b, rm, rv, False, MOMENTUM, EPS, out=y, save_mean=sm,
                                  save_invstd=si)[0]
        return lambda: bn(x, w, b, rm, rv, False, MOMENTUM, EPS)[0]
    bwd = torch.ops.aten.native_batch_norm_backward
    dy, sm, si = t.dy, t.save_mean, t.save_invstd
    mask = [True, True, True]
    if op == "bwd-relu":
        thr = torch.ops.aten.threshold_backward
        y = t.y_relu
        return lambda: bwd(thr(dy, y, 0), x, w, None, None, sm, si, True, EPS, mask)[0]
    return lambda: bwd(dy, x, w, None, None, sm, si, True, EPS, mask)[0]


def _numpy_call(d, op, reuse):
    # Plain vectorised NumPy, as a user would write it: single-threaded, temporaries included.
    x, axes, bs, dt = d.x, d.axes, d.bshape, d.row.dtype
    w, b = d.w.reshape(bs), d.b.reshape(bs)
    buf = np.ones_like(x) if reuse and op.startswith("fwd") else None
    if op in ("fwd-train", "fwd-relu"):
        relu = op == "fwd-relu"
        rm = np.zeros(d.row.channels, dt)
        rv = np.ones(d.row.channels, dt)
        n = x.size // d.row.channels

        def fwd():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            scale = w / np.sqrt(var + dt.type(EPS))
            y = np.subtract(x, mean, out=buf)
            y *= scale
            y += b
            if relu:
                np.maximum(y, 0, out=y)
            rm[:] = (1 - MOMENTUM) * rm + MOMENTUM * mean.reshape(-1)
            rv[:] = (1 - MOMENTUM) * rv + MOMENTUM * var.reshape(-1) * (n / (n - 1))
            return y
        return fwd
    if op == "fwd-eval":
        rm, rv = d.rm_eval, d.rv_eval

        def fwd_eval():
            # The O(C) coefficients are part of the call, as in the other libraries.
            scale = d.w / np.sqrt(rv + dt.type(EPS))
            shift = d.b - rm * scale
            y = np.multiply(x, scale.reshape(bs), out=buf)
            y += shift.reshape(bs)
            return y
        return fwd_eval
    dy = d.dy
    mean = d.mean.astype(dt).reshape(bs)
    invstd = d.invstd.astype(dt).reshape(bs)
    n = x.size // d.row.channels
    y = d.y_relu if op == "bwd-relu" else None

    def bwd():
        g = dy if y is None else np.where(y > 0, dy, dt.type(0))
        xhat = (x - mean) * invstd
        sum_g = g.sum(axis=axes, keepdims=True)
        sum_gx = (g * xhat).sum(axis=axes, keepdims=True)
        dx = xhat * (sum_gx / n)
        np.subtract(g, dx, out=dx)
        dx -= sum_g / n
        dx *= w * invstd
        return dx
    return bwd


def make_calls(d, op, impls, reuse, torch, nthreads):
    """{name: zero-argument callable} for the implementations and the floor probe."""
    calls = {}
    for name in impls:
        if name == "fastbn":
            calls[name] = _fastbn_call(d, op, reuse)
        elif name == "torch":
            calls[name] = _torch_call(d, op, reuse, torch)
        elif name == "numpy":
            calls[name] = _numpy_call(d, op, reuse)
    src, dst = d.copy_src, d.copy_dst
    calls[PROBE] = lambda: _kernels.stream_copy(src, dst, nthreads)
    return calls


# --------------------------------------------------------------------------- variants suite

def variant_axes(row):
    """The two adjacent feature axes of the several-axes rows: nchw (C, H), nhwc (W, C)."""
    return (2, 3) if row.layout == "nhwc" else (1, 2)


def make_variant_calls(d, ops):
    """{op: zero-argument callable} of the variants suite on a row's arrays (RowData)."""
    from .. import functional as F

    rng = np.random.default_rng(SEED + 1)
    x, dy, w, b, ax = d.x, d.dy, d.w, d.b, d.axis
    dt, C = d.row.dtype, d.row.channels
    mean, invstd = d.mean, d.invstd
    var = (1.0 / invstd**2 - EPS).astype(dt)
    mean_dt = mean.astype(dt)
    calls = {}
    for op in ops:
        if op not in VARIANT_OPS:
            raise ValueError(f"unknown variants op {op!r}")
    if "plain-fwd" in ops:
        calls["plain-fwd"] = lambda: F.batch_norm_forward(x, w, b, axis=ax, eps=EPS)
    if "plain-bwd" in ops:
        calls["plain-bwd"] = lambda: F.batch_norm_backward(dy, x, mean, invstd, w, axis=ax)
    if "fixed-fwd" in ops:
        calls["fixed-fwd"] = lambda: F.fixed_batch_norm(x, mean_dt, var, w, b, axis=ax, eps=EPS)
    if "fixed-bwd" in ops:
        calls["fixed-bwd"] = lambda: F.fixed_batch_norm_backward(dy, x, mean_dt, var, w,
                                                                 axis=ax, eps=EPS)
    if "renorm-fwd" in ops or "renorm-bwd" in ops:
        rmean = (mean + 0.1 * rng.standard_normal(C)).astype(dt)
        rstd = (np.sqrt(var) * rng.uniform(0.8, 1.25, C)).astype(dt)
        bounds = dict(rmax=3.0, rmin=1 / 3, dmax=5.0)
        _y, rm, ri, r, dd = F.batch_renorm_forward(x, rmean, rstd, w, b, axis=ax, eps=EPS,
                                                   **bounds)
        calls["renorm-fwd"] = lambda: F.batch_renorm_forward(x, rmean, rstd, w, b, axis=ax,
                                                             eps=EPS, **bounds)
        calls["renorm-bwd"] = lambda: F.batch_renorm_backward(dy, x, rm, ri, r, dd, w, axis=ax)
    if "ghost-fwd" in ops or "ghost-bwd" in ops:
        v = GHOST_BATCH
        _y, gm, gi = F.ghost_batch_norm_forward(x, w, b, virtual_batch_size=v, axis=ax, eps=EPS)
        calls["ghost-fwd"] = lambda: F.ghost_batch_norm_forward(x, w, b, virtual_batch_size=v,
                                                                axis=ax, eps=EPS)
        calls["ghost-bwd"] = lambda: F.ghost_batch_norm_backward(dy, x, gm, gi, w,
                                                                 virtual_batch_size=v, axis=ax)
    if "masked-fwd" in ops or "masked-bwd" in ops:
        mshape = tuple(s for i, s in enumerate(x.shape) if i != d.axis)
        mask = rng.random(mshape) < 0.8
        _y, mm, mi = F.batch_norm_forward(x, w, b, axis=ax, eps=EPS, mask=mask)
        calls["masked-fwd"] = lambda: F.batch_norm_forward(x, w, b, axis=ax, eps=EPS, mask=mask)
        calls["masked-bwd"] = lambda: F.batch_norm_backward(dy, x, mm, mi, w, axis=ax,
                                                            mask=mask)
    if "double-bwd" in ops:
        ddx = rng.standard_normal(x.shape).astype(dt)
        ddw = rng.standard_normal(C).astype(dt)
        ddb = rng.standard_normal(C).astype(dt)
        calls["double-bwd"] = lambda: F.batch_norm_double_backward(ddx, ddw, ddb, dy, x, mean,
                                                                   invstd, w, axis=ax)
    if "axes-fwd" in ops or "axes-bwd" in ops:
        axes = variant_axes(d.row)
        fshape = tuple(x.shape[a] for a in axes)
        aw = rng.uniform(0.5, 1.5, fshape).astype(dt)
        ab = rng.standard_normal(fshape).astype(dt)
        _y, am, ai = F.batch_norm_forward(x, aw, ab, axis=axes, eps=EPS)
        calls["axes-fwd"] = lambda: F.batch_norm_forward(x, aw, ab, axis=axes, eps=EPS)
        calls["axes-bwd"] = lambda: F.batch_norm_backward(dy, x, am, ai, aw, axis=axes)
    return {op: calls[op] for op in ops}


# --------------------------------------------------------------------------- checks

def check_outputs(d, op, calls):
    """Relative max difference of each implementation's main output (y or dx) from fastbn's.

    The bench times equivalent work only if the outputs agree; a mismatch is reported, never
    hidden.
    """
    ref = np.asarray(calls["fastbn"]())
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    errs = {}
    for name in ("torch", "numpy"):
        if name in calls:
            other = calls[name]()
            other = d.to_row_layout(other) if name == "torch" else np.asarray(other)
            errs[name] = float(np.max(np.abs(other.astype(np.float64) - ref))) / scale
    return errs


def check_tolerance(dtype):
    return 1e-3 if dtype == np.float32 else 1e-9


def peak_alloc_ratio(f, nbytes):
    """fastbn's peak extra allocation during one call, in units of |x| (tracemalloc).

    tracemalloc sees NumPy's data buffers; memory a C kernel mallocs itself is not counted.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = f()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        if started:
            tracemalloc.stop()
    return (peak - base) / nbytes



def probe_imbalance(nbytes, nthreads):
    """How much slower than an even split the stream_copy probe is (>= 1).

    stream_copy gives each thread one contiguous share of ceil(n / threads) bytes rounded up to
    64, and runs serially below 128 KiB (fastbn's parallel threshold), so the busiest thread
    copies min(n, share): 1.0 for rows of 128 KiB or more, `nthreads` for tiny rows. Where it
    is above 1 the probe understates the floor's bandwidth, and overstates %floor, by this factor.
    """
    if nbytes <= 0:
        return 1.0
    nt = nthreads if nbytes // 4 >= 32768 and nthreads > 1 else 1
    share = ((-(-nbytes // nt)) + 63) // 64 * 64
    busiest = min(nbytes, share)
    return busiest / (nbytes / nthreads)



def _import_torch(thp=False):
    if thp:
        # c10's CPU allocator reads this when it first allocates: it must be set before.
        if "torch" in sys.modules and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
            print("warning: --torch-thp: torch was already imported, the setting may not "
                  "take effect", file=sys.stderr)
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        import torch
    except ImportError:
        return None
    return torch



import_torch = _import_torch


# --------------------------------------------------------------------------- GPU (CuPy)

def torch_cuda():
    """PyTorch when it is installed with a usable CUDA device, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


class GpuRowData:
    """Device arrays of one suite row, shared by fastbn (CuPy) and PyTorch (DLPack views)."""

    def __init__(self, cp, row, torch=None):
        rng = np.random.default_rng(SEED)
        dt = row.dtype
        C = row.channels
        self.row = row
        self.axis = row.axis
        self.x = cp.asarray((0.5 + rng.standard_normal(row.shape)).astype(dt))
        self.dy = cp.asarray(rng.standard_normal(row.shape).astype(dt))
        self.w = cp.asarray((1 + 0.1 * rng.standard_normal(C)).astype(dt))
        self.b = cp.asarray((0.1 * rng.standard_normal(C)).astype(dt))
        self.rm = cp.zeros(C, dt)
        self.rv = cp.ones(C, dt)
        self.y, self.mean, self.invstd = batch_norm_forward(self.x, self.w, self.b,
                                                            axis=self.axis)
        self.yr = batch_norm_forward(self.x, self.w, self.b, axis=self.axis,
                                     activation="relu")[0]
        self.t = None
        if torch is not None:
            def t(a):
                v = torch.from_dlpack(a)
                # channels-last rows: the NCHW view of the NHWC memory (channels_last strides)
                if self.axis == -1 and v.dim() > 2:
                    v = v.permute(0, v.dim() - 1, *range(1, v.dim() - 1))
                return v
            self.t = {k: t(getattr(self, k)) for k in ("x", "dy", "w", "b", "rm", "rv")}


def _gpu_fastbn_call(d, op):
    x, w, b, ax = d.x, d.w, d.b, d.axis
    if op in ("fwd-train", "fwd-relu"):
        act = "relu" if op == "fwd-relu" else None
        return lambda: batch_norm(x, d.rm, d.rv, w, b, training=True, momentum=MOMENTUM,
                                  eps=EPS, axis=ax, activation=act)
    if op == "fwd-eval":
        return lambda: batch_norm(x, d.rm, d.rv, w, b, training=False, eps=EPS, axis=ax)
    if op == "bwd-train":
        return lambda: batch_norm_backward(d.dy, x, d.mean, d.invstd, w, axis=ax)
    if op == "bwd-relu":
        return lambda: batch_norm_backward(d.dy, x, d.mean, d.invstd, w, axis=ax,
                                           activation="relu", y=d.yr)
    raise ValueError(op)


def _gpu_torch_call(d, op, torch):
    # The backward is torch.autograd.grad on a retained graph: what a user's backward runs
    # (cuDNN's batch-norm backward, plus the ReLU's for the fused rows).
    F = torch.nn.functional
    t = d.t
    if op in ("fwd-train", "fwd-relu", "fwd-eval"):
        training = op != "fwd-eval"
        relu = op == "fwd-relu"

        def fwd():
            with torch.no_grad():
                y = F.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], training=training,
                                 momentum=MOMENTUM, eps=EPS)
                return F.relu(y) if relu else y
        return fwd
    x = t["x"].detach().requires_grad_(True)
    w = t["w"].detach().requires_grad_(True)
    b = t["b"].detach().requires_grad_(True)
    rm, rv = t["rm"].clone(), t["rv"].clone()
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
    if op == "bwd-relu":
        y = F.relu(y)
    dy = t["dy"]
    return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)


def make_gpu_calls(d, op, impls, torch):
    """{name: zero-argument callable} of the GPU implementations of one row and op."""
    calls = {"fastbn": _gpu_fastbn_call(d, op)}
    if "torch" in impls and torch is not None:
        calls["torch"] = _gpu_torch_call(d, op, torch)
    return calls


def copy_bandwidth(cp, nbytes, repeat=7):
    """Device-to-device copy bandwidth in bytes/s (read + write), median of repeats."""
    from .timing import time_round_robin

    n = max(int(nbytes) // 4, 1)
    src = cp.ones(n, cp.float32)
    dst = cp.empty_like(src)

    def copy():
        dst[...] = src
    samples = time_round_robin({"copy": copy}, repeat, 0.02, cuda_event_clock(cp),
                               max_loops=GPU_MAX_LOOPS)["copy"]
    del src, dst
    return 2 * 4 * n / float(np.median(samples))

