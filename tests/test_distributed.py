"""SyncBatchNorm over MPI: k ranks equal one process on the whole batch; disagreement raises.

The multi-rank tests launch ``mpiexec -n 2`` and ``-n 3`` on the workers in tests/mpi/ (each
rank writes its results to a file in tmp_path, checked here, so a failure shows what each rank
saw). They are skipped, with the reason, when mpi4py or mpiexec is missing. The in-process
tests run on a one-rank COMM_WORLD.
"""
import copy
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import rel_err
from fastbn.layer import BatchNorm

from conftest import subprocess_env

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "mpi"
LAUNCH_TIMEOUT = 90  # seconds for one mpiexec run; a hang fails the test instead of CI


def _load_cases():
    spec = importlib.util.spec_from_file_location("_mpi_cases", WORKERS / "_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cases = _load_cases()


# --------------------------------------------------------------------------- launching

def _find_mpiexec():
    # Prefer the launcher installed beside this Python (the mpich wheel puts it there), so
    # that it matches the MPI library mpi4py loads.
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        p = os.path.join(d, "mpiexec")
        if os.path.exists(p):
            return p
    return shutil.which("mpiexec")


def _have_mpi4py():
    try:
        import mpi4py  # noqa: F401  (the package only: MPI starts with mpi4py.MPI)
    except ImportError:
        return False
    return True


def _mpi_ready():
    if not _have_mpi4py():
        return "mpi4py is not installed (pip install 'fastbn[mpi]')"
    if _find_mpiexec() is None:
        return "no mpiexec on PATH (pip install mpich, or install an MPI)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_ready() is not None, reason=str(_mpi_ready()))


def run_mpi(n, script, *args, timeout=LAUNCH_TIMEOUT):
    """Run ``mpiexec -n n python script args``; returns its combined output.

    Fails the test (with the output) on a non-zero exit or when it outlives ``timeout``: the
    whole process group is killed, so a hung rank cannot outlive the test.
    """
    mpiexec = _find_mpiexec()
    cmd = [mpiexec, "-n", str(n)]
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    # script: a worker's name, or an absolute path (which the / below keeps as is)
    cmd += [sys.executable, str(WORKERS / script), *map(str, args)]
    env = subprocess_env(OMP_NUM_THREADS="1")  # k ranks share the machine's cores
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for more than {timeout} s; output:\n{out}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}; output:\n{out}")
    return out


# --------------------------------------------------------------------------- k ranks = 1

_RUNS = {}


def equivalence_run(k, tmp_path_factory, tag=""):
    """Results of sync_equivalence.py on k ranks (one launch per k and tag), per rank."""
    key = (k, tag)
    if key not in _RUNS:
        d = tmp_path_factory.mktemp(f"sync_eq_{k}{tag}")
        run_mpi(k, "sync_equivalence.py", d)
        _RUNS[key] = [dict(np.load(d / f"rank{r}.npz")) for r in range(k)]
    return _RUNS[key]


def reference_steps(cfg, k):
    """Single-process BatchNorm on the whole batches: [(step key, split, results)]."""
    bn = BatchNorm(cases.num_features(cfg), **cases.layer_options(cfg))
    w, b = cases.parameters(cfg)
    if w is not None:
        bn.weight, bn.bias = w, b
    out = []
    for step, split in enumerate(cases.SPLITS[k]):
        x, dy = cases.batch(cfg, step, sum(split))
        y = bn(x)
        dx = bn.backward(dy)
        out.append((str(step), split, x, dy, y, dx, _state(bn)))
    return out, bn


def _state(bn):
    s = {n: getattr(bn, n).copy() for n in ("grad_weight", "grad_bias", "running_mean",
                                            "running_var") if getattr(bn, n) is not None}
    if bn.num_batches_tracked is not None:
        s["num_batches_tracked"] = bn.num_batches_tracked
    return s


