"""``python -m fastbn bench [--gpu]``: the parser, the runs and ``main``.

One parser and one selection syntax for the CPU and the GPU benchmark: ``--suite``,
``--subset``, ``--rows`` (comma-separated substrings of row names), ``--ops`` (comma-separated);
``--gpu`` runs the same suite rows through the CuPy implementations against PyTorch CUDA
(cuDNN) and the device's copy bandwidth.
"""
import argparse
import gc
import json
import os
import sys

from .._threads import set_num_threads
from . import impls as _impls
from . import machine, report
from .impls import GPU_IMPLS, GPU_MAX_LOOPS, IMPLS, PROBE
from .suites import (MB, OPS, RESNET50_BATCH, RESNET50_LAYERS, RESNET50_OPS, SUBSETS, SUITES,
                     VARIANT_OPS, NetRow, select_rows)
from .timing import cuda_event_clock, summarize, time_round_robin

_CPU_ONLY = ("threads", "reuse", "torch_thp")


def parser():
    p = argparse.ArgumentParser(
        prog="python -m fastbn bench",
        description="Time fastbn, PyTorch and NumPy batch norm side by side against the "
                    "memory floor measured in the same run (--gpu: fastbn on CuPy against "
                    "PyTorch CUDA and the device's copy bandwidth).",
        epilog="--suite resnet50: every batch-norm layer of torchvision's ResNet-50 at batch "
               f"{RESNET50_BATCH}, 224x224 (53 layers, 12 distinct shapes, each timed once "
               "and counted as often as the network has it), NCHW and channels-last; "
               "defaults there: --ops fwd-train,bwd-train,fwd-eval, --impls fastbn,torch. "
               "It prints a table per layout and thread count and the whole-network sum per "
               "training step (fwd-train + bwd-train) and per inference (fwd-eval), fastbn vs "
               "PyTorch, and the worst single layer-op. --subset and --rows select within "
               "the suite (e.g. --suite resnet50 --subset nhwc). --suite variants: each "
               "batch-norm variant (fixed statistics, batch renorm, ghost batches, masked "
               "statistics, double backward, several feature axes) timed beside plain batch "
               "norm's training forward or backward on the same arrays in the same rounds, "
               "with its ratio to it (fastbn only; --ops picks variant ops, the plain ones are "
               "always timed).")
    p.add_argument("--gpu", action="store_true",
                   help="the CuPy path: the same rows on the CUDA device, fastbn vs PyTorch "
                        "CUDA (cuDNN) vs a device-to-device copy (needs CuPy)")
    p.add_argument("--suite", choices=tuple(SUITES), default="shapes",
                   help="shapes: the synthetic rows (default); resnet50: the batch-norm "
                        "layers of ResNet-50 with whole-network sums; variants: the variants "
                        "beside plain batch norm (see below)")
    p.add_argument("--subset", choices=SUBSETS, default="all",
                   help="a group of rows of the suite (default: all)")
    p.add_argument("--rows", default=None,
                   help="comma-separated substrings matched against row names, e.g. "
                        "'nhwc,4096x1024' (see --list)")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated ops (default: {','.join(OPS)}; resnet50: "
                        f"{','.join(RESNET50_OPS)})")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1,2; CPU only)")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations to time besides fastbn "
                        "(default: fastbn,torch,numpy; resnet50 and --gpu: fastbn,torch; "
                        "torch is skipped when not installed)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds per measurement (default 7, --quick 3)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="minimum duration of one sample in ms (default 5, --gpu 20; "
                        "--quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter samples (a rough look, not a result)")
    p.add_argument("--reuse", action="store_true",
                   help="preallocated outputs for the forward ops on every side (CPU only)")
    p.add_argument("--torch-thp", action="store_true",
                   help="give PyTorch's allocator transparent huge pages as NumPy's has "
                        "(THP_MEM_ALLOC_ENABLE=1): fresh multi-MB outputs then fault alike on "
                        "both sides (CPU only)")
    p.add_argument("--copy-mb", type=float, default=1024.0,
                   help="--gpu: size of the device copy probe in MB (default 1024, at least "
                        "4x the largest row)")
    p.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="auto",
                   help="progress with an ETA on stderr: auto (tqdm on a terminal where it "
                        "is installed, else plain lines; the default), tqdm (even when not a "
                        "terminal), plain, none")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results as JSON to PATH")
    p.add_argument("--list", action="store_true", help="list the selected rows and exit")
    return p


_parser = parser


def split(text, name, allowed=None, conv=str):
    """The items of a comma-separated option; SystemExit naming the option when malformed."""
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


_split = split


# --------------------------------------------------------------------------- CPU run

def run(rows, ops, threads, impls, repeat, min_sample, reuse, torch, progress=None):
    """Measure every (row, thread count, op) on the CPU; returns a list of result dicts."""
    results = []
    for row in rows:
        d = _impls.RowData(row, torch if "torch" in impls else None)
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
                calls = _impls.make_calls(d, op, run_impls, reuse, torch, nt)
                res = {"row": row.name, "layout": row.layout, "shape": list(row.shape),
                       "axis": row.axis, "dtype": row.dtype.name, "bytes": row.nbytes,
                       "op": op, "threads": nt}
                if ti == 0:
                    res["check"] = _impls.check_outputs(d, op, calls)
                    res["alloc_x"] = _impls.peak_alloc_ratio(calls["fastbn"], row.nbytes)
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
                derive(res)
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


