"""The Cython entry points of fastbn._kernels refuse bad input by themselves, never crash.

Every def/cpdef entry point gets, in each array slot: None, a non-ndarray, wrong dtypes, a
byte-swapped, misaligned, non-contiguous, wrongly sized or (outputs) read-only array; and
C = 0, outer * inner = 0, negative and overflowing extents, odd thread counts. Required arrays
raise TypeError (None, non-ndarray, dtype) or ValueError (layout, size, read-only, extents);
optional ones (weight, bias, the backward's ReLU mask y, the running statistics) accept None.
The fast paths return None for anything not plain.

A wrong guess here could crash the interpreter, so the cases run in child processes (one per
group of entry points, many cases each); a signal fails the test with the case that caused it.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import subprocess_env

O, C, I = 2, 3, 4
N = O * C * I


# --------------------------------------------------------------------------- array variants

def _misaligned(a):
    buf = np.frombuffer(bytearray(a.nbytes + 1), np.uint8)
    m = buf[1:].view(a.dtype).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


def _noncontig(a):
    z = np.zeros(a.shape + (2,), a.dtype)
    z[..., 0] = a
    return z[..., 0]


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _variants(a, *, output, dtypes_ok):
    """(name, array or object, expected) for every bad variant of a good array `a`."""
    other = np.float16 if a.dtype != np.float16 else np.float32
    yield "list", a.tolist(), TypeError
    yield "int32", np.nan_to_num(a).astype(np.int32), TypeError
    yield "float16", a.astype(other), TypeError
    for dt in (np.float32, np.float64):
        if dt != a.dtype and dt not in dtypes_ok:
            yield np.dtype(dt).name, a.astype(dt), TypeError
    yield "byteswapped", a.astype(a.dtype.newbyteorder()), ValueError
    yield "misaligned", _misaligned(a), ValueError
    yield "noncontiguous", _noncontig(a), ValueError
    yield "too long", np.concatenate([a.ravel(), a.ravel()[:1]]), ValueError
    yield "too short", a.ravel()[:-1].copy(), ValueError
    if output:
        yield "read-only", _readonly(a), ValueError


# --------------------------------------------------------------------------- entry point specs
# Each slot: (name, kind). Kinds: "x" x-shaped input, "xout" x-shaped output, "xopt" optional
# x-shaped input (ReLU mask), "chan" required per-channel (float32 or float64), "chanopt"
# optional per-channel, "out<k>" float64 output of k*C values, "O"/"C"/"I" extents, or a
# plain value.

def _specs():
    return {
        "channel_stats": [("x", "x"), "O", "C", "I", ("out", "out2"), 1],
        "forward_train": [("x", "x"), ("y", "xout"), "O", "C", "I", ("weight", "chanopt"),
                          ("bias", "chanopt"), 1e-5, False, ("stats", "out3"), 1],
        "normalize": [("x", "x"), ("y", "xout"), "O", "C", "I", ("mean", "chan"),
                      ("invstd", "chan"), ("weight", "chanopt"), ("bias", "chanopt"), True, 1],
        "normalize_running": [("x", "x"), ("y", "xout"), "O", "C", "I", ("mean", "chan"),
                              ("var", "chan"), 1e-5, ("weight", "chanopt"), ("bias", "chanopt"),
                              False, 1],
        "backward_sums": [("dy", "x"), ("x", "x"), ("y", "xopt"), "O", "C", "I",
                          ("mean", "chan"), ("out", "out2"), 1],
        "backward_dx": [("dy", "x"), ("x", "x"), ("y", "xopt"), ("dx", "xout"), "O", "C", "I",
                        ("mean", "chan"), ("invstd", "chan"), ("weight", "chanopt"),
                        ("sum_dy", "chan"), ("sum_dy_xmu", "chan"), float(O * I), True, 1],
        "backward": [("dy", "x"), ("x", "x"), ("y", "xopt"), ("dx", "xout"), "O", "C", "I",
                     ("mean", "chan"), ("invstd", "chan"), ("weight", "chanopt"), True,
                     ("sums", "out2"), 1],
        "masked_channel_stats": [("x", "x"), ("mask", "mask"), "O", "C", "I", ("out", "out3"), 1],
        "masked_forward_train": [("x", "x"), ("y", "xout"), ("mask", "mask"), "O", "C", "I",
                                 ("weight", "chanopt"), ("bias", "chanopt"), 1e-5, False,
                                 ("stats", "out5"), 1],
        "masked_backward": [("dy", "x"), ("x", "x"), ("y", "xopt"), ("mask", "mask"),
                            ("dx", "xout"), "O", "C", "I", ("mean", "chan"), ("invstd", "chan"),
                            ("weight", "chanopt"), ("sums", "out2"), 1],
        "affine": [("a_in", "x"), ("b_in", "x"), ("out", "xout"), "O", "C", "I", ("a", "chan"),
                   ("k", "chan"), ("m", "chan"), ("c", "chan"), 1],
    }


def _good(kind, dtype, o, c, i, rng):
    n = o * c * i
    if kind in ("x", "xopt"):
        return rng.standard_normal(n).astype(dtype).reshape(o, c, i) + (1 if kind == "xopt" else 0)
    if kind == "xout":
        return np.full((o, c, i), np.nan, dtype)
    if kind in ("chan", "chanopt"):
        return (rng.random(c) + 0.5).astype(dtype)
    if kind.startswith("out"):
        return np.full(int(kind[3:]) * c, np.nan)
    if kind == "mask":  # a byte per (outer, inner) position, at least two of them set
        m = (rng.random(o * i) < 0.7).astype(np.uint8)
        m[:2] = 1
        return m
    raise AssertionError(kind)


def _mask_variants(m):
    """Bad masks: another dtype (bool included: the kernels take bytes), the wrong size, a
    strided view, a list."""
    yield "list", m.tolist(), TypeError
    yield "bool", m.astype(bool), TypeError
    yield "int32", m.astype(np.int32), TypeError
    yield "float64", m.astype(np.float64), TypeError
    yield "noncontiguous", _noncontig(m), ValueError
    yield "too long", np.concatenate([m, m[:1]]), ValueError
    yield "too short", m[:-1].copy(), ValueError


def _args(spec, dtype, o, c, i, rng, extents=None):
    ext = {"O": o, "C": c, "I": i}
    ext.update(extents or {})
    args = []
    for s in spec:
        if isinstance(s, tuple):
            args.append(_good(s[1], dtype, o, c, i, rng))
        elif isinstance(s, str):
            args.append(ext[s])
        else:
            args.append(s)
    return args


def _check_finite_outputs(spec, args):
    for s, a in zip(spec, args):
        if isinstance(s, tuple) and s[1] in ("xout", "out2", "out3", "out5"):
            assert np.all(np.isfinite(a)), f"{s[0]} not fully written"


def _cases_for(name, K):
    """(case name, thunk, expected): expected an exception class, or None (must not raise;
    the thunk checks its own results)."""
    rng = np.random.default_rng(0)
    spec = _specs()[name]
    fn = getattr(K, name)
    for dtype in (np.float32, np.float64):
        dn = np.dtype(dtype).name

        def good(dtype=dtype):
            args = _args(spec, dtype, O, C, I, rng)
            fn(*args)
            _check_finite_outputs(spec, args)
        yield f"{dn} good", good, None

        for k, s in enumerate(spec):
            if not isinstance(s, tuple):
                continue
            pname, kind = s
            base = _args(spec, dtype, O, C, I, rng)
            optional = kind in ("xopt", "chanopt")
            # None, and every bad variant of this slot
            variants = [("None", None, None if optional else TypeError)]
            if kind == "xopt" or kind == "x" and k > 0:
                ok = ()  # x-shaped arrays must share the first one's dtype
            elif kind.startswith("out"):
                ok = (np.float64,)
            elif kind.startswith("chan"):
                ok = (np.float32, np.float64)
            else:
                ok = ()
            if kind == "mask":
                variants = [("None", None, TypeError)] + list(_mask_variants(base[k]))
            else:
                variants += list(_variants(base[k], output=kind in ("xout",) or
                                           kind.startswith("out"), dtypes_ok=ok))
            for vname, v, exp in variants:
                if kind == "x" and k == 0 and vname in ("float32", "float64"):
                    continue  # the first array picks the dtype

                def run(base=base, k=k, v=v):
                    args = list(base)
                    args[k] = v
                    fn(*args)
                yield f"{dn} {pname}={vname}", run, exp

        # extents
        for ext, exp in [(dict(O=-1), ValueError), (dict(C=-1), ValueError),
                         (dict(I=-1), ValueError), (dict(O=2 ** 62), ValueError),
                         (dict(O=2 ** 40, I=2 ** 40), ValueError),
                         (dict(C=2 ** 61), ValueError)]:
            def run(ext=ext):
                fn(*_args(spec, dtype, O, C, I, rng, ext))
            yield f"{dn} extents {ext}", run, exp

        def c_zero(dtype=dtype):
            for o, i in ((O, I), (0, I), (O, 0), (0, 0)):
                fn(*_args(spec, dtype, o, 0, i, rng))
        yield f"{dn} C=0", c_zero, None

        for o, i in ((0, I), (O, 0)):
            def empty(o=o, i=i, dtype=dtype):
                args = _args(spec, dtype, o, C, i, rng)
                if name == "forward_train":
                    with _raises(ValueError):
                        fn(*args)
                    return
                fn(*args)
                for s, a in zip(spec, args):
                    if isinstance(s, tuple) and s[1].startswith("out"):
                        assert np.all(a == 0), f"{s[0]} should be zeros, got {a}"
            yield f"{dn} O={o} I={i}", empty, None

        for nt in (-5, 0, 2, 3, 10 ** 6):
            def threads(nt=nt, dtype=dtype):
                args = _args(spec, dtype, O, C, I, rng)
                args[-1] = nt
                fn(*args)
                _check_finite_outputs(spec, args)
            yield f"{dn} nthreads={nt}", threads, None


class _raises:
    def __init__(self, exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        if t is None:
            raise AssertionError(f"did not raise {self.exc.__name__}")
        return issubclass(t, self.exc)


def _update_running_cases(K):
    f64 = lambda c=C: np.linspace(0.5, 1.5, c)  # noqa: E731
    for slot, pname, optional in ((0, "running_mean", True), (1, "running_var", True),
                                  (2, "mean", False), (3, "var", False)):
        def base(c=C):
            return [np.zeros(c, np.float32), np.ones(c), f64(c), f64(c), 8.0, 0.1]
        b = base()
        exp_none = None if optional else TypeError
        variants = [("None", None, exp_none)]
        variants += list(_variants(b[slot], output=optional,
                                   dtypes_ok=(np.float32, np.float64) if optional else ()))
        for vname, v, exp in variants:
            if slot == 2 and vname == "too long":
                continue  # mean sets C: a longer one makes var the wrong size instead
            if slot == 2 and vname == "too short":
                continue

            def run(slot=slot, v=v):
                args = base()
                args[slot] = v
                K.update_running(*args)
            yield f"update_running {pname}={vname}", run, exp
    # a bad running_var must not leave running_mean half-updated
    def atomic():
        rm, rv = np.zeros(C), np.ones(C)
        with _raises(ValueError):
            K.update_running(rm, _readonly(rv), f64(), f64(), 8.0, 0.5)
        assert np.all(rm == 0)
    yield "update_running checks both before writing", atomic, None

    def c_zero():
        K.update_running(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), 0.0, 0.1)
        K.update_running(None, None, np.zeros(0), np.zeros(0), 1.0, 0.1)
    yield "update_running C=0", c_zero, None


def _fast_cases(K):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((O, C, I)).astype(np.float32)
    w = np.ones(C, np.float32)
    b = np.zeros(C, np.float32)
    m = np.zeros(C)
    inv = np.ones(C)
    rv = np.ones(C, np.float32)
    calls = {
        "batch_norm_fast": (lambda x=x, w=w, b=b, rm=np.zeros(C, np.float32), rv=rv, dy=None:
                            K.batch_norm_fast(x, w, b, rm, rv, True, 0.1, 1e-5, 1, None, 1)),
        "batch_norm_fast eval": (lambda x=x, w=w, b=b, rm=np.zeros(C, np.float32), rv=rv,
                                 dy=None:
                                 K.batch_norm_fast(x, w, b, rm, rv, False, 0.1, 1e-5, 1, None,
                                                   1)),
        "forward_with_stats_fast": (lambda x=x, w=w, b=b, rm=None, rv=None, dy=None:
                                    K.forward_with_stats_fast(x, w, b, 1e-5, 1, "relu", 1)),
        "normalize_fast": (lambda x=x, w=w, b=b, rm=m, rv=inv, dy=None:
                           K.normalize_fast(x, rm, rv, w, b, -2, None, 1)),
        "batch_norm_backward_fast": (lambda x=x, w=w, b=None, rm=m, rv=inv, dy=x:
                                     K.batch_norm_backward_fast(dy, x, rm, rv, w, 1, True,
                                                                "relu", x, 1)),
    }
    for cname, call in calls.items():
        yield f"{cname} plain", (lambda call=call: _assert(call() is not None)), None
        for arg in ("x", "w", "b", "rm", "rv", "dy"):
            good = call.__defaults__[("x", "w", "b", "rm", "rv", "dy").index(arg)]
            if good is None:
                continue
            for vname, v, _ in _variants(good, output=False, dtypes_ok=()):
                if vname in ("float32", "float64") and arg != "dy":
                    continue  # x picks the dtype; per-channel arrays may be either

                def run(call=call, arg=arg, v=v):
                    r = call(**{arg: v})
                    _assert(r is None, f"returned {type(r).__name__}, expected None")
                yield f"{cname} {arg}={vname} -> None", run, None
        for ax in (3, -4, None, 1.0):
            if cname.startswith("batch_norm_backward"):
                f = lambda ax=ax: K.batch_norm_backward_fast(x, x, m, inv, w, ax, True, None,  # noqa: E731
                                                             None, 1)
            elif cname.startswith("normalize"):
                f = lambda ax=ax: K.normalize_fast(x, m, inv, w, b, ax, None, 1)  # noqa: E731
            elif cname.startswith("forward"):
                f = lambda ax=ax: K.forward_with_stats_fast(x, w, b, 1e-5, ax, None, 1)  # noqa: E731
            else:
                f = lambda ax=ax: K.batch_norm_fast(x, w, b, None, None, True, 0.1, 1e-5, ax,  # noqa: E731
                                                    None, 1)
            yield f"{cname} axis={ax} -> None", (lambda f=f: _assert(f() is None)), None
    # training with one value per channel, empty x, other activations
    one = x[:1, :, :1].copy()
    yield "batch_norm_fast O*I=1 -> None", (lambda: _assert(
        K.batch_norm_fast(one, None, None, None, None, True, 0.1, 1e-5, 1, None, 1) is None)), None
    yield "forward_with_stats_fast O*I=1 -> None", (lambda: _assert(
        K.forward_with_stats_fast(one, None, None, 1e-5, 1, None, 1) is None)), None
    yield "batch_norm_fast empty -> None", (lambda: _assert(
        K.batch_norm_fast(x[:0], None, None, None, None, True, 0.1, 1e-5, 1, None, 1) is None)), None
    yield "forward_with_stats_fast gelu -> None", (lambda: _assert(
        K.forward_with_stats_fast(x, None, None, 1e-5, 1, "gelu", 1) is None)), None
    # invstd_fast
    v = np.array([0.0, 1.0, 4.0])
    yield "invstd_fast plain", (lambda: _assert(
        np.array_equal(K.invstd_fast(v, 0.0), [0.0, 1.0, 0.5]))), None
    for vname, bad, _ in _variants(v, output=False, dtypes_ok=(np.float32,)):
        if vname.startswith("too"):
            continue  # any length is plain
        yield f"invstd_fast var={vname} -> None", (lambda bad=bad: _assert(
            K.invstd_fast(bad, 0.0) is None)), None
    yield "invstd_fast var=None -> None", (lambda: _assert(K.invstd_fast(None, 0.0) is None)), None
    yield "invstd_fast 2-D -> None", (lambda: _assert(
        K.invstd_fast(v.reshape(1, 3), 0.0) is None)), None
    yield "invstd_fast eps=None", (lambda: K.invstd_fast(v, None)), TypeError
    yield "batch_norm_fast momentum=None", (lambda: K.batch_norm_fast(
        x, w, b, None, None, True, None, 1e-5, 1, None, 1)), TypeError
    # stream_copy
    src = np.arange(1000, dtype=np.uint8)

    def copy_ok():
        for nt in (-1, 0, 1, 2, 10 ** 6):
            dst = np.zeros_like(src)
            K.stream_copy(src, dst, nt)
            _assert(np.array_equal(src, dst))
        K.stream_copy(src[:0], src[:0].copy(), 2)
    yield "stream_copy plain", copy_ok, None
    for slot in (0, 1):
        for vname, bad, exp in [("None", None, TypeError), ("list", src.tolist(), TypeError),
                                ("float64", src.astype(np.float64), TypeError),
                                ("noncontiguous", _noncontig(src), ValueError),
                                ("too short", src[:-1].copy(), ValueError)]:
            def run(slot=slot, bad=bad):
                args = [src, np.zeros_like(src), 2]
                args[slot] = bad
                K.stream_copy(*args)
            yield f"stream_copy {('src', 'dst')[slot]}={vname}", run, exp
    yield "stream_copy dst=read-only", (lambda: K.stream_copy(src, _readonly(src), 1)), ValueError


def _assert(cond, msg="assertion failed"):
    if not cond:
        raise AssertionError(msg)


GROUPS = {
    "stats": ["channel_stats", "forward_train"],
    "normalize": ["normalize", "normalize_running", "update_running"],
    "backward": ["backward_sums", "backward_dx", "backward", "affine"],
    "masked": ["masked_channel_stats", "masked_forward_train", "masked_backward"],
    "fast": ["fast"],
}


def _group_cases(group, K):
    for name in GROUPS[group]:
        if name == "update_running":
            yield from _update_running_cases(K)
        elif name == "fast":
            yield from _fast_cases(K)
        else:
            for cname, f, exp in _cases_for(name, K):
                yield f"{name} {cname}", f, exp


def _child(group):
    """Run a group's cases, printing START before each and a JSON verdict line after."""
    import fastbn._kernels as K

    for cname, f, exp in _group_cases(group, K):
        print("START", cname, flush=True)
        try:
            with np.errstate(all="ignore"):
                f()
        except Exception as e:  # noqa: BLE001 - every outcome is reported
            got = type(e).__name__
            ok = exp is not None and isinstance(e, exp)
            detail = f"{got}: {e}"
        else:
            ok = exp is None
            detail = "no exception"
        print(json.dumps({"case": cname, "ok": ok,
                          "expected": exp.__name__ if exp else "success", "got": detail}),
              flush=True)


@pytest.mark.parametrize("group", list(GROUPS))
def test_entry_points_refuse_bad_input_without_crashing(group):
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); "
            f"import test_kernel_boundary as T; T._child({group!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=subprocess_env(OMP_NUM_THREADS="2"), timeout=120)
    lines = p.stdout.splitlines()
    started = [ln[6:] for ln in lines if ln.startswith("START ")]
    verdicts = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert p.returncode == 0, (
        f"child died with {p.returncode} during case {started[-1] if started else '?'!r}\n"
        f"{p.stderr[-3000:]}")
    assert len(verdicts) == len(started) > 20
    bad = [v for v in verdicts if not v["ok"]]
    assert not bad, "\n".join(f"{v['case']}: expected {v['expected']}, got {v['got']}"
                              for v in bad)
