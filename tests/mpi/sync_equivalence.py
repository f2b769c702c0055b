"""MPI worker: SyncBatchNorm training and eval steps on uneven slices of known batches.

Usage: mpiexec -n K python sync_equivalence.py OUTDIR
Each rank writes OUTDIR/rank{r}.npz with, per config and step, its y and dx, and the layer's
grad_weight, grad_bias, running statistics and num_batches_tracked. The pytest side compares
them with a single-process BatchNorm on the whole batch.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cases  # noqa: E402

from mpi4py import MPI  # noqa: E402

from fastbn.distributed import SyncBatchNorm  # noqa: E402


def main(outdir):
    comm = MPI.COMM_WORLD
    rank, k = comm.Get_rank(), comm.Get_size()
    out = {}
    for cfg in _cases.CONFIGS:
        layer = SyncBatchNorm(_cases.num_features(cfg), comm, timeout=30,
                              **_cases.layer_options(cfg))
        w, b = _cases.parameters(cfg)
        if w is not None:
            layer.weight, layer.bias = w, b
        for step, split in enumerate(_cases.SPLITS[k]):
            x, dy = _cases.batch(cfg, step, sum(split))
            mine = _cases.rows(split, rank)
            # Own contiguous copies: a rank's slice is an array of its own in real use.
            y = layer(np.ascontiguousarray(x[mine]))
            dx = layer.backward(np.ascontiguousarray(dy[mine]))
            record(out, f"{cfg}/{step}", layer, y, dx)
        layer.eval()
        x, dy = _cases.batch(cfg, 99, sum(_cases.EVAL_SPLIT[k]))
        mine = _cases.rows(_cases.EVAL_SPLIT[k], rank)
        y = layer(x[mine])
        dx = layer.backward(dy[mine])
        record(out, f"{cfg}/eval", layer, y, dx)
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **out)


def record(out, key, layer, y, dx):
    out[f"{key}/y"] = y
    out[f"{key}/dx"] = dx
    for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
        v = getattr(layer, name)
        if v is not None:
            out[f"{key}/{name}"] = v.copy()
    if layer.num_batches_tracked is not None:
        out[f"{key}/num_batches_tracked"] = np.int64(layer.num_batches_tracked)


if __name__ == "__main__":
    main(sys.argv[1])
