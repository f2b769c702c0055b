"""``python -m fastbn bench``: fastbn, PyTorch and NumPy side by side against a measured floor.

One process times every implementation on the same arrays, interleaved: within each repeat the
implementations (and the floor probe) take turns, the starting one rotating, so that a slow
phase of a shared machine lands on all of them instead of on one. Each sample runs enough calls
to last ``--sample-ms``; a row's time is the median sample per call, its spread the
interquartile range over the median.

The floor of a row is measured in the same rounds: ``fastbn._kernels.stream_copy`` (an OpenMP
memcpy, one equal contiguous share per thread) copies |x| bytes with the row's thread count, and the op's traffic is
counted in copies of x (one copy reads |x| and writes |x|): training forward 1.5 (x read twice,
y written), inference 1, backward 2.5 (x and dy read twice, dx written), the ReLU variants as
their base op (the fused backward also reads y, so its floor share is a conservative figure).

Allocation: by default every implementation allocates its outputs as a user's call does;
``--reuse`` hands preallocated outputs to the forward ops of all three (fastbn ``out=``,
PyTorch's ``native_batch_norm.out``, NumPy ufunc ``out=``). The backward has no ``out=`` in
fastbn, so it allocates dx on every side in both modes.

The public entry point is :func:`main`; ``python -m fastbn bench [options]`` calls it.
"""
import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

from . import _kernels
from ._threads import openmp_enabled, set_num_threads
from .functional import batch_norm, batch_norm_backward, batch_norm_forward

EPS = 1e-5
MOMENTUM = 0.1
SEED = 1234
MB = 1e6                      # decimal: "rows of >= 1 MB" in the issue
FLOOR_TARGET = 0.75           # share of the floor every row of >= 1 MB should reach
FLOOR_MIN_BYTES = 1 * MB
SCALING_MIN_BYTES = 16 * MB   # rows on which 2 threads should be >= 1.6x faster than 1
SCALING_TARGET = 1.6
TINY_BYTES = 64 * 1024        # rows where the per-call cost of the Python layer dominates

# Traffic of each op in copies of x (a copy reads |x| and writes |x| bytes), see the docstring.
OPS = {
    "fwd-train": (1.5, "training forward: batch statistics, normalise, running-stat update"),
    "fwd-eval": (1.0, "inference forward with running statistics"),
    "bwd-train": (2.5, "training backward: dx, dweight, dbias"),
    "fwd-relu": (1.5, "training forward with fused ReLU"),
    "bwd-relu": (2.5, "training backward through ReLU (y read as the mask)"),
}
IMPLS = ("fastbn", "torch", "numpy")
PROBE = "copy"


# --------------------------------------------------------------------------- suite

class Row:
    """One array shape of the suite: layout nc/nchw/nhwc, the shape fastbn receives, dtype."""

    __slots__ = ("layout", "shape", "dtype", "tags")

    def __init__(self, layout, shape, dtype="float32", tiny=False):
        self.layout = layout
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        tags = {layout, {"float32": "f32", "float64": "f64"}[self.dtype.name]}
        tags.add("tiny" if tiny else ("large" if self.nbytes >= FLOOR_MIN_BYTES else "small"))
        self.tags = frozenset(tags)

    @property
    def axis(self):
        # Channels-last rows are given as the (N, H, W, C) array with axis=-1.
        return -1 if self.layout == "nhwc" else 1

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def name(self):
        short = {"float32": "f32", "float64": "f64"}[self.dtype.name]
        return f"{self.layout}-{'x'.join(map(str, self.shape))}-{short}"


def _nhwc(n, c, h, w):
    return (n, h, w, c)


_NCHW = [(32, 64, 56, 56), (128, 256, 14, 14), (8, 3, 224, 224), (256, 64, 32, 32),
         (16, 512, 7, 7)]

SUITE = (
    [Row("nc", s) for s in [(256, 1024), (4096, 1024), (65536, 64), (64, 4096)]]
    + [Row("nchw", s) for s in _NCHW]
    + [Row("nhwc", _nhwc(*s)) for s in _NCHW]
    + [Row("nchw", (32, 64, 56, 56), "float64"), Row("nc", (4096, 1024), "float64")]
    + [Row("nc", (32, 16), tiny=True), Row("nchw", (8, 16, 4, 4), tiny=True)]
)
SUBSETS = ("all", "nc", "nchw", "nhwc", "f32", "f64", "tiny", "large", "small")


# --------------------------------------------------------------------------- ResNet-50 suite

RESNET50_BATCH = 16
RESNET50_OPS = ("fwd-train", "bwd-train", "fwd-eval")  # training step = the first two


def resnet50_layers(batch=RESNET50_BATCH):
    """The 53 batch-norm layers of torchvision's ``resnet50`` on 224x224 inputs, forward order.

    [(module name, (N, C, H, W))], written out from the architecture (torchvision is not
    needed): the stem's bn1 at 112x112 (after the stride-2 7x7 conv; the max pool then halves
    to 56x56), then layer1..layer4 of [3, 4, 6, 3] Bottleneck blocks of widths 64/128/256/512,
    expansion 4. ResNet v1.5, as torchvision: the stride 2 of the first block of layers 2-4 is
    on conv2 (the 3x3), so bn1 sees the block's input resolution and bn2, bn3 and the
    downsample's bn (``downsample.1``, first block of each layer) the output resolution.
    """
    layers = [("bn1", (batch, 64, 112, 112))]
    res = 56
    for li, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for bi in range(blocks):
            out = res // 2 if (bi == 0 and li > 1) else res
            name = f"layer{li}.{bi}."
            layers.append((name + "bn1", (batch, width, res, res)))
            layers.append((name + "bn2", (batch, width, out, out)))
            layers.append((name + "bn3", (batch, 4 * width, out, out)))
            if bi == 0:
                layers.append((name + "downsample.1", (batch, 4 * width, out, out)))
            res = out
    return layers


