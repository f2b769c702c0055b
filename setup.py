"""Build the fastbn kernels: Cython + OpenMP, with a serial fallback.

Environment overrides:
  FASTBN_NO_OPENMP=1       build serial kernels even when OpenMP is available
  FASTBN_FAIL_NO_OPENMP=1  make a missing OpenMP a build error instead of a warning
  FASTBN_NATIVE=1          add -march=native (opt-in; the default build is portable)
  FASTBN_BOUNDSCHECK=1     compile the kernels with Cython bounds checks (debugging)
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0);
        return 0;
    }
    """
)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _openmp_flags(compiler):
    """Return (compile_args, link_args) that build and run a tiny OpenMP program, or None."""
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    tmp = tempfile.mkdtemp(prefix="fastbn-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        for cflags, lflags in candidates:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                exe = os.path.join(tmp, "probe")
                compiler.link_executable(objs, exe, extra_postargs=lflags)
                out = subprocess.run([exe], capture_output=True, text=True, timeout=30)
                if out.returncode == 0 and out.stdout.strip() == "1":
                    return cflags, lflags
            except Exception:  # noqa: BLE001 - any failure means "not this flag set"
                continue
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        unix = self.compiler.compiler_type == "unix"
        base = ["-O3"] if unix else ["/O2"]
        if unix:
            # Reductions are written with explicit independent accumulators; nothing here
            # relies on -ffast-math, which would make results depend on the compiler's whims.
            # -fopenmp-simd: honour `omp simd` (vectorised reductions) even in serial builds.
            # -fno-trapping-math: lets GCC turn the ReLU mask `y > 0 ? g : 0` into a vector
            # select (with trapping math the comparison stays a branch and the masked backward
            # ran scalar, 10x slower). It changes no result, only which FP exception flags
            # may be raised, which fastbn never reads.
            base += ["-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
                     "-Wno-unused-function"]
            if _env_flag("FASTBN_NATIVE"):
                base.append("-march=native")
        omp = None
        if _env_flag("FASTBN_NO_OPENMP"):
            print("fastbn: FASTBN_NO_OPENMP set, building serial kernels")
        else:
            omp = _openmp_flags(self.compiler)
            if omp is None:
                msg = (
                    "fastbn: could not compile and run an OpenMP program with this compiler; "
                    "building serial kernels (install libgomp/libomp, or set "
                    "FASTBN_FAIL_NO_OPENMP=1 to make this an error)"
                )
                if _env_flag("FASTBN_FAIL_NO_OPENMP"):
                    raise RuntimeError(msg)
                warnings.warn(msg)
                print(msg)
        for ext in self.extensions:
            ext.extra_compile_args = base + (omp[0] if omp else [])
            ext.extra_link_args = list(omp[1]) if omp else []
        super().build_extensions()


directives = {
    "language_level": 3,
    "boundscheck": _env_flag("FASTBN_BOUNDSCHECK"),
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
    "embedsignature": True,
}

extensions = [
    Extension(
        "fastbn._kernels",
        ["src/fastbn/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "src/fastbn"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        # the loops' headers: an edit to any of them rebuilds the extension
        depends=["src/fastbn/_simd.h", "src/fastbn/_simd_loops.h", "src/fastbn/_simd_dispatch.h",
                 "src/fastbn/_half_loops.h"],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
    cmdclass={"build_ext": BuildExt},
)
