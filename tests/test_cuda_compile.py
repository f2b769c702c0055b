"""The CUDA source without a GPU: nvcc compiles it, and its kernels run under a host emulation.

1. nvcc compiles src/fastbn/cuda/batch_norm.cu for sm_80 and sm_90 with every warning an
   error, so that a broken kernel cannot land (CI has nvcc but no GPU). Skipped, with the
   reason, only where nvcc is absent.
2. The kernels the Python side launches exist in the compiled PTX, and the partition constants
   of fastbn/cuda/kernels.py match the #defines of the source.
3. The same source is compiled for the host (g++) under a small emulation of the CUDA execution
   model (each block's threads are coroutines; __syncthreads and warp shuffles are barriers),
   and fastbn's public functions run on a NumPy-backed stand-in for CuPy that launches those
   host-compiled kernels. This runs the real kernel code and the real GPU Python layer
   (validation, layouts, launch arguments) end to end, and compares with the CPU kernels.
   Every launch checks each argument against the kernel's C signature (an int64 where the
   kernel takes fbn_i64, a float16 array where it takes unsigned short *, ...), and every
   array lives between guard bands that must be untouched after each launch.
   What it cannot show: GPU-only behaviour (memory model, occupancy, speed); tests/gpu does that.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn.cuda import kernels as K

SOURCE = Path(K.__file__).with_name("batch_norm.cu")
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found on PATH: the CUDA compile check needs the CUDA toolkit"
)


# --------------------------------------------------------------------------- nvcc

def _nvcc_flags():
    """-Werror all-warnings where this nvcc knows it (CUDA >= 10.2), else nothing."""
    help_text = subprocess.run([NVCC, "--help"], capture_output=True, text=True).stdout
    if "all-warnings" in help_text:
        return ["-Werror", "all-warnings"]
    return []


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_the_kernels(arch, tmp_path):
    cmd = [NVCC, f"-arch={arch}", *_nvcc_flags(), "-cubin", "-o", str(tmp_path / "bn.cubin"),
           str(SOURCE)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout}\n{run.stderr}"
    assert (tmp_path / "bn.cubin").stat().st_size > 0


@needs_nvcc
def test_every_launched_kernel_is_in_the_ptx(tmp_path):
    ptx = tmp_path / "bn.ptx"
    run = subprocess.run([NVCC, "-arch=sm_80", *_nvcc_flags(), "--ptx", "-o", str(ptx),
                          str(SOURCE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)\(", ptx.read_text()))
    assert entries == set(K.kernel_names())


def _find_nvrtc():
    """libnvrtc from the CUDA toolkit, the loader's path, or NVIDIA's nvidia-cuda-nvrtc wheel."""
    import ctypes.util
    import glob

    candidates = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 str(Path(NVCC).resolve().parents[1]) if NVCC else None):
        if home:
            candidates += sorted(glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")))
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib",
                                                    "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_the_kernels_without_a_warning(arch):
    # cupy.RawModule compiles with NVRTC, not nvcc: check that path where libnvrtc exists.
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (CUDA toolkit lib64, or pip install nvidia-cuda-nvrtc)")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"batch_norm.cu",
                                  0, None, None) == 0
    opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
    rc = lib.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    if rc != 0 and "libnvrtc-builtins" in text:
        pytest.skip(f"this libnvrtc cannot find its builtins library: {text.strip()}")
    assert rc == 0, text
    assert "warning" not in text.lower(), text


def test_partition_constants_match_the_source():
    text = SOURCE.read_text()
    defines = {m[0]: int(m[1]) for m in re.findall(r"#define\s+(FBN_\w+)\s+(\d+)", text)}
    assert defines == {
        "FBN_THREADS": K.THREADS,
        "FBN_NCL_CHUNK": K.NCL_CHUNK,
        "FBN_ROW_ITEMS": K.ROW_ITEMS,
        "FBN_UNROLL": K.UNROLL,
    }


def test_source_needs_no_headers_and_ships_with_the_package():
    # NVRTC (what cupy.RawModule uses) has no host headers: the source must stand alone.
    assert not re.search(r"^\s*#\s*include", SOURCE.read_text(), re.M)
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert "cuda/*.cu" in pyproject.read_text()


def test_importing_the_loader_does_not_import_cupy():
    code = ("import sys; import fastbn.cuda.kernels, fastbn.cuda.backend, fastbn.cuda; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    env = dict(os.environ, PYTHONPATH=str(Path(fastbn.__file__).parents[1]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr


# --------------------------------------------------------------------------- host emulation

PRELUDE = r"""
#include <math.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>
#include <ucontext.h>
#include <functional>

