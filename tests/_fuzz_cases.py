"""Fuzz cases for tests/test_fuzz.py: random argument combinations for every public function.

Each case is built from (seed, target, index) alone, so any case can be replayed on its own:

    PYTHONPATH=src python tests/_fuzz_cases.py --target batch_norm_backward --seed 0 --case 17 -v

prints the arguments, runs the call in this process (a crash is then visible as such) and says
what was expected and what happened. As a child of test_fuzz.py (``--start/--stop --log``) it
runs a range of cases and appends one line per case to the log file, written with os.write
before and after each call, so that the parent knows which case a crash happened in.

A case is a valid call (random shape, feature axis, dtype, values) with 0-3 perturbations
applied to its arguments. Each perturbation has a verdict:

    ok      the call must succeed and match the float64 reference below
    either  a clean TypeError/ValueError naming the argument, or the reference result
    refuse  a TypeError/ValueError (TypeError where `exc` says so) naming the argument

and the outcome must be exactly one of (1) a refusal whose message names one of the perturbed
arguments, with every array argument bitwise unchanged (and the layer's state unchanged), or
(2) the reference result, with in-place buffers updated as the reference says. Only the public
API and its documented contract are used.
"""
import argparse
import json
import math
import os
import re
import sys
import traceback

import numpy as np

import fastbn
from fastbn import functional as F

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
TOL = {"e": 2e-3, "f": 1e-4, "d": 1e-10}


# =========================================================================== arrays

