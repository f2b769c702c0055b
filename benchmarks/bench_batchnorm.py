"""asv benchmarks of batch norm: fastbn beside PyTorch and NumPy on the same arrays.

Every class is one operation; its parameters are the implementation, dtype, layout, shape and
thread count. The baselines live in the same grid (``impl``) so that one table shows the three
side by side and so that a slow machine shows up in the baselines too. Unavailable cells are
skipped by raising NotImplementedError in ``setup``: PyTorch not installed, NumPy at more than
one thread (its elementwise code is single-threaded).

This file uses fastbn's public API only: asv runs the benchmarks of the current checkout
against older commits (``asv continuous``), which lack private helpers added later.

Allocation: every call allocates its outputs, as a user's call does; the inputs are made in
``setup`` from a fixed seed, so their pages are touched before anything is timed.
``peakmem_`` is the peak RSS of the whole benchmark process: the inputs of ``setup`` (x and,
for the backward, dy and y) plus what the call allocates on top.
"""
import numpy as np

import fastbn

EPS = 1e-5
MOMENTUM = 0.1
SEED = 1234

# NCHW shapes; "channels_last" stores the same data as (N, H, W, C) and passes axis=-1.
# The grid stays small: asv starts a process per cell (a full run is ~40 cells per method).
SHAPES = {
    "32x64x56x56": (32, 64, 56, 56),   # 25.7 MB in float32: a ResNet stage, beyond L2
    "8x3x224x224": (8, 3, 224, 224),   # 3 channels: the hard channels-last case
}
TINY = (8, 16, 4, 4)                   # per-call overhead of the Python layer


def _torch():
    # Imported on demand: importing PyTorch takes seconds, and asv starts a fresh process
    # for every cell, so the fastbn and NumPy cells should not pay for it.
    try:
        import torch
    except ImportError:
        raise NotImplementedError("PyTorch is not installed") from None
    return torch


class _BatchNormCase:
    params = (["fastbn", "torch", "numpy"], ["float32", "float64"],
              ["channels_first", "channels_last"], list(SHAPES), [1, 2])
    param_names = ["impl", "dtype", "layout", "shape", "n_threads"]
    timeout = 300
    op = None  # set by each operation's class

    def setup(self, impl, dtype, layout, shape, n_threads):
        if impl == "numpy" and n_threads != 1:
            raise NotImplementedError("NumPy's elementwise code is single-threaded")
        fastbn.set_num_threads(n_threads)
        if impl == "torch":
            _torch().set_num_threads(n_threads)
        self.call = _make_call(self.op, impl, np.dtype(dtype), layout, SHAPES[shape])
        self.call()  # first call: warms the allocator, caches and thread pool

    def teardown(self, *params):
        fastbn.set_num_threads(None)


class _Arrays:
    """Inputs of one case, deterministic, in the layout fastbn receives."""

    def __init__(self, dtype, layout, shape):
        rng = np.random.default_rng(SEED)
        if layout == "channels_last":
            n, c, h, w = shape
            shape = (n, h, w, c)
        self.nhwc = layout == "channels_last"
        self.axis = -1 if self.nhwc else 1
        C = shape[self.axis]
        self.x = (rng.standard_normal(shape, dtype=dtype) * 2 + 0.5).astype(dtype, copy=False)
        self.dy = rng.standard_normal(shape, dtype=dtype)
        self.w = rng.uniform(0.5, 1.5, C).astype(dtype)
        self.b = rng.standard_normal(C).astype(dtype)
        self.rm = np.zeros(C, dtype)
        self.rv = np.ones(C, dtype)
        self.axes = tuple(i for i in range(len(shape)) if i != self.axis % len(shape))
        self.bshape = tuple(C if i not in self.axes else 1 for i in range(len(shape)))


