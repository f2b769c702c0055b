"""The 2-byte float conversions of the kernels (_kernels.half_to_float / float_to_half) and
their use by the CPU backend (issue 18).

References: NumPy's astype for float16 and ml_dtypes' astype for bfloat16, compared bit for bit
(NaN payloads and signs included) over all 65536 half patterns, a dense set of float32 values
(every rounding tie and its neighbours in every binade, subnormal, overflow and NaN
boundaries) and random bit patterns, at every ISA level this CPU runs and for 1 and 2 threads.
End to end, fastbn's results for float16/bfloat16 input must be bitwise those of the NumPy-cast
path (the backend's convert switched off) and of casting to float32 by hand.
"""
import warnings

import numpy as np
import pytest

import fastbn
from fastbn import _cpu, _kernels
from fastbn.functional import (batch_norm, batch_norm_backward, batch_norm_forward,
                               channel_moments, normalize)

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - the test extra installs it
    ml_dtypes = BF16 = None

F16 = np.dtype(np.float16)
NO_BF16 = "ml_dtypes not installed (pip install ml_dtypes): NumPy has no bfloat16 without it"


@pytest.fixture(params=["float16", "bfloat16"])
def half(request):
    """(the half dtype, the bf16 flag of the kernels)."""
    if request.param == "bfloat16":
        if BF16 is None:
            pytest.skip(NO_BF16)
        return BF16, True
    return F16, False


def _astype(a, dtype):
    with warnings.catch_warnings():  # overflow/invalid in cast: the values are meant
        warnings.simplefilter("ignore", RuntimeWarning)
        return a.astype(dtype)


def _to_float(h, bf16, nthreads=1):
    out = np.empty(h.shape, np.float32)
    _kernels.half_to_float(h, out, bf16, nthreads)
    return out


def _to_half(f, dtype, bf16, nthreads=1):
    out = np.empty(f.shape, dtype)
    _kernels.float_to_half(f, out, bf16, nthreads)
    return out


def _bits_equal(a, b):
    ua, ub = a.view(np.uint16 if a.itemsize == 2 else np.uint32), \
        b.view(np.uint16 if b.itemsize == 2 else np.uint32)
    bad = np.flatnonzero(ua != ub)
    assert bad.size == 0, (f"{bad.size} values differ, first at {bad[:5]}: "
                           f"{[hex(v) for v in ua[bad[:5]]]} != {[hex(v) for v in ub[bad[:5]]]}")


def _dense_float32():
    """float32 bit patterns around every place where rounding to float16/bfloat16 changes:
    for every value of the top 16 bits, low bits at and around each float16 tie (bit 12, with
    bit 13 even and odd), the bfloat16 tie (bit 15) and the ends; the float16 subnormal ties
    (2k+1) 2^-25 and their neighbours; the overflow boundary; NaN payloads that float16 keeps,
    drops or must keep nonzero; random patterns."""
    hi = np.arange(65536, dtype=np.uint64) << 16
    lows = [0, 1, 2, 0x7fff, 0x8000, 0x8001, 0xffff, 0xfffe]
    for t in range(0, 0x10000, 0x2000):  # every float16 tie position in the low 16 bits
        lows += [t + 0xfff, t + 0x1000, t + 0x1001]
    pats = [(hi[:, None] + np.array(lows, np.uint64)).ravel()]
    k = np.arange(2048, dtype=np.float64)
    ties = ((2 * k + 1) * 2.0 ** -25).astype(np.float32).view(np.uint32).astype(np.int64)
    pats.append((ties[:, None] + np.arange(-2, 3)).ravel().astype(np.uint64))
    for edge in (65504.0, 65520.0, 65536.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3.3895e38):
        b = int(np.float32(edge).view(np.uint32))
        pats.append(np.arange(b - 64, b + 65, dtype=np.uint64))
    nan = np.array([0x7f800001, 0x7f801fff, 0x7f802000, 0x7fbfffff, 0x7fc00000, 0x7fffffff,
                    0x7f800000, 0x00000000, 0x00000001, 0x007fffff, 0x00800000], np.uint64)
    pats += [nan, nan | 0x80000000]
    rng = np.random.default_rng(18)
    pats.append(rng.integers(0, 2 ** 32, 1 << 20, dtype=np.uint64))
    return np.concatenate(pats).astype(np.uint32).view(np.float32)