class Arr:
    """An array argument under construction: float64 values, a dtype and a memory form."""

    def __init__(self, values, dtype, form="C"):
        self.values = np.asarray(values, dtype=np.float64)
        self.dtype = np.dtype(dtype)
        self.form = form
        self.mask_seed = 0

    def make(self, rng):
        v, dt, form = self.values, self.dtype, self.form
        if form == "bigendian":
            a = np.asarray(v.astype(dt), dtype=dt.newbyteorder(">"))
            return a
        base = v.astype(dt) if dt.kind != "O" else v.astype(object)
        if form == "C":
            return np.array(base, order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
        if form == "F":
            return np.asfortranarray(base)
        if form == "perm":
            p = rng.permutation(base.ndim)
            t = np.ascontiguousarray(base.transpose(p))
            return t.transpose(np.argsort(p))
        if form == "gap":
            if base.ndim == 0:
                return base.copy()
            k = int(rng.integers(base.ndim))
            step = int(rng.integers(2, 4))
            shp = list(base.shape)
            shp[k] = max(1, shp[k] * step)
            buf = np.full(shp, 1234.5, dtype=dt)
            sl = [slice(None)] * base.ndim
            sl[k] = slice(None, None, step)
            view = buf[tuple(sl)][tuple(slice(0, n) for n in base.shape)]
            view[...] = base
            return view
        if form == "neg":
            b = np.ascontiguousarray(np.flip(base))
            return np.flip(b)
        if form == "bcast":
            return np.broadcast_to(base, base.shape)  # values already made constant along axis
        if form == "misaligned":
            n = base.size
            buf = bytearray(n * dt.itemsize + 1)
            a = np.frombuffer(buf, dtype=dt, count=n, offset=1).reshape(base.shape)
            a[...] = base
            return a
        if form == "readonly":
            a = np.array(base)
            a.flags.writeable = False
            return a
        if form == "list":
            return base.tolist()
        if form == "tuple":
            return tuple(base.tolist())
        if form == "masked":
            r = np.random.default_rng(self.mask_seed)
            return np.ma.masked_array(base.copy(), mask=r.random(base.shape) < 0.4)
        if form == "masked_nomask":
            return np.ma.masked_array(base.copy())
        raise AssertionError(form)


FORMS_VALUE_PRESERVING = ["C", "F", "perm", "gap", "neg", "misaligned", "readonly"]


def make_bcast(values, axis, rng):
    """values made constant along one axis (so a zero-stride view can hold them)."""
    if values.ndim == 0 or values.size == 0:
        return values
    k = int(rng.integers(values.ndim)) if axis is None else axis
    first = np.take(values, [0], axis=k)
    return np.broadcast_to(first, values.shape).copy()


# =========================================================================== perturbations
# Each returns (tag, verdict, names, exc) after modifying the slot dict in place.
# A slot is {"kind": "arr", "arr": Arr} or {"kind": "raw", "value": obj}.

def _set_raw(slots, name, value):
    slots[name] = {"kind": "raw", "value": value}


def perturb_array(rng, slots, name, role, ctx):
    """role: 'x', 'xlike' (dy, y), 'out', 'chan', 'chan_rw' (written in place)."""
    slot = slots[name]
    required = name in ctx["required"]
    writes = role == "out" or (role == "chan_rw" and ctx.get("writes_running", False))
    if slot["kind"] != "arr":  # currently None or raw: give it a value or keep None
        if required:
            return f"{name}=None", "refuse", [name], None
        return f"{name}=None", "ok", [name], None
    a = slot["arr"]
    shape = a.values.shape
    choices = ["form", "form", "form", "bigendian", "list", "ragged", "masked", "masked_nomask",
               "dtype_bad", "dtype_float", "ndim", "shape", "nan", "none", "bcast"]
    if role in ("chan", "chan_rw"):
        choices += ["scalar", "tuple", "dtype_int"]
    kind = choices[int(rng.integers(len(choices)))]
    if kind == "form":
        f = FORMS_VALUE_PRESERVING[int(rng.integers(len(FORMS_VALUE_PRESERVING)))]
        if a.values.ndim < 2 and f in ("F", "perm"):
            f = "C"
        a.form = f
        if f == "readonly" and writes:
            return f"{name}:readonly", "refuse", [name], None
        return f"{name}:{f}", "ok", [name], None
    if kind == "bcast":
        a.values = make_bcast(a.values, None, rng)
        a.form = "bcast"
        if writes:
            return f"{name}:bcast", "refuse", [name], None
        return f"{name}:bcast", "ok", [name], None
    if kind == "bigendian":
        a.form = "bigendian"
        return f"{name}:bigendian", "either", [name], None
    if kind in ("list", "tuple") and 0 in shape[:-1]:
        kind = "bigendian"  # nested lists cannot hold a zero extent before the last axis
        a.form = kind
        return f"{name}:{kind}", "either", [name], None
    if kind in ("list", "tuple"):
        a.form = kind
        if writes:
            return f"{name}:{kind}", "refuse", [name], None
        return f"{name}:{kind}", "either", [name], None
    if kind == "ragged":
        ragged = [[1.0, 2.0], [3.0]] if role not in ("chan", "chan_rw") else [1.0, [2.0, 3.0]]
        _set_raw(slots, name, ragged)
        return f"{name}:ragged", "refuse", [name], None
    if kind in ("masked", "masked_nomask"):
        a.form = kind
        a.mask_seed = int(rng.integers(1 << 30))
        return f"{name}:{kind}", "refuse", [name], TypeError
    if kind == "dtype_bad":
        dt = [np.int32, np.int64, np.bool_, np.complex128, np.object_, np.uint8][int(rng.integers(6))]
        a.dtype = np.dtype(dt)
        if role in ("chan", "chan_rw") and not writes and a.dtype.kind in "iu":
            return f"{name}:dtype={a.dtype}", "either", [name], None
        return f"{name}:dtype={a.dtype.kind}", "refuse", [name], None
    if kind == "dtype_int":
        a.dtype = np.dtype(np.int64)
        a.values = np.round(a.values)
        if writes:
            return f"{name}:dtype=int", "refuse", [name], None
        return f"{name}:dtype=int", "either", [name], None
    if kind == "dtype_float":
        others = [d for d in (F16, F32, F64) if d != a.dtype]
        a.dtype = others[int(rng.integers(len(others)))]
        if role == "x":
            if ctx.get("layer_dtype") is not None and a.dtype not in (F16, ctx["layer_dtype"]):
                return f"{name}:dtype_float", "refuse", [name], None
            if ctx.get("x_peers"):  # dy/y/out must match x's dtype: either side may be named
                return f"{name}:dtype_float", "either", [name] + ctx["x_peers"], None
            return f"{name}:dtype_float", "ok", [name], None
        if role in ("chan",):
            return f"{name}:dtype_float", "ok", [name], None
        if role == "chan_rw":
            return f"{name}:dtype_float", "either" if a.dtype == F16 else "ok", [name], None
        return f"{name}:dtype_float", "either", [name], None  # dy/y/out of another dtype
    if kind in ("ndim", "shape", "scalar") and ctx.get("any_shape"):
        a.values = [np.asarray(2.5), a.values.reshape(1, -1), np.resize(a.values, a.values.size + 1)][
            int(rng.integers(3))]
        return f"{name}:shape{a.values.shape}", "either", [name], None
    if kind == "ndim":
        if role in ("chan", "chan_rw"):
            opts = ["0d", "2d"]
        else:
            opts = ["0d", "1d"]
        o = opts[int(rng.integers(len(opts)))]
        if o == "0d":
            a.values = np.asarray(1.5)
        elif o == "1d":
            a.values = a.values.reshape(-1)[:max(1, min(4, a.values.size))]
            if a.values.size == 0:
                a.values = np.ones(3)
        else:
            a.values = a.values.reshape(1, -1) if rng.random() < 0.5 else a.values.reshape(-1, 1)
        return f"{name}:{o}", "refuse", [name], None
    if kind == "shape" and role == "x":
        if ctx.get("layer_axis") is None:  # x defines C: its shape is the problem's
            a.form = "C"
            return f"{name}:C", "ok", [name], None
        shp = list(shape)
        shp[ctx["layer_axis"]] += 1
        a.values = np.resize(a.values if a.values.size else np.ones(1), shp)
        return f"{name}:wrong_C", "refuse", [name], None
    if kind == "shape":
        if role in ("chan", "chan_rw"):
            n = shape[0]
            m = n + (1 if (n == 0 or rng.random() < 0.5) else -1)
            a.values = np.resize(a.values if a.values.size else np.ones(1), (m,))
        else:
            shp = list(shape)
            k = int(rng.integers(len(shp)))
            shp[k] += 1
            a.values = np.resize(a.values if a.values.size else np.ones(1), shp)
        names = [name] + ctx.get("shape_peers", {}).get(name, [])
        return f"{name}:wrong_shape", "refuse", names, None
    if kind == "nan":
        if a.values.size == 0:
            return f"{name}:nan(empty)", "ok", [name], None
        v = a.values.copy().reshape(-1)
        v[int(rng.integers(v.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        a.values = v.reshape(a.values.shape)
        ctx["nonfinite"] = True
        return f"{name}:nonfinite", "ok", [name], None
    if kind == "none":
        _set_raw(slots, name, None)
        if required:
            return f"{name}=None", "refuse", [name], None
        return f"{name}=None", "ok", [name], None
    if kind == "scalar":
        _set_raw(slots, name, [1.0, 2, np.float64(0.5)][int(rng.integers(3))])
        return f"{name}:python_scalar", "refuse", [name], None
    raise AssertionError(kind)


SCALARS = {
    # (value factory, verdict, tag)
    "eps": [
        (lambda b: 0.0, "ok", "0"), (lambda b: 1e-3, "ok", "1e-3"), (lambda b: 1, "ok", "int"),
        (lambda b: np.float32(1e-4), "ok", "np.float32"), (lambda b: np.float64(1e-5), "ok", "np.float64"),
        (lambda b: 1e300, "either", "huge"), (lambda b: np.array(1e-5), "either", "0d-array"),
        (lambda b: True, "refuse", "bool"), (lambda b: False, "refuse", "bool"),
        (lambda b: np.bool_(True), "refuse", "np.bool_"), (lambda b: "1e-5", "refuse", "str"),
        (lambda b: float("nan"), "refuse", "nan"), (lambda b: float("inf"), "refuse", "inf"),
        (lambda b: -1e-5, "refuse", "negative"), (lambda b: None, "refuse", "None"),
        (lambda b: 1e-5 + 0j, "refuse", "complex"), (lambda b: [1e-5], "refuse", "list"),
    ],
    "momentum": [
        (lambda b: 0.0, "ok", "0"), (lambda b: 1.0, "ok", "1"), (lambda b: 1, "ok", "int"),
        (lambda b: np.float32(0.25), "ok", "np.float32"), (lambda b: np.array(0.5), "either", "0d-array"),
        (lambda b: True, "refuse", "bool"), (lambda b: np.bool_(False), "refuse", "np.bool_"),
        (lambda b: "0.1", "refuse", "str"), (lambda b: float("nan"), "refuse", "nan"),
        (lambda b: float("inf"), "refuse", "inf"), (lambda b: -0.1, "refuse", "negative"),
        (lambda b: 1.5, "refuse", ">1"), (lambda b: 1e300, "refuse", "huge"),
        (lambda b: None, "refuse", "None"), (lambda b: 0.1j, "refuse", "complex"),
    ],
    "axis": [
        (lambda b: b[0] - b[1], "ok", "negative-equivalent"), (lambda b: b[0], "ok", "positive"),
        (lambda b: np.int64(b[0]), "ok", "np.int64"), (lambda b: np.int32(b[0] - b[1]), "ok", "np.int32"),
        (lambda b: np.array(b[0]), "either", "0d-array"),
        (lambda b: bool(b[0] % 2), "refuse", "bool"), (lambda b: float(b[0]), "refuse", "float"),
        (lambda b: str(b[0]), "refuse", "str"), (lambda b: None, "refuse", "None"),
        (lambda b: b[1], "refuse", "out_of_range"), (lambda b: -b[1] - 1, "refuse", "out_of_range"),
        (lambda b: 2 ** 70, "refuse", "huge"), (lambda b: complex(b[0]), "refuse", "complex"),
        (lambda b: np.float64(b[0]), "refuse", "np.float64"),
    ],
    "training": [
        (lambda b: np.bool_(b), "either", "np.bool_"), (lambda b: np.array(b), "either", "0d-array"),
        (lambda b: str(b), "refuse", "str"), (lambda b: int(b), "refuse", "int"),
        (lambda b: None, "refuse", "None"), (lambda b: float(b), "refuse", "float"),
    ],
    "activation": [
        (lambda b: "sigmoid", "refuse", "unknown"), (lambda b: "RELU", "either", "RELU"),
        (lambda b: 1, "refuse", "int"), (lambda b: True, "refuse", "bool"),
        (lambda b: b"relu", "refuse", "bytes"), (lambda b: ["relu"], "refuse", "list"),
        (lambda b: "", "refuse", "empty-str"),
    ],
    "count": [
        (lambda b: np.int64(b), "ok", "np.int64"), (lambda b: float(b), "either", "float"),
        (lambda b: True, "refuse", "bool"), (lambda b: str(b), "refuse", "str"),
        (lambda b: float("nan"), "refuse", "nan"), (lambda b: float("inf"), "refuse", "inf"),
        (lambda b: -3, "refuse", "negative"), (lambda b: 0, "refuse0", "0"),
        (lambda b: None, "refuse", "None"), (lambda b: complex(b), "refuse", "complex"),
        (lambda b: 1, "either", "1"),
    ],
}


def perturb_scalar(rng, slots, name, base, ctx):
    opts = SCALARS[name]
    make, verdict, tag = opts[int(rng.integers(len(opts)))]
    value = make(base)
    _set_raw(slots, name, value)
    if name == "momentum" and not ctx.get("uses_momentum", True) and verdict == "refuse":
        verdict = "either"  # eval mode / no running stats: momentum is not used
    if verdict == "refuse0":
        verdict = "refuse" if ctx.get("count_must_be_positive") else "either"
    if name == "count" and tag in ("0", "1", "float") and ctx.get("count_ambiguous"):
        verdict = "either"
    ctx["scalar_tags"][name] = tag
    return f"{name}={tag}", verdict, [name], None


# =========================================================================== reference

def f64(a):
    return None if a is None else np.array(a, dtype=np.float64)


def red_axes(ndim, ax):
    return tuple(i for i in range(ndim) if i != ax)


def bshape(ndim, ax, C):
    s = [1] * ndim
    s[ax] = C
    return s


def ref_stats(x, ax):
    axes = red_axes(x.ndim, ax)
    n = math.prod(x.shape[:ax] + x.shape[ax + 1:])  # values per channel, whatever C is
    with np.errstate(all="ignore"):
        mean = x.mean(axis=axes) if n else np.zeros(x.shape[ax])
        var = ((x - mean.reshape(bshape(x.ndim, ax, -1))) ** 2).mean(axis=axes) if n else np.zeros(x.shape[ax])
    return n, mean, var


def ref_invstd(var, eps):
    v = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(all="ignore"):
        inv = 1.0 / np.sqrt(v)
    inv = np.where(v == 0, 0.0, inv)
    return inv


def ref_normalize(x, ax, mean, invstd, w, b, relu):
    C = x.shape[ax]
    bs = bshape(x.ndim, ax, C)
    w = np.ones(C) if w is None else w
    b = np.zeros(C) if b is None else b
    with np.errstate(all="ignore"):
        y = (x - mean.reshape(bs)) * invstd.reshape(bs) * w.reshape(bs) + b.reshape(bs)
        if relu:
            y = np.where(y > 0, y, np.where(np.isnan(y), y, 0.0))
    return y


def ref_grad(dy, y, relu):
    if not relu:
        return dy
    return np.where(y > 0, dy, 0.0)


def ref_sums(g, x, ax, mean):
    axes = red_axes(x.ndim, ax)
    C = x.shape[ax]
    with np.errstate(all="ignore"):
        return g.sum(axis=axes), (g * (x - mean.reshape(bshape(x.ndim, ax, C)))).sum(axis=axes)


def ref_dx(g, x, ax, mean, invstd, w, sum_dy, sum_dy_xmu, count, training):
    C = x.shape[ax]
    bs = bshape(x.ndim, ax, C)
    w = np.ones(C) if w is None else w
    m, inv, ww = mean.reshape(bs), invstd.reshape(bs), w.reshape(bs)
    with np.errstate(all="ignore"):
        if not training:
            return g * inv * ww
        if count == 0:
            return np.zeros_like(g)
        return ww * inv * (g - sum_dy.reshape(bs) / count
                           - (x - m) * inv * inv * sum_dy_xmu.reshape(bs) / count)


# =========================================================================== comparison

def _finite_max(a):
    a = np.asarray(a, dtype=np.float64)
    f = a[np.isfinite(a)]
    return float(np.abs(f).max()) if f.size else 0.0


def compare(name, actual, expected, tol, scale=None, relu_zero=False, skip_channels=None):
    """None when actual matches expected (float64), else a short description."""
    if actual is None:
        return f"{name}: got None"
    try:
        a = np.array(actual, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001
        return f"{name}: not convertible to float64 ({exc!r})"
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return f"{name}: shape {a.shape}, expected {e.shape}"
    if a.size == 0:
        return None
    if scale is None:
        scale = 1.0 + _finite_max(e)
    keep = np.ones(e.shape, bool) if skip_channels is None else ~skip_channels
    ef = np.isfinite(e)
    bad_nf = keep & ~ef & np.isfinite(a)
    if relu_zero:
        bad_nf &= a != 0
    if bad_nf.any():
        i = tuple(int(k) for k in np.argwhere(bad_nf)[0])
        return f"{name}: finite {a[i]!r} at {i} where the reference is {e[i]!r}"
    fin = keep & ef
    with np.errstate(all="ignore"):
        err = np.where(fin, np.abs(a - e), 0.0)
    err = np.where(fin & ~np.isfinite(a), np.inf, err)
    if (err > tol * scale).any():
        i = tuple(int(k) for k in np.unravel_index(int(np.argmax(err)), err.shape))
        return (f"{name}: {a[i]!r} at {i}, expected {e[i]!r} (|err| {err[i]:.3g} > "
                f"{tol:g} * {scale:.3g})")
    return None


def dtype_of(obj):
    return obj.dtype if isinstance(obj, np.ndarray) else F64


def tol_for(dt):
    return TOL.get(np.dtype(dt).char, 1e-4)


def native(dt):
    dt = np.dtype(dt)
    return dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt


# =========================================================================== snapshots

def snap(obj):
    """Bitwise snapshot of an argument (arrays incl. masks; lists deep-copied)."""
    if isinstance(obj, np.ma.MaskedArray):
        return ("ma", np.ma.getdata(obj).tobytes(), np.ma.getmaskarray(obj).tobytes(),
                obj.shape, obj.dtype.str)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "O":
            return ("obj", obj.shape, [repr(v) for v in obj.reshape(-1).tolist()])
        return ("nd", obj.tobytes(), obj.shape, obj.dtype.str)
    if isinstance(obj, (list, tuple)):
        return ("seq", repr(obj))
    return ("other", repr(obj))


# =========================================================================== cases

FUNCTIONAL_TARGETS = [
    "batch_norm_forward", "forward_with_stats", "batch_norm", "batch_norm_backward",
    "normalize", "channel_moments", "backward_sums", "backward_dx", "update_running_stats",
    "invstd_from_var",
]
TARGETS = FUNCTIONAL_TARGETS + ["BatchNorm"]

SIGNATURES = {
    # name: (array slots with roles, scalar slots, required)
    "batch_norm_forward": ([("x", "x"), ("weight", "chan"), ("bias", "chan"), ("out", "out")],
                           ["axis", "eps", "activation"], {"x"}),
    "forward_with_stats": ([("x", "x"), ("weight", "chan"), ("bias", "chan"), ("out", "out")],
                           ["axis", "eps", "activation"], {"x"}),
    "batch_norm": ([("x", "x"), ("running_mean", "chan_rw"), ("running_var", "chan_rw"),
                    ("weight", "chan"), ("bias", "chan"), ("out", "out")],
                   ["axis", "eps", "activation", "momentum", "training"], {"x"}),
    "batch_norm_backward": ([("dy", "xlike"), ("x", "x"), ("mean", "chan"), ("invstd", "chan"),
                             ("weight", "chan"), ("y", "xlike")],
                            ["axis", "training", "activation"], {"x", "dy", "mean", "invstd"}),
    "normalize": ([("x", "x"), ("mean", "chan"), ("invstd", "chan"), ("weight", "chan"),
                   ("bias", "chan"), ("out", "out")], ["axis", "activation"],
                  {"x", "mean", "invstd"}),
    "channel_moments": ([("x", "x")], ["axis"], {"x"}),
    "backward_sums": ([("dy", "xlike"), ("x", "x"), ("mean", "chan"), ("y", "xlike")],
                      ["axis", "activation"], {"x", "dy", "mean"}),
    "backward_dx": ([("dy", "xlike"), ("x", "x"), ("mean", "chan"), ("invstd", "chan"),
                     ("sum_dy", "chan"), ("sum_dy_xmu", "chan"), ("weight", "chan"),
                     ("y", "xlike")], ["axis", "training", "activation", "count"],
                    {"x", "dy", "mean", "invstd", "sum_dy", "sum_dy_xmu"}),
    "update_running_stats": ([("running_mean", "chan_rw"), ("running_var", "chan_rw"),
                              ("mean", "chan"), ("var", "chan")], ["count", "momentum"],
                             {"mean", "var"}),
    "invstd_from_var": ([("var", "chan")], ["eps"], {"var"}),
}


def make_problem(rng, force_valid_n=False):
    ndim = int(rng.integers(2, 5))
    ax = int(rng.integers(ndim))
    shape = [int(rng.integers(1, 4)) for _ in range(ndim)]
    shape[ax] = int(rng.integers(1, 6))
    if ndim == 2:
        shape[1 - ax] = int(rng.integers(2, 6))
    mode = "normal"
    r = rng.random()
    if not force_valid_n:
        if r < 0.07:
            mode = "empty"
            k = [i for i in range(ndim) if i != ax][int(rng.integers(ndim - 1))]
            shape[k] = 0
        elif r < 0.12:
            mode = "one"
            shape = [1] * ndim
            shape[ax] = int(rng.integers(1, 5))
        elif r < 0.16:
            mode = "c0"
            shape[ax] = 0
    if mode == "normal" and math.prod(shape) // shape[ax] < 2:
        k = [i for i in range(ndim) if i != ax][0]
        shape[k] = 2
    dtype = [F16, F32, F64][int(rng.integers(3))]
    return dict(shape=tuple(shape), ax=ax, ndim=ndim, C=shape[ax], dtype=dtype, mode=mode,
                n=math.prod(shape[:ax] + shape[ax + 1:]))


def x_values(rng, shape):
    return rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + rng.uniform(-2, 2)


def build_functional(target, rng):
    pb = make_problem(rng)
    shape, ax, C, dt = pb["shape"], pb["ax"], pb["C"], pb["dtype"]
    arrays, scalars, required = SIGNATURES[target]
    slots = {}
    xv = x_values(rng, shape)
    chan_dt = lambda: [F32, F64][int(rng.integers(2))]  # noqa: E731
    relu = rng.random() < 0.3
    training = bool(rng.random() < 0.7)
    axis_value = ax if rng.random() < 0.5 else ax - pb["ndim"]
    base = {"axis": (ax, pb["ndim"]),
            "eps": 1e-5, "momentum": float(rng.uniform(0, 1)), "training": training,
            "activation": "relu" if relu else None, "count": pb["n"]}
    n, bmean, bvar = ref_stats(xv, ax)
    opt_present = lambda p=0.6: rng.random() < p  # noqa: E731
    order = sorted(arrays, key=lambda nr: nr[0].startswith("sum_dy"))  # y before the sums
    for name, role in order:
        if name == "x":
            slots[name] = {"kind": "arr", "arr": Arr(xv, dt)}
        elif name == "dy":
            slots[name] = {"kind": "arr", "arr": Arr(rng.standard_normal(shape), dt)}
        elif name == "y":
            if relu:
                w0 = rng.standard_normal(C)
                yv = ref_normalize(xv, ax, bmean, ref_invstd(bvar, 1e-5), w0, rng.standard_normal(C), True)
                slots[name] = {"kind": "arr", "arr": Arr(yv.astype(dt), dt)}
            else:
                slots[name] = {"kind": "raw", "value": None}
        elif name == "out":
            if opt_present(0.35):
                slots[name] = {"kind": "arr", "arr": Arr(np.full(shape, 7.0), dt)}
            else:
                slots[name] = {"kind": "raw", "value": None}
        elif name in ("weight", "bias"):
            if opt_present():
                v = rng.standard_normal(C) * (1.0 if name == "weight" else 0.5)
                slots[name] = {"kind": "arr", "arr": Arr(v, chan_dt())}
            else:
                slots[name] = {"kind": "raw", "value": None}
        elif name == "mean":
            if target == "update_running_stats":
                C = C or 3
                v = rng.standard_normal(C)
            elif target in ("batch_norm_backward", "backward_dx") and not training:
                v = rng.standard_normal(C) * 0.5
            else:
                v = bmean
            slots[name] = {"kind": "arr", "arr": Arr(v, F64 if rng.random() < 0.7 else F32)}
        elif name == "invstd":
            if target in ("batch_norm_backward", "backward_dx") and not training:
                v = rng.uniform(0.3, 2.0, C)
            else:
                v = ref_invstd(bvar, 1e-5) if pb["n"] > 1 else rng.uniform(0.3, 2.0, C)
            slots[name] = {"kind": "arr", "arr": Arr(v, F64 if rng.random() < 0.7 else F32)}
        elif name == "var":
            Cv = C if C else 3
            v = rng.uniform(0.1, 3.0, Cv) if target != "invstd_from_var" or rng.random() < 0.8 \
                else np.concatenate([[0.0], rng.uniform(0, 2, Cv - 1)])
            slots[name] = {"kind": "arr", "arr": Arr(v, F64 if rng.random() < 0.6 else F32)}
        elif name in ("running_mean", "running_var"):
            Cv = C if (C or target != "update_running_stats") else 3
            if target == "update_running_stats":
                slots.setdefault("_C", Cv)
            if target == "batch_norm" and training and rng.random() < 0.25:
                slots[name] = {"kind": "raw", "value": None}
                continue
            v = rng.standard_normal(Cv) * 0.3 if name == "running_mean" else rng.uniform(0.2, 2.0, Cv)
            slots[name] = {"kind": "arr", "arr": Arr(v, chan_dt())}
        elif name in ("sum_dy", "sum_dy_xmu"):
            g = ref_grad(f64(slots["dy"]["arr"].values), f64(slots["y"]["arr"].values)
                         if relu else None, relu)
            sdy, sdx = ref_sums(g, xv, ax, bmean)
            slots[name] = {"kind": "arr", "arr": Arr(sdy if name == "sum_dy" else sdx, F64)}
    if target == "update_running_stats":
        Cv = len(slots["mean"]["arr"].values)
        for nm in ("running_mean", "running_var", "var"):
            if slots[nm]["kind"] == "arr":
                slots[nm]["arr"].values = np.resize(slots[nm]["arr"].values, Cv)
        base["count"] = int(rng.integers(2, 50))
    # bookkeeping for verdicts
    ctx = {"required": set(required), "scalar_tags": {}, "problem": pb,
           "writes_running": target == "update_running_stats" or (target == "batch_norm" and training),
           "uses_momentum": target == "update_running_stats" or (target == "batch_norm" and training),
           "count_must_be_positive": target == "update_running_stats" or (pb["n"] > 0 and pb["C"] > 0 and training),
           "shape_peers": {}, "any_shape": target == "invstd_from_var",
           "count_ambiguous": target == "update_running_stats",
           "x_peers": [nm for nm, r in arrays if r in ("xlike", "out")]}
    if target == "update_running_stats":
        peers = ["running_mean", "running_var", "mean", "var"]
        ctx["shape_peers"] = {p: [q for q in peers if q != p] for p in peers}
    if target == "batch_norm" and not training:
        ctx["required"] |= {"running_mean", "running_var"}
    if relu and target in ("batch_norm_backward", "backward_sums", "backward_dx"):
        ctx["required"].add("y")
    for s in scalars:
        if s == "axis":
            slots[s] = {"kind": "raw", "value": axis_value}
        elif s == "count":
            slots[s] = {"kind": "raw", "value": base["count"]}
        else:
            slots[s] = {"kind": "raw", "value": base[s]}
    # perturbations
    perts = []
    k = [0, 1, 1, 1, 2, 2, 3][int(rng.integers(7))]
    names = [nm for nm, _ in arrays] + list(scalars)
    roles = dict(arrays)
    for _ in range(k):
        nm = names[int(rng.integers(len(names)))]
        if any(p[0].split(":")[0].split("=")[0] == nm for p in perts):
            continue
        if nm in roles:
            perts.append(perturb_array(rng, slots, nm, roles[nm], ctx))
        else:
            b = base["axis"] if nm == "axis" else base[nm]
            perts.append(perturb_scalar(rng, slots, nm, b, ctx))
    # aliasing: out=x (documented to work in place)
    if "out" in roles and slots["out"]["kind"] == "arr" and not perts and rng.random() < 0.3:
        slots["out"] = {"kind": "alias", "of": "x"}
        perts.append(("out=x", "ok", ["out"], None))
    return pb, slots, perts, ctx, base


def materialize(slots, rng):
    args = {}
    for name, s in slots.items():
        if name.startswith("_"):
            continue
        if s["kind"] == "arr":
            args[name] = s["arr"].make(rng)
        elif s["kind"] == "raw":
            args[name] = s["value"]
    for name, s in slots.items():
        if not name.startswith("_") and s.get("kind") == "alias":
            args[name] = args[s["of"]]
    return args


def shape_mode_verdict(target, pb, training):
    """(verdict, names) from the problem's shape alone."""
    mode = pb["mode"]
    if target in ("update_running_stats", "invstd_from_var"):
        return "ok", []
    if mode == "c0":
        return "either", ["x"]
    if mode == "one":
        if target in ("batch_norm_forward", "forward_with_stats") or (target == "batch_norm" and training):
            return "refuse", ["x"]
        if target in ("batch_norm_backward", "backward_dx", "channel_moments") and training:
            return "either", ["x"]
    if mode == "empty" and target == "channel_moments":
        return "either", ["x"]
    return "ok", []


# --------------------------------------------------------------------------- calling

def call_functional(target, args):
    a = dict(args)
    if target in ("batch_norm_forward", "forward_with_stats", "normalize", "channel_moments"):
        x = a.pop("x")
        return getattr(F, target)(x, **a) if target != "batch_norm_forward" else \
            fastbn.batch_norm_forward(x, **a)
    if target == "batch_norm":
        x = a.pop("x")
        return fastbn.batch_norm(x, **a)
    if target == "batch_norm_backward":
        return fastbn.batch_norm_backward(a.pop("dy"), a.pop("x"), a.pop("mean"), a.pop("invstd"), **a)
    if target == "backward_sums":
        return F.backward_sums(a.pop("dy"), a.pop("x"), a.pop("mean"), **a)
    if target == "backward_dx":
        return F.backward_dx(a.pop("dy"), a.pop("x"), a.pop("mean"), a.pop("invstd"),
                             a.pop("sum_dy"), a.pop("sum_dy_xmu"), a.pop("count"), **a)
    if target == "update_running_stats":
        return F.update_running_stats(**a)
    if target == "invstd_from_var":
        return F.invstd_from_var(a["var"], a["eps"])
    raise AssertionError(target)


def scalar_value(v, kind):
    """How an accepted scalar is understood (for the reference)."""
    if kind == "activation":
        return v is not None and str(v).lower() == "relu"
    if kind == "training":
        return bool(v)
    if kind == "axis":
        return int(v)
    return float(v)


def expected_functional(target, before, args, pb):
    """List of acceptable outcomes: each a list of (label, getter, expected, tol, scale, opts)."""
    x = f64(before.get("x")) if "x" in before else None
    xdt = native(dtype_of(args["x"])) if "x" in args else None
    tol = tol_for(xdt) if xdt is not None else 1e-10
    stol = tol if xdt is None or xdt.char != "e" else 1e-4  # statistics are float32/float64
    relu = scalar_value(args.get("activation"), "activation")
    training = scalar_value(args.get("training", target != "batch_norm"), "training")
    eps = scalar_value(args.get("eps", 1e-5), "eps")
    checks = []
    if x is not None:
        ax = scalar_value(args.get("axis", 1), "axis") % x.ndim
        C = x.shape[ax]
        n = math.prod(x.shape[:ax] + x.shape[ax + 1:])  # values per channel, whatever C is
        chan_nf = None
        if C:
            nf = ~np.isfinite(x)
            chan_nf = np.broadcast_to(nf.any(axis=red_axes(x.ndim, ax)).reshape(bshape(x.ndim, ax, C)), x.shape)
    w, b = f64(before.get("weight")), f64(before.get("bias"))

    def y_dtype_ok(y):
        return isinstance(y, np.ndarray) and native(y.dtype) == xdt

    if target in ("batch_norm_forward", "forward_with_stats", "batch_norm", "normalize"):
        if target == "normalize":
            mean, inv = f64(before["mean"]), f64(before["invstd"])
        elif target == "batch_norm" and not training:
            mean = f64(before["running_mean"])
            inv = ref_invstd(f64(before["running_var"]), eps)
        else:
            _, mean, var = ref_stats(x, ax)
            inv = ref_invstd(var, eps)
        y = ref_normalize(x, ax, mean, inv, w, b, relu)
        outs = []
        getter_y = (lambda r: r) if target in ("batch_norm", "normalize") else (lambda r: r[0])
        outs.append(("y", getter_y, y, tol, None, dict(relu_zero=relu, dtype=True)))
        if args.get("out") is not None:
            outs.append(("out", lambda r, a=args["out"]: a, y, tol, None, dict(relu_zero=relu, inplace=True)))
        stat_skip = None if chan_nf is None else chan_nf.any(axis=red_axes(x.ndim, ax)) if x.size else None
        if target in ("batch_norm_forward", "forward_with_stats") and n > 0:
            outs.append(("mean", lambda r: r[1], mean, stol, 1.0 + _finite_max(x), dict(skip=stat_skip)))
            outs.append(("invstd", lambda r: r[2], inv, stol, 1.0 + _finite_max(inv), dict(skip=stat_skip)))
        if target == "forward_with_stats":
            outs.append(("count", lambda r: r[4], np.float64(n), 0, 1.0, {}))
            if n > 0:
                outs.append(("var", lambda r: r[3], var, stol, 1.0 + _finite_max(var) + _finite_max(x) ** 2 * 1e-3, dict(skip=stat_skip)))
        if target == "batch_norm" and training:
            alts = []
            rm, rv = before.get("running_mean"), before.get("running_var")
            mom = scalar_value(args.get("momentum"), "momentum")
            exp_rm = exp_rv = None
            if n > 0:
                with np.errstate(all="ignore"):
                    if rm is not None:
                        exp_rm = (1 - mom) * f64(rm) + mom * mean
                    if rv is not None:
                        exp_rv = (1 - mom) * f64(rv) + mom * var * (n / (n - 1))
            else:
                exp_rm, exp_rv = f64(rm), f64(rv)
            for nm, e in (("running_mean", exp_rm), ("running_var", exp_rv)):
                if e is not None:
                    bt = tol_for(dtype_of(args[nm]))
                    outs.append((nm, lambda r, a=args[nm]: a, e, max(bt, stol), None, dict(inplace=True, skip=stat_skip)))
            return [outs]
        return [outs]
    if target == "channel_moments":
        cnt, mean, var = ref_stats(x, ax)
        skip = None if chan_nf is None or not x.size else chan_nf.any(axis=red_axes(x.ndim, ax))
        outs = [("count", lambda r: r[0], np.float64(cnt), 0, 1.0, {})]
        if cnt > 0:
            outs += [("mean", lambda r: r[1], mean, stol, 1.0 + _finite_max(x), dict(skip=skip)),
                     ("M2", lambda r: r[2], var * cnt, stol, cnt * (1.0 + _finite_max(var) + _finite_max(x) ** 2 * 1e-3), dict(skip=skip))]
        else:
            outs += [("mean.shape", lambda r: np.shape(r[1]), np.asarray((C,), float), 0, 1.0, {}),
                     ("M2.shape", lambda r: np.shape(r[2]), np.asarray((C,), float), 0, 1.0, {})]
        return [outs]
    if target in ("batch_norm_backward", "backward_sums", "backward_dx"):
        dy = f64(before["dy"])
        yv = f64(before.get("y")) if relu else None
        g = ref_grad(dy, yv, relu)
        mean = f64(before["mean"])
        sdy, sdx = ref_sums(g, x, ax, mean)
        gs = _finite_max(g)
        xm = _finite_max(x) + _finite_max(mean)
        if target == "backward_sums":
            return [[("count", lambda r: r[0], np.float64(n), 0, 1.0, {}),
                     ("sum_dy", lambda r: r[1], sdy, stol, 1 + n * gs, {}),
                     ("sum_dy_xmu", lambda r: r[2], sdx, stol, 1 + n * gs * xm, {})]]
        inv = f64(before["invstd"])
        if target == "backward_dx":
            cnt = scalar_value(args["count"], "count")
            sdy, sdx = f64(before["sum_dy"]), f64(before["sum_dy_xmu"])
        else:
            cnt = n
        dx = ref_dx(g, x, ax, mean, inv, w, sdy, sdx, cnt, training)
        ws = 1.0 if w is None else _finite_max(w)
        im = _finite_max(inv)
        scale = 1 + ws * im * (gs + (_finite_max(sdy) + xm * im * im * _finite_max(sdx)) / max(cnt, 1))
        getter = (lambda r: r) if target == "backward_dx" else (lambda r: r[0])
        outs = [("dx", getter, dx, tol, scale, dict(dtype=True))]
        if target == "batch_norm_backward":
            with np.errstate(all="ignore"):
                # zero for an empty batch whatever invstd holds (documented, as PyTorch)
                dw = sdx * inv if n else np.zeros_like(sdx)
            outs += [("dweight", lambda r: r[1], dw, stol, 1 + n * gs * xm * im, {}),
                     ("dbias", lambda r: r[2], sdy, stol, 1 + n * gs, {})]
        return [outs]
    if target == "update_running_stats":
        cnt = scalar_value(args["count"], "count")
        mom = scalar_value(args["momentum"], "momentum")
        mean, var = f64(before["mean"]), f64(before["var"])
        alts = []
        unb_opts = [var * (cnt / (cnt - 1))] if cnt > 1 else [var, None]
        for unb in unb_opts:
            outs = []
            for nm, batch in (("running_mean", mean), ("running_var", unb)):
                if before.get(nm) is None:
                    continue
                e = f64(before[nm]) if batch is None else (1 - mom) * f64(before[nm]) + mom * batch
                outs.append((nm, lambda r, a=args[nm]: a, e, tol_for(dtype_of(args[nm])), None, dict(inplace=True)))
            outs.append(("return", lambda r: r, None, 0, 1.0, dict(none=True)))
            alts.append(outs)
        return alts
    if target == "invstd_from_var":
        var = f64(before["var"])
        inv = ref_invstd(var, eps)
        t = 1e-10 if dtype_of(args["var"]).char == "d" else 1e-6
        return [[("invstd", lambda r: r, inv, t, None, dict(rel=True))]]
    raise AssertionError(target)


def check_outcome(result, alts, args, xdt):
    """None if result matches one alternative, else the description for the first one."""
    first = None
    for outs in alts:
        problem = None
        for label, getter, exp, tol, scale, opts in outs:
            try:
                got = getter(result)
            except Exception as exc:  # noqa: BLE001
                problem = f"{label}: result has no such part ({exc!r})"
                break
            if opts.get("none"):
                if got is not None:
                    problem = f"{label}: expected None, got {type(got).__name__}"
                    break
                continue
            if opts.get("dtype") and xdt is not None:
                if not isinstance(got, np.ndarray) or native(got.dtype) != xdt:
                    problem = (f"{label}: dtype {getattr(got, 'dtype', type(got).__name__)}, "
                               f"expected {xdt}")
                    break
            if label in ("mean", "invstd", "var", "M2") and isinstance(got, np.ndarray) \
                    and np.shape(got) != np.shape(exp):
                problem = f"{label}: shape {got.shape}, expected {np.shape(exp)}"
                break
            if opts.get("rel"):
                sc = None
                e = np.asarray(exp)
                with np.errstate(all="ignore"):
                    scale_arr = np.where(np.isfinite(e), np.abs(e), 0) + 1e-300
                try:
                    a = np.array(got, dtype=np.float64)
                except Exception as exc:  # noqa: BLE001
                    problem = f"{label}: {exc!r}"
                    break
                if a.shape != e.shape:
                    problem = f"{label}: shape {a.shape}, expected {e.shape}"
                    break
                with np.errstate(all="ignore"):
                    ok = np.where(np.isfinite(e), np.abs(a - e) <= tol * scale_arr, ~np.isfinite(a))
                if not ok.all():
                    i = int(np.argmin(ok.reshape(-1)))
                    problem = f"{label}: {a.reshape(-1)[i]!r} at [{i}], expected {e.reshape(-1)[i]!r}"
                    break
                continue
            skip = opts.get("skip")
            if skip is not None and np.ndim(exp) != 1:
                skip = None
            problem = compare(label, got, exp, tol if tol else 0.0, scale,
                              relu_zero=opts.get("relu_zero", False), skip_channels=skip)
            if problem:
                break
        if problem is None:
            return None
        first = first or problem
    return first


def names_in(msg, names):
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


def run_functional_case(target, seed, index, verbose=False):
    rng = np.random.default_rng([seed, TARGETS.index(target), index])
    pb, slots, perts, ctx, base = build_functional(target, rng)
    training = scalar_value(slots["training"]["value"], "training") \
        if "training" in slots and slots["training"]["kind"] == "raw" and \
        isinstance(slots["training"]["value"], (bool, np.bool_)) else base["training"]
    mv, mnames = shape_mode_verdict(target, pb, training if "training" in slots else True)
    verdicts = [p[1] for p in perts] + [mv]
    names = [n for p in perts if p[1] != "ok" for n in p[2]] + mnames
    # a required exception type holds when that perturbation is the only questionable one
    nonok = [p for p in perts if p[1] != "ok"]
    exc_req = [nonok[0][3]] if len(nonok) == 1 and nonok[0][3] is not None and mv == "ok" else []
    must_refuse = "refuse" in verdicts
    may_refuse = must_refuse or "either" in verdicts
    tags = sorted(p[0] for p in perts) + ([f"shape:{pb['mode']}"] if pb["mode"] != "normal" else [])
    args = materialize(slots, np.random.default_rng([seed, index, 7]))
    desc = describe(target, args, pb)
    if verbose:
        print(f"case {target} seed={seed} case={index}\n  tags: {tags}\n  verdicts: {verdicts}"
              f"\n  names accepted in a refusal: {names}\n{desc}", flush=True)
    before_snap = {k: snap(v) for k, v in args.items()}
    before = {}
    for k, v in args.items():
        if k in ("axis", "eps", "momentum", "training", "activation", "count"):
            continue
        try:
            before[k] = None if v is None else np.array(np.ma.getdata(v) if isinstance(v, np.ma.MaskedArray) else v, dtype=np.float64)
        except Exception:  # noqa: BLE001
            before[k] = "unconvertible"
    return _execute(target, tags, desc, args, before_snap, before, pb,
                    lambda: call_functional(target, args),
                    lambda: expected_functional(target, before, args, pb),
                    must_refuse, may_refuse, names, exc_req, verbose)


def _written_ok(args, before_snap, allowed):
    changed = [k for k, v in args.items() if k not in allowed and snap(v) != before_snap[k]]
    return changed


def _execute(target, tags, desc, args, before_snap, before, pb, call, expected, must_refuse,
             may_refuse, names, exc_req, verbose, state=None):
    failures = []
    try:
        result = call()
    except (TypeError, ValueError) as exc:
        msg = f"{type(exc).__name__}: {exc}"
        if verbose:
            print("  raised", msg)
        if not may_refuse:
            failures.append(("refused a valid call", msg))
        elif not names_in(str(exc), names):
            failures.append(("refusal does not name the argument", f"{msg} (expected one of {names})"))
        elif exc_req and not any(isinstance(exc, e) for e in exc_req):
            failures.append((f"refused with {type(exc).__name__}, expected {exc_req[0].__name__}", msg))
        changed = _written_ok(args, before_snap, ())
        if changed:
            failures.append(("wrote before failing", f"changed {changed} ({msg})"))
        if state is not None:
            st = state()
            if st:
                failures.append(("layer state changed by a failed call", st + f" ({msg})"))
        return finish(target, tags, desc, failures)
    except Exception as exc:  # noqa: BLE001
        failures.append((f"raised {type(exc).__name__}", f"{exc!r} :: "
                         + traceback.format_exc(limit=-2).strip().splitlines()[-3].strip()))
        return finish(target, tags, desc, failures)
    if verbose:
        print("  returned", summarize(result))
    if must_refuse:
        failures.append(("accepted an invalid argument", f"returned {summarize(result)}"))
        return finish(target, tags, desc, failures)
    try:
        alts = expected()
    except Exception as exc:  # noqa: BLE001
        failures.append(("reference could not be computed (accepted odd input?)", repr(exc)))
        return finish(target, tags, desc, failures)
    xdt = native(dtype_of(args["x"])) if "x" in args else None
    problem = check_outcome(result, alts, args, xdt)
    if problem:
        failures.append(("wrong result", problem))
    allowed = {"out", "x"} if args.get("out") is not None and args.get("out") is args.get("x") else {"out"}
    if target == "update_running_stats" or (target == "batch_norm" and scalar_value(args.get("training"), "training")):
        allowed |= {"running_mean", "running_var"}
    changed = _written_ok(args, before_snap, allowed)
    if changed:
        failures.append(("modified an input", f"changed {changed}"))
    return finish(target, tags, desc, failures)


def finish(target, tags, desc, failures):
    return [{"target": target, "tags": tags, "kind": k, "detail": d, "desc": desc}
            for k, d in failures]


def summarize(obj):
    if isinstance(obj, tuple):
        return "(" + ", ".join(summarize(o) for o in obj) + ")"
    if isinstance(obj, np.ndarray):
        return f"ndarray{obj.shape} {obj.dtype}"
    return repr(obj)[:60]


def describe(target, args, pb):
    parts = []
    for k, v in args.items():
        if isinstance(v, np.ma.MaskedArray):
            parts.append(f"{k}=masked{v.shape} {v.dtype}")
        elif isinstance(v, np.ndarray):
            parts.append(f"{k}=ndarray{v.shape} {v.dtype.str} strides={v.strides} "
                         f"{'ro' if not v.flags.writeable else 'rw'}"
                         f"{' misaligned' if not v.flags.aligned else ''}")
        elif isinstance(v, (list, tuple)):
            parts.append(f"{k}={type(v).__name__}[{len(v)}]")
        else:
            parts.append(f"{k}={v!r}")
    return f"  {target}: " + ", ".join(parts)


# =========================================================================== the layer

LAYER_CTOR = {
    "num_features": [(lambda C: np.int64(C), "ok"), (lambda C: True, "refuse"),
                     (lambda C: 0, "refuse"), (lambda C: -1, "refuse"), (lambda C: float(C), "refuse"),
                     (lambda C: str(C), "refuse"), (lambda C: None, "refuse")],
    "axis": [(lambda a: True, "refuse"), (lambda a: 1.0, "refuse"), (lambda a: "1", "refuse"),
             (lambda a: None, "refuse"), (lambda a: np.int64(a), "ok")],
    "eps": [(lambda a: True, "refuse"), (lambda a: "1e-5", "refuse"), (lambda a: float("nan"), "refuse"),
            (lambda a: -1.0, "refuse"), (lambda a: float("inf"), "refuse"), (lambda a: None, "refuse"),
            (lambda a: 0.0, "ok"), (lambda a: np.float32(1e-3), "ok")],
    "momentum": [(lambda a: True, "refuse"), (lambda a: "0.1", "refuse"), (lambda a: 1.5, "refuse"),
                 (lambda a: float("nan"), "refuse"), (lambda a: -0.5, "refuse"), (lambda a: None, "ok"),
                 (lambda a: 0.0, "ok"), (lambda a: 1, "ok")],
    "affine": [(lambda a: "False", "refuse"), (lambda a: 0, "refuse"), (lambda a: None, "refuse"),
               (lambda a: False, "ok"), (lambda a: np.bool_(False), "either")],
    "track_running_stats": [(lambda a: "False", "refuse"), (lambda a: 1, "refuse"),
                            (lambda a: False, "ok"), (lambda a: None, "refuse")],
    "activation": [(lambda a: "sigmoid", "refuse"), (lambda a: 1, "refuse"), (lambda a: "relu", "ok")],
    "dtype": [(lambda a: np.float16, "refuse"), (lambda a: np.int32, "refuse"), (lambda a: "float64", "ok"),
              (lambda a: np.complex64, "refuse"), (lambda a: np.float64, "ok"), (lambda a: ">f8", "either")],
}


def layer_state(bn):
    st = {}
    for k in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        v = getattr(bn, k)
        st[k] = None if v is None else snap(v)
    st["num_batches_tracked"] = bn.num_batches_tracked
    st["training"] = bn.training
    return st


def diff_state(bn, st):
    now = layer_state(bn)
    changed = [k for k in st if now[k] != st[k]]
    return f"changed {changed}" if changed else ""


def run_layer_case(seed, index, verbose=False):
    rng = np.random.default_rng([seed, TARGETS.index("BatchNorm"), index])
    pb = make_problem(rng)
    if pb["C"] == 0:
        pb = make_problem(rng, force_valid_n=True)
    C, ax = pb["C"], pb["ax"]
    kw = dict(axis=ax if rng.random() < 0.5 else ax - pb["ndim"], eps=1e-5,
              momentum=float(rng.uniform(0, 1)) if rng.random() < 0.8 else None,
              affine=bool(rng.random() < 0.8), track_running_stats=bool(rng.random() < 0.8),
              activation="relu" if rng.random() < 0.3 else None,
              dtype=[np.float32, np.float64][int(rng.integers(2))])
    nf = C
    out = []
    tags = []
    if rng.random() < 0.25:  # constructor fuzz
        key = list(LAYER_CTOR)[int(rng.integers(len(LAYER_CTOR)))]
        make, verdict = LAYER_CTOR[key][int(rng.integers(len(LAYER_CTOR[key])))]
        val = make(nf if key == "num_features" else kw.get(key))
        tags.append(f"ctor:{key}={val!r}")
        desc = f"  BatchNorm({nf}, **{kw}) with {key}={val!r}"
        if verbose:
            print(desc)
        try:
            if key == "num_features":
                nf_used = val
                bn = fastbn.BatchNorm(val, **kw)
            else:
                kw[key] = val
                bn = fastbn.BatchNorm(nf, **kw)
        except (TypeError, ValueError) as exc:
            if verdict == "ok":
                return finish("BatchNorm", tags, desc, [("refused a valid call", f"{type(exc).__name__}: {exc}")])
            if not names_in(str(exc), [key]):
                return finish("BatchNorm", tags, desc, [("refusal does not name the argument", f"{type(exc).__name__}: {exc}")])
            return []
        except Exception as exc:  # noqa: BLE001
            return finish("BatchNorm", tags, desc, [(f"raised {type(exc).__name__}", repr(exc))])
        if verdict == "refuse":
            return finish("BatchNorm", tags, desc, [("accepted an invalid argument", repr(bn))])
        if key == "num_features":
            return []
    else:
        bn = fastbn.BatchNorm(nf, **kw)
    ldt = bn.dtype
    if bn.affine:
        bn.weight = rng.standard_normal(C)
        bn.bias = rng.standard_normal(C) * 0.5
    if bn.track_running_stats:
        bn.running_mean = rng.standard_normal(C) * 0.3
        bn.running_var = rng.uniform(0.2, 2.0, C)
    shadow_ctx = None
    steps = int(rng.integers(1, 4))
    for step in range(steps):
        what = ["forward", "forward", "backward", "mode", "load"][int(rng.integers(5))]
        if what == "mode":
            opts = [(True, "ok"), (False, "ok"), ("False", "refuse"), (0, "refuse"), (None, "refuse"),
                    (np.bool_(False), "either")]
            val, verdict = opts[int(rng.integers(len(opts)))]
            t = f"train(mode={val!r})"
            st = layer_state(bn)
            try:
                bn.train(val)
            except (TypeError, ValueError) as exc:
                if verdict == "ok" or not names_in(str(exc), ["mode"]):
                    out += finish("BatchNorm", tags + [t], repr(bn), [("bad refusal of train()", f"{exc}")])
                d = diff_state(bn, st)
                if d:
                    out += finish("BatchNorm", tags + [t], repr(bn), [("layer state changed by a failed call", d)])
                continue
            if verdict == "refuse":
                out += finish("BatchNorm", tags + [t], repr(bn), [("accepted an invalid argument", f"training={bn.training!r}")])
                bn.training = bool(val)
            elif not isinstance(bn.training, bool) and not isinstance(bn.training, np.bool_):
                out += finish("BatchNorm", tags + [t], repr(bn), [("wrong result", f"training={bn.training!r}")])
            continue
        if what == "load":
            sd = bn.state_dict()
            keys = list(sd)
            if not keys:
                continue
            k = keys[int(rng.integers(len(keys)))]
            bad = [("wrong_shape", np.ones(C + 1), "refuse"), ("str", "abc", "refuse"),
                   ("masked", np.ma.masked_array(np.ones(C)), "refuse"),
                   ("complex", np.ones(C, complex), "refuse"), ("None", None, "refuse"),
                   ("ok", None, "ok")]
            label, val, verdict = bad[int(rng.integers(len(bad)))]
            if k == "num_batches_tracked":
                val = {"wrong_shape": np.ones(2, np.int64), "str": "3", "masked": np.ma.masked_array(3),
                       "complex": np.asarray(1 + 1j), "None": None, "ok": np.asarray(5)}[label]
                if label == "masked":
                    verdict = "either"
            elif label == "ok":
                val = rng.uniform(0.5, 1.5, C)
            sd = {kk: vv for kk, vv in sd.items()}
            sd[k] = val
            t = f"load_state_dict({k}:{label})"
            st = layer_state(bn)
            try:
                bn.load_state_dict(sd)
            except (TypeError, ValueError) as exc:
                if verdict == "ok" or not names_in(str(exc), [k, "state_dict"]):
                    out += finish("BatchNorm", tags + [t], repr(bn), [("bad refusal of load_state_dict", f"{type(exc).__name__}: {exc}")])
                d = diff_state(bn, st)
                if d:
                    out += finish("BatchNorm", tags + [t], repr(bn), [("layer state changed by a failed call", d)])
                continue
            except Exception as exc:  # noqa: BLE001
                out += finish("BatchNorm", tags + [t], repr(bn), [(f"raised {type(exc).__name__}", repr(exc))])
                continue
            if verdict == "refuse":
                out += finish("BatchNorm", tags + [t], repr(bn), [("accepted an invalid argument", "load_state_dict")])
            continue
        if what == "forward":
            pbx = dict(pb)
            if rng.random() < 0.3:
                pbx = make_problem(rng)
                # keep C and the axis of the layer
                shp = list(pbx["shape"])[:]
                nd = len(shp)
                if not -nd <= bn.axis < nd:
                    continue
                shp[bn.axis % nd] = C
                pbx.update(shape=tuple(shp), ax=bn.axis % nd, ndim=nd, C=C)
                if pbx["mode"] == "c0":
                    pbx["mode"] = "normal"
                pbx["n"] = math.prod(shp) // C
                if pbx["n"] == 0:
                    pbx["mode"] = "empty"
                elif pbx["n"] == 1:
                    pbx["mode"] = "one"
                elif pbx["mode"] in ("empty", "one"):
                    pbx["mode"] = "normal"
            xdt = ldt if rng.random() < 0.75 else F16
            slots = {"x": {"kind": "arr", "arr": Arr(x_values(rng, pbx["shape"]), xdt)}}
            ctx = {"required": {"x"}, "scalar_tags": {}, "layer_dtype": ldt,
                   "layer_axis": bn.axis % len(pbx["shape"])}
            perts = []
            if rng.random() < 0.6:
                perts.append(perturb_array(rng, slots, "x", "x", ctx))
            args = materialize(slots, np.random.default_rng([seed, index, step]))
            x_in = args["x"]
            batch = bn.training or not bn.track_running_stats
            verdicts = [p[1] for p in perts]
            names = [n for p in perts if p[1] != "ok" for n in p[2]]
            if pbx["mode"] == "one" and batch:
                verdicts.append("refuse")
                names.append("x")
            if isinstance(x_in, np.ndarray) and x_in.dtype.kind == "f" and native(x_in.dtype) not in (ldt, F16):
                verdicts.append("refuse")
                names.append("x")
            exc_req = [p[3] for p in perts if p[1] == "refuse" and p[3] is not None][:len(names) == 1]
            t = [f"forward({'train' if bn.training else 'eval'}{'' if bn.track_running_stats else ',untracked'})"] \
                + sorted(p[0] for p in perts) + ([f"shape:{pbx['mode']}"] if pbx["mode"] != "normal" else [])
            desc = f"  {bn!r}, training={bn.training}: " + describe("forward", args, pbx)
            st = layer_state(bn)
            before_snap = {"x": snap(x_in)}
            try:
                xb = np.array(np.ma.getdata(x_in) if isinstance(x_in, np.ma.MaskedArray) else x_in, dtype=np.float64)
            except Exception:  # noqa: BLE001
                xb = None
            prev = dict(w=None if bn.weight is None else f64(bn.weight), b=None if bn.bias is None else f64(bn.bias),
                        rm=None if bn.running_mean is None else f64(bn.running_mean),
                        rv=None if bn.running_var is None else f64(bn.running_var),
                        nbt=bn.num_batches_tracked, training=bn.training)
            holder = {}

            def expected(xb=xb, prev=prev, holder=holder, x_in=x_in):
                axn = bn.axis % xb.ndim
                relu = bn.activation == "relu"
                n, mean, var = ref_stats(xb, axn)
                tol = tol_for(native(dtype_of(x_in)))
                stol = max(tol if tol < 1e-3 else 1e-4, tol_for(ldt))
                if batch:
                    m, inv = mean, ref_invstd(var, bn.eps)
                else:
                    m, inv = prev["rm"], ref_invstd(prev["rv"], bn.eps)
                y = ref_normalize(xb, axn, m, inv, prev["w"], prev["b"], relu)
                holder.update(x=xb, y=y, mean=m, inv=inv, w=prev["w"], training=batch, relu=relu,
                              axis=axn, n=n, xdt_native=native(dtype_of(x_in)))
                outs = [("y", lambda r: r, y, tol, None, dict(relu_zero=relu, dtype=True))]
                alts = [outs]
                if bn.track_running_stats:
                    if prev["training"] and n > 0:
                        f = 1.0 / (prev["nbt"] + 1) if bn.momentum is None else bn.momentum
                        erm = (1 - f) * prev["rm"] + f * mean
                        erv = (1 - f) * prev["rv"] + f * var * (n / (n - 1))
                        nbts = [prev["nbt"] + 1]
                    else:
                        erm, erv = prev["rm"], prev["rv"]
                        nbts = [prev["nbt"]] + ([prev["nbt"] + 1] if prev["training"] else [])
                    skip = np.broadcast_to(~np.isfinite(xb), xb.shape).any(axis=red_axes(xb.ndim, axn)) if xb.size else None
                    alts = []
                    for nb in nbts:
                        alts.append(outs + [
                            ("running_mean", lambda r: bn.running_mean, erm, stol, None, dict(skip=skip)),
                            ("running_var", lambda r: bn.running_var, erv, stol, None, dict(skip=skip)),
                            ("num_batches_tracked", lambda r: np.float64(bn.num_batches_tracked), np.float64(nb), 0, 1.0, {})])
                return alts

            fl = _execute("BatchNorm", t, desc, {"x": x_in}, before_snap, {"x": xb}, pbx,
                          lambda: bn(x_in), expected, "refuse" in verdicts,
                          "refuse" in verdicts or "either" in verdicts, names, exc_req, verbose,
                          state=lambda st=st: diff_state(bn, st))
            out += fl
            if holder and not fl:
                shadow_ctx = holder
            elif fl and "refuse" in verdicts:
                pass  # kept the previous cache (checked by the next backward)
            elif fl:
                shadow_ctx = None
                break
            continue
        if what == "backward":
            if shadow_ctx is None:
                continue
            c = shadow_ctx
            xshape = c["x"].shape
            dyv = rng.standard_normal(xshape)
            slots = {"dy": {"kind": "arr", "arr": Arr(dyv, c["xdt_native"])}}  # dy like the input
            ctx = {"required": {"dy"}, "scalar_tags": {}}
            perts = []
            if rng.random() < 0.5:
                perts.append(perturb_array(rng, slots, "dy", "xlike", ctx))
            args = materialize(slots, np.random.default_rng([seed, index, step, 1]))
            dy_in = args["dy"]
            verdicts = [p[1] for p in perts]
            names = [n for p in perts if p[1] != "ok" for n in p[2]]
            exc_req = [p[3] for p in perts if p[1] == "refuse" and p[3] is not None]
            t = ["backward"] + sorted(p[0] for p in perts)
            desc = f"  {bn!r}: backward(" + describe("dy", args, None).split(": ", 1)[1] + ")"
            st = layer_state(bn)
            gw0 = None if bn.grad_weight is None else f64(bn.grad_weight)
            gb0 = None if bn.grad_bias is None else f64(bn.grad_bias)
            try:
                dyb = np.array(np.ma.getdata(dy_in) if isinstance(dy_in, np.ma.MaskedArray) else dy_in, dtype=np.float64)
            except Exception:  # noqa: BLE001
                dyb = None

            def expected(c=c, dyb=dyb, gw0=gw0, gb0=gb0, dy_in=dy_in):
                g = ref_grad(dyb, c["y"], c["relu"])
                sdy, sdx = ref_sums(g, c["x"], c["axis"], c["mean"])
                n = c["n"]
                dx = ref_dx(g, c["x"], c["axis"], c["mean"], c["inv"], c["w"], sdy, sdx, n, c["training"])
                tol = tol_for(c["xdt_native"])
                stol = max(tol if tol < 1e-3 else 1e-4, tol_for(ldt))
                gs, xm, im = _finite_max(g), _finite_max(c["x"]) + _finite_max(c["mean"]), _finite_max(c["inv"])
                ws = 1.0 if c["w"] is None else _finite_max(c["w"])
                scale = 1 + ws * im * (gs + (_finite_max(sdy) + xm * im * im * _finite_max(sdx)) / max(n, 1))
                outs = [("dx", lambda r: r, dx, tol, scale, dict(dtype=True))]
                if bn.affine:
                    with np.errstate(all="ignore"):
                        dw = sdx * c["inv"]
                    ew = dw if gw0 is None else gw0 + dw
                    eb = sdy if gb0 is None else gb0 + sdy
                    outs += [("grad_weight", lambda r: bn.grad_weight, ew, stol, 1 + n * gs * xm * im + _finite_max(ew), {}),
                             ("grad_bias", lambda r: bn.grad_bias, eb, stol, 1 + n * gs + _finite_max(eb), {})]
                return [outs]

            fl = _execute("BatchNorm", t, desc, {"dy": dy_in}, {"dy": snap(dy_in)}, {"dy": dyb}, None,
                          lambda: bn.backward(dy_in), expected, "refuse" in verdicts,
                          "refuse" in verdicts or "either" in verdicts, names, exc_req, verbose,
                          state=lambda st=st: diff_state(bn, st))
            out += fl
            if fl:
                break
    return out


def run_case(target, seed, index, verbose=False):
    if target == "BatchNorm":
        return run_layer_case(seed, index, verbose)
    return run_functional_case(target, seed, index, verbose)


# =========================================================================== child driver

def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", type=int)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=1)
    p.add_argument("--log")
    p.add_argument("--skip", default="[]", help="JSON list of tag lists: skip cases containing one")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    import warnings
    warnings.simplefilter("ignore")
    if a.case is not None:
        fails = run_case(a.target, a.seed, a.case, verbose=True)
        for f in fails:
            print(f"FAIL [{f['kind']}] {f['detail']}\n  tags: {f['tags']}")
        print("PASS" if not fails else f"{len(fails)} failure(s)")
        return 1 if fails else 0
    skip = [set(s) for s in json.loads(a.skip)]
    fd = os.open(a.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(obj):
        os.write(fd, (json.dumps(obj) + "\n").encode())

    for i in range(a.start, a.stop):
        tags = case_tags(a.target, a.seed, i)
        if any(s <= set(tags) for s in skip):
            emit({"skip": i})
            continue
        emit({"start": i, "tags": tags})
        try:
            fails = run_case(a.target, a.seed, i)
        except Exception as exc:  # noqa: BLE001  (a bug in the harness itself)
            fails = [{"target": a.target, "tags": tags, "kind": "HARNESS ERROR",
                      "detail": traceback.format_exc(), "desc": ""}]
        emit({"end": i, "fails": fails})
    emit({"done": True})
    os.close(fd)
    return 0


def case_tags(target, seed, index):
    """The tags of a case without running it (same generator, no fastbn call)."""
    if target == "BatchNorm":
        return []
    rng = np.random.default_rng([seed, TARGETS.index(target), index])
    pb, slots, perts, ctx, base = build_functional(target, rng)
    return sorted(p[0] for p in perts) + ([f"shape:{pb['mode']}"] if pb["mode"] != "normal" else [])


if __name__ == "__main__":
    sys.exit(main())