def _tol(cfg):
    # float64 to 1e-12; float32 a few ulps; float16 output is rounded to 11 bits, so one
    # rounding step apart (results computed in float32 that land either side of a tie).
    return {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3}[cases.input_dtype(cfg).name]


@needs_mpi
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("cfg", list(cases.CONFIGS))
def test_k_ranks_equal_one_process_on_the_whole_batch(k, cfg, tmp_path_factory):
    ranks = equivalence_run(k, tmp_path_factory)
    tol = _tol(cfg)
    steps, _bn = reference_steps(cfg, k)
    assert any(0 in split for _, split, *_ in steps)  # a rank with no rows is exercised
    for step, split, _x, dy, y, dx, state in steps:
        for r in range(k):
            got = ranks[r]
            mine = cases.rows(split, r)
            key = f"{cfg}/{step}"
            assert got[f"{key}/y"].shape == y[mine].shape
            assert got[f"{key}/y"].dtype == y.dtype
            assert rel_err(got[f"{key}/y"], y[mine], scale=np.abs(y).max()) <= tol, (key, r)
            assert rel_err(got[f"{key}/dx"], dx[mine], scale=np.abs(dx).max()) <= tol, (key, r)
            for name, want in state.items():
                if name == "num_batches_tracked":
                    assert int(got[f"{key}/{name}"]) == want
                else:
                    assert rel_err(got[f"{key}/{name}"], want) <= tol, (key, r, name)
            # The whole batch's gradients and running statistics: bitwise the same on every
            # rank, since every rank merged the same numbers in the same order.
            for name in state:
                np.testing.assert_array_equal(got[f"{key}/{name}"], ranks[0][f"{key}/{name}"])


@needs_mpi
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("cfg", list(cases.CONFIGS))
def test_eval_mode_uses_running_statistics_locally(k, cfg, tmp_path_factory):
    ranks = equivalence_run(k, tmp_path_factory)
    tol = _tol(cfg)
    steps, bn = reference_steps(cfg, k)
    bn.eval()
    split = cases.EVAL_SPLIT[k]
    x, dy = cases.batch(cfg, 99, sum(split))
    y = bn(x)
    dx = bn.backward(dy)
    trained = steps[-1][-1]
    for r in range(k):
        got = ranks[r]
        mine = cases.rows(split, r)
        key = f"{cfg}/eval"
        assert rel_err(got[f"{key}/y"], y[mine], scale=np.abs(y).max()) <= tol
        assert rel_err(got[f"{key}/dx"], dx[mine], scale=np.abs(dx).max()) <= tol
        if "grad_weight" not in trained:
            continue
        if not bn.track_running_stats:
            # Batch statistics in eval mode too: synchronised, the whole batch's gradients.
            want_w, want_b = bn.grad_weight, bn.grad_bias
        else:
            # Eval-mode gradients are this rank's own (no communication): the trained
            # gradient plus an eval backward of this rank's rows alone.
            local = BatchNorm(cases.num_features(cfg), **cases.layer_options(cfg))
            local.load_state_dict(bn.state_dict())
            local.eval()
            local(x[mine])
            local.backward(dy[mine])
            want_w = trained["grad_weight"].astype(np.float64) + local.grad_weight
            want_b = trained["grad_bias"].astype(np.float64) + local.grad_bias
        assert rel_err(got[f"{key}/grad_weight"], want_w) <= 10 * tol, r
        assert rel_err(got[f"{key}/grad_bias"], want_b) <= 10 * tol, r


@needs_mpi
def test_repeated_runs_are_bitwise_identical(tmp_path_factory):
    first = equivalence_run(3, tmp_path_factory)
    second = equivalence_run(3, tmp_path_factory, tag="_again")
    for r in range(3):
        assert first[r].keys() == second[r].keys()
        for key in first[r]:
            np.testing.assert_array_equal(first[r][key], second[r][key], err_msg=key)