DENSE = _dense_float32()


def test_every_half_to_float32_matches_astype(half, level):
    dtype, bf16 = half
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = h.view(dtype).astype(np.float32)
    _bits_equal(_to_float(h, bf16), ref)
    _bits_equal(_to_float(h.view(dtype), bf16), ref)  # the half dtype itself, not a view


def test_float32_to_half_matches_astype(half, level):
    dtype, bf16 = half
    ref = _astype(DENSE, dtype)
    _bits_equal(_to_half(DENSE, dtype, bf16), ref)
    out = np.empty(DENSE.shape, np.uint16)  # the uint16 view as destination
    _kernels.float_to_half(DENSE, out, bf16, 1)
    _bits_equal(out, ref.view(np.uint16))


def test_round_trip_of_every_half_is_exact(half, level):
    dtype, bf16 = half
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype)
    _bits_equal(_to_half(_to_float(h, bf16), dtype, bf16), _astype(h.astype(np.float32), dtype))


def test_special_values(half, level):
    """Spelled out: ties to even, overflow to inf, NaN rules, -0 (the dense tests cover more)."""
    dtype, bf16 = half
    u = np.array([0x7f800001, 0xff800001, 0x7fc00000, 0x80000000, 0x7f800000], np.uint32)
    got = _to_half(u.view(np.float32), dtype, bf16).view(np.uint16)
    if bf16:  # ml_dtypes: every NaN is 0x7fc0 / 0xffc0 by sign
        assert [hex(v) for v in got] == ["0x7fc0", "0xffc0", "0x7fc0", "0x8000", "0x7f80"]
    else:  # NumPy: the payload's top bits, made nonzero
        assert [hex(v) for v in got] == ["0x7c01", "0xfc01", "0x7e00", "0x8000", "0x7c00"]
        f = np.array([65519.99, 65520.0, 2.0 ** -25, 3 * 2.0 ** -25, 1 + 2.0 ** -11],
                     np.float32)
        assert [hex(v) for v in _to_half(f, dtype, bf16).view(np.uint16)] == \
            ["0x7bff", "0x7c00", "0x0", "0x2", "0x3c00"]
        # a signalling float16 NaN stays signalling in float32 (NumPy; F16C would quiet it)
        assert hex(_to_float(np.array([0x7c01], np.uint16), False).view(np.uint32)[0]) == \
            "0x7f802000"


@pytest.mark.parametrize("n", [0, 1, 7, 15, 17, 1000003])
def test_sizes(half, level, n):
    dtype, bf16 = half
    f = DENSE[:n] if n <= DENSE.size else np.resize(DENSE, n)
    f = np.ascontiguousarray(f)
    h = _astype(f, dtype)
    _bits_equal(_to_half(f, dtype, bf16), h)
    _bits_equal(_to_float(h, bf16), h.astype(np.float32))


def test_thread_count_invariance(half, level):
    dtype, bf16 = half
    f = np.ascontiguousarray(np.resize(DENSE, 3 * 65536 + 12345))
    h = _astype(f, dtype)
    one, two = _to_half(f, dtype, bf16, 1), _to_half(f, dtype, bf16, 2)
    _bits_equal(one, two)
    _bits_equal(one, h)
    _bits_equal(_to_float(h, bf16, 1), _to_float(h, bf16, 2))
    _bits_equal(_to_float(h, bf16, 2), h.astype(np.float32))


def test_unaligned_offsets_and_tails(half, level):
    """Views starting at every offset of a vector register (the loops' loads are unaligned)."""
    dtype, bf16 = half
    f = np.ascontiguousarray(DENSE[:4099])
    h = _astype(f, dtype)
    for off in range(17):
        _bits_equal(_to_half(f[off:], dtype, bf16), h[off:])
        _bits_equal(_to_float(h[off:], bf16), h[off:].astype(np.float32))


