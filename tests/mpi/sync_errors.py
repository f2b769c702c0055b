"""MPI worker: ranks that disagree must all raise, quickly, instead of hanging.

Usage: mpiexec -n K python sync_errors.py SCENARIO OUTDIR
Every rank writes OUTDIR/rank{r}.json: the exception it got (type and message) or none, the
seconds it took, and scenario-specific facts. The pytest side checks that every rank wrote
its file (no rank hung) and that each one saw the expected error.
"""
import json
import os
import sys
import time

import numpy as np

from mpi4py import MPI

from fastbn.distributed import SyncBatchNorm
from fastbn.layer import BatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
rng = np.random.default_rng(rank)
TIMEOUT = 3.0  # seconds; short, so that the timeout scenarios end quickly


def data(shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def channels(facts):
    layer = SyncBatchNorm(3 if rank == 0 else 4, dtype=np.float64, timeout=TIMEOUT)
    try:
        layer(data((5, layer.num_features, 2)))
    finally:
        # A disagreement caught at the header leaves the communicator usable.
        ok = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
        ok(data((5, 3, 2)))
        facts["recovered"] = True


def dtype(facts):
    dt = np.float64 if rank == 0 else np.float32
    SyncBatchNorm(3, dtype=dt, timeout=TIMEOUT)(data((5, 3, 2), dt))


def axis(facts):
    ax = 1 if rank == 0 else -1
    SyncBatchNorm(3, axis=ax, dtype=np.float64, timeout=TIMEOUT)(data((5, 3, 4, 3)))


def eps(facts):
    SyncBatchNorm(3, eps=1e-5 if rank == 0 else 1e-3, dtype=np.float64,
                  timeout=TIMEOUT)(data((5, 3)))


def mode_batch_stats(facts):
    # Without running statistics eval mode also uses (synchronised) batch statistics, so
    # a rank in eval mode while another trains is caught at the header.
    layer = SyncBatchNorm(3, track_running_stats=False, dtype=np.float64, timeout=TIMEOUT)
    layer.train(rank == 0)
    layer(data((5, 3)))


def op_order(facts):
    layer = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    x = data((5, 3, 2))
    layer(x)
    facts["first_forward"] = True
    if rank == 0:
        layer(x)
    else:
        layer.backward(x)


def skipped_layer(facts):
    a = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    b = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    x = data((5, 3, 2))
    if rank == 0:
        a(x)  # the other ranks skip layer a
    b(x)


def bad_input(facts):
    layer = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    x = data((5, 3, 2))
    layer(x.astype(np.int64) if rank == size - 1 else x)


def one_value(facts):
    layer = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    before = layer.running_var.copy()
    try:
        layer(data((1 if rank == 0 else 0, 3)))
    finally:
        facts["running_var_unchanged"] = bool(np.array_equal(layer.running_var, before))
        facts["num_batches_tracked"] = layer.num_batches_tracked


def train_vs_eval(facts, first_call=False):
    layer = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    x = data((5, 3, 2))
    if not first_call:
        layer(x)  # one step together, then the other ranks forget layer.train()
        facts["first_step"] = True
    if rank == 0:
        layer(x)  # training: waits for the others, which never come
    else:
        layer.eval()
        # An evaluation loop: local forwards, which notice that rank 0 gave up.
        for i in range(100):
            layer(x)
            facts["eval_forwards"] = i + 1
            time.sleep(0.2)


def train_vs_eval_first_call(facts):
    # The same, at the very first synchronised call (while the communicator is duplicated).
    train_vs_eval(facts, first_call=True)


def eval_local(facts):
    """Rank 0 evaluates alone (no communication), then all ranks train together."""
    layer = SyncBatchNorm(3, dtype=np.float64, timeout=TIMEOUT)
    ref = BatchNorm(3, dtype=np.float64)
    layer.running_mean, layer.running_var = [0.5, -1.0, 2.0], [2.0, 0.5, 1.5]
    ref.load_state_dict(layer.state_dict())
    if rank == 0:
        layer.eval()
        ref.eval()
        worst = 0.0
        for _ in range(5):
            x, dy = data((4, 3, 2)), data((4, 3, 2))
            worst = max(worst, float(np.max(np.abs(layer(x) - ref(x)))))
            worst = max(worst, float(np.max(np.abs(layer.backward(dy) - ref.backward(dy)))))
        facts["eval_max_diff"] = worst
        layer.train()
        layer.zero_grad()
    comm.Barrier()  # the other ranks wait here while rank 0 evaluates
    layer(data((4, 3, 2)))
    layer.backward(data((4, 3, 2)))
    facts["calls"] = layer._calls
    facts["running_mean"] = layer.running_mean.tolist()
    facts["grad_bias"] = layer.grad_bias.tolist()


SCENARIOS = {f.__name__: f for f in (channels, dtype, axis, eps, mode_batch_stats, op_order,
                                     skipped_layer, bad_input, one_value, train_vs_eval,
                                     train_vs_eval_first_call, eval_local)}


def main(scenario, outdir):
    facts = {"rank": rank, "size": size, "error_type": None, "message": None}
    # Ranks finish importing at different times on a loaded machine; without this barrier that
    # skew would count against the scenarios' short timeout and turn errors into timeouts.
    comm.Barrier()
    start = time.monotonic()
    try:
        SCENARIOS[scenario](facts)
    except Exception as exc:  # recorded for the pytest side to check
        facts["error_type"] = type(exc).__name__
        facts["message"] = str(exc)
    facts["seconds"] = time.monotonic() - start
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
