"""The one timing loop of fastbn's benchmarks (CPU and GPU bench, ``python -m fastbn`` report).

Round-robin sampling: every callable is calibrated to a number of calls per sample that lasts
about ``min_sample`` seconds; then in each of ``repeat`` rounds every callable takes one turn,
the starting one rotating, so that a slow phase of a shared machine lands on all of them
instead of on one. A sample is the time of its calls divided by their number; ``summarize``
gives the median, the interquartile range over the median and the minimum.

What a sample's time is comes from a *clock*: ``clock(f, k)`` runs ``f`` ``k`` times and
returns the seconds they took. :func:`wall_clock` (``time.perf_counter``) serves the CPU;
:func:`cuda_event_clock` (CUDA events around the calls, then a synchronisation) the GPU.
"""
import gc
import math
import time

import numpy as np

MAX_LOOPS = 1 << 20


def wall_clock(f, k):
    """Seconds of ``k`` calls of ``f`` by ``time.perf_counter``."""
    t0 = time.perf_counter()
    for _ in range(k):
        f()
    return time.perf_counter() - t0


def cuda_event_clock(cp):
    """A clock for CuPy work: CUDA events around the ``k`` calls, waited for at the end."""
    def clock(f, k):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(k):
            f()
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3
    return clock


def loops_for(f, min_sample, clock=wall_clock, max_loops=MAX_LOOPS):
    """Calls per sample so that a sample lasts about ``min_sample`` seconds (at least 1)."""
    clock(f, 1)  # first call: touches output pages, warms caches and the allocator
    k = 1
    while True:
        dt = clock(f, k)
        if dt >= min_sample / 4 or k >= max_loops:
            return max(1, min(max_loops, math.ceil(k * min_sample / max(dt, 1e-9))))
        k *= 8


def time_round_robin(calls, repeat, min_sample, clock=wall_clock, max_loops=MAX_LOOPS):
    """Per-call times {name: [repeat samples]}; in each repeat every callable takes a turn.

    The garbage collector is off while sampling (a collection would land on one of them).
    """
    names = list(calls)
    loops = {n: loops_for(calls[n], min_sample, clock, max_loops) for n in names}
    samples = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeat):
            s = r % len(names)
            for n in names[s:] + names[:s]:
                k = loops[n]
                samples[n].append(clock(calls[n], k) / k)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summarize(samples):
    """{"median", "iqr_rel" (interquartile range / median), "min", "samples"} of samples."""
    a = np.asarray(samples)
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "iqr_rel": float((q75 - q25) / med) if med > 0 else 0.0,
            "min": float(a.min()), "samples": [float(v) for v in a]}


def medians(calls, repeat, min_sample=0.0, clock=wall_clock):
    """{name: median seconds per call} of :func:`time_round_robin`.

    With the default ``min_sample=0`` every sample is one call (after one warm-up call and
    one calibration call): the median of ``repeat`` single calls, interleaved.
    """
    return {n: summarize(s)["median"]
            for n, s in time_round_robin(calls, repeat, min_sample, clock).items()}