@needs_mpi
def test_example_data_parallel_training_matches_one_process():
    out = run_mpi(2, HERE.parent / "examples" / "ddp_train.py", "--epochs", "1", "--check")
    import re

    m = re.search(r"max relative parameter difference (\S+)", out)
    assert m, out
    assert float(m.group(1)) < 1e-12, out
    assert "test accuracy" in out


# --------------------------------------------------------------------------- disagreement

def errors_run(k, scenario, tmp_path):
    out = run_mpi(k, "sync_errors.py", scenario, tmp_path)
    facts = []
    for r in range(k):
        f = tmp_path / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result; mpiexec output:\n{out}"
        facts.append(json.loads(f.read_text()))
    return facts


# scenario -> (error type on rank 0, on the other ranks, a regex both messages match)
SYNC = ("SyncError", "SyncError")
MISMATCHES = {
    "channels": SYNC + (r"disagree on the number of features \(C\): rank 0: 3, rank 1: 4",),
    "dtype": SYNC + (r"disagree on the input dtype: rank 0: float64, rank 1: float32",),
    "axis": SYNC + (r"disagree on the feature axis: rank 0: 1, rank 1: 3",),
    "eps": SYNC + (r"disagree on eps: rank 0: 1e-05, rank 1: 0.001",),
    "mode_batch_stats": SYNC + (
        r"disagree on the options \(affine, track_running_stats, activation, training\): "
        r"rank 0: affine, training, rank 1: affine",),
    "op_order": SYNC + (
        r"disagree on the operation: rank 0: forward \(training\), "
        r"rank 1: backward \(training\)",),
    "skipped_layer": SYNC + (
        r"disagree on which SyncBatchNorm layer is called.*rank 0: 0, rank 1: 1",),
    "one_value": ("ValueError", "ValueError",
                  r"x: expected more than 1 value per channel when training, got 1 value\(s\) "
                  r"per channel in the whole batch"),
}


@needs_mpi
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("scenario", list(MISMATCHES))
def test_disagreeing_ranks_all_raise(k, scenario, tmp_path):
    import re

    facts = errors_run(k, scenario, tmp_path)
    first, others, pattern = MISMATCHES[scenario]
    for f in facts:
        want = first if f["rank"] == 0 else others
        assert f["error_type"] == want, f
        assert re.search(pattern, f["message"]), f
        assert f["seconds"] < 10, f  # answered at the header, not by a timeout
    if scenario == "channels":
        assert all(f["recovered"] for f in facts)  # the communicator is still usable
    if scenario == "op_order":
        assert all(f["first_forward"] for f in facts)
    if scenario == "one_value":
        assert all(f["running_var_unchanged"] and f["num_batches_tracked"] == 0 for f in facts)


@needs_mpi
@pytest.mark.parametrize("k", [2, 3])
def test_a_rank_whose_input_is_refused_stops_every_rank(k, tmp_path):
    facts = errors_run(k, "bad_input", tmp_path)
    bad = k - 1
    for f in facts:
        if f["rank"] == bad:
            assert f["error_type"] == "TypeError"
            assert f["message"].startswith("x: expected a floating-point array"), f
        else:
            assert f["error_type"] == "SyncError"
            assert f"rank {bad} failed before communicating and raised: TypeError: x: expected " \
                   "a floating-point array" in f["message"], f


@needs_mpi
@pytest.mark.parametrize("scenario,k", [("train_vs_eval", 2), ("train_vs_eval", 3),
                                        ("train_vs_eval_first_call", 2)])
def test_a_rank_left_waiting_times_out_and_tells_the_others(scenario, k, tmp_path):
    facts = errors_run(k, scenario, tmp_path)
    for f in facts:
        if f["rank"] == 0:
            assert f["error_type"] == "SyncTimeoutError", f
            assert "waited 3 s for the other ranks" in f["message"]
            assert "eval mode" in f["message"]
        else:
            assert f["error_type"] == "SyncError", f
            assert "rank 0 gave up" in f["message"], f
            assert f["eval_forwards"] < 100  # noticed during the eval loop, not after it
        assert f["seconds"] < 30, f


