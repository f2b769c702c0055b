"""What the benchmark prints and writes: header, tables, summary, network sums, JSON, progress.

Columns of an implementation that did not run (PyTorch not installed, or left out) are left
out of the tables, not filled with "-"; the summary says in one line that PyTorch is absent.
"""
import math
import os
import sys
import time

import numpy as np

from .impls import check_tolerance
from .suites import (FLOOR_MIN_BYTES, FLOOR_TARGET, MB, OPS, RESNET50_OPS, SCALING_MIN_BYTES,
                     SCALING_TARGET, TINY_BYTES)

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


def _runtimes(meta):
    """The OpenMP runtimes line: threadpoolctl's libraries with their thread counts."""
    rts = meta.get("openmp_runtimes")
    if rts is None:
        return "? (threadpoolctl is not installed: pip install threadpoolctl)"
    if not rts:
        return "none loaded"
    return ", ".join(f"{os.path.basename(r['filepath'] or r['prefix'] or '?')}"
                     + (f" {r['version']}" if r.get("version") else "")
                     + f" ({r['num_threads']} threads)" for r in rts)


def _header(meta):
    names = {"fastbn": "fastbn", "torch": "PyTorch", "numpy": "NumPy"}
    lines = [
        f"fastbn bench ({meta.get('suite', 'shapes')} suite): "
        + " vs ".join(names[i] for i in meta["impls"]) + ", same arrays, interleaved rounds",
        f"CPU: {meta['cpu']}; kernels' CPU level: {meta['kernels_cpu_level'] or 'n/a'} "
        f"({meta['logical_cpus']} logical CPUs, {meta.get('usable_cpus')} usable; caches "
        f"{', '.join(f'{k} {v}' for k, v in meta['caches'].items()) or 'unknown'})",
        f"numpy {meta['numpy']}, torch {meta['torch'] or 'not installed'}, python "
        f"{meta['python']}, fastbn OpenMP {'on' if meta['fastbn_openmp'] else 'OFF'}; "
        f"OpenMP runtime(s): {_runtimes(meta)}",
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
    ] + ([
        "PyTorch: torch.native_batch_norm (train/eval), aten.native_batch_norm_backward; "
        "relu: torch.relu_ in place after the forward, aten.threshold_backward before the "
        "backward"] if "torch" in meta["impls"] else []) + ([
        "NumPy: plain vectorised code, single-threaded; timed at the first thread count and "
        "shown in every block"] if "numpy" in meta["impls"] else []) + [
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


# (heading, width, alignment, needs): a column shows only where its implementation ran.
_TABLE = (("row", 26, "<", None), ("MB", 7, ">", None), ("op", 9, "<", None),
          ("fastbn", 10, ">", None), ("iqr", 5, ">", None), ("torch", 10, ">", "torch"),
          ("iqr", 5, ">", "torch"), ("numpy", 10, ">", "numpy"), ("pt/fb", 7, ">", "torch"),
          ("GB/s", 7, ">", None), ("flrGB/s", 7, ">", None), ("%floor", 6, ">", None),
          ("alloc", 6, ">", None), ("ok", 3, ">", None))


def _columns(spec, impls):
    keep = [i for i, c in enumerate(spec) if c[3] is None or c[3] in impls]
    fmt = " ".join(f"{{:{spec[i][2]}{spec[i][1]}}}" for i in keep)
    return keep, fmt


def format_table(results, threads, impls):
    keep, fmt = _columns(_TABLE, impls)
    lines = []
    for nt in threads:
        lines.append("")
        lines.append(f"== threads = {nt} ==")
        lines.append(fmt.format(*(_TABLE[i][0] for i in keep)))
        for r in (r for r in results if r["threads"] == nt):
            t = r["times"]
            tol = check_tolerance(np.dtype(r["dtype"]))
            ok = all(v <= tol for v in r["check"].values())
            tr = t.get("torch")
            ratio = r["torch_over_fastbn"]
            cells = (
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
                "yes" if ok else "NO")
            lines.append(fmt.format(*(cells[i] for i in keep)))
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


_NTABLE = (("shape (N,C,H,W)", 20, "<", None), ("x", 3, ">", None), ("layers", 22, "<", None),
           ("fwd fb", 8, ">", None), ("fwd pt", 8, ">", "torch"), ("bwd fb", 8, ">", None),
           ("bwd pt", 8, ">", "torch"), ("step fb", 9, ">", None), ("step pt", 9, ">", "torch"),
           ("pt/fb", 6, ">", "torch"), ("eval fb", 8, ">", None), ("eval pt", 8, ">", "torch"),
           ("pt/fb", 6, ">", "torch"), ("iqr", 5, ">", None))
_HEADLINE = (("layout", 7, "<", None), ("threads", 7, ">", None), ("layers", 6, ">", None),
             ("|", 1, "<", None), ("step fb", 9, ">", None), ("step pt", 9, ">", "torch"),
             ("pt/fb", 5, ">", "torch"), ("[min]", 6, ">", "torch"), ("|", 1, "<", None),
             ("infer fb", 9, ">", None), ("infer pt", 9, ">", "torch"),
             ("pt/fb", 5, ">", "torch"), ("[min]", 6, ">", "torch"))


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
    impls = ["fastbn"] + (["torch"] if any("torch" in r["times"] for r in results) else [])
    keep, fmt = _columns(_NTABLE, impls)
    hkeep, hfmt = _columns(_HEADLINE, impls)
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
            lines.append(fmt.format(*(_NTABLE[i][0] for i in keep)))
            for e in ents:
                f, b, v, st = e["fwd-train"], e["bwd-train"], e["fwd-eval"], e["train_step"]
                spread = iqr.get((e["row"], nt), 0.0)
                cells = (
                    "x".join(map(str, e["nchw"])), e["count"], _short_layers(e["layers"]),
                    _fmt_time(f["fastbn"]), _fmt_time(f["torch"]), _fmt_time(b["fastbn"]),
                    _fmt_time(b["torch"]), _fmt_time(st["fastbn"]), _fmt_time(st["torch"]),
                    _fr(st["torch_over_fastbn"]), _fmt_time(v["fastbn"]),
                    _fmt_time(v["torch"]), _fr(v["torch_over_fastbn"]),
                    f"{100 * spread:.0f}%")
                lines.append(fmt.format(*(cells[i] for i in keep)))
            ts, inf = net["train_step"], net["inference"]
            cells = (
                "network sum", net["layers"], f"({net['distinct_shapes']} shapes x count)",
                _fmt_time(net["fwd-train"]["fastbn"]), _fmt_time(net["fwd-train"]["torch"]),
                _fmt_time(net["bwd-train"]["fastbn"]), _fmt_time(net["bwd-train"]["torch"]),
                _fmt_time(ts["fastbn"]), _fmt_time(ts["torch"]), _fr(ts["torch_over_fastbn"]),
                _fmt_time(inf["fastbn"]), _fmt_time(inf["torch"]),
                _fr(inf["torch_over_fastbn"]), "")
            lines.append(fmt.format(*(cells[i] for i in keep)))
    lines.append("")
    n_all = ns["layers_in_network"]
    if "torch" in impls:
        lines.append(f"== {title}: all batch-norm layers per step, fastbn vs PyTorch ==")
        lines.append(f"each distinct shape is timed once and counted as often as the network "
                     f"has it ({n_all} layers); per-call medians; pt/fb = PyTorch time / "
                     "fastbn time (> 1: fastbn faster); [on minima]")
    else:
        lines.append(f"== {title}: all batch-norm layers per step, fastbn ==")
        lines.append(f"each distinct shape is timed once and counted as often as the network "
                     f"has it ({n_all} layers); per-call medians")
    lines.append(hfmt.format(*(_HEADLINE[i][0] for i in hkeep)))
    for net in ns["network"]:
        ts, inf = net["train_step"], net["inference"]
        partial = "" if net["layers"] == n_all else f"  (PARTIAL: {net['layers']} of {n_all})"
        cells = (net["layout"], net["threads"], net["layers"], "|",
                 _fmt_time(ts["fastbn"]), _fmt_time(ts["torch"]),
                 _fr(ts["torch_over_fastbn"]), f"[{_fr(ts['torch_over_fastbn_min'])}]", "|",
                 _fmt_time(inf["fastbn"]), _fmt_time(inf["torch"]),
                 _fr(inf["torch_over_fastbn"]), f"[{_fr(inf['torch_over_fastbn_min'])}]")
        lines.append(hfmt.format(*(cells[i] for i in hkeep)) + partial)
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



# --------------------------------------------------------------------------- variants suite

def variants_header(meta):
    """The header of ``--suite variants``: the machine, the timing, what each op times."""
    lines = [
        "fastbn bench (variants suite): each variant beside plain batch norm's same op "
        "(training forward or backward), same arrays, interleaved rounds",
        f"CPU: {meta['cpu']}; kernels' CPU level: {meta['kernels_cpu_level'] or 'n/a'} "
        f"({meta['logical_cpus']} logical CPUs, {meta.get('usable_cpus')} usable)",
        f"numpy {meta['numpy']}, python {meta['python']}, fastbn OpenMP "
        f"{'on' if meta['fastbn_openmp'] else 'OFF'}",
        f"timing: {meta['repeat']} rounds, samples of >= {meta['sample_ms']} ms, median per "
        "call; iqr = interquartile range / median; every op of a row takes a turn in each round",
        "GLIBC_TUNABLES="
        + (meta["GLIBC_TUNABLES"] or "(unset: fresh multi-MB outputs may page-fault)")
        + f"; 1-min load average at start: {meta['load_average_start']}",
        "x/plain = the variant's time / plain batch norm's op of the same row, thread count and "
        "run; every call allocates its outputs",
        "ops:",
    ] + [f"  {op:<11} {text}" for op, text in meta["op_descriptions"].items()]
    return "\n".join(lines)


_VTABLE = "{:<26} {:>7} {:<11} {:>10} {:>5} {:>8}"


def format_variants(results, threads):
    lines = []
    for nt in threads:
        lines.append("")
        lines.append(f"== threads = {nt} ==")
        lines.append(_VTABLE.format("row", "MB", "op", "time", "iqr", "x/plain"))
        for r in (r for r in results if r["threads"] == nt):
            t = r["times"]["fastbn"]
            lines.append(_VTABLE.format(
                r["row"], f"{r['bytes'] / MB:.2f}", r["op"], _fmt_time(t["median"]),
                f"{100 * t['iqr_rel']:.0f}%",
                "-" if r["ratio"] is None else f"{r['ratio']:.2f}"))
    return "\n".join(lines)


def variants_summary(results, threads):
    """{threads: {op: geometric mean over the rows of the variant's ratio to plain}}."""
    out = {}
    for nt in threads:
        per = {}
        for r in results:
            if r["threads"] == nt and r["ratio"] is not None:
                per.setdefault(r["op"], []).append(r["ratio"])
        out[nt] = {op: _geomean(v) for op, v in per.items()}
    return out


def format_variants_summary(s, threads):
    lines = ["", "== summary: variant time / plain batch norm's, geometric mean over the rows =="]
    for nt in threads:
        lines.append(f"threads={nt}: " + ", ".join(f"{op} {v:.2f}x"
                                                   for op, v in s[nt].items()))
    return "\n".join(lines)


def json_safe(obj):
    """``obj`` with non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- GPU

_GPU_TABLE = (("row", 28, "<", None), ("op", 10, "<", None), ("MB", 7, ">", None),
              ("fastbn ms", 10, ">", None), ("torch ms", 9, ">", "torch"),
              ("floor ms", 9, ">", None), ("fbn floor%", 10, ">", None),
              ("torch floor%", 12, ">", "torch"), ("torch/fbn", 9, ">", "torch"))


def gpu_header(info, impls, bw, copy_bytes):
    """The GPU bench's first line and its table's column headings."""
    keep, fmt = _columns(_GPU_TABLE, impls)
    head = fmt.format(*(_GPU_TABLE[i][0] for i in keep))
    torch = "torch" in impls
    return (f"fastbn GPU bench on {info['device']} (CuPy {info['cupy']}"
            + (f", PyTorch {info['torch']}, cuDNN {info['cudnn']}" if torch else ", no PyTorch")
            + f"); copy floor {bw / 1e9:.0f} GB/s (read + write, {copy_bytes / MB:.0f} MB copy)"
            + "\n" + head + "\n" + "-" * len(head))


def gpu_line(res, impls):
    """One row of the GPU table."""
    keep, fmt = _columns(_GPU_TABLE, impls)
    tf, tt, floor = res["fastbn_s"], res["torch_s"], res["floor_s"]
    cells = (res["row"], res["op"], f"{res['bytes'] / MB:.1f}", f"{tf * 1e3:.4f}",
             "-" if tt is None else f"{tt * 1e3:.4f}", f"{floor * 1e3:.4f}",
             f"{100 * floor / tf:.0f}%", "-" if tt is None else f"{100 * floor / tt:.0f}%",
             "-" if tt is None else f"{tt / tf:.2f}")
    return fmt.format(*(cells[i] for i in keep))


def gpu_summary(results, have_torch):
    ratios = [r["torch_over_fastbn"] for r in results if r["torch_over_fastbn"]]
    if ratios:
        return (f"geometric-mean torch/fastbn: {_geomean(ratios):.2f} over {len(ratios)} rows")
    if not have_torch:
        return ("PyTorch with CUDA is not available (or --no-torch): no comparison with it "
                "(pip install torch==2.13.0 with CUDA to add one)")
    return ""


# --------------------------------------------------------------------------- progress

class Progress:
    """Progress of a run with an ETA, on stderr.

    ``mode``: "auto" (tqdm where it is installed and the stream is a terminal, else plain
    lines), "tqdm" (tqdm even when the stream is not a terminal), "plain" or "none". A plain
    line is ``[done/total] elapsed ETA text``; on a terminal it rewrites itself in place.
    """

    def __init__(self, total, stream=None, mode="auto"):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.mode = mode
        self.t0 = time.perf_counter()
        self.bar = None
        if mode in ("auto", "tqdm") and (self.tty or mode == "tqdm"):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=self.stream, unit="cell", leave=False,
                                dynamic_ncols=True)
        if mode == "tqdm" and self.bar is None:
            self.mode = "plain"

    def eta(self):
        """Seconds left, from the mean time of the steps done so far (None before one)."""
        if self.done <= 1:
            return None
        el = time.perf_counter() - self.t0
        return el / (self.done - 1) * (self.total - self.done + 1)

    def step(self, text):
        """Announce the next step (the previous one is done)."""
        self.done += 1
        if self.mode == "none":
            return
        if self.bar is not None:
            if self.done > 1:
                self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=True)
            return
        el = time.perf_counter() - self.t0
        eta = self.eta()
        line = (f"[{self.done:4d}/{self.total}] {el:6.1f}s "
                f"ETA {'?' if eta is None else _fmt_eta(eta):>6} {text}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()
            self.bar = None
        elif self.tty and self.mode != "none":
            self.stream.write("\r\033[K")
            self.stream.flush()


def _fmt_eta(s):
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