#define FBN_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static  /* blocks run one at a time: static storage is the block's */

struct fbn_emu_dim { unsigned int x, y, z; };
static fbn_emu_dim threadIdx, blockIdx, blockDim, gridDim;

static inline float fbn_emu_h2f(unsigned short h)
{
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static inline unsigned short fbn_emu_f2h(float f)
{
    _Float16 v = (_Float16)f;  /* round to nearest even, as cvt.rn.f16.f32 */
    unsigned short h;
    memcpy(&h, &v, 2);
    return h;
}

namespace fbn_emu {
const int MAXT = 1024;
const size_t STACK = 64 * 1024;
static ucontext_t sched;
static ucontext_t ctx[MAXT];
static bool done[MAXT];
static double slot[MAXT];
static int cur;
static char *stacks;
static std::function<void()> body;

static void entry() { body(); done[cur] = true; }

static void yield() { swapcontext(&ctx[cur], &sched); }

/* Round-robin: each pass runs every live thread to its next barrier or its end, so a pass is
 * one barrier phase (a thread that reaches a barrier waits for the next pass). */
static void run_block(int n)
{
    for (int t = 0; t < n; t++) {
        getcontext(&ctx[t]);
        ctx[t].uc_stack.ss_sp = stacks + (size_t)t * STACK;
        ctx[t].uc_stack.ss_size = STACK;
        ctx[t].uc_link = &sched;
        makecontext(&ctx[t], entry, 0);
        done[t] = false;
    }
    for (;;) {
        int alive = 0;
        for (int t = 0; t < n; t++) {
            if (done[t])
                continue;
            cur = t;
            threadIdx.x = t;
            swapcontext(&sched, &ctx[t]);
            alive += !done[t];
        }
        if (!alive)
            break;
    }
}

static void launch(int grid, int block, std::function<void()> fn)
{
    if (!stacks)
        stacks = (char *)malloc(MAXT * STACK);
    body = fn;
    gridDim.x = grid; gridDim.y = gridDim.z = 1;
    blockDim.x = block; blockDim.y = blockDim.z = 1;
    threadIdx.y = threadIdx.z = blockIdx.y = blockIdx.z = 0;
    for (int b = 0; b < grid; b++) {
        blockIdx.x = b;
        run_block(block);
    }
}
}  // namespace fbn_emu

static inline void __syncthreads() { fbn_emu::yield(); }

template <class T>
static inline T __shfl_down_sync(unsigned int, T v, int off)
{
    const int t = threadIdx.x;
    fbn_emu::slot[t] = (double)v;
    fbn_emu::yield();                 /* every lane has published */
    const int src = (t % 32) + off < 32 ? t + off : t;
    const T r = (T)fbn_emu::slot[src];
    fbn_emu::yield();                 /* every lane has read */
    return r;
}
"""

_C_TO_DTYPE = {"float": np.float32, "double": np.float64, "unsigned short": np.float16}
_C_SCALARS = {"fbn_i64": (np.int64, ctypes.c_int64), "int": (np.int32, ctypes.c_int32),
              "double": (np.float64, ctypes.c_double)}


def _parse_param(decl):
    decl = decl.strip()
    m = re.fullmatch(r"(const\s+)?([\w ]+?)\s*(\*)?\s*(\w+)", decl)
    assert m, decl
    return {"type": m[2].strip(), "pointer": bool(m[3]), "name": m[4]}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not found: the host emulation of the CUDA kernels needs a C++ compiler")
    return build_emulator(tmp_path_factory.mktemp("emu"))


def build_emulator(d):
    """Compile batch_norm.cu for the host with the emulation prelude; returns (lib, sigs)."""
    base = d / "base.cpp"
    base.write_text(PRELUDE + f'\n#include "{SOURCE}"\n')
    pre = subprocess.run([GXX, "-std=c++17", "-E", "-P", str(base)], capture_output=True,
                         text=True)
    if pre.returncode != 0:
        pytest.skip(f"g++ cannot preprocess the emulation harness: {pre.stderr[-500:]}")
    sigs = {}
    for name, params in re.findall(r'extern "C" void (fbn_\w+)\(([^)]*)\)', pre.stdout):
        sigs[name] = [_parse_param(p) for p in params.split(",")]
    wrappers = []
    for name, params in sigs.items():
        args = ", ".join(
            f"*({p['type']} {'*' if p['pointer'] else ''}*)a[{i}]" for i, p in enumerate(params)
        )
        wrappers.append(
            f'extern "C" void emu_{name}(int g, int b, void **a)'
            f"{{ fbn_emu::launch(g, b, [a]{{ {name}({args}); }}); }}"
        )
    src = d / "emu.cpp"
    src.write_text(base.read_text() + "\n" + "\n".join(wrappers) + "\n")
    lib = d / "libfbnemu.so"
    build = subprocess.run([GXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib),
                            str(src)], capture_output=True, text=True)
    if build.returncode != 0 and "_Float16" in build.stderr:
        pytest.skip("this g++ has no _Float16 (needed to emulate the half conversions)")
    assert build.returncode == 0, build.stderr[-3000:]
    return ctypes.CDLL(str(lib)), sigs


class _Ptr:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


class FakeCupy(types.ModuleType):
    """The part of CuPy that fastbn.cuda uses, on NumPy memory, with emulated kernels."""

    PAD = 64  # guard elements before and after every allocation

    def __init__(self, emulator):
        super().__init__("cupy")
        lib, sigs = emulator
        fake = self

        class ndarray(np.ndarray):
            @property
            def data(self):
                return _Ptr(self.__array_interface__["data"][0])

        ndarray.__module__ = "cupy"  # what fastbn._backend.is_cupy_array looks at
        self.ndarray = ndarray
        self.float16, self.float32, self.float64 = np.float16, np.float32, np.float64
        self._lib, self._sigs = lib, sigs
        self._bases = []
        self.launches = []

        class _Runtime:
            @staticmethod
            def getDevice():
                return 0

            @staticmethod
            def getDeviceProperties(dev):
                return {"multiProcessorCount": 1}  # a small grid cap: kernels stride

        self.cuda = types.SimpleNamespace(runtime=_Runtime)

        class RawModule:
            def __init__(self, code, **options):
                assert code == K.source()

            def get_function(self, name):
                return _Kernel(fake, name)

        self.RawModule = RawModule

    # ---- allocation with guard bands
    def _alloc(self, shape, dtype):
        shape = tuple(int(s) for s in (shape if isinstance(shape, tuple) else (shape,)))
        n = int(np.prod(shape))
        base = np.empty(n + 2 * self.PAD, dtype)
        base.view(np.uint8)[:] = 0xFF  # NaN in every float dtype: a stray read shows
        self._bases.append(base)
        return base[self.PAD:self.PAD + n].reshape(shape).view(self.ndarray)

    def check_guards(self):
        for base in self._bases:
            raw = base.view(np.uint8)
            pad = self.PAD * base.itemsize
            assert (raw[:pad] == 0xFF).all() and (raw[-pad:] == 0xFF).all(), \
                "a kernel wrote outside its array"

    def empty(self, shape, dtype=np.float64):
        return self._alloc(shape, dtype)

    def zeros(self, shape, dtype=np.float64):
        a = self._alloc(shape, dtype)
        a[...] = 0
        return a

    def asarray(self, a, dtype=None):
        if isinstance(a, self.ndarray) and (dtype is None or a.dtype == dtype):
            return a
        src = np.asarray(a, dtype=dtype)
        out = self._alloc(src.shape, src.dtype)
        out[...] = src
        return out

    def ascontiguousarray(self, a, dtype=None):
        if isinstance(a, self.ndarray) and a.flags.c_contiguous and (
                dtype is None or a.dtype == dtype):
            return a
        src = np.asarray(a, dtype=dtype)
        out = self._alloc(src.shape, src.dtype)
        out[...] = src
        return out

    def asnumpy(self, a):
        return np.array(np.asarray(a).view(np.ndarray))

    may_share_memory = staticmethod(np.may_share_memory)
    shares_memory = staticmethod(np.shares_memory)
    sqrt = staticmethod(np.sqrt)

    # Array functions CuPy has with NumPy's signature, which the variants use: NumPy's, with
    # array results moved into guarded fake-CuPy memory (so that a NumPy array leaking out of
    # the GPU path is still refused as one). Only names CuPy defines belong here.
    _NUMPY_TWINS = ("maximum", "minimum", "clip", "isfinite", "all", "ones", "zeros_like",
                    "empty_like", "ones_like", "expand_dims", "stack", "count_nonzero")

    def __getattr__(self, attr):
        if attr not in FakeCupy._NUMPY_TWINS:
            raise AttributeError(f"the fake cupy has no {attr!r}")
        fn = getattr(np, attr)

        def twin(*args, **kwargs):
            out = kwargs.get("out")
            res = fn(*args, **kwargs)
            if out is not None or not isinstance(res, np.ndarray) or res.ndim == 0:
                return res
            return self.asarray(res)

        return twin

    def where(self, cond, a, b):
        return self.asarray(np.where(cond, a, b))

    @staticmethod
    def copyto(dst, src):
        np.copyto(dst, src)


class _Kernel:
    def __init__(self, fake, name):
        self.fake, self.name = fake, name
        self.params = fake._sigs[name]
        self.fn = getattr(fake._lib, f"emu_{name}")

    def __call__(self, grid, block, args):
        assert isinstance(grid, tuple) and len(grid) == 1 and grid[0] >= 1, grid
        assert block == (K.THREADS,), block
        assert len(args) == len(self.params), (self.name, len(args), len(self.params))
        keep = []
        for p, a in zip(self.params, args):
            where = f"{self.name}({p['name']})"
            if p["pointer"]:
                assert isinstance(a, self.fake.ndarray), f"{where}: got {type(a)}"
                assert a.dtype == _C_TO_DTYPE[p["type"]], f"{where}: got {a.dtype}"
                assert a.flags.c_contiguous, f"{where}: not contiguous"
                keep.append(ctypes.c_void_p(a.__array_interface__["data"][0]))
            else:
                np_type, c_type = _C_SCALARS[p["type"]]
                assert type(a) is np_type, f"{where}: expected {np_type}, got {type(a)}"
                keep.append(c_type(a.item()))
        argv = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(v) for v in keep])
        self.fn(ctypes.c_int(grid[0]), ctypes.c_int(block[0]), argv)
        self.fake.launches.append(self.name)
        self.fake.check_guards()


@pytest.fixture
def cp(emulator, monkeypatch):
    fake = FakeCupy(emulator)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    # kernels.py caches kernel handles per device: start each test with the fake's
    monkeypatch.setattr(K, "_modules", {})
    monkeypatch.setattr(K, "_functions", {})
    monkeypatch.setattr(K, "_sm_counts", {})
    return fake


# --------------------------------------------------------------------------- emulated runs

# (shape, axis): ragged NCL; NCL with several 4096-value chunks per channel; channels-last with
# 3 channels over several row blocks; 2-D with C > 256 (32-channel tiles, a partial tile);
# channels-last 4-D; a 1x1 spatial NCHW; C = 1.
CASES = [
    ((3, 5, 7, 11), 1),
    ((2, 3, 2500), 1),
    ((1500, 3), -1),
    ((130, 300), 1),
    ((4, 6, 9, 5), -1),
    ((6, 4, 1, 1), 1),
    ((33, 1), 1),
]
DTYPES = [np.float32, np.float64, np.float16]
TOL = {np.float64: 1e-12, np.float32: 3e-6, np.float16: 2e-3}
# Statistics and gradient sums: both sides accumulate float64 data in double; for float32 (and
# float16, computed in float32) the CPU sums blocks of 8 values per lane in float first.
SUM_TOL = {np.float64: 1e-12, np.float32: 1e-6, np.float16: 1e-6}


def _data(shape, dtype, seed, loc=0.5):
    r = np.random.default_rng(seed)
    return (loc + r.standard_normal(shape)).astype(dtype)


def _close(gpu, cpu, tol, name):
    g = np.asarray(gpu, dtype=np.float64)
    c = np.asarray(cpu, dtype=np.float64)
    assert g.shape == c.shape, name
    scale = max(float(np.max(np.abs(c))) if c.size else 0.0, 1e-30)
    err = float(np.max(np.abs(g - c))) / scale if c.size else 0.0
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=lambda v: str(v))
def test_emulated_forward_matches_cpu(cp, shape, axis, dtype):
    x = _data(shape, dtype, 1)
    C = shape[axis]
    w = _data((C,), np.float32, 2)
    b = _data((C,), np.float32, 3)
    for act in (None, "relu"):
        y, mean, invstd = fastbn.batch_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b),
                                                    axis=axis, activation=act)
        assert isinstance(y, cp.ndarray) and y.dtype == dtype and y.shape == x.shape
        ry, rmean, rinvstd = fastbn.batch_norm_forward(x, w, b, axis=axis, activation=act)
        _close(mean, rmean, SUM_TOL[dtype], "mean")
        _close(invstd, rinvstd, SUM_TOL[dtype], "invstd")
        # float16 outputs may differ by one half-ulp rounding of nearly equal float32 values
        _close(y, ry, TOL[dtype], f"y ({act})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=lambda v: str(v))
def test_emulated_backward_matches_cpu(cp, shape, axis, dtype):
    x = _data(shape, dtype, 4)
    dy = _data(shape, dtype, 5, loc=0.0)
    C = shape[axis]
    w = _data((C,), np.float32, 6)
    for act in (None, "relu"):
        y, mean, invstd = fastbn.batch_norm_forward(x, w, None, axis=axis, activation=act)
        for training in (True, False):
            got = fastbn.batch_norm_backward(
                cp.asarray(dy), cp.asarray(x), cp.asarray(mean), cp.asarray(invstd),
                cp.asarray(w), axis=axis, training=training, activation=act,
                y=cp.asarray(y) if act else None)
            ref = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                             training=training, activation=act,
                                             y=y if act else None)
            for name, g, r in zip(("dx", "dweight", "dbias"), got, ref):
                assert isinstance(g, cp.ndarray) and g.dtype == r.dtype, name
                # dx of a training backward is a difference of O(a*dy) terms
                scale_tol = TOL[dtype] * (30 if (name == "dx" and training) else 3)
                _close(g, r, scale_tol, f"{name} (relu={act}, training={training})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES[:4], ids=lambda v: str(v))
def test_emulated_building_blocks_match_cpu(cp, shape, axis, dtype):
    x = _data(shape, dtype, 7)
    dy = _data(shape, dtype, 8, loc=0.0)
    C = shape[axis]
    n, mean, m2 = F.channel_moments(cp.asarray(x), axis=axis)
    rn, rmean, rm2 = F.channel_moments(x, axis=axis)
    assert n == rn
    _close(mean, rmean, SUM_TOL[dtype], "mean")
    _close(m2, rm2, max(SUM_TOL[dtype], 1e-11), "M2")
    invstd = 1.0 / np.sqrt(rm2 / rn + 1e-5)
    w, b = _data((C,), np.float64, 9), _data((C,), np.float64, 10)
    y = F.normalize(cp.asarray(x), cp.asarray(rmean), cp.asarray(invstd), cp.asarray(w),
                    cp.asarray(b), axis=axis, activation="relu")
    _close(y, F.normalize(x, rmean, invstd, w, b, axis=axis, activation="relu"), TOL[dtype],
           "normalize")
    n, s1, s2 = F.backward_sums(cp.asarray(dy), cp.asarray(x), cp.asarray(rmean), axis=axis)
    rn, rs1, rs2 = F.backward_sums(dy, x, rmean, axis=axis)
    _close(s1, rs1, SUM_TOL[dtype], "sum_dy")
    # a sum of products of both signs: its cancellation scales the float32 rounding up
    _close(s2, rs2, SUM_TOL[dtype] * 10, "sum_dy_xmu")
    dx = F.backward_dx(cp.asarray(dy), cp.asarray(x), cp.asarray(rmean), cp.asarray(invstd),
                       cp.asarray(rs1), cp.asarray(rs2), rn, cp.asarray(w), axis=axis)
    rdx = F.backward_dx(dy, x, rmean, invstd, rs1, rs2, rn, w, axis=axis)
    _close(dx, rdx, TOL[dtype] * 30, "backward_dx")


@pytest.mark.parametrize("shape,axis", [((3, 5, 7, 11), 1), ((40, 6), 1)], ids=str)
def test_emulated_batch_norm_running_stats_and_inference(cp, shape, axis):
    x = _data(shape, np.float32, 11)
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    grm, grv = cp.asarray(rm), cp.asarray(rv)
    y = fastbn.batch_norm(cp.asarray(x), grm, grv, None, None, training=True, momentum=0.3,
                          axis=axis)
    ry = fastbn.batch_norm(x, rm, rv, None, None, training=True, momentum=0.3, axis=axis)
    _close(y, ry, TOL[np.float32], "y")
    _close(grm, rm, 1e-6, "running_mean")
    _close(grv, rv, 1e-6, "running_var")
    rv[0] = 0.0  # zero variance and eps = 0: invstd = 0, y = bias
    y = fastbn.batch_norm(cp.asarray(x), cp.asarray(rm), cp.asarray(rv), None, cp.asarray(rm),
                          training=False, eps=0.0, axis=axis)
    ry = fastbn.batch_norm(x, rm, rv, None, rm, training=False, eps=0.0, axis=axis)
    _close(y, ry, TOL[np.float32], "inference y")
    assert np.isfinite(np.asarray(y)).all()


def test_emulated_stability_large_mean(cp):
    # float32 values with mean 1e4 x std: the statistics must match the exact float64
    # statistics of the same float32 values to 1e-5 (DESIGN.md's numerical contract).
    r = np.random.default_rng(13)
    x = (1e4 + r.standard_normal((16, 3, 1000))).astype(np.float32)
    n, mean, m2 = F.channel_moments(cp.asarray(x), axis=1)
    x64 = x.astype(np.float64)
    exact_mean = x64.mean(axis=(0, 2))
    exact_var = x64.var(axis=(0, 2))
    assert np.max(np.abs(np.asarray(mean) - exact_mean) / exact_mean) < 1e-5
    assert np.max(np.abs(np.asarray(m2) / n - exact_var) / exact_var) < 1e-5
    y, _m, _i = fastbn.batch_norm_forward(cp.asarray(x), axis=1)
    y_ref = (x64 - exact_mean[None, :, None]) / np.sqrt(exact_var + 1e-5)[None, :, None]
    assert np.max(np.abs(np.asarray(y, dtype=np.float64) - y_ref)) < 1e-3


def test_emulated_layouts_out_and_degenerate_channels(cp):
    r = np.random.default_rng(14)
    x = r.standard_normal((6, 4, 5, 3)).astype(np.float32)
    x[:, 1] = 2.5          # a constant channel: x_hat = 0
    x[0, 2, 0, 0] = np.nan  # poisons channel 2 only
    ry, rmean, rinvstd = fastbn.batch_norm_forward(x, eps=0.0)
    # a non-contiguous view is copied; channels_last strides are used in place
    for view in (lambda a: a[:, :, ::2], lambda a: a.transpose(0, 2, 3, 1)):
        gx, cx = view(cp.asarray(x)), view(x)
        ax = 1 if gx.shape[1] == 4 else 3
        gy, _m, _i = fastbn.batch_norm_forward(gx, eps=0.0, axis=ax)
        cy, _m, _i = fastbn.batch_norm_forward(cx, eps=0.0, axis=ax)
        np.testing.assert_array_equal(np.isnan(np.asarray(gy)), np.isnan(cy))
        ok = ~np.isnan(cy)
        _close(np.asarray(gy)[ok], cy[ok], TOL[np.float32], "y")
    gy, gmean, ginvstd = fastbn.batch_norm_forward(cp.asarray(x), eps=0.0)
    assert np.asarray(ginvstd)[1] == 0.0 and (np.asarray(gy)[:, 1] == 0).all()
    assert np.isnan(np.asarray(gy)[:, 2]).all() and not np.isnan(np.asarray(gy)[:, [0, 1, 3]]).any()
    # out=x works in place; an out of another layout is filled from a temporary
    gx = cp.asarray(x)
    res = fastbn.batch_norm_forward(gx, eps=0.0, out=gx)[0]
    assert res is gx
    np.testing.assert_array_equal(np.isnan(np.asarray(gx)), np.isnan(ry))
    out = cp.asarray(np.zeros(x.shape[::-1], np.float32)).transpose(3, 2, 1, 0)
    res = fastbn.batch_norm_forward(cp.asarray(x), eps=0.0, out=out)[0]
    assert res is out
    _close(np.nan_to_num(np.asarray(out)), np.nan_to_num(ry), TOL[np.float32], "out")


def test_emulated_empty_batch_and_argument_checks(cp):
    n, mean, m2 = F.channel_moments(cp.asarray(np.zeros((0, 3), np.float32)))
    assert n == 0 and (np.asarray(mean) == 0).all() and (np.asarray(m2) == 0).all()
    x = cp.asarray(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match=r"weight: expected a CuPy array like x, got numpy"):
        fastbn.batch_norm_forward(x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        fastbn.batch_norm_forward(x, cp.asarray(np.ones(4, np.float32)))
    with pytest.raises(TypeError, match=r"x: expected a floating-point array"):
        fastbn.batch_norm_forward(cp.asarray(np.ones((4, 3), np.int32)))
    with pytest.raises(ValueError, match=r"x: expected more than 1 value per channel"):
        fastbn.batch_norm_forward(cp.asarray(np.ones((1, 3), np.float32)))
    with pytest.raises(ValueError, match=r"y: expected the forward's output"):
        fastbn.batch_norm_backward(x, x, cp.zeros(3), cp.zeros(3), activation="relu")
    with pytest.raises(TypeError, match=r"dy: expected a CuPy array like x, got numpy"):
        fastbn.batch_norm_backward(np.ones((4, 3), np.float32), x, cp.zeros(3), cp.zeros(3))
    assert cp.launches == []  # nothing ran for a refused call


def test_emulated_layer_matches_the_cpu_layer_over_training_steps(cp):
    # fastbn.BatchNorm moved with .to("gpu") (the fake CuPy here) against the CPU layer: ten
    # training steps with a ReLU, parameter updates from the gradients, then eval mode.
    r = np.random.default_rng(15)
    cpu = fastbn.BatchNorm(5, activation="relu", momentum=0.2)
    gpu = fastbn.BatchNorm(5, activation="relu", momentum=0.2).to("gpu")
    for step in range(10):
        x = (3.0 + 2.0 * r.standard_normal((4, 5, 3, 2))).astype(np.float32)
        dy = r.standard_normal(x.shape).astype(np.float32)
        y_c, y_g = cpu(x), gpu(cp.asarray(x))
        _close(y_g, y_c, 1e-5, f"y, step {step}")
        _close(gpu.backward(cp.asarray(dy)), cpu.backward(dy), 1e-4, f"dx, step {step}")
        for layer in (cpu, gpu):
            layer.weight = layer.weight - 0.1 * layer.grad_weight
            layer.bias = layer.bias - 0.1 * layer.grad_bias
            layer.zero_grad()
    for name in ("weight", "bias", "running_mean", "running_var"):
        _close(getattr(gpu, name), getattr(cpu, name), 1e-5, name)
    assert gpu.num_batches_tracked == cpu.num_batches_tracked == 10
    cpu.eval()
    gpu.eval()
    x = r.standard_normal((4, 5, 3, 2)).astype(np.float32)
    _close(gpu(cp.asarray(x)), cpu(x), 1e-5, "eval y")


# --------------------------------------------------------------------------- variants

def _variant_calls(x, dy, dd, w, b, mask):
    """Each variant of fastbn.variants on (x, dy, dd, w, b, mask) of one array module;
    statistics-like arguments are computed by the caller's module too."""
    C = x.shape[1]
    mod = type(x).__module__.split(".", 1)[0]
    asm = (lambda a: a) if mod == "numpy" else sys.modules["cupy"].asarray
    mean = asm(np.linspace(0.3, 0.7, C))
    var = asm(np.linspace(0.8, 1.4, C))
    r = asm(np.linspace(0.9, 1.1, C))
    d = asm(np.linspace(-0.2, 0.2, C))
    return {
        "fixed_batch_norm": lambda: (F.fixed_batch_norm(x, mean, var, w, b),),
        "fixed_batch_norm_backward": lambda: F.fixed_batch_norm_backward(dy, x, mean, var, w),
        "batch_renorm_forward": lambda: F.batch_renorm_forward(x, mean, var, w, b, rmax=1.2,
                                                               rmin=0.8, dmax=0.3),
        "batch_renorm_backward": lambda: F.batch_renorm_backward(dy, x, mean, var, r, d, w),
        "ghost_batch_norm_forward": lambda: F.ghost_batch_norm_forward(
            x, w, b, virtual_batch_size=3),
        "ghost_batch_norm_backward": lambda: F.ghost_batch_norm_backward(
            dy, x, asm(np.stack([np.asarray(mean)] * 2)), asm(np.stack([np.asarray(var)] * 2)),
            w, virtual_batch_size=3),
        "masked forward": lambda: fastbn.batch_norm_forward(x, w, b, mask=mask),
        "masked backward": lambda: fastbn.batch_norm_backward(dy, x, mean, var, w, mask=mask),
        "double backward": lambda: F.batch_norm_double_backward(dd, w, b, dy, x, mean, var, w),
        "double backward (eval)": lambda: F.batch_norm_double_backward(
            dd, w, b, dy, x, mean, var, w, training=False),
        "axes forward": lambda: fastbn.batch_norm_forward(
            x, asm(np.ones(x.shape[1:3])), None, axis=(1, 2)),
        "axes backward": lambda: fastbn.batch_norm_backward(
            dy, x, asm(np.full(x.shape[1:3], 0.5)), asm(np.ones(x.shape[1:3])), axis=(1, 2)),
        "axes moments": lambda: F.channel_moments(x, axis=(1, 2))[1:],
        "axes batch_norm": lambda: (fastbn.batch_norm(
            x, asm(np.zeros(x.shape[1:3])), asm(np.ones(x.shape[1:3])), training=True,
            axis=(1, 2)),),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_emulated_variants_match_cpu(cp, dtype):
    # Every variant on (fake) CuPy arrays against the same call on NumPy: the CUDA path runs
    # the variants through the backend's verbs and CuPy array operations, no kernel of its own.
    shape = (6, 4, 5)
    x, dy, dd = _data(shape, dtype, 21), _data(shape, dtype, 22, 0.0), _data(shape, dtype, 23, 0.0)
    w, b = _data((4,), np.float32, 24), _data((4,), np.float32, 25)
    mask = np.random.default_rng(26).random((6, 5)) < 0.6
    cpu = _variant_calls(x, dy, dd, w, b, mask)
    gpu = _variant_calls(*(cp.asarray(a) for a in (x, dy, dd, w, b, mask)))
    for name, call in cpu.items():
        ref = call()
        cp.launches.clear()
        got = gpu[name]()
        # which run on the CUDA kernels and which on CuPy array operations alone
        # (docs/guide/variants.md says so)
        on_arrays = name.startswith("masked")
        assert bool(cp.launches) != on_arrays, (name, cp.launches)
        assert len(got) == len(ref), name
        for k, (g, r) in enumerate(zip(got, ref)):
            assert isinstance(g, cp.ndarray), f"{name}[{k}]: {type(g)}"
            assert g.dtype == r.dtype and g.shape == r.shape, f"{name}[{k}]"
            _close(g, r, TOL[dtype] * 30, f"{name}[{k}]")


@pytest.mark.parametrize("options", [
    dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, activation="relu"),
    dict(virtual_batch_size=2, activation="relu"), dict(mask=True),
    dict(num_features=(4, 3), axis=(1, 2))], ids=str)
def test_emulated_layer_variants_match_the_cpu_layer(cp, options):
    # The layer's variants moved with .to("gpu"): three training steps, then eval.
    options = dict(options)
    masked = options.pop("mask", False)
    C = options.pop("num_features", 4)
    r = np.random.default_rng(27)
    cpu = fastbn.BatchNorm(C, momentum=0.2, **options)
    gpu = fastbn.BatchNorm(C, momentum=0.2, **options).to("gpu")
    for step in range(3):
        x = (1.0 + r.standard_normal((4, 4, 3))).astype(np.float32)
        dy = r.standard_normal(x.shape).astype(np.float32)
        kw, gkw = {}, {}
        if masked:
            m = r.random((4, 3)) < 0.7
            kw, gkw = dict(mask=m), dict(mask=cp.asarray(m))
        _close(gpu(cp.asarray(x), **gkw), cpu(x, **kw), 1e-5, f"y, step {step}")
        _close(gpu.backward(cp.asarray(dy)), cpu.backward(dy), 1e-4, f"dx, step {step}")
    for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
        _close(getattr(gpu, name), getattr(cpu, name), 1e-5, name)
    cpu.eval()
    gpu.eval()
    x = r.standard_normal((4, 4, 3)).astype(np.float32)
    _close(gpu(cp.asarray(x)), cpu(x), 1e-5, "eval y")


def test_emulated_bfloat16_is_refused(cp):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed (bfloat16)")
    x = cp.asarray(np.ones((4, 3), ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match=r"x: expected a float16, float32 or float64 CuPy array "
                                        r"\(bfloat16 runs on the CPU path only\), got dtype "
                                        r"bfloat16"):
        fastbn.batch_norm_forward(x)
    assert cp.launches == []
