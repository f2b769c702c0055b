"""GPU benchmark: fastbn (CuPy + our kernels) against PyTorch CUDA batch norm (cuDNN) and the
device's copy bandwidth, all measured in the same run on the benchmark suite's shapes.

Run with ``python -m fastbn.cuda.bench [options]`` (or ``python -m fastbn bench --gpu`` where
the CLI forwards it). Needs CuPy and a CUDA device; PyTorch with CUDA is optional (its columns
are left empty without it).

Method. Every row's arrays live on the device; PyTorch sees the same memory through DLPack
(channels-last rows as an NCHW view with channels_last strides, so cuDNN's NHWC kernels run).
Each implementation's sample is a CUDA-event-timed loop of calls long enough to last
``--sample-ms``; the implementations take turns within every repeat (the starting one
rotating), and a row's time is the median sample per call. Both sides allocate their outputs
as a user's call does (CuPy's and PyTorch's caching allocators, so no page faults).

Floor. A device-to-device copy of ``--copy-mb`` MB (at least 4x the largest row) measured in
the same run gives the bandwidth B (bytes read + written per second); a row's floor is its
op's traffic in copies of x (training forward 1.5, inference 1, backward 2.5, as in
``python -m fastbn bench``) times 2|x|/B. ``floor%`` is floor time / measured time.
The PyTorch backward is timed as ``torch.autograd.grad`` on a retained graph (what a user's
backward runs: cuDNN's batch-norm backward, plus the ReLU's for the fused rows).
"""
import argparse
import json
import platform
import sys

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1
SEED = 1234
MB = 1e6


def _suite():
    from .._bench import OPS, SUBSETS, SUITE, select_rows

    return OPS, SUBSETS, SUITE, select_rows