def derive(res):
    """Traffic, bandwidths and floor share of one CPU result from its medians."""
    copies = OPS[res["op"]][0]
    res["probe_imbalance"] = _impls.probe_imbalance(res["bytes"], res["threads"])
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


# --------------------------------------------------------------------------- variants run

def run_variants(rows, ops, threads, repeat, min_sample, progress=None):
    """Time every variant op with plain batch norm's ops in the same rounds, per (row, thread
    count); each result carries its ratio to the plain op it is compared with."""
    results = []
    for row in rows:
        d = _impls.RowData(row)
        for nt in threads:
            set_num_threads(nt)
            if progress is not None:
                progress.step(f"{row.name} t={nt} variants")
            calls = _impls.make_variant_calls(d, ops)
            times = {op: summarize(s)
                     for op, s in time_round_robin(calls, repeat, min_sample).items()}
            for op in ops:
                base = VARIANT_OPS[op][0]
                t = times[op]["median"]
                results.append({
                    "row": row.name, "layout": row.layout, "shape": list(row.shape),
                    "axis": row.axis, "dtype": row.dtype.name, "bytes": row.nbytes, "op": op,
                    "threads": nt, "baseline": base, "times": {"fastbn": times[op]},
                    "ratio": None if base is None else t / times[base]["median"]})
            del calls
        del d
        gc.collect()
    return results


def main_variants(args, rows, ops, threads, repeat, sample_ms):
    """``python -m fastbn bench --suite variants``."""
    meta = machine.machine_info(None)
    meta.update(suite="variants", repeat=repeat, sample_ms=sample_ms, threads=threads, ops=ops,
                impls=["fastbn"], op_descriptions={op: VARIANT_OPS[op][1] for op in ops})
    print(report.variants_header(meta), flush=True)
    progress = report.Progress(len(rows) * len(threads), mode=args.progress)
    try:
        results = run_variants(rows, ops, threads, repeat, sample_ms / 1e3, progress)
    finally:
        progress.close()
        set_num_threads(None)
    meta["load_average_end"] = machine._load_average()
    s = report.variants_summary(results, threads)
    print(report.format_variants(results, threads))
    print(report.format_variants_summary(s, threads), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.json_safe({"meta": meta, "results": results, "summary": s}), f,
                      indent=1)
    return 0


# --------------------------------------------------------------------------- GPU run

def run_gpu(cp, rows, ops, impls, repeat, min_sample, torch, bw, progress=None, out=None):
    """Measure every (row, op) on the CUDA device; prints a line per result to ``out``."""
    clock = cuda_event_clock(cp)
    results = []
    for row in rows:
        d = _impls.GpuRowData(cp, row, torch)
        for op in ops:
            if progress is not None:
                progress.step(f"{row.name} {op}")
            calls = _impls.make_gpu_calls(d, op, impls, torch)
            samples = time_round_robin(calls, repeat, min_sample, clock, GPU_MAX_LOOPS)
            times = {n: summarize(s) for n, s in samples.items()}
            floor = OPS[op][0] * 2 * row.nbytes / bw
            tf = times["fastbn"]["median"]
            tt = times["torch"]["median"] if "torch" in times else None
            res = {"row": row.name, "op": op, "bytes": row.nbytes, "fastbn_s": tf,
                   "torch_s": tt, "floor_s": floor, "fastbn_floor_share": floor / tf,
                   "torch_floor_share": None if tt is None else floor / tt,
                   "torch_over_fastbn": None if tt is None else tt / tf, "times": times}
            results.append(res)
            if out is not None:
                print(report.gpu_line(res, impls), file=out, flush=True)
        del d
        cp.get_default_memory_pool().free_all_blocks()
    return results


def main_gpu(args, rows, ops, impls, repeat, sample_ms):
    """``python -m fastbn bench --gpu``: returns 2 (with one line why) without CuPy/a device."""
    from ..cuda import unavailable_reason

    why = unavailable_reason()
    if why is not None:
        print(f"fastbn GPU bench: {why}", file=sys.stderr)
        return 2
    import cupy as cp

    torch = _impls.torch_cuda() if "torch" in impls else None
    impls = [i for i in impls if i != "torch" or torch is not None]
    info = machine.device_info(cp, torch)
    copy_bytes = max(args.copy_mb * MB, 4 * max(r.nbytes for r in rows))
    bw = _impls.copy_bandwidth(cp, copy_bytes)
    info.update(copy_bandwidth_GBps=bw / 1e9, copy_bytes=int(copy_bytes), suite=args.suite,
                repeat=repeat, sample_ms=sample_ms, ops=ops, impls=impls)
    print(report.gpu_header(info, impls, bw, copy_bytes), flush=True)
    progress = report.Progress(len(rows) * len(ops), mode=args.progress)
    try:
        results = run_gpu(cp, rows, ops, impls, repeat, sample_ms / 1e3, torch, bw, progress,
                          out=sys.stdout)
    finally:
        progress.close()
    line = report.gpu_summary(results, torch is not None)
    if line:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.json_safe({"machine": info, "results": results}), f, indent=1)
    return 0