@needs_mpi
@pytest.mark.parametrize("k", [2, 3])
def test_eval_mode_does_not_communicate(k, tmp_path):
    # Rank 0 evaluates (forward and backward) while the others wait in a barrier of the
    # program's own: had eval communicated, rank 0 would have blocked and timed out.
    facts = errors_run(k, "eval_local", tmp_path)
    assert all(f["error_type"] is None for f in facts), facts
    assert facts[0]["eval_max_diff"] == 0.0  # the same as BatchNorm in eval mode
    for f in facts:
        assert f["calls"] == 2  # only the training forward and backward were collective
        assert f["running_mean"] == facts[0]["running_mean"]
        assert f["grad_bias"] == facts[0]["grad_bias"]


# --------------------------------------------------------------------------- in process

def test_import_needs_no_mpi4py():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import fastbn, fastbn.distributed as d\n"
        "assert 'mpi4py.MPI' not in sys.modules\n"
        "try:\n"
        "    d.SyncBatchNorm(3)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    env = subprocess_env()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ImportError: fastbn.distributed needs mpi4py" in out.stdout
    assert "fastbn[mpi]" in out.stdout


def test_merge_moments_is_exact_and_skips_empty_parts(rng):
    from fastbn.distributed import merge_moments
    from fastbn.functional import channel_moments

    x = 1e3 + rng.standard_normal((40, 4, 3))
    x[:, 2] = 5.0  # a constant channel: M2 must come out 0, not a rounding residue
    x[7, 3, 0] = np.nan  # poisons its own channel only
    parts = [x[:0], x[:11], x[11:11], x[11:12], x[12:]]
    moments = [channel_moments(p) for p in parts]
    n, mean, m2 = merge_moments(*zip(*moments))
    assert n == 40 * 3
    flat = x.transpose(1, 0, 2).reshape(4, -1)
    want_mean = flat.mean(axis=1)
    want_m2 = ((flat - want_mean[:, None]) ** 2).sum(axis=1)
    ok = [0, 1]
    assert rel_err(mean[ok], want_mean[ok]) <= 1e-15
    assert rel_err(m2[ok], want_m2[ok]) <= 1e-12
    assert mean[2] == 5.0 and m2[2] == 0.0
    assert np.isnan(mean[3]) and np.isnan(m2[3])
    n0, mean0, m20 = merge_moments([0, 0], [np.zeros(4)] * 2, [np.zeros(4)] * 2)
    assert n0 == 0 and not mean0.any() and not m20.any()


mpi4py_missing = pytest.mark.skipif(not _have_mpi4py(),
                                    reason="mpi4py is not installed (pip install 'fastbn[mpi]')")


@mpi4py_missing
def test_one_rank_equals_batchnorm_bitwise(rng):
    from fastbn.distributed import SyncBatchNorm

    for axis, shape, act in [(1, (7, 3, 4, 5), None), (-1, (6, 4, 5, 3), "relu")]:
        a = BatchNorm(3, axis=axis, activation=act, dtype=np.float64, momentum=None)
        b = SyncBatchNorm(3, axis=axis, activation=act, dtype=np.float64, momentum=None)
        for _ in range(2):
            x = 3 + rng.standard_normal(shape)
            dy = rng.standard_normal(shape)
            np.testing.assert_array_equal(a(x), b(x))
            np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert a.num_batches_tracked == b.num_batches_tracked == 2


