"""fastbn's benchmark: ``python -m fastbn bench`` (CPU) and ``python -m fastbn bench --gpu``.

One process times every implementation on the same arrays, interleaved: within each round the
implementations (and the floor probe) take turns, the starting one rotating, so that a slow
phase of a shared machine lands on all of them instead of on one. Each sample runs enough calls
to last ``--sample-ms``; a row's time is the median sample per call, its spread the
interquartile range over the median.

The floor of a row is measured in the same rounds: on the CPU ``fastbn._kernels.stream_copy``
(an OpenMP memcpy, one equal contiguous share per thread) copies |x| bytes with the row's
thread count; on the GPU a device-to-device copy measured once gives the bandwidth. An op's
traffic is counted in copies of x (one copy reads |x| and writes |x|): training forward 1.5,
inference 1, backward 2.5, the ReLU variants as their base op.

Modules: ``suites`` (the rows), ``impls`` (fastbn CPU and CuPy, PyTorch CPU and CUDA, NumPy,
the probes), ``timing`` (the one timing loop), ``machine`` (what it ran on), ``report``
(tables, summary, JSON, progress) and ``cli`` (the parser and :func:`main`).
"""
from .cli import derive, main, parser, run, run_gpu, split
from .impls import (IMPLS, PROBE, RowData, check_outputs, check_tolerance, make_calls,
                    peak_alloc_ratio, probe_imbalance)
from .machine import cpu_model, kernels_cpu_level, machine_info
from .report import Progress, format_network, format_summary, format_table, network_summary, summary
from .suites import (OPS, RESNET50, RESNET50_BATCH, RESNET50_LAYERS, RESNET50_OPS, SUBSETS,
                     SUITE, SUITES, NetRow, Row, resnet50_layers, select_rows)
from .timing import summarize, time_round_robin

__all__ = [
    "IMPLS", "NetRow", "OPS", "PROBE", "Progress", "RESNET50", "RESNET50_BATCH",
    "RESNET50_LAYERS", "RESNET50_OPS", "Row", "RowData", "SUBSETS", "SUITE", "SUITES",
    "check_outputs", "check_tolerance", "cpu_model", "derive", "format_network",
    "format_summary", "format_table", "kernels_cpu_level", "machine_info", "main",
    "make_calls", "network_summary", "parser", "peak_alloc_ratio", "probe_imbalance",
    "resnet50_layers", "run", "run_gpu", "select_rows", "split", "summarize", "summary",
    "time_round_robin",
]
