"""python -m fastbn: a short report on embedded default data; python -m fastbn bench.

The report builds its data from a fixed seed (the same bytes on every machine): a float32 NCHW
batch, the same batch channels-last, and a float32 batch whose mean is 10^4 times its standard
deviation. It checks the kernels against the plain float64 reference, times them against NumPy
(and PyTorch when installed), and runs the Kohler et al. equivalence checks.
"""
import platform
import sys

import numpy as np

import fastbn
from fastbn import _reference as ref

SEED = 20150211  # Ioffe & Szegedy's arXiv submission date


def default_data():
    rng = np.random.default_rng(SEED)
    nchw = (0.5 + 2.0 * rng.standard_normal((16, 32, 28, 28))).astype(np.float32)
    return {
        "NCHW (16, 32, 28, 28) float32": (nchw, 1),
        "NHWC (16, 28, 28, 32) float32": (np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), -1),
        "offset 1e4, (256, 64) float32": (
            (1e4 + rng.standard_normal((256, 64))).astype(np.float32), 1),
        "(512, 100) float64": (rng.standard_normal((512, 100)), 1),
    }


def _max_rel(a, b, scale=None):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    s = float(np.max(np.abs(b))) if scale is None else scale
    return float(np.max(np.abs(a - b))) / max(s, 1e-300)


def self_check(data):
    rows = []
    ok = True
    for name, (x, axis) in data.items():
        C = x.shape[axis]
        rng = np.random.default_rng(1)
        w, b = rng.standard_normal(C), rng.standard_normal(C)
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis)
        dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        ry, rmean, rvar, rinv = ref.forward(x, w, b, axis=axis)
        rdx, rdw, rdb = ref.backward(dy, x, rmean, rinv, w, axis=axis)
        tol = 1e-11 if x.dtype == np.float64 else 1e-4
        spread = float(np.sqrt(rvar.max()))
        errs = {
            # relative to the data's scale: a mean near 0 has no meaningful relative error
            "mean": _max_rel(mean, rmean, float(np.abs(rmean).max()) + spread),
            "var": _max_rel(1 / invstd**2 - 1e-5, rvar),
            "y": _max_rel(y, ry),
            "dx": _max_rel(dx, rdx),
        }
        good = all(e < tol for e in errs.values())
        ok &= good
        rows.append((name, errs, good))
    return rows, ok


def _numpy_forward_train(x, axis):
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    return (x - mean) / np.sqrt(var + x.dtype.type(1e-5))


def timing(data, repeat=7):
    """Training-forward medians of fastbn, NumPy and PyTorch (when installed), in seconds.

    The benchmark's timing loop: the implementations take turns in each of ``repeat`` rounds
    of one call each (after a warm-up call), and each side's median call is reported.
    """
    from fastbn.benchmark.timing import medians

    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    for name, (x, axis) in list(data.items())[:2]:
        C = x.shape[axis]
        calls = {"fastbn": lambda: fastbn.batch_norm_forward(x, axis=axis),
                 "numpy": lambda: _numpy_forward_train(x, axis)}
        if torch is not None:
            t = torch.from_numpy(x if axis == 1 else np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            if axis == -1:
                t = t.contiguous(memory_format=torch.channels_last)
            torch.set_num_threads(fastbn.get_num_threads())
            rm, rv = torch.zeros(C), torch.ones(C)
            calls["torch"] = lambda: torch.ops.aten.native_batch_norm(t, None, None, rm, rv,
                                                                      True, 0.1, 1e-5)
        med = medians(calls, repeat)
        rows.append((name, med["fastbn"], med["numpy"], med.get("torch")))
    return rows, torch is not None


def cpu_model():
    """The CPU's model name with its family and model numbers (fastbn.benchmark.machine)."""
    from fastbn.benchmark.machine import cpu_model as _cpu_model

    return _cpu_model()


def report():
    out = []
    p = out.append
    p(f"fastbn {fastbn.__version__} on {cpu_model()}, "
      f"Python {platform.python_version()}, NumPy {np.__version__}")
    p(f"kernels: OpenMP {'on' if fastbn.openmp_enabled() else 'OFF (serial build)'}, "
      f"{fastbn.get_num_threads()} thread(s)")
    data = default_data()
    p("")
    p("Self-check against the float64 reference (max relative error; fixed-seed data):")
    rows, ok = self_check(data)
    for name, errs, good in rows:
        cells = "  ".join(f"{k} {v:.1e}" for k, v in errs.items())
        p(f"  {name:32s} {cells}  {'ok' if good else 'FAIL'}")
    p("")
    p("Training forward, median of 7 calls (ms):")
    trows, have_torch = timing(data)
    head = f"  {'':32s} {'fastbn':>8s} {'NumPy':>8s}" + (f" {'PyTorch':>8s}" if have_torch else "")
    p(head)
    for name, fb, npy, tt in trows:
        line = f"  {name:32s} {fb * 1e3:8.3f} {npy * 1e3:8.3f}"
        if have_torch:
            line += f" {tt * 1e3:8.3f}   ({tt / fb:.1f}x PyTorch)"
        p(line + f"   ({npy / fb:.1f}x NumPy)")
    if not have_torch:
        p("  (PyTorch not installed: pip install torch==2.13.0 to compare)")
    p("  full comparison: python -m fastbn bench")
    try:
        from fastbn.analysis import reparam
    except ImportError:
        reparam = None
    if reparam is not None and hasattr(reparam, "report_lines"):
        p("")
        p("Batch norm as a reparameterisation of the weights (Kohler et al.):")
        lines = reparam.report_lines()
        ok = ok and not any("MISMATCH" in line for line in lines)
        out.extend("  " + line for line in lines)
    return "\n".join(out), ok


_DESCRIPTION = """\
fastbn: fast, numerically stable batch normalization for NumPy.

commands:
  report   (the default) a self-check of the kernels against a float64 reference on
           fixed-seed data, a short timing against NumPy (and PyTorch when installed)
           and the Kohler et al. equivalence checks; exits 1 if a check fails
  bench    fastbn, PyTorch and NumPy side by side against the memory floor measured in
           the same run (python -m fastbn bench --help for its options;
           --suite resnet50: ResNet-50's batch-norm layers; --gpu: the CuPy path)
"""


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastbn", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"fastbn {fastbn.__version__} (kernels: OpenMP "
                           f"{'on' if fastbn.openmp_enabled() else 'off'})")
    p.add_argument("command", nargs="?", default="report", choices=["report", "bench"],
                   help="report (default) or bench")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # its own parser: every option after the word is its own
        from fastbn.benchmark import main as bench_main

        return bench_main(argv[1:])  # --gpu included: one parser for the CPU and the GPU
    _parser().parse_args(argv)  # report; --help and --version exit here
    text, ok = report()
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