class NetRow(Row):
    """A distinct layer shape of a network: timed once, counted ``count`` times in its sums."""

    __slots__ = ("net", "nchw", "count", "layers")

    def __init__(self, net, layout, nchw, layers, dtype="float32"):
        super().__init__(layout, _nhwc(*nchw) if layout == "nhwc" else nchw, dtype)
        self.tags = self.tags | {net}
        self.net = net
        self.nchw = tuple(nchw)
        self.layers = tuple(layers)
        self.count = len(self.layers)


def _net_rows(net, layers):
    by_shape = {}
    for name, shape in layers:  # first appearance keeps the network's order
        by_shape.setdefault(tuple(shape), []).append(name)
    return tuple(NetRow(net, layout, shape, names)
                 for layout in ("nchw", "nhwc") for shape, names in by_shape.items())


RESNET50_LAYERS = tuple(resnet50_layers())
RESNET50 = _net_rows("resnet50", RESNET50_LAYERS)
SUITES = {"shapes": SUITE, "resnet50": RESNET50}


def select_rows(subset="all", patterns=None, suite="shapes"):
    """Rows of ``suite`` in the tag group ``subset`` whose name contains one of ``patterns``."""
    rows = [r for r in SUITES[suite] if subset == "all" or subset in r.tags]
    if patterns:
        rows = [r for r in rows if any(p in r.name for p in patterns)]
    return rows


# --------------------------------------------------------------------------- arrays of one row

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


# --------------------------------------------------------------------------- timing

def _loops_for(f, min_sample):
    """Calls per sample so that a sample lasts about ``min_sample`` seconds."""
    f()  # first call: touches output pages, warms caches and the allocator
    k = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        dt = time.perf_counter() - t0
        if dt >= min_sample / 4 or k >= 1 << 20:
            return max(1, min(1 << 20, math.ceil(k * min_sample / max(dt, 1e-9))))
        k *= 8


def time_round_robin(calls, repeat, min_sample):
    """Per-call times {name: [repeat samples]}; in each repeat every callable takes a turn."""
    names = list(calls)
    loops = {n: _loops_for(calls[n], min_sample) for n in names}
    samples = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeat):
            s = r % len(names)
            for n in names[s:] + names[:s]:
                f, k = calls[n], loops[n]
                t0 = time.perf_counter()
                for _ in range(k):
                    f()
                samples[n].append((time.perf_counter() - t0) / k)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summarize(samples):
    a = np.asarray(samples)
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "iqr_rel": float((q75 - q25) / med) if med > 0 else 0.0,
            "min": float(a.min()), "samples": [float(v) for v in a]}


# --------------------------------------------------------------------------- machine

def cpu_model():
    """The CPU's model name: /proc/cpuinfo, else lscpu, else platform.

    /proc/cpuinfo's family and model numbers follow the name: a virtual machine may show a
    bare "AMD EPYC", which the numbers pin down (family 26 = Zen 5).
    """
    try:
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
        if fields.get("model name"):
            fam, mod = fields.get("cpu family"), fields.get("model")
            return fields["model name"] + (f" (family {fam} model {mod})"
                                           if fam and mod is not None else "")
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cache_sizes():
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            p = os.path.join(base, entry)
            try:
                with open(os.path.join(p, "level")) as f:
                    level = f.read().strip()
                with open(os.path.join(p, "type")) as f:
                    kind = f.read().strip()
                with open(os.path.join(p, "size")) as f:
                    size = f.read().strip()
            except OSError:
                continue
            if kind in ("Data", "Unified"):
                sizes[f"L{level}"] = size
    except OSError:
        pass
    return sizes


def _openmp_libraries():
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "libgomp" in line or "libomp" in line or "libiomp" in line})
    except OSError:
        return []


def kernels_cpu_level():
    """``fastbn._kernels.cpu_level()`` (the instruction-set level the kernels run, e.g.
    "x86-64-v4") where this build has it, else None."""
    f = getattr(_kernels, "cpu_level", None)
    if f is None:
        return None
    try:
        level = f() if callable(f) else f
    except Exception as e:  # a report, not a failure: say what went wrong
        return f"error ({type(e).__name__}: {e})"
    return None if level is None else str(level)