def _make_call(op, impl, dtype, layout, shape):
    a = _Arrays(dtype, layout, shape)
    relu = op.endswith("relu")
    if op.startswith("bwd"):
        # The forward's saved state, computed once: the backward times the backward only.
        y, a.mean, a.invstd = fastbn.batch_norm_forward(a.x, a.w, a.b, axis=a.axis, eps=EPS,
                                                        activation="relu" if relu else None)
        a.y = y if relu else None
    return {"fastbn": _fastbn, "torch": _pytorch, "numpy": _numpy}[impl](op, a, relu)


def _fastbn(op, a, relu):
    x, w, b, rm, rv, ax = a.x, a.w, a.b, a.rm, a.rv, a.axis
    act = "relu" if relu else None
    if op.startswith("fwd-train"):
        return lambda: fastbn.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM,
                                         eps=EPS, axis=ax, activation=act)
    if op == "fwd-eval":
        return lambda: fastbn.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=ax)
    dy, mean, invstd, y = a.dy, a.mean, a.invstd, a.y
    return lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=ax, activation=act,
                                              y=y)


def _pytorch(op, a, relu):
    torch = _torch()

    def t(arr):
        ta = torch.from_numpy(arr)
        # (N, H, W, C) memory seen as NCHW is PyTorch's channels_last tensor, without a copy.
        return ta.permute(0, 3, 1, 2) if a.nhwc else ta

    x, w, b = t(a.x), torch.from_numpy(a.w), torch.from_numpy(a.b)
    rm, rv = torch.from_numpy(a.rm), torch.from_numpy(a.rv)
    if op.startswith("fwd"):
        training = op != "fwd-eval"

        def fwd():
            y = torch.native_batch_norm(x, w, b, rm, rv, training, MOMENTUM, EPS)[0]
            # In place, as nn.ReLU(inplace=True): no second output for PyTorch.
            return torch.relu_(y) if relu else y
        return fwd
    dy = t(a.dy)
    _, sm, si = torch.native_batch_norm(x, w, b, None, None, True, MOMENTUM, EPS)
    bwd = torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]
    if relu:
        y = t(a.y)
        thr = torch.ops.aten.threshold_backward
        return lambda: bwd(thr(dy, y, 0), x, w, None, None, sm, si, True, EPS, mask)
    return lambda: bwd(dy, x, w, None, None, sm, si, True, EPS, mask)


def _numpy(op, a, relu):
    # Plain vectorised NumPy, as a user would write it.
    x, axes, bs, dt = a.x, a.axes, a.bshape, a.x.dtype
    w, b = a.w.reshape(bs), a.b.reshape(bs)
    eps = dt.type(EPS)
    if op.startswith("fwd-train"):
        def fwd_train():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            y = x - mean
            y *= w / np.sqrt(var + eps)
            y += b
            if relu:
                np.maximum(y, 0, out=y)
            return y
        return fwd_train
    if op == "fwd-eval":
        rm, rv = a.rm.reshape(bs), a.rv.reshape(bs)

        def fwd_eval():
            scale = w / np.sqrt(rv + eps)
            y = x * scale
            y += b - rm * scale
            return y
        return fwd_eval
    dy, y = a.dy, a.y
    mean = a.mean.astype(dt).reshape(bs)
    invstd = a.invstd.astype(dt).reshape(bs)
    n = x.size // x.shape[a.axis]

    def bwd():
        g = dy if y is None else np.where(y > 0, dy, dt.type(0))
        xhat = (x - mean) * invstd
        sum_g = g.sum(axis=axes, keepdims=True)
        sum_gx = (g * xhat).sum(axis=axes, keepdims=True)
        dx = g - sum_g / n
        dx -= xhat * (sum_gx / n)
        dx *= w * invstd
        return dx, sum_gx, sum_g
    return bwd


class BatchNormForwardTrain(_BatchNormCase):
    """Training forward: batch statistics, normalise, update the running statistics."""
    op = "fwd-train"

    def time_forward_train(self, *params):
        self.call()

    def peakmem_forward_train(self, *params):
        self.call()