@pytest.mark.parametrize("call,match", [
    (lambda: _kernels.half_to_float(np.zeros(4, np.float32), np.zeros(4, np.float32), False, 1),
     "src must be float16"),
    (lambda: _kernels.half_to_float(np.zeros(4, np.float16), np.zeros(4, np.float32), True, 1),
     "src must be bfloat16"),
    (lambda: _kernels.half_to_float(np.zeros(8, np.float16)[::2], np.zeros(4, np.float32),
                                    False, 1), "src must be C-contiguous"),
    (lambda: _kernels.half_to_float(np.zeros(4, np.float16), np.zeros(5, np.float32), False, 1),
     "dst must have 4 values"),
    (lambda: _kernels.half_to_float(np.zeros(4, np.float16), np.zeros(4, np.float64), False, 1),
     "dst must be float32"),
    (lambda: _kernels.half_to_float(np.zeros(4, ">f2"), np.zeros(4, np.float32), False, 1),
     "native byte order"),
    (lambda: _kernels.half_to_float([0.0], np.zeros(1, np.float32), False, 1),
     "must be an ndarray"),
    (lambda: _kernels.float_to_half(np.zeros(4, np.float32), np.zeros(4, np.float32), False, 1),
     "dst must be float16"),
    (lambda: _kernels.float_to_half(np.zeros(4, np.float16), np.zeros(4, np.float16), False, 1),
     "src must be float32"),
    (lambda: _kernels.float_to_half(np.zeros(4, np.float32), np.zeros(3, np.uint16), False, 1),
     "dst must have 4 values"),
])
def test_bad_arguments_refused(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_read_only_misaligned_and_overlapping_refused():
    src = np.ones(4, np.float32)
    ro = np.zeros(4, np.float16)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="dst must be writable"):
        _kernels.float_to_half(src, ro, False, 1)
    assert not ro.any()
    raw = np.zeros(9, np.uint8)
    mis = raw[1:].view(np.uint16)
    assert not mis.flags.aligned
    with pytest.raises(ValueError, match="src must be aligned"):
        _kernels.half_to_float(mis, np.zeros(4, np.float32), False, 1)
    buf = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="must not overlap"):
        _kernels.float_to_half(buf, buf.view(np.uint16)[:8], False, 1)
    assert not buf.any()


# ----------------------------------------------------------------------- the backend's use

class _Spy:
    """_cpu.convert that counts the conversions the kernels did (reads: half -> float32)."""

    def __init__(self):
        self.done = self.reads = 0
        self._real = _cpu.convert

    def __call__(self, src, dst):
        ok = self._real(src, dst)
        self.done += ok
        self.reads += ok and dst.dtype == np.float32
        return ok


def _numpy_path(monkeypatch):
    monkeypatch.setattr(_cpu, "convert", lambda src, dst: False)