def _parser(subsets, ops):
    p = argparse.ArgumentParser(prog="python -m fastbn.cuda.bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", choices=subsets, default="all", help="rows of one tag group")
    p.add_argument("--rows", nargs="*", metavar="PATTERN",
                   help="only rows whose name contains one of these (e.g. nhwc-8x224)")
    p.add_argument("--ops", nargs="*", choices=list(ops), default=list(ops), metavar="OP",
                   help=f"ops to time (default all: {', '.join(ops)})")
    p.add_argument("--repeat", type=int, default=7, help="samples per implementation (7)")
    p.add_argument("--sample-ms", type=float, default=20.0, help="length of one sample (20 ms)")
    p.add_argument("--copy-mb", type=float, default=1024.0, help="size of the copy probe (MB)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


class _Row:
    """Device arrays of one suite row, shared by fastbn and PyTorch."""

    def __init__(self, cp, row, torch):
        rng = np.random.default_rng(SEED)
        dt = row.dtype
        C = row.channels
        self.axis = row.axis
        self.x = cp.asarray((0.5 + rng.standard_normal(row.shape)).astype(dt))
        self.dy = cp.asarray(rng.standard_normal(row.shape).astype(dt))
        self.w = cp.asarray((1 + 0.1 * rng.standard_normal(C)).astype(dt))
        self.b = cp.asarray((0.1 * rng.standard_normal(C)).astype(dt))
        self.rm = cp.zeros(C, dt)
        self.rv = cp.ones(C, dt)
        import fastbn

        self.y, self.mean, self.invstd = fastbn.batch_norm_forward(self.x, self.w, self.b,
                                                                   axis=self.axis)
        self.yr = fastbn.batch_norm_forward(self.x, self.w, self.b, axis=self.axis,
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


def _fastbn_call(d, op):
    import fastbn

    x, w, b = d.x, d.w, d.b
    if op == "fwd-train":
        return lambda: fastbn.batch_norm(x, d.rm, d.rv, w, b, training=True, momentum=MOMENTUM,
                                         eps=EPS, axis=d.axis)
    if op == "fwd-relu":
        return lambda: fastbn.batch_norm(x, d.rm, d.rv, w, b, training=True, momentum=MOMENTUM,
                                         eps=EPS, axis=d.axis, activation="relu")
    if op == "fwd-eval":
        return lambda: fastbn.batch_norm(x, d.rm, d.rv, w, b, training=False, eps=EPS,
                                         axis=d.axis)
    if op == "bwd-train":
        return lambda: fastbn.batch_norm_backward(d.dy, x, d.mean, d.invstd, w, axis=d.axis)
    if op == "bwd-relu":
        return lambda: fastbn.batch_norm_backward(d.dy, x, d.mean, d.invstd, w, axis=d.axis,
                                                  activation="relu", y=d.yr)
    raise ValueError(op)


def _torch_call(d, op, torch):
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
    relu = op == "bwd-relu"
    x = t["x"].detach().requires_grad_(True)
    w = t["w"].detach().requires_grad_(True)
    b = t["b"].detach().requires_grad_(True)
    rm, rv = t["rm"].clone(), t["rv"].clone()
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
    if relu:
        y = F.relu(y)
    dy = t["dy"]
    return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)


def _time(cp, fn, loops):
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(loops):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / loops


def _calibrate(cp, fn, sample_s):
    fn()
    cp.cuda.Device().synchronize()
    loops = 1
    while True:
        t = _time(cp, fn, loops) * loops
        if t >= sample_s or loops >= 1 << 16:
            return loops
        loops = min(1 << 16, max(loops * 2, int(loops * sample_s / max(t, 1e-9) * 1.2)))


def _round_robin(cp, calls, repeat, sample_s):
    names = list(calls)
    loops = {n: _calibrate(cp, calls[n], sample_s) for n in names}
    samples = {n: [] for n in names}
    for r in range(repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            samples[n].append(_time(cp, calls[n], loops[n]))
    return {n: float(np.median(s)) for n, s in samples.items()}


def copy_bandwidth(cp, nbytes, repeat=7):
    """Device-to-device copy bandwidth in bytes/s (read + write), median of repeats."""
    n = max(int(nbytes) // 4, 1)
    src = cp.ones(n, cp.float32)
    dst = cp.empty_like(src)

    def copy():
        dst[...] = src
    loops = _calibrate(cp, copy, 0.02)
    t = float(np.median([_time(cp, copy, loops) for _ in range(repeat)]))
    del src, dst
    return 2 * 4 * n / t


def _device_info(cp, torch):
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    info = {"device": name, "cupy": cp.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion()}
    if torch is not None:
        info["torch"] = torch.__version__
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def main(argv=None):
    """Run the GPU benchmark and print the table; returns a process exit code."""
    OPS, SUBSETS, SUITE, select_rows = _suite()
    args = _parser(SUBSETS, OPS).parse_args(argv)
    from . import unavailable_reason

    why = unavailable_reason()
    if why is not None:
        print(f"fastbn GPU bench: {why}", file=sys.stderr)
        return 2
    import cupy as cp

    torch = None if args.no_torch else _torch_cuda()
    rows = select_rows(args.subset, args.rows)
    if not rows:
        print("fastbn GPU bench: no row matches the selection", file=sys.stderr)
        return 2
    info = _device_info(cp, torch)
    copy_bytes = max(args.copy_mb * MB, 4 * max(r.nbytes for r in rows))
    bw = copy_bandwidth(cp, copy_bytes)
    info["copy_bandwidth_GBps"] = bw / 1e9
    info["copy_bytes"] = int(copy_bytes)
    print(f"fastbn GPU bench on {info['device']} (CuPy {info['cupy']}"
          + (f", PyTorch {info['torch']}, cuDNN {info['cudnn']}" if torch else ", no PyTorch")
          + f"); copy floor {bw / 1e9:.0f} GB/s (read + write, {copy_bytes / MB:.0f} MB copy)")
    header = (f"{'row':<28} {'op':<10} {'MB':>7} {'fastbn ms':>10} {'torch ms':>9} "
              f"{'floor ms':>9} {'fbn floor%':>10} {'torch floor%':>12} {'torch/fbn':>9}")
    print(header)
    print("-" * len(header))
    results = []
    total = len(rows) * len(args.ops)
    done = 0
    for row in rows:
        d = _Row(cp, row, torch)
        for op in args.ops:
            done += 1
            print(f"  [{done}/{total}] {row.name} {op} ...", end="\r", file=sys.stderr,
                  flush=True)
            calls = {"fastbn": _fastbn_call(d, op)}
            if torch is not None:
                calls["torch"] = _torch_call(d, op, torch)
            times = _round_robin(cp, calls, args.repeat, args.sample_ms / 1e3)
            floor = OPS[op][0] * 2 * row.nbytes / bw
            tf, tt = times["fastbn"], times.get("torch")
            res = {"row": row.name, "op": op, "bytes": row.nbytes, "fastbn_s": tf,
                   "torch_s": tt, "floor_s": floor, "fastbn_floor_share": floor / tf,
                   "torch_floor_share": None if tt is None else floor / tt,
                   "torch_over_fastbn": None if tt is None else tt / tf}
            results.append(res)
            print(" " * 60, end="\r", file=sys.stderr)
            print(f"{row.name:<28} {op:<10} {row.nbytes / MB:>7.1f} {tf * 1e3:>10.4f} "
                  + (f"{tt * 1e3:>9.4f} " if tt is not None else f"{'-':>9} ")
                  + f"{floor * 1e3:>9.4f} {100 * floor / tf:>9.0f}% "
                  + (f"{100 * floor / tt:>11.0f}% {tt / tf:>9.2f}" if tt is not None
                     else f"{'-':>12} {'-':>9}"))
        del d
        cp.get_default_memory_pool().free_all_blocks()
    ratios = [r["torch_over_fastbn"] for r in results if r["torch_over_fastbn"]]
    if ratios:
        print(f"geometric-mean torch/fastbn: {float(np.exp(np.mean(np.log(ratios)))):.2f} "
              f"over {len(ratios)} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
