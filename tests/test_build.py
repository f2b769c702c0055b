"""The build's OpenMP detection: a compiler without OpenMP gives serial kernels (or an error).

These tests build the extension from the source tree with a compiler wrapper that rejects
-fopenmp, the situation of a machine without libgomp/libomp. They need the source checkout
(setup.py beside tests/) and a C compiler.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = [
    pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source checkout"),
    pytest.mark.skipif(CC is None or sys.platform == "win32", reason="needs a Unix C compiler"),
]


@pytest.fixture(scope="module")
def no_openmp_cc(tmp_path_factory):
    d = tmp_path_factory.mktemp("cc")
    wrapper = d / "cc-no-openmp"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do
          case "$a" in *openmp*) [ "$a" = "-fopenmp-simd" ] || {{ echo "no OpenMP here" >&2; exit 1; }};; esac
        done
        exec {CC} "$@"
        """))
    wrapper.chmod(0o755)
    return str(wrapper)


def build(tmp_path, cc, **env):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.so", "*.c", "*.html",
                                                                     "__pycache__"))
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "README.md", tmp_path)
    e = dict(os.environ, CC=cc, LDSHARED=f"{cc} -shared")
    e.update(env)
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=e,
        capture_output=True, text=True, timeout=600,
    )


def test_missing_openmp_is_an_error_when_asked(tmp_path, no_openmp_cc):
    r = build(tmp_path, no_openmp_cc, FASTBN_FAIL_NO_OPENMP="1")
    assert r.returncode != 0
    assert "could not compile and run an OpenMP program" in r.stdout + r.stderr


def _levels():
    from fastbn import _kernels

    return _kernels.cpu_levels()


def _results_of_build(tmp_path, level):
    """Forward and backward of the extension built in tmp_path, and of the installed one, both
    at ISA level `level` (FASTBN_CPU_LEVEL in the child, set_cpu_level here)."""
    rng = np.random.default_rng(0)
    results = {}
    for dtype in (np.float32, np.float64):
        for axis, shape in ((1, (9, 70, 301)), (1, (16, 40, 7)), (-1, (50, 3, 37)),
                            (-1, (33, 1100))):
            key = f"{np.dtype(dtype).name}_{axis}_{'x'.join(map(str, shape))}"
            results[key] = (5 + rng.standard_normal(shape)).astype(dtype), axis
    np.savez(tmp_path / "x.npz", **{k: v[0] for k, v in results.items()})
    script = textwrap.dedent("""\
        import sys, numpy as np, fastbn
        xs = np.load(sys.argv[1])
        out = {}
        for key in xs.files:
            x, axis = xs[key], int(key.split("_")[1])
            y, m, s = fastbn.batch_norm_forward(x, axis=axis, activation="relu")
            dx, dw, db = fastbn.batch_norm_backward(x, x, m, s, axis=axis, activation="relu",
                                                    y=y)
            out.update({f"{key}/{n}": a
                        for n, a in dict(y=y, m=m, s=s, dx=dx, dw=dw, db=db).items()})
        print(fastbn.openmp_enabled())
        np.savez(sys.argv[2], **out)
        """)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.npz"), str(tmp_path / "r.npz")],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "src"), FASTBN_CPU_LEVEL=level),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    import fastbn
    from fastbn import _kernels

    built, here = np.load(tmp_path / "r.npz"), {}
    prev = _kernels.set_cpu_level(level)
    try:
        for key, (x, axis) in results.items():
            y, m, s = fastbn.batch_norm_forward(x, axis=axis, activation="relu")
            dx, dw, db = fastbn.batch_norm_backward(x, x, m, s, axis=axis, activation="relu",
                                                    y=y)
            here.update({f"{key}/{n}": a
                         for n, a in dict(y=y, m=m, s=s, dx=dx, dw=dw, db=db).items()})
    finally:
        _kernels.set_cpu_level(prev)
    return out.stdout.strip(), built, here


def test_missing_openmp_builds_serial_kernels_with_identical_results(tmp_path, no_openmp_cc):
    r = build(tmp_path, no_openmp_cc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "building serial kernels" in r.stdout + r.stderr
    for level in _levels():
        openmp, serial, here = _results_of_build(tmp_path, level)
        assert openmp == "False"
        # the block partition does not depend on threads: serial and OpenMP builds agree
        # bitwise, at every ISA level
        for name, a in here.items():
            assert np.array_equal(serial[name], a), (level, name)


def test_plain_c_lanes_give_identical_results(tmp_path):
    # Compilers without GCC/Clang vector extensions get structs of lanes (FASTBN_NO_VECTOR_EXT
    # forces that path here): the same operations in the same order, so the same bits at the
    # baseline level (no FMA). Above it, whether GCC contracts a struct lane's a + g * v into an
    # FMA is its own choice (x86-64-v4 float32 backward sums differ), so there the results need
    # only agree to rounding.
    r = build(tmp_path, CC, CFLAGS=os.environ.get("CFLAGS", "") + " -DFASTBN_NO_VECTOR_EXT")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for level in _levels():
        _, plain, here = _results_of_build(tmp_path, level)
        for name, a in here.items():
            if level == "baseline":
                assert np.array_equal(plain[name], a), (level, name)
            else:
                tol = 1e-4 if a.dtype == np.float32 else 1e-10
                np.testing.assert_allclose(plain[name], a, rtol=tol, atol=tol * np.abs(a).max(),
                                           err_msg=f"{level} {name}")