# --------------------------------------------------------------------------- main

def main(argv=None):
    """Run the benchmark; ``argv`` holds the options after ``bench``. Returns the exit code."""
    p = parser()
    args = p.parse_args(argv)
    variants = args.suite == "variants"
    if variants:
        given = [o for o in ("gpu", "impls", "no_torch", "reuse", "torch_thp")
                 if getattr(args, o) not in (None, False)]
        if given:
            p.error(", ".join("--" + o.replace("_", "-") for o in given)
                    + ": not available with --suite variants (fastbn only, on the CPU)")
        ops = split(args.ops, "ops", tuple(VARIANT_OPS)) if args.ops else list(VARIANT_OPS)
        # the plain ops every ratio needs, first, then the asked ones in the table's order
        need = {"plain-fwd", "plain-bwd"} | set(ops)
        args.ops = ",".join(op for op in VARIANT_OPS if op in need)
    net = args.suite == "resnet50"
    if args.gpu:
        given = [o for o in _CPU_ONLY if getattr(args, o) not in (None, False)]
        if given:
            p.error(", ".join("--" + o.replace("_", "-") for o in given)
                    + ": not available with --gpu")
        if args.impls is not None and "numpy" in split(args.impls, "impls", IMPLS):
            p.error("--impls: numpy does not run with --gpu (choose from fastbn, torch)")
    if args.ops is None:
        args.ops = ",".join(RESNET50_OPS if net else OPS)
    if args.impls is None:
        args.impls = "fastbn,torch" if (net or args.gpu) else ",".join(IMPLS)
    ops = split(args.ops, "ops", tuple(VARIANT_OPS) if variants else tuple(OPS))
    threads = split(args.threads or "1,2", "threads", conv=int)
    if any(n < 1 for n in threads):
        raise SystemExit(f"--threads: expected positive integers, got {args.threads!r}")
    impls = split(args.impls, "impls", GPU_IMPLS if args.gpu else IMPLS)
    if "fastbn" not in impls:
        impls.insert(0, "fastbn")
    if args.no_torch and "torch" in impls:
        impls.remove("torch")
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    if repeat < 1:
        raise SystemExit(f"--repeat: expected a positive integer, got {repeat}")
    sample_ms = (args.sample_ms if args.sample_ms is not None
                 else 1.0 if args.quick else 20.0 if args.gpu else 5.0)
    patterns = split(args.rows, "rows") if args.rows else None
    rows = select_rows(args.subset, patterns, args.suite)
    if args.list:
        for r in rows:
            extra = (f"  x{r.count}: {','.join(r.layers)}" if isinstance(r, NetRow) else "")
            print(f"{r.name:<26} {r.nbytes / MB:8.2f} MB  axis={r.axis}  "
                  f"tags={','.join(sorted(r.tags))}{extra}")
        return 0
    if not rows:
        raise SystemExit("no rows selected (see --list)")
    if args.gpu:
        return main_gpu(args, rows, ops, impls, repeat, sample_ms)
    if variants:
        return main_variants(args, rows, ops, threads, repeat, sample_ms)

    torch = _impls.import_torch(args.torch_thp) if "torch" in impls else None
    if torch is None and "torch" in impls:
        impls.remove("torch")
    meta = machine.machine_info(torch)
    meta.update(suite=args.suite, repeat=repeat, sample_ms=sample_ms, reuse=args.reuse,
                threads=threads, ops=ops, impls=impls,
                bytes_model={op: c for op, (c, _) in OPS.items()},
                layout_note="nhwc rows: fastbn gets the (N,H,W,C) array with axis=-1")
    print(report._header(meta), flush=True)
    over = [n for n in threads if n > (os.cpu_count() or 1)]
    if over:
        print(f"warning: thread counts {over} exceed the {os.cpu_count()} logical CPUs",
              flush=True)

    torch_threads = torch.get_num_threads() if torch is not None else None
    progress = report.Progress(len(rows) * len(threads) * len(ops), mode=args.progress)
    try:
        results = run(rows, ops, threads, impls, repeat, sample_ms / 1e3, args.reuse, torch,
                      progress)
    finally:
        progress.close()
        set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(torch_threads)
    meta["load_average_end"] = machine._load_average()
    s = report.summary(results, threads)
    doc = {"meta": meta, "results": results, "summary": s}
    if net:
        # The network's own tables replace the per-row one (its rows are all in --json).
        doc[args.suite] = ns = report.network_summary(results, rows, threads, RESNET50_LAYERS)
        print(report.format_network(ns, results, threads, f"ResNet-50 batch {RESNET50_BATCH}"))
        print("\nper-row figures of the same run (each distinct shape once; floor, checks):")
    else:
        print(report.format_table(results, threads, impls))
    print(report.format_summary(s, threads, meta), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.json_safe(doc), f, indent=1)
    return 0