@mpi4py_missing
def test_options_and_refusals():
    from fastbn.distributed import DEFAULT_TIMEOUT, SyncBatchNorm

    b = SyncBatchNorm(3, axis=-1, eps=1e-3, momentum=0.2, affine=False, dtype=np.float64)
    assert (b.axis, b.eps, b.momentum, b.affine, b.weight, b.dtype) == (
        -1, 1e-3, 0.2, False, None, np.float64)
    assert b.timeout == DEFAULT_TIMEOUT and b.comm.Get_size() >= 1
    with pytest.raises(TypeError,
                       match=r"comm: expected an mpi4py intracommunicator.*got builtins.int"):
        SyncBatchNorm(3, comm=3)
    with pytest.raises(ValueError,
                       match=r"timeout: expected a positive number of seconds or None, got -1.0"):
        SyncBatchNorm(3, timeout=-1)
    with pytest.raises(TypeError, match=r"timeout: expected a positive number.*got str"):
        SyncBatchNorm(3, timeout="1")
    with pytest.raises(ValueError,
                       match=r"device: SyncBatchNorm runs on NumPy arrays \(CPU\) only"):
        b.to("gpu")
    with pytest.raises(ValueError, match=r"x: expected 3 features"):
        b(np.zeros((4, 5), np.float64))
    with pytest.raises(RuntimeError, match=r"no forward to differentiate"):
        SyncBatchNorm(3).backward(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"got 1 value\(s\) per channel in the whole batch"):
        SyncBatchNorm(3)(np.zeros((1, 3), np.float32))


@mpi4py_missing
def test_copies_keep_the_communicator_and_state(rng):
    from fastbn.distributed import SyncBatchNorm

    b = SyncBatchNorm(3, dtype=np.float64)
    b(rng.standard_normal((5, 3)))
    for c in (copy.deepcopy(b), pickle.loads(pickle.dumps(b))):
        assert isinstance(c, SyncBatchNorm) and c.comm == b.comm
        np.testing.assert_array_equal(c.running_var, b.running_var)
        assert c.running_var is not b.running_var
        c(rng.standard_normal((5, 3)))  # usable
        assert c.num_batches_tracked == 2
    own = SyncBatchNorm(3, comm=b.comm.Dup())
    assert copy.deepcopy(own).comm == own.comm  # shared: communicators cannot be copied
    with pytest.raises(TypeError, match=r"cannot pickle a layer bound to a communicator other"):
        pickle.dumps(own)


@mpi4py_missing
def test_convert_sync_batchnorm_swaps_every_layer_and_shares_state():
    from fastbn.distributed import SyncBatchNorm, convert_sync_batchnorm

    class Block:
        def __init__(self):
            self.bn = BatchNorm(4, axis=-1, momentum=None, activation="relu")
            self.scale = np.ones(4)

    shared = BatchNorm(2, dtype=np.float64)
    shared.running_mean = [1.0, 2.0]
    shared.num_batches_tracked = 5
    shared.eval()
    already = SyncBatchNorm(3)
    model = {"blocks": [Block(), Block()], "pair": (shared, 1.5), "again": shared,
             "sync": already, "fn": np.sum}
    model["self"] = model  # cycles are fine
    weight = model["blocks"][0].bn.weight
    out = convert_sync_batchnorm(model)
    assert out is model
    bn0 = model["blocks"][0].bn
    assert isinstance(bn0, SyncBatchNorm)
    assert (bn0.axis, bn0.momentum, bn0.activation, bn0.training) == (-1, None, "relu", True)
    assert bn0.weight is weight  # shared, as PyTorch's convert_sync_batchnorm does
    assert model["blocks"][1].bn is not bn0
    s = model["pair"][0]
    assert isinstance(s, SyncBatchNorm) and model["again"] is s and model["pair"][1] == 1.5
    assert not s.training and s.num_batches_tracked == 5 and s.dtype == np.float64
    assert s.running_mean.tolist() == [1.0, 2.0]
    assert model["sync"] is already and model["fn"] is np.sum
    single = BatchNorm(3)
    converted = convert_sync_batchnorm(single)
    assert isinstance(converted, SyncBatchNorm) and converted.weight is single.weight
    layers = [BatchNorm(3), "not a layer"]
    assert isinstance(convert_sync_batchnorm(layers)[0], SyncBatchNorm)
