"""Smoke tests of `python -m fastbn bench` (fastbn.benchmark) on tiny rows: structure, not speed."""
import json
import math

import numpy as np
import pytest

from fastbn import _kernels
from fastbn import benchmark as bench
from fastbn.benchmark import report


def _run(tmp_path, capsys, *extra):
    path = tmp_path / "bench.json"
    rc = bench.main(["--rows", "nc-32x16", "--threads", "1,2", "--repeat", "2",
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
        tol = bench.check_tolerance(np.dtype(r["dtype"]))
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
    rc = bench.main(["--rows", "nc-256x1024", "--threads", "1", "--repeat", "1",
                      "--sample-ms", "0.2", "--ops", "fwd-train,bwd-train", "--impls",
                      "fastbn", "--reuse", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    with open(tmp_path / "r.json") as f:
        results = {r["op"]: r for r in json.load(f)["results"]}
    assert results["fwd-train"]["alloc_x"] < 0.15      # out= given: no y allocated
    assert 0.95 < results["bwd-train"]["alloc_x"] < 1.1  # dx only
    assert "--reuse" in capsys.readouterr().out


def test_default_allocation_is_one_output():
    row = bench.Row("nchw", (4, 8, 16, 16))
    d = bench.RowData(row)
    for op in ("fwd-train", "fwd-relu", "bwd-train", "bwd-relu"):
        calls = bench.make_calls(d, op, ["fastbn"], False, None, 1)
        assert 0.95 < bench.peak_alloc_ratio(calls["fastbn"], row.nbytes) < 1.2, op


@pytest.mark.parametrize("layout,shape", [("nchw", (4, 3, 6, 5)), ("nhwc", (4, 6, 5, 3)),
                                          ("nc", (17, 5))])
@pytest.mark.parametrize("op", list(bench.OPS))
def test_numpy_baseline_matches_fastbn(layout, shape, op):
    # The NumPy baseline is plain code, independent of fastbn: agreement means both time
    # the same computation.
    d = bench.RowData(bench.Row(layout, shape))
    calls = bench.make_calls(d, op, ["fastbn", "numpy"], False, None, 1)
    assert bench.check_outputs(d, op, calls)["numpy"] < 1e-5


def test_selection_and_list(capsys):
    assert len(bench.SUITE) == 18
    nhwc = bench.select_rows("nhwc")
    assert [r.axis for r in nhwc] == [-1] * 5
    assert ("nhwc-8x224x224x3-f32" in [r.name for r in nhwc])
    assert [r.name for r in bench.select_rows("all", ["f64"])] == [
        "nchw-32x64x56x56-f64", "nc-4096x1024-f64"]
    assert all(r.nbytes < 1e6 for r in bench.select_rows("tiny"))
    assert bench.main(["--subset", "tiny", "--list"]) == 0
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
        bench.main(argv)


@pytest.mark.parametrize("nbytes,nthreads,expected", [
    (1 << 20, 2, 1.0),               # one equal contiguous share per thread
    (64 << 20, 2, 1.0),
    (5 << 20, 2, 1.0),
    ((5 << 20) + 1, 2, (((5 << 19) + 1 + 63) // 64 * 64) / (((5 << 20) + 1) / 2)),  # rounding to 64
    (4096, 2, 2.0),                  # serial below 128 KiB
    (5 << 20, 1, 1.0),
])
def test_probe_imbalance(nbytes, nthreads, expected):
    assert bench.probe_imbalance(nbytes, nthreads) == pytest.approx(expected)


def test_torch_thp_option_is_recorded(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch", reason="PyTorch not installed: --torch-thp has no effect")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # restored after the test
    path = tmp_path / "thp.json"
    assert bench.main(["--rows", "nc-32x16", "--threads", "1", "--ops", "fwd-eval",
                        "--repeat", "1", "--sample-ms", "0.2", "--torch-thp",
                        "--json", str(path)]) == 0
    with open(path) as f:
        meta = json.load(f)["meta"]
    assert meta["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE=1 (now: 1" in capsys.readouterr().out


# --------------------------------------------------------------------------- ResNet-50 suite

def test_resnet50_layers_follow_the_architecture():
    layers = bench.resnet50_layers()
    assert len(layers) == 53
    names = [n for n, _ in layers]
    assert len(set(names)) == 53
    assert layers[0] == ("bn1", (16, 64, 112, 112))
    assert layers[-1] == ("layer4.2.bn3", (16, 2048, 7, 7))
    shapes = dict(layers)
    # v1.5: the stride is on conv2, so bn1 of a first block sees the input resolution
    assert shapes["layer2.0.bn1"] == (16, 128, 56, 56)
    assert shapes["layer2.0.bn2"] == (16, 128, 28, 28)
    assert shapes["layer3.0.bn1"] == (16, 256, 28, 28)
    assert shapes["layer4.0.bn1"] == (16, 512, 14, 14)
    assert shapes["layer1.0.downsample.1"] == (16, 256, 56, 56)
    assert shapes["layer4.0.downsample.1"] == (16, 2048, 7, 7)
    assert [n for n in names if "downsample" in n] == [
        f"layer{i}.0.downsample.1" for i in (1, 2, 3, 4)]
    for li, (width, blocks, res) in enumerate([(64, 3, 56), (128, 4, 28), (256, 6, 14),
                                               (512, 3, 7)], 1):
        stage = [(n, s) for n, s in layers if n.startswith(f"layer{li}.")]
        assert len(stage) == 3 * blocks + 1
        for n, (N, C, H, W) in stage:
            assert N == 16 and H == W
            assert C == (width if n.endswith(("bn1", "bn2")) else 4 * width), n
            if not (li > 1 and n == f"layer{li}.0.bn1"):
                assert H == res, n
    # the distinct shapes, each in both layouts, carry the network's multiplicity
    rows = bench.select_rows(suite="resnet50")
    assert len(rows) == 24
    for layout in ("nchw", "nhwc"):
        lr = [r for r in rows if r.layout == layout]
        assert len(lr) == 12 and sum(r.count for r in lr) == 53
        assert sorted(n for r in lr for n in r.layers) == sorted(names)
        for r in lr:
            assert all(shapes[n] == r.nchw for n in r.layers)
            assert r.channels == r.nchw[1]
    assert {r.name: r.count for r in rows}["nhwc-16x14x14x256-f32"] == 11
    assert {r.name: r.count for r in rows}["nchw-16x2048x7x7-f32"] == 4
    assert bench.select_rows("nhwc", suite="resnet50")[0].axis == -1
    # the default suite is unchanged
    assert not any("resnet50" in r.tags for r in bench.select_rows())


def test_asv_resnet50_layers_match_the_bench(monkeypatch):
    # benchmarks/ may use fastbn's public API only, so it writes the layers out itself.
    import importlib
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))
    mod = importlib.import_module("benchmarks.bench_resnet")
    assert mod.resnet50_layers() == bench.resnet50_layers()
    assert len(mod.LAYERS) == 53


def test_resnet50_suite_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_kernels, "cpu_level", lambda: "x86-64-test", raising=False)
    path = tmp_path / "rn.json"
    rc = bench.main(["--suite", "resnet50", "--rows", "16x512x7x7,16x7x7x2048",
                      "--threads", "1,2", "--repeat", "2", "--sample-ms", "0.2",
                      "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    with open(path) as f:
        data = json.load(f)
    assert data["meta"]["suite"] == "resnet50"
    assert data["meta"]["kernels_cpu_level"] == "x86-64-test"
    assert "kernels' CPU level: x86-64-test" in out
    assert data["meta"]["ops"] == ["fwd-train", "bwd-train", "fwd-eval"]
    have_torch = "torch" in data["meta"]["impls"]
    assert "numpy" not in data["meta"]["impls"]
    ns = data["resnet50"]
    assert ns["layers_in_network"] == 53
    assert sorted((n["layout"], n["threads"]) for n in ns["network"]) == [
        ("nchw", 1), ("nchw", 2), ("nhwc", 1), ("nhwc", 2)]
    by = {(r["row"], r["threads"], r["op"]): r for r in data["results"]}
    for n in ns["network"]:
        ents = [e for e in ns["shapes"] if e["layout"] == n["layout"]
                and e["threads"] == n["threads"]]
        assert len(ents) == 1 and n["layers"] == ents[0]["count"] == (
            5 if n["layout"] == "nchw" else 4)
        e = ents[0]
        for impl in ("fastbn", "torch") if have_torch else ("fastbn",):
            med = {op: by[(e["row"], n["threads"], op)]["times"][impl]["median"]
                   for op in bench.RESNET50_OPS}
            assert n["train_step"][impl] == pytest.approx(
                e["count"] * (med["fwd-train"] + med["bwd-train"]))
            assert n["inference"][impl] == pytest.approx(e["count"] * med["fwd-eval"])
            assert e["train_step"][impl] == pytest.approx(med["fwd-train"] + med["bwd-train"])
        if have_torch:
            assert n["train_step"]["torch_over_fastbn"] == pytest.approx(
                n["train_step"]["torch"] / n["train_step"]["fastbn"])
    if have_torch:
        worst = ns["worst_layer_op"]
        qs = [e[op]["torch_over_fastbn"] for e in ns["shapes"] for op in bench.RESNET50_OPS]
        assert worst["torch_over_fastbn"] == pytest.approx(min(qs))
        assert "worst single layer-op:" in out
        for r in data["results"]:
            assert r["check"]["torch"] <= 1e-3
    assert "all batch-norm layers per step, fastbn vs PyTorch" in out
    assert "PARTIAL: 5 of 53" in out and "PARTIAL: 4 of 53" in out
    assert "== ResNet-50 batch 16 NCHW, threads = 2 ==" in out


def test_cpu_level_absent_is_na(capsys, monkeypatch):
    monkeypatch.delattr(_kernels, "cpu_level", raising=False)
    assert bench.kernels_cpu_level() is None
    monkeypatch.setattr(_kernels, "cpu_level", lambda: "x86-64-v4", raising=False)
    assert bench.kernels_cpu_level() == "x86-64-v4"
    meta = dict(bench.machine_info(None), repeat=1, sample_ms=1, reuse=False,
                impls=["fastbn"])
    meta["kernels_cpu_level"] = None
    assert "kernels' CPU level: n/a" in report._header(meta)


# --------------------------------------------------------------------------- one package

def test_one_parser_for_cpu_and_gpu():
    from fastbn.cuda import bench as gpu_bench

    # the GPU entry point's old space-separated lists become the shared comma syntax
    assert gpu_bench._legacy_lists(["--subset", "large", "--ops", "fwd-train", "bwd-train",
                                    "--rows", "nhwc", "--json", "g.json"]) == [
        "--subset", "large", "--ops", "fwd-train,bwd-train", "--rows", "nhwc", "--json",
        "g.json"]
    assert gpu_bench._legacy_lists(["--rows", "--repeat", "3"]) == ["--repeat", "3"]
    args = bench.parser().parse_args(["--gpu", "--rows", "nc-32x16,nhwc", "--ops",
                                      "fwd-train,bwd-relu", "--copy-mb", "64"])
    assert args.gpu and args.rows == "nc-32x16,nhwc" and args.copy_mb == 64


@pytest.mark.parametrize("argv,match", [
    (["--gpu", "--threads", "1,2"], "--threads: not available with --gpu"),
    (["--gpu", "--reuse"], "--reuse: not available with --gpu"),
    (["--gpu", "--impls", "fastbn,numpy"], "numpy does not run with --gpu"),
])
def test_cpu_only_options_are_refused_with_gpu(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--rows", "nc-32x16"])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_timing_loop_round_robin_and_medians():
    from fastbn.benchmark import timing

    order = []
    calls = {n: (lambda n=n: order.append(n)) for n in "abc"}
    samples = timing.time_round_robin(calls, 3, 0.0)
    assert {n: len(s) for n, s in samples.items()} == {"a": 3, "b": 3, "c": 3}
    # warm-up and calibration (2 calls each), then the rounds, the first one rotating
    assert order[6:] == list("abc" "bca" "cab")
    ticks = iter(range(100))

    def clock(f, k):
        f()
        return float(next(ticks) % 2 + 1)   # 1, 2, 1, 2, ... seconds
    med = timing.medians({"x": lambda: None}, 4, clock=clock)
    assert med == {"x": 1.5}


def test_progress_plain_eta_and_forced_tqdm(capsys):
    import io

    s = io.StringIO()
    p = report.Progress(3, stream=s, mode="plain")
    for step in "abc":
        p.step(step)
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 3 and "ETA      ? a" in lines[0] and "ETA" in lines[2]
    assert lines[2].startswith("[   3/3]")
    pytest.importorskip("tqdm")
    s = io.StringIO()
    p = report.Progress(2, stream=s, mode="tqdm")   # forced: not a terminal
    assert p.bar is not None
    p.step("row-a")
    p.step("row-b")
    p.close()
    assert "row-b" in s.getvalue() and "1/2 [00:00<" in s.getvalue()  # elapsed<ETA
    s = io.StringIO()
    report.Progress(2, stream=s, mode="none").step("x")
    assert s.getvalue() == ""


def test_without_torch_no_column_of_dashes(tmp_path, capsys):
    # impls fastbn only: the table has no PyTorch/NumPy columns, the summary no comparison
    assert bench.main(["--rows", "nc-32x16", "--threads", "1", "--ops", "fwd-eval",
                       "--repeat", "1", "--sample-ms", "0.2", "--impls", "fastbn"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("== threads = 1 =="):out.index("== summary ==")]
    head, row = table.strip().splitlines()[1:3]
    assert "torch" not in head and "pt/fb" not in head and "numpy" not in head
    assert " - " not in row


def test_machine_openmp_runtimes_from_threadpoolctl():
    pytest.importorskip("threadpoolctl")
    from fastbn import openmp_enabled
    from fastbn.benchmark import machine

    info = machine.machine_info(None)
    assert info["usable_cpus"] >= 1 and info["fastbn_threads"] >= 1
    assert "family" in info["cpu"] or info["cpu"]
    if openmp_enabled():
        assert info["openmp_runtimes"] and all(r["filepath"] for r in info["openmp_runtimes"])
        assert info["openmp_libraries"] == sorted({r["filepath"]
                                                   for r in info["openmp_runtimes"]})


def test_report_command_times_through_the_benchmark_loop(monkeypatch):
    import fastbn.__main__ as cli_main
    from fastbn.benchmark import timing

    seen = []
    real = timing.medians

    def spy(calls, repeat, *a, **k):
        seen.append(sorted(calls))
        return real(calls, 1, *a, **k)
    monkeypatch.setattr(timing, "medians", spy)
    rows, _ = cli_main.timing(cli_main.default_data())
    assert len(rows) == 2 and all(fb > 0 and npy > 0 for _, fb, npy, _ in rows)
    assert seen and all({"fastbn", "numpy"} <= set(names) for names in seen)


def test_variants_suite_smoke(tmp_path, capsys):
    """--suite variants: every variant op beside plain batch norm's, with its ratio."""
    from fastbn.benchmark.suites import VARIANT_OPS, VARIANTS

    row = min(VARIANTS, key=lambda r: r.nbytes)
    path = tmp_path / "variants.json"
    rc = bench.main(["--suite", "variants", "--rows", row.name, "--threads", "1",
                     "--repeat", "2", "--sample-ms", "0.2", "--progress", "none",
                     "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    with open(path) as f:
        data = json.load(f)
    results = data["results"]
    assert [r["op"] for r in results] == list(VARIANT_OPS)
    for r in results:
        assert r["row"] == row.name and r["threads"] == 1
        t = r["times"]["fastbn"]
        assert len(t["samples"]) == 2 and all(_positive(v) for v in t["samples"])
        base = VARIANT_OPS[r["op"]][0]
        assert r["baseline"] == base
        if base is None:
            assert r["ratio"] is None
        else:
            plain = next(p for p in results if p["op"] == base)
            assert r["ratio"] == pytest.approx(t["median"] / plain["times"]["fastbn"]["median"])
    assert set(data["summary"]["1"]) == set(VARIANT_OPS) - {"plain-fwd", "plain-bwd"}
    assert "x/plain" in out and "ghost-bwd" in out and "== summary" in out


def test_variants_suite_ops_and_errors(tmp_path, capsys):
    from fastbn.benchmark.suites import VARIANTS

    row = min(VARIANTS, key=lambda r: r.nbytes)
    path = tmp_path / "v.json"
    assert bench.main(["--suite", "variants", "--rows", row.name, "--threads", "1",
                       "--ops", "ghost-bwd", "--repeat", "1", "--sample-ms", "0.1",
                       "--progress", "none", "--json", str(path)]) == 0
    with open(path) as f:
        ops = [r["op"] for r in json.load(f)["results"]]
    assert ops == ["plain-fwd", "plain-bwd", "ghost-bwd"]  # the plain ops always come along
    with pytest.raises(SystemExit):
        bench.main(["--suite", "variants", "--ops", "fwd-train"])
    with pytest.raises(SystemExit):
        bench.main(["--suite", "variants", "--gpu"])
    capsys.readouterr()