def _data(shape, dtype, layout, seed):
    rng = np.random.default_rng(seed)
    x = (1.5 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "channels_last":
        order = (0,) + tuple(range(2, len(shape))) + (1,)
        x = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
        dy = np.ascontiguousarray(dy.transpose(order)).transpose(np.argsort(order))
    elif layout == "strided":  # no C-contiguous view: the NumPy path
        x, dy = np.repeat(x, 2, axis=-1)[..., ::2], np.repeat(dy, 2, axis=-1)[..., ::2]
    return x, dy


def _run_all(x, dy, C):
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    b = np.linspace(-0.2, 0.3, C).astype(np.float32)
    y, mean, inv = batch_norm_forward(x, w, b)
    yr, _, _ = batch_norm_forward(x, w, b, activation="relu")
    dx, dw, db = batch_norm_backward(dy, x, mean, inv, w)
    dxr, _, _ = batch_norm_backward(dy, x, mean, inv, w, activation="relu", y=yr)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    yt = batch_norm(x, rm, rv, w, b, training=True)
    ye = batch_norm(x, rm, rv, w, b, training=False)
    yn = normalize(x, mean, inv, w, b)
    n, m, m2 = channel_moments(x)
    bn = fastbn.BatchNorm(C, dtype=np.float32)
    yl = bn(x)
    dxl = bn.backward(dy)
    out = np.empty_like(x)
    batch_norm_forward(x, w, b, out=out)
    return [y, mean, inv, yr, dx, dw, db, dxr, yt, ye, rm, rv, yn, m, m2, yl, dxl,
            bn.grad_weight, bn.grad_bias, out]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_end_to_end_bitwise_as_numpy_casts(half, level, layout, monkeypatch):
    dtype, _ = half
    C = 6
    x, dy = _data((4, C, 9, 11), dtype, layout, seed=3)
    spy = _Spy()
    monkeypatch.setattr(_cpu, "convert", spy)
    fast = _run_all(x, dy, C)
    # inputs converted by the kernels (of the strided ones, with no C-contiguous view, only the
    # ReLU backward's y, a fresh forward output), outputs (fresh, in x's layout) written back
    assert spy.reads == 1 if layout == "strided" else spy.reads >= 12
    assert spy.done - spy.reads >= 10
    _numpy_path(monkeypatch)
    slow = _run_all(x, dy, C)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and a.strides == b.strides
        _bits_equal(np.ascontiguousarray(a), np.ascontiguousarray(b))


@pytest.mark.parametrize("shape,layout", [((3, 5, 40, 41), "nchw"), ((6, 9, 3, 5), "nchw"),
                                          ((4, 7, 6, 5), "channels_last"), ((300, 11), "nchw")])
def test_end_to_end_as_casting_by_hand(half, shape, layout):
    """float16/bfloat16 batch norm is float32 batch norm of the same values, rounded once
    (y written over the float32 copy of x, dx over that of dy: bitwise as separate arrays)."""
    dtype, _ = half
    C = shape[1]
    x, dy = _data(shape, dtype, layout, seed=4)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    b = np.linspace(-1, 1, C).astype(np.float32)
    for relu in (None, "relu"):
        y, mean, inv = batch_norm_forward(x, w, b, activation=relu)
        y32, mean32, inv32 = batch_norm_forward(x32, w, b, activation=relu)
        _bits_equal(y, _astype(y32, dtype))
        _bits_equal(mean, mean32)
        _bits_equal(normalize(x, mean, inv, w, b, activation=relu),
                    _astype(normalize(x32, mean, inv, w, b, activation=relu), dtype))
        yy = None if relu is None else y
        dx, dw, db = batch_norm_backward(dy, x, mean, inv, w, activation=relu, y=yy)
        dx32, dw32, db32 = batch_norm_backward(dy32, x32, mean, inv, w, activation=relu,
                                               y=None if yy is None else yy.astype(np.float32))
        _bits_equal(dx, _astype(dx32, dtype))
        _bits_equal(dw, dw32)
        _bits_equal(db, db32)
    assert not np.shares_memory(dx, dy) and not np.shares_memory(y, x)


def test_out_in_another_layout_or_byte_order_takes_numpy_path(monkeypatch):
    """An out= whose canonical view is not C-contiguous (or not native) is cast by NumPy:
    same result as a fresh output."""
    x, _ = _data((4, 6, 5, 7), F16, "nchw", seed=5)
    ref, _, _ = batch_norm_forward(x)
    spy = _Spy()
    monkeypatch.setattr(_cpu, "convert", spy)
    out = np.empty(x.shape[::-1], F16).T  # Fortran order
    batch_norm_forward(x, out=out)
    _bits_equal(np.ascontiguousarray(out), ref)
    swapped = np.empty(x.shape, ">f2")
    batch_norm_forward(x.astype(">f2"), out=swapped)
    _bits_equal(swapped.astype(F16), ref)
    inplace = x.copy()
    batch_norm_forward(inplace, out=inplace)
    _bits_equal(inplace, ref)
    assert spy.reads >= 2  # x read by the kernels in the first and last calls


def test_convert_declines_what_it_cannot_do():
    f = np.zeros(4, np.float32)
    assert not _cpu.convert(f, np.zeros(4, np.float64))         # not a half
    assert not _cpu.convert(f, np.zeros(5, np.float16))         # sizes
    assert not _cpu.convert(f, np.zeros(8, np.float16)[::2])    # strided
    assert not _cpu.convert(f, np.zeros(4, ">f2"))              # byte order
    assert not _cpu.convert(f, f.view(np.float16)[:4])          # overlapping
    ro = np.zeros(4, np.float16)
    ro.flags.writeable = False
    assert not _cpu.convert(f, ro)
    h = np.ones(4, np.float16)
    assert _cpu.convert(h, f) and (f == 1).all()