class BatchNormForwardEval(_BatchNormCase):
    """Inference forward with running statistics."""
    op = "fwd-eval"

    def time_forward_eval(self, *params):
        self.call()

    def peakmem_forward_eval(self, *params):
        self.call()


class BatchNormBackward(_BatchNormCase):
    """Training backward: dx, dweight, dbias."""
    op = "bwd-train"

    def time_backward(self, *params):
        self.call()

    def peakmem_backward(self, *params):
        self.call()


class BatchNormForwardTrainReLU(_BatchNormCase):
    """Training forward with ReLU (fused in fastbn; in-place relu_ after it in PyTorch)."""
    op = "fwd-train-relu"

    def time_forward_train_relu(self, *params):
        self.call()

    def peakmem_forward_train_relu(self, *params):
        self.call()


class BatchNormBackwardReLU(_BatchNormCase):
    """Training backward through ReLU (gradient where the forward's output is > 0)."""
    op = "bwd-relu"

    def time_backward_relu(self, *params):
        self.call()

    def peakmem_backward_relu(self, *params):
        self.call()


class FastbnExtraAllocation:
    """fastbn's peak allocation beyond its inputs during one call, in units of |x|.

    tracemalloc sees NumPy's data buffers: the forward should allocate y plus O(C) (~1.0),
    the backward dx plus O(C) (~1.0). Memory a C kernel mallocs itself is not counted.
    """
    params = (["fwd-train", "fwd-eval", "bwd-train", "fwd-train-relu", "bwd-relu"],
              ["channels_first", "channels_last"])
    param_names = ["op", "layout"]
    unit = "|x|"

    def setup(self, op, layout):
        self.call = _make_call(op, "fastbn", np.dtype("float32"), layout, SHAPES["32x64x56x56"])
        self.nbytes = 32 * 64 * 56 * 56 * 4
        self.call()

    def track_extra_allocation(self, op, layout):
        import gc
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            result = self.call()
            peak = tracemalloc.get_traced_memory()[1]
            del result
        finally:
            tracemalloc.stop()
        return (peak - base) / self.nbytes


class MemoryFloor:
    """The floor probe of `python -m fastbn bench`: an OpenMP memcpy of |x| bytes.

    A training forward's floor is 1.5 of these copies, inference 1, a backward 2.5. Skipped at
    commits whose kernels lack ``stream_copy``.
    """
    params = (["float32", "float64"], list(SHAPES), [1, 2])
    param_names = ["dtype", "shape", "n_threads"]

    def setup(self, dtype, shape, n_threads):
        from fastbn import _kernels

        if not hasattr(_kernels, "stream_copy"):
            raise NotImplementedError("fastbn._kernels.stream_copy is not in this commit")
        nbytes = int(np.prod(SHAPES[shape])) * np.dtype(dtype).itemsize
        self.src = np.random.default_rng(SEED).integers(0, 255, nbytes, dtype=np.uint8)
        self.dst = np.ones_like(self.src)  # pages touched
        self.copy = _kernels.stream_copy
        self.n_threads = n_threads
        self.copy(self.src, self.dst, n_threads)

    def time_stream_copy(self, dtype, shape, n_threads):
        self.copy(self.src, self.dst, self.n_threads)


class BatchNormCallOverhead:
    """Every op on a tiny float32 NCHW array at one thread: the cost of the Python layer."""
    params = (["fastbn", "torch", "numpy"],
              ["fwd-train", "fwd-eval", "bwd-train", "fwd-train-relu", "bwd-relu"])
    param_names = ["impl", "op"]

    def setup(self, impl, op):
        fastbn.set_num_threads(1)
        if impl == "torch":
            _torch().set_num_threads(1)
        self.call = _make_call(op, impl, np.dtype("float32"), "channels_first", TINY)
        self.call()

    def teardown(self, *params):
        fastbn.set_num_threads(None)

    def time_call(self, impl, op):
        self.call()