def machine_info(torch):
    return {
        "cpu": cpu_model(),
        "kernels_cpu_level": kernels_cpu_level(),
        "logical_cpus": os.cpu_count(),
        "caches": _cache_sizes(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "fastbn_openmp": openmp_enabled(),
        "openmp_libraries": _openmp_libraries(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "transparent_hugepages": _thp_mode(),
        "numpy_madvise_hugepage": _numpy_madvise_hugepage(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "load_average_start": _load_average(),
    }


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def _numpy_madvise_hugepage():
    # NumPy asks for huge pages on its large allocations (fewer page faults on a fresh output);
    # PyTorch's CPU allocator does only with THP_MEM_ALLOC_ENABLE=1.
    try:
        from numpy._core.multiarray import _get_madvise_hugepage
    except ImportError:
        try:
            from numpy.core.multiarray import _get_madvise_hugepage
        except ImportError:
            return None
    return bool(_get_madvise_hugepage())


def _load_average():
    # Other processes on the cores make multithreaded timings swing: say how busy it was.
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- run

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


class _Progress:
    def __init__(self, total, stream=None):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()

    def step(self, text):
        self.done += 1
        el = time.perf_counter() - self.t0
        line = f"[{self.done:4d}/{self.total}] {el:6.1f}s {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def run(rows, ops, threads, impls, repeat, min_sample, reuse, torch, progress=None):
    """Measure every (row, thread count, op); returns a list of result dicts."""
    results = []
    for row in rows:
        d = RowData(row, torch if "torch" in impls else None)
        numpy_times = {}
        for ti, nt in enumerate(threads):
            set_num_threads(nt)
            if torch is not None:
                torch.set_num_threads(nt)
            # NumPy's elementwise code is single-threaded: measured at the first thread count
            # only and shown with the others.
            run_impls = [i for i in impls if i != "numpy" or ti == 0]
            for op in ops:
                if progress is not None:
                    progress.step(f"{row.name} t={nt} {op}")
                calls = make_calls(d, op, run_impls, reuse, torch, nt)
                res = {"row": row.name, "layout": row.layout, "shape": list(row.shape),
                       "axis": row.axis, "dtype": row.dtype.name, "bytes": row.nbytes,
                       "op": op, "threads": nt}
                if ti == 0:
                    res["check"] = check_outputs(d, op, calls)
                    res["alloc_x"] = peak_alloc_ratio(calls["fastbn"], row.nbytes)
                    # What is left beyond the outputs of x's size: O(C) bookkeeping and
                    # Python objects (KiB), or a hidden temporary (MB).
                    outputs = 0 if reuse and op.startswith("fwd") else 1
                    res["alloc_extra_bytes"] = (res["alloc_x"] - outputs) * row.nbytes
                samples = time_round_robin(calls, repeat, min_sample)
                times = {n: summarize(s) for n, s in samples.items()}
                if "numpy" in times:
                    numpy_times[op] = times["numpy"]
                elif op in numpy_times:
                    times["numpy"] = dict(numpy_times[op], threads=threads[0])
                res["times"] = times
                _derive(res)
                results.append(res)
            del calls
        del d
        gc.collect()
    # Carry the once-per-row fields to the other thread counts of the same (row, op).
    first = {(r["row"], r["op"]): r for r in results if "check" in r}
    for r in results:
        src = first[(r["row"], r["op"])]
        r.setdefault("check", src["check"])
        r.setdefault("alloc_x", src["alloc_x"])
        r.setdefault("alloc_extra_bytes", src["alloc_extra_bytes"])
    return results


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


def _derive(res):
    copies = OPS[res["op"]][0]
    res["probe_imbalance"] = probe_imbalance(res["bytes"], res["threads"])
    t = res["times"]
    fb = t["fastbn"]["median"]
    cp = t[PROBE]["median"]
    traffic = copies * 2 * res["bytes"]
    res["traffic_bytes"] = traffic
    res["fastbn_gbps"] = traffic / fb / 1e9
    res["floor_gbps"] = 2 * res["bytes"] / cp / 1e9
    res["floor_s"] = copies * cp
    res["floor_share"] = copies * cp / fb
    res["torch_over_fastbn"] = t["torch"]["median"] / fb if "torch" in t else None


# --------------------------------------------------------------------------- report

def _fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.3g}ms"
    return f"{s:.3g}s"


def _geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(results, threads):
    """Aggregate figures of the issue's targets."""
    out = {"speedup_geomean": {}, "floor": {}, "slower_than_torch": [], "below_floor": [],
           "scaling": [], "tiny": [], "alloc_max": {}, "check_failures": []}
    for nt in threads:
        for op in OPS:
            rs = [r for r in results if r["threads"] == nt and r["op"] == op]
            if not rs:
                continue
            g = _geomean([r["torch_over_fastbn"] for r in rs])
            out["speedup_geomean"][f"{op} t={nt}"] = g
            big = [r for r in rs if r["bytes"] >= FLOOR_MIN_BYTES]
            ok = [r for r in big if r["floor_share"] >= FLOOR_TARGET]
            out["floor"][f"{op} t={nt}"] = [len(ok), len(big)]
    for r in results:
        tag = f"{r['row']} {r['op']} t={r['threads']}"
        if r["torch_over_fastbn"] is not None and r["torch_over_fastbn"] < 1:
            out["slower_than_torch"].append([tag, r["torch_over_fastbn"]])
        if r["bytes"] >= FLOOR_MIN_BYTES and r["floor_share"] < FLOOR_TARGET:
            out["below_floor"].append([tag, r["floor_share"]])
        if r["bytes"] < TINY_BYTES:
            out["tiny"].append([tag, r["times"]["fastbn"]["median"],
                                r["times"].get("torch", {}).get("median")])
        tol = check_tolerance(np.dtype(r["dtype"]))
        bad = {k: v for k, v in r["check"].items() if not v <= tol}
        if bad and r["threads"] == threads[0]:
            out["check_failures"].append([f"{r['row']} {r['op']}", bad])
    for op in OPS:
        rs = [r for r in results if r["op"] == op]
        # Python objects weigh more than the data of a tiny row: judge on the large ones.
        rs = [r for r in rs if r["bytes"] >= FLOOR_MIN_BYTES] or rs
        if rs:
            worst = max(rs, key=lambda r: r["alloc_extra_bytes"])
            C = worst["shape"][worst["axis"]]
            out["alloc_max"][op] = {
                "alloc_x": max(r["alloc_x"] for r in rs), "extra_bytes": worst["alloc_extra_bytes"],
                "row": worst["row"], "channels": C,
                "c_vectors": worst["alloc_extra_bytes"] / (8 * C)}
    if 1 in threads and 2 in threads:
        by = {(r["row"], r["op"], r["threads"]): r for r in results}
        for (row, op, nt), r2 in by.items():
            if nt != 2 or r2["bytes"] < SCALING_MIN_BYTES or (row, op, 1) not in by:
                continue
            r1 = by[(row, op, 1)]
            s = r1["times"]["fastbn"]["median"] / r2["times"]["fastbn"]["median"]
            out["scaling"].append([f"{row} {op}", s, r2["floor_share"]])
    out["all_speedup_geomean"] = _geomean([r["torch_over_fastbn"] for r in results])
    return out


def _header(meta):
    names = {"fastbn": "fastbn", "torch": "PyTorch", "numpy": "NumPy"}
    lines = [
        f"fastbn bench ({meta.get('suite', 'shapes')} suite): "
        + " vs ".join(names[i] for i in meta["impls"]) + ", same arrays, interleaved rounds",
        f"CPU: {meta['cpu']}; kernels' CPU level: {meta['kernels_cpu_level'] or 'n/a'} "
        f"({meta['logical_cpus']} logical CPUs; caches "
        f"{', '.join(f'{k} {v}' for k, v in meta['caches'].items()) or 'unknown'})",
        f"numpy {meta['numpy']}, torch {meta['torch'] or 'not installed'}, python "
        f"{meta['python']}, fastbn OpenMP {'on' if meta['fastbn_openmp'] else 'OFF'}; "
        f"OpenMP runtime(s): {', '.join(map(os.path.basename, meta['openmp_libraries'])) or '?'}",
        f"timing: {meta['repeat']} rounds, samples of >= {meta['sample_ms']} ms, median per "
        "call; iqr = interquartile range / median; implementations take turns in each round",
        "allocation: " + (
            "--reuse: forward outputs preallocated on every side (fastbn out=, "
            "torch native_batch_norm.out, NumPy out=); backward allocates dx everywhere"
            if meta["reuse"] else
            "every side allocates its outputs as a user's call does (no out=, no reuse)"),
        "GLIBC_TUNABLES="
        + (meta["GLIBC_TUNABLES"] or "(unset: fresh multi-MB outputs may page-fault)")
        + f"; 1-min load average at start: {meta['load_average_start']}",
        f"transparent huge pages: {meta['transparent_hugepages']}; NumPy (so fastbn) madvises "
        f"huge pages for large arrays: {meta['numpy_madvise_hugepage']}; PyTorch's allocator "
        "does only with THP_MEM_ALLOC_ENABLE=1 (now: "
        f"{meta['THP_MEM_ALLOC_ENABLE'] or 'unset'}; --torch-thp sets it)",
        "layouts: nc/nchw axis=1; nhwc = the (N,H,W,C) array with axis=-1 for fastbn and NumPy, "
        "the same memory as a channels_last NCHW tensor for PyTorch",
        "PyTorch: torch.native_batch_norm (train/eval), aten.native_batch_norm_backward; "
        "relu: torch.relu_ in place after the forward, aten.threshold_backward before the "
        "backward",
        "NumPy: plain vectorised code, single-threaded; timed at the first thread count and "
        "shown in every block",
        "floor: stream_copy (OpenMP memcpy, an equal share per thread, same thread count) of "
        "|x| bytes, in "
        "the same rounds; op traffic in copies of x: fwd-train 1.5, fwd-eval 1, bwd-train 2.5, "
        "fwd-relu 1.5, bwd-relu 2.5 (also reads y: conservative)",
        "columns: GB/s = fastbn's modelled traffic / time; floor GB/s = 2|x| / copy time; "
        "%floor = floor time / fastbn time; alloc = fastbn's peak extra allocation "
        "(tracemalloc) in units of |x|; ok = outputs agree",
        "%floor*: the probe ran on fewer threads than the row (rows under 128 KiB copy "
        "serially): the floor is understated and %floor overstated by up to probe_imbalance "
        "(in --json)",
    ]
    return "\n".join(lines)


_COLS = ("{:<26} {:>7} {:<9} {:>10} {:>5} {:>10} {:>5} {:>10} {:>7} {:>7} {:>7} {:>6} "
         "{:>6} {:>3}")


def format_table(results, threads, impls):
    lines = []
    for nt in threads:
        lines.append("")
        lines.append(f"== threads = {nt} ==")
        lines.append(_COLS.format("row", "MB", "op", "fastbn", "iqr", "torch", "iqr", "numpy",
                                  "pt/fb", "GB/s", "flrGB/s", "%floor", "alloc", "ok"))
        for r in (r for r in results if r["threads"] == nt):
            t = r["times"]
            tol = check_tolerance(np.dtype(r["dtype"]))
            ok = all(v <= tol for v in r["check"].values())
            tr = t.get("torch")
            ratio = r["torch_over_fastbn"]
            lines.append(_COLS.format(
                r["row"], f"{r['bytes'] / MB:.2f}", r["op"],
                _fmt_time(t["fastbn"]["median"]), f"{100 * t['fastbn']['iqr_rel']:.0f}%",
                _fmt_time(tr and tr["median"]),
                f"{100 * tr['iqr_rel']:.0f}%" if tr else "-",
                _fmt_time(t["numpy"]["median"]) if "numpy" in t else "-",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{r['fastbn_gbps']:.1f}", f"{r['floor_gbps']:.1f}",
                f"{100 * r['floor_share']:.0f}%"
                + ("*" if r["probe_imbalance"] > 1.05 and r["bytes"] >= FLOOR_MIN_BYTES
                   else ""),
                f"{r['alloc_x']:.2f}",
                "yes" if ok else "NO"))
    return "\n".join(lines)


_WORST = 8  # rows named per list in the text summary; --json has them all


def format_summary(s, threads, meta):
    lines = ["", "== summary =="]
    if meta["torch"]:
        lines.append("geometric-mean speed-up vs PyTorch (PyTorch time / fastbn time):")
        for key, g in s["speedup_geomean"].items():
            lines.append(f"  {key:<16} {g:.2f}x" if g is not None else f"  {key:<16} -")
        if s["all_speedup_geomean"] is not None:
            lines.append(f"  {'all rows':<16} {s['all_speedup_geomean']:.2f}x")
    else:
        lines.append("PyTorch is not installed: no comparison with it "
                     "(pip install torch==2.13.0 to add one)")
    lines.append(f"rows of >= 1 MB at >= {100 * FLOOR_TARGET:.0f}% of their floor:")
    tot_ok = tot = 0
    for key, (ok, n) in s["floor"].items():
        lines.append(f"  {key:<16} {ok}/{n}")
        tot_ok += ok
        tot += n
    lines.append(f"  {'all':<16} {tot_ok}/{tot}")
    if s["below_floor"]:
        worst = sorted(s["below_floor"], key=lambda kv: kv[1])[:_WORST]
        lines.append(f"  lowest: " + ", ".join(f"{k} ({100 * v:.0f}%)" for k, v in worst)
                     + (" ... (all in --json)" if len(s["below_floor"]) > _WORST else ""))
    if s["slower_than_torch"]:
        worst = sorted(s["slower_than_torch"], key=lambda kv: kv[1])[:_WORST]
        lines.append(f"rows slower than PyTorch: {len(s['slower_than_torch'])}; slowest: "
                     + ", ".join(f"{k} ({v:.2f})" for k, v in worst)
                     + (" ... (all in --json)" if len(s["slower_than_torch"]) > _WORST else ""))
    elif meta["torch"]:
        lines.append("rows slower than PyTorch: none")
    if s["scaling"]:
        low = [x for x in s["scaling"] if x[1] < SCALING_TARGET]
        missed = [x for x in low if x[2] < FLOOR_TARGET]
        lines.append(
            f"thread scaling (fastbn t=1 / t=2) on rows of >= 16 MB: geomean "
            f"{_geomean([x[1] for x in s['scaling']]):.2f}x, {len(s['scaling']) - len(low)}/"
            f"{len(s['scaling'])} at >= {SCALING_TARGET}x; below and not at the 2-thread "
            f"floor: {len(missed)}"
            + (": " + ", ".join(f"{k} ({v:.2f}x, {100 * f:.0f}% floor)"
                                for k, v, f in sorted(missed, key=lambda x: x[1])[:_WORST])
               if missed else "")
            + (" ... (all in --json)" if len(missed) > _WORST else ""))
    tiny = [t for t in s["tiny"] if t[2] is not None]
    if tiny:
        slower = [t for t in tiny if t[1] > t[2]]
        lines.append(
            f"tiny rows (< {TINY_BYTES // 1024} KiB), per call: fastbn "
            f"{_fmt_time(min(t[1] for t in tiny))}-{_fmt_time(max(t[1] for t in tiny))}, "
            f"PyTorch {_fmt_time(min(t[2] for t in tiny))}-{_fmt_time(max(t[2] for t in tiny))}; "
            f"fastbn slower in {len(slower)}/{len(tiny)}")
    if s["alloc_max"]:
        outputs = "0 (--reuse) for the forward, 1 for the backward" if meta["reuse"] else "1"
        lines.append(f"fastbn's peak extra allocation (tracemalloc), rows of >= 1 MB (all rows "
                     f"if none): {outputs} output(s) of |x| + the most beyond them (O(C) "
                     "bookkeeping and Python objects; a temporary of x's size would be MBs):")
        for op, a in s["alloc_max"].items():
            lines.append(f"  {op:<10} max {a['alloc_x']:.2f}|x|; beyond the outputs "
                         f"{a['extra_bytes'] / 1024:+.0f} KiB on {a['row']} (C={a['channels']}: "
                         f"{a['c_vectors']:.1f} float64 C-vectors)")
    if s["check_failures"]:
        lines.append("OUTPUT MISMATCH (relative max difference from fastbn): "
                     + "; ".join(f"{k} {v}" for k, v in s["check_failures"]))
    elif len(meta["impls"]) > 1:
        names = {"torch": "PyTorch", "numpy": "NumPy"}
        others = " and ".join(names[i] for i in meta["impls"] if i != "fastbn")
        lines.append(f"outputs: {others} {'agree' if ' and ' in others else 'agrees'} with fastbn on every row (y or dx; "
                     "rel. max diff <= 1e-3 float32, 1e-9 float64)")
    load = meta.get("load_average_start")
    if load is not None and load > 0.5:
        # Taken before the first measurement, so it is other processes' load, not ours.
        lines.append(f"WARNING: 1-min load average {load} before the run on "
                     f"{meta['logical_cpus']} logical CPUs (and {meta.get('load_average_end')} "
                     "at the end, this run included): other processes competed for the "
                     "cores; multithreaded timings are not trustworthy, rerun on a quiet "
                     "machine")
    lines.append(f"CPU: {meta['cpu']}; kernels' CPU level: {meta['kernels_cpu_level'] or 'n/a'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- network suite report

def _t(r, impl, key="median"):
    t = r["times"].get(impl) if r is not None else None
    return None if t is None else t[key]


def _ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def network_summary(results, rows, threads, net_layers):
    """Per distinct shape and whole-network figures of a network suite (``NetRow`` rows).

    Each distinct shape is timed once; the network sums weight its median per call by the
    number of the network's layers of that shape. A training step is fwd-train + bwd-train of
    every layer, an inference fwd-eval of every layer. ``*_min`` sums use the minima instead of
    the medians: a second look at the same run, less exposed to a noisy machine.
    """
    by = {(r["row"], r["threads"], r["op"]): r for r in results}
    layouts = [lo for lo in ("nchw", "nhwc") if any(r.layout == lo for r in rows)]
    out = {"layers_in_network": len(net_layers), "method": (
        "each distinct layer shape timed once; network sums = sum over distinct shapes of "
        "count x median per call; training step = fwd-train + bwd-train, inference = fwd-eval"),
        "shapes": [], "network": [], "worst_layer_op": None, "layer_ops_slower_than_torch": []}
    worst = None
    for lo in layouts:
        lrows = [r for r in rows if r.layout == lo]
        for nt in threads:
            tot = {}
            for row in lrows:
                ent = {"layout": lo, "row": row.name, "nchw": list(row.nchw),
                       "count": row.count, "layers": list(row.layers), "threads": nt}
                for op in RESNET50_OPS:
                    r = by.get((row.name, nt, op))
                    ent[op] = {impl: _t(r, impl) for impl in ("fastbn", "torch")}
                    ent[op]["torch_over_fastbn"] = _ratio(ent[op]["torch"], ent[op]["fastbn"])
                    for impl in ("fastbn", "torch"):
                        for key in ("median", "min"):
                            v = _t(r, impl, key)
                            k = (op, impl, key)
                            # None poisons the sum: a missing op leaves no partial total.
                            tot[k] = None if v is None or (k in tot and tot[k] is None) else \
                                tot.get(k, 0.0) + row.count * v
                    q = ent[op]["torch_over_fastbn"]
                    if q is not None:
                        tag = {"layout": lo, "row": row.name, "op": op, "threads": nt,
                               "count": row.count, "torch_over_fastbn": q}
                        if worst is None or q < worst["torch_over_fastbn"]:
                            worst = tag
                        if q < 1:
                            out["layer_ops_slower_than_torch"].append(tag)
                step = {impl: (None if ent["fwd-train"][impl] is None
                               or ent["bwd-train"][impl] is None
                               else ent["fwd-train"][impl] + ent["bwd-train"][impl])
                        for impl in ("fastbn", "torch")}
                step["torch_over_fastbn"] = _ratio(step["torch"], step["fastbn"])
                ent["train_step"] = step
                out["shapes"].append(ent)

            def total(ops, impl, key="median"):
                vals = [tot.get((op, impl, key)) for op in ops]
                return None if any(v is None for v in vals) else sum(vals)

            net = {"layout": lo, "threads": nt, "layers": sum(r.count for r in lrows),
                   "distinct_shapes": len(lrows)}
            for name, ops in (("train_step", ("fwd-train", "bwd-train")),
                              ("inference", ("fwd-eval",)), ("fwd-train", ("fwd-train",)),
                              ("bwd-train", ("bwd-train",))):
                fb, pt = total(ops, "fastbn"), total(ops, "torch")
                net[name] = {"fastbn": fb, "torch": pt, "torch_over_fastbn": _ratio(pt, fb),
                             "torch_over_fastbn_min": _ratio(total(ops, "torch", "min"),
                                                             total(ops, "fastbn", "min"))}
            out["network"].append(net)
    out["worst_layer_op"] = worst
    return out


_NCOLS = ("{:<20} {:>3} {:<22} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>8} {:>8} {:>6} "
          "{:>5}")


def _fr(q):
    return f"{q:.2f}" if q is not None else "-"


def _short_layers(names):
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


def format_network(ns, results, threads, title):
    """A table per layout and thread count, then the whole-network headline."""
    # The widest interquartile range / median of the row's fastbn and PyTorch samples, all ops.
    iqr = {}
    for r in results:
        k = (r["row"], r["threads"])
        iqr[k] = max([iqr.get(k, 0.0)] + [r["times"][i]["iqr_rel"] for i in ("fastbn", "torch")
                                           if i in r["times"]])
    lines = []
    for lo in ("nchw", "nhwc"):
        for nt in threads:
            ents = [e for e in ns["shapes"] if e["layout"] == lo and e["threads"] == nt]
            if not ents:
                continue
            net = next(n for n in ns["network"] if n["layout"] == lo and n["threads"] == nt)
            lines.append("")
            what = ("NCHW" if lo == "nchw" else
                    "channels-last: fastbn (N,H,W,C) axis=-1, PyTorch channels_last")
            lines.append(f"== {title} {what}, threads = {nt} ==")
            lines.append(_NCOLS.format("shape (N,C,H,W)", "x", "layers", "fwd fb", "fwd pt",
                                       "bwd fb", "bwd pt", "step fb", "step pt", "pt/fb",
                                       "eval fb", "eval pt", "pt/fb", "iqr"))
            for e in ents:
                f, b, v, st = e["fwd-train"], e["bwd-train"], e["fwd-eval"], e["train_step"]
                spread = iqr.get((e["row"], nt), 0.0)
                lines.append(_NCOLS.format(
                    "x".join(map(str, e["nchw"])), e["count"], _short_layers(e["layers"]),
                    _fmt_time(f["fastbn"]), _fmt_time(f["torch"]), _fmt_time(b["fastbn"]),
                    _fmt_time(b["torch"]), _fmt_time(st["fastbn"]), _fmt_time(st["torch"]),
                    _fr(st["torch_over_fastbn"]), _fmt_time(v["fastbn"]),
                    _fmt_time(v["torch"]), _fr(v["torch_over_fastbn"]),
                    f"{100 * spread:.0f}%"))
            ts, inf = net["train_step"], net["inference"]
            lines.append(_NCOLS.format(
                "network sum", net["layers"], f"({net['distinct_shapes']} shapes x count)",
                _fmt_time(net["fwd-train"]["fastbn"]), _fmt_time(net["fwd-train"]["torch"]),
                _fmt_time(net["bwd-train"]["fastbn"]), _fmt_time(net["bwd-train"]["torch"]),
                _fmt_time(ts["fastbn"]), _fmt_time(ts["torch"]), _fr(ts["torch_over_fastbn"]),
                _fmt_time(inf["fastbn"]), _fmt_time(inf["torch"]),
                _fr(inf["torch_over_fastbn"]), ""))
    lines.append("")
    n_all = ns["layers_in_network"]
    lines.append(f"== {title}: all batch-norm layers per step, fastbn vs PyTorch ==")
    lines.append(f"each distinct shape is timed once and counted as often as the network has "
                 f"it ({n_all} layers); per-call medians; pt/fb = PyTorch time / fastbn time "
                 "(> 1: fastbn faster); [on minima]")
    lines.append("{:<7} {:>7} {:>6} | {:>9} {:>9} {:>5} {:>6} | {:>9} {:>9} {:>5} {:>6}".format(
        "layout", "threads", "layers", "step fb", "step pt", "pt/fb", "[min]", "infer fb",
        "infer pt", "pt/fb", "[min]"))
    for net in ns["network"]:
        ts, inf = net["train_step"], net["inference"]
        partial = "" if net["layers"] == n_all else f"  (PARTIAL: {net['layers']} of {n_all})"
        lines.append("{:<7} {:>7} {:>6} | {:>9} {:>9} {:>5} {:>6} | {:>9} {:>9} {:>5} {:>6}{}"
                     .format(net["layout"], net["threads"], net["layers"],
                             _fmt_time(ts["fastbn"]), _fmt_time(ts["torch"]),
                             _fr(ts["torch_over_fastbn"]),
                             f"[{_fr(ts['torch_over_fastbn_min'])}]",
                             _fmt_time(inf["fastbn"]), _fmt_time(inf["torch"]),
                             _fr(inf["torch_over_fastbn"]),
                             f"[{_fr(inf['torch_over_fastbn_min'])}]", partial))
    w = ns["worst_layer_op"]
    if w is not None:
        n_ops = sum(1 for e in ns["shapes"] for op in RESNET50_OPS
                    if e[op]["torch_over_fastbn"] is not None)
        slow = ns["layer_ops_slower_than_torch"]
        lines.append(f"worst single layer-op: {w['row']} {w['op']} t={w['threads']} "
                     f"(x{w['count']} in the network): pt/fb {w['torch_over_fastbn']:.2f}; "
                     f"layer-ops where fastbn is slower than PyTorch: {len(slow)}/{n_ops}"
                     + (": " + ", ".join(f"{x['row']} {x['op']} t={x['threads']} "
                                         f"({x['torch_over_fastbn']:.2f})"
                                         for x in sorted(slow, key=lambda x:
                                                         x["torch_over_fastbn"])[:_WORST])
                        if slow else "")
                     + (" ..." if len(slow) > _WORST else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastbn bench",
        description="Time fastbn, PyTorch and NumPy batch norm side by side against the "
                    "memory floor measured in the same run.",
        epilog="--suite resnet50: every batch-norm layer of torchvision's ResNet-50 at batch "
               f"{RESNET50_BATCH}, 224x224 (53 layers, 12 distinct shapes, each timed once "
               "and counted as often as the network has it), NCHW and channels-last; "
               "defaults there: --ops fwd-train,bwd-train,fwd-eval, --impls fastbn,torch. "
               "It prints a table per layout and thread count and the whole-network sum per "
               "training step (fwd-train + bwd-train) and per inference (fwd-eval), fastbn vs "
               "PyTorch, and the worst single layer-op. --subset and --rows select within "
               "the suite (e.g. --suite resnet50 --subset nhwc).")
    p.add_argument("--suite", choices=tuple(SUITES), default="shapes",
                   help="shapes: the synthetic rows (default); resnet50: the batch-norm "
                        "layers of ResNet-50 with whole-network sums (see below)")
    p.add_argument("--subset", choices=SUBSETS, default="all",
                   help="a group of rows of the suite (default: all)")
    p.add_argument("--rows", default=None,
                   help="comma-separated substrings matched against row names, e.g. "
                        "'nhwc,4096x1024' (see --list)")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated ops (default: {','.join(OPS)}; resnet50: "
                        f"{','.join(RESNET50_OPS)})")
    p.add_argument("--threads", default="1,2",
                   help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations to time besides fastbn "
                        "(default: fastbn,torch,numpy; resnet50: fastbn,torch; torch is "
                        "skipped when not installed)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds per measurement (default 7, --quick 3)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="minimum duration of one sample in ms (default 5, --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter samples (a rough look, not a result)")
    p.add_argument("--reuse", action="store_true",
                   help="preallocated outputs for the forward ops on every side")
    p.add_argument("--torch-thp", action="store_true",
                   help="give PyTorch's allocator transparent huge pages as NumPy's has "
                        "(THP_MEM_ALLOC_ENABLE=1): fresh multi-MB outputs then fault alike on "
                        "both sides")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results as JSON to PATH")
    p.add_argument("--list", action="store_true", help="list the selected rows and exit")
    return p


def _split(text, name, allowed=None, conv=str):
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise SystemExit(f"--{name}: expected a comma-separated list, got {text!r}")
    try:
        items = [conv(s) for s in items]
    except ValueError:
        raise SystemExit(f"--{name}: expected a comma-separated list of integers, "
                         f"got {text!r}") from None
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise SystemExit(f"--{name}: expected some of {', '.join(allowed)}, got "
                             f"{', '.join(map(str, bad))}")
    return items


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv=None):
    """Run the benchmark; ``argv`` holds the options after ``bench``. Returns 0."""
    args = _parser().parse_args(argv)
    net = args.suite != "shapes"
    if args.ops is None:
        args.ops = ",".join(RESNET50_OPS if net else OPS)
    if args.impls is None:
        args.impls = "fastbn,torch" if net else ",".join(IMPLS)
    ops = _split(args.ops, "ops", tuple(OPS))
    threads = _split(args.threads, "threads", conv=int)
    if any(n < 1 for n in threads):
        raise SystemExit(f"--threads: expected positive integers, got {args.threads!r}")
    impls = _split(args.impls, "impls", IMPLS)
    if "fastbn" not in impls:
        impls.insert(0, "fastbn")
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    if repeat < 1:
        raise SystemExit(f"--repeat: expected a positive integer, got {repeat}")
    sample_ms = args.sample_ms if args.sample_ms is not None else (1.0 if args.quick else 5.0)
    patterns = _split(args.rows, "rows") if args.rows else None
    rows = select_rows(args.subset, patterns, args.suite)
    if args.list:
        for r in rows:
            extra = (f"  x{r.count}: {','.join(r.layers)}" if isinstance(r, NetRow) else "")
            print(f"{r.name:<26} {r.nbytes / MB:8.2f} MB  axis={r.axis}  "
                  f"tags={','.join(sorted(r.tags))}{extra}")
        return 0
    if not rows:
        raise SystemExit("no rows selected (see --list)")

    torch = _import_torch(args.torch_thp) if "torch" in impls else None
    if torch is None and "torch" in impls:
        impls.remove("torch")
    meta = machine_info(torch)
    meta.update(suite=args.suite, repeat=repeat, sample_ms=sample_ms, reuse=args.reuse,
                threads=threads, ops=ops, impls=impls,
                bytes_model={op: c for op, (c, _) in OPS.items()},
                layout_note="nhwc rows: fastbn gets the (N,H,W,C) array with axis=-1")
    print(_header(meta), flush=True)
    over = [n for n in threads if n > (os.cpu_count() or 1)]
    if over:
        print(f"warning: thread counts {over} exceed the {os.cpu_count()} logical CPUs",
              flush=True)

    torch_threads = torch.get_num_threads() if torch is not None else None
    progress = _Progress(len(rows) * len(threads) * len(ops))
    try:
        results = run(rows, ops, threads, impls, repeat, sample_ms / 1e3, args.reuse, torch,
                      progress)
    finally:
        progress.close()
        set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(torch_threads)
    meta["load_average_end"] = _load_average()
    s = summary(results, threads)
    doc = {"meta": meta, "results": results, "summary": s}
    if net:
        # The network's own tables replace the per-row one (its rows are all in --json).
        doc[args.suite] = ns = network_summary(results, rows, threads, RESNET50_LAYERS)
        print(format_network(ns, results, threads, f"ResNet-50 batch {RESNET50_BATCH}"))
        print("\nper-row figures of the same run (each distinct shape once; floor, checks):")
    else:
        print(format_table(results, threads, impls))
    print(format_summary(s, threads, meta), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(doc), f, indent=1)
    return 0
