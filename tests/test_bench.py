"""Smoke tests of `python -m fastbn bench` (fastbn._bench) on tiny rows: structure, not speed."""
import json
import math

import numpy as np
import pytest

from fastbn import _bench


def _run(tmp_path, capsys, *extra):
    path = tmp_path / "bench.json"
    rc = _bench.main(["--rows", "nc-32x16", "--threads", "1,2", "--repeat", "2",
                      "--sample-ms", "0.2", "--json", str(path), *extra])
    assert rc == 0
    captured = capsys.readouterr()
    with open(path) as f:
        return json.load(f), captured


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_json_structure_and_numbers(tmp_path, capsys):
    data, captured = _run(tmp_path, capsys, "--ops", "fwd-train,bwd-relu")
    meta, results = data["meta"], data["results"]
    assert meta["threads"] == [1, 2]
    assert meta["bytes_model"] == {"fwd-train": 1.5, "fwd-eval": 1.0, "bwd-train": 2.5,
                                   "fwd-relu": 1.5, "bwd-relu": 2.5}
    assert isinstance(meta["cpu"], str) and meta["cpu"]
    # one result per (row, thread count, op)
    assert sorted((r["threads"], r["op"]) for r in results) == [
        (1, "bwd-relu"), (1, "fwd-train"), (2, "bwd-relu"), (2, "fwd-train")]
    for r in results:
        assert r["row"] == "nc-32x16-f32" and r["shape"] == [32, 16]
        assert r["bytes"] == 32 * 16 * 4
        for impl in ["fastbn", "copy"] + [k for k in ("torch", "numpy") if k in r["times"]]:
            t = r["times"][impl]
            assert len(t["samples"]) == 2
            assert all(_positive(v) for v in t["samples"])
            assert min(t["samples"]) <= t["median"] <= max(t["samples"])
        for key in ("fastbn_gbps", "floor_gbps", "floor_share", "alloc_x"):
            assert _positive(r[key]), key
        copies = data["meta"]["bytes_model"][r["op"]]
        assert r["traffic_bytes"] == copies * 2 * r["bytes"]
        assert r["floor_share"] == pytest.approx(
            copies * r["times"]["copy"]["median"] / r["times"]["fastbn"]["median"])
        # NumPy is timed once (first thread count) and carried to the others
        assert r["times"]["numpy"]["median"] > 0
        tol = _bench.check_tolerance(np.dtype(r["dtype"]))
        assert all(v <= tol for v in r["check"].values()), r["check"]
    # the progress line goes to stderr, the table to stdout
    assert "nc-32x16-f32 t=2 bwd-relu" in captured.err
    assert "== threads = 2 ==" in captured.out
    assert "geometric-mean speed-up vs PyTorch" in captured.out
    assert "CPU:" in captured.out


def test_torch_columns_when_installed(tmp_path, capsys):
    pytest.importorskip("torch", reason="PyTorch not installed: no PyTorch baseline to check")
    data, _ = _run(tmp_path, capsys, "--ops", "fwd-eval")
    for r in data["results"]:
        assert _positive(r["times"]["torch"]["median"])
        assert r["torch_over_fastbn"] == pytest.approx(
            r["times"]["torch"]["median"] / r["times"]["fastbn"]["median"])
        assert r["check"]["torch"] <= 1e-3


def test_reuse_forward_allocates_nothing_of_x_size(tmp_path, capsys):
    # A 1 MiB row with C = 1024: the O(C) float64 bookkeeping (weights, statistics, the
    # running-stat update) is a few per cent of |x|; a y of x's size would be 1.
    rc = _bench.main(["--rows", "nc-256x1024", "--threads", "1", "--repeat", "1",
                      "--sample-ms", "0.2", "--ops", "fwd-train,bwd-train", "--impls",
                      "fastbn", "--reuse", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    with open(tmp_path / "r.json") as f:
        results = {r["op"]: r for r in json.load(f)["results"]}
    assert results["fwd-train"]["alloc_x"] < 0.15      # out= given: no y allocated
    assert 0.95 < results["bwd-train"]["alloc_x"] < 1.1  # dx only
    assert "--reuse" in capsys.readouterr().out


def test_default_allocation_is_one_output():
    row = _bench.Row("nchw", (4, 8, 16, 16))
    d = _bench.RowData(row)
    for op in ("fwd-train", "fwd-relu", "bwd-train", "bwd-relu"):
        calls = _bench.make_calls(d, op, ["fastbn"], False, None, 1)
        assert 0.95 < _bench.peak_alloc_ratio(calls["fastbn"], row.nbytes) < 1.2, op


@pytest.mark.parametrize("layout,shape", [("nchw", (4, 3, 6, 5)), ("nhwc", (4, 6, 5, 3)),
                                          ("nc", (17, 5))])
@pytest.mark.parametrize("op", list(_bench.OPS))
def test_numpy_baseline_matches_fastbn(layout, shape, op):
    # The NumPy baseline is plain code, independent of fastbn: agreement means both time
    # the same computation.
    d = _bench.RowData(_bench.Row(layout, shape))
    calls = _bench.make_calls(d, op, ["fastbn", "numpy"], False, None, 1)
    assert _bench.check_outputs(d, op, calls)["numpy"] < 1e-5


def test_selection_and_list(capsys):
    assert len(_bench.SUITE) == 18
    nhwc = _bench.select_rows("nhwc")
    assert [r.axis for r in nhwc] == [-1] * 5
    assert ("nhwc-8x224x224x3-f32" in [r.name for r in nhwc])
    assert [r.name for r in _bench.select_rows("all", ["f64"])] == [
        "nchw-32x64x56x56-f64", "nc-4096x1024-f64"]
    assert all(r.nbytes < 1e6 for r in _bench.select_rows("tiny"))
    assert _bench.main(["--subset", "tiny", "--list"]) == 0
    out = capsys.readouterr().out
    assert "nc-32x16-f32" in out and "nchw-8x16x4x4-f32" in out


@pytest.mark.parametrize("argv,match", [
    (["--ops", "fwd-train,sideways"], "--ops: expected some of"),
    (["--threads", "two"], "--threads: expected a comma-separated list of integers"),
    (["--threads", "0"], "--threads: expected positive integers"),
    (["--rows", "no-such-row"], "no rows selected"),
])
def test_bad_options(argv, match):
    with pytest.raises(SystemExit, match=match):
        _bench.main(argv)


@pytest.mark.parametrize("nbytes,nthreads,expected", [
    (1 << 20, 2, 1.0),               # one equal contiguous share per thread
    (64 << 20, 2, 1.0),
    (5 << 20, 2, 1.0),
    ((5 << 20) + 1, 2, (((5 << 19) + 1 + 63) // 64 * 64) / (((5 << 20) + 1) / 2)),  # rounding to 64
    (4096, 2, 2.0),                  # serial below 128 KiB
    (5 << 20, 1, 1.0),
])
def test_probe_imbalance(nbytes, nthreads, expected):
    assert _bench.probe_imbalance(nbytes, nthreads) == pytest.approx(expected)


def test_torch_thp_option_is_recorded(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch", reason="PyTorch not installed: --torch-thp has no effect")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # restored after the test
    path = tmp_path / "thp.json"
    assert _bench.main(["--rows", "nc-32x16", "--threads", "1", "--ops", "fwd-eval",
                        "--repeat", "1", "--sample-ms", "0.2", "--torch-thp",
                        "--json", str(path)]) == 0
    with open(path) as f:
        meta = json.load(f)["meta"]
    assert meta["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE=1 (now: 1" in capsys.readouterr().out
