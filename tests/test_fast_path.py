"""The one-call fast paths of batch_norm, forward_with_stats, normalize, invstd_from_var and
batch_norm_backward.

functional offers plain calls (C-contiguous float32/float64 ndarrays, exact 1-D per-channel
ndarrays, plain scalars) to _kernels.batch_norm_fast / forward_with_stats_fast / normalize_fast /
invstd_fast / batch_norm_backward_fast first. These
tests pin down that (1) such calls do take the fast path, (2) its results, running-statistics
updates included, are bitwise those of the general path, and (3) everything else (other
layouts, dtypes, types, and every invalid argument) is handed back to the general path, whose
checks and messages stay the only ones.
"""
import numpy as np
import pytest

from fastbn import _kernels, functional as F

SHAPES = [((6, 5), 1), ((6, 5), -1), ((6, 5), 0), ((4, 3, 7), 1), ((2, 3, 4, 5), -1),
          ((3, 2, 4, 4), 1)]


def _general(monkeypatch):
    monkeypatch.setattr(_kernels, "batch_norm_fast", lambda *a: None)
    monkeypatch.setattr(_kernels, "forward_with_stats_fast", lambda *a: None)
    monkeypatch.setattr(_kernels, "normalize_fast", lambda *a: None)
    monkeypatch.setattr(_kernels, "invstd_fast", lambda *a: None)
    monkeypatch.setattr(_kernels, "batch_norm_backward_fast", lambda *a: None)


def _args(rng, shape, axis, dtype, pdtype, affine):
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    C = shape[axis]
    w = (1 + 0.1 * rng.standard_normal(C)).astype(pdtype) if affine else None
    b = (0.1 * rng.standard_normal(C)).astype(pdtype) if affine else None
    rm = (0.1 * rng.standard_normal(C)).astype(pdtype)
    rv = (1 + 0.1 * rng.random(C)).astype(pdtype)
    return x, w, b, rm, rv


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pdtype", [np.float32, np.float64], ids=["p32", "p64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_fast_path_is_taken_and_matches_the_general_path(
        rng, monkeypatch, shape, axis, dtype, pdtype, affine, activation):
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, pdtype, affine)
    for training in (True, False):
        fast_rm, fast_rv = rm.copy(), rv.copy()
        y = _kernels.batch_norm_fast(x, w, b, fast_rm, fast_rv, training, 0.1, 1e-5, axis,
                                     activation, 1)
        assert y is not None, "plain arguments should take the fast path"
        with monkeypatch.context() as m:
            _general(m)
            gen_rm, gen_rv = rm.copy(), rv.copy()
            ref = F.batch_norm(x, gen_rm, gen_rv, w, b, training=training, momentum=0.1,
                               eps=1e-5, axis=axis, activation=activation)
        assert y.dtype == ref.dtype and y.shape == ref.shape and y.flags.c_contiguous
        assert np.array_equal(y, ref)
        assert np.array_equal(fast_rm, gen_rm) and np.array_equal(fast_rv, gen_rv)
        if training:
            assert not np.array_equal(fast_rm, rm), "running statistics were not updated"


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_with_stats_fast_path_matches_the_general_path(
        rng, monkeypatch, shape, axis, dtype, affine, activation):
    x, w, b, _, _ = _args(rng, shape, axis, dtype, np.float32, affine)
    got = _kernels.forward_with_stats_fast(x, w, b, 1e-5, axis, activation, 1)
    assert got is not None, "plain arguments should take the fast path"
    with monkeypatch.context() as m:
        _general(m)
        ref = F.forward_with_stats(x, w, b, axis=axis, eps=1e-5, activation=activation)
    assert got[4] == ref[4] and type(got[4]) is type(ref[4])
    for g, r in zip(got[:4], ref[:4]):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert np.array_equal(g, r)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pdtype", [np.float32, np.float64], ids=["p32", "p64"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_normalize_fast_path_matches_the_general_path(rng, monkeypatch, shape, axis, dtype,
                                                      pdtype, activation):
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, pdtype, True)
    inv = (1 / np.sqrt(rv + 1e-5)).astype(pdtype)
    for weight, bias in ((w, b), (None, None)):
        got = _kernels.normalize_fast(x, rm, inv, weight, bias, axis, activation, 1)
        assert got is not None, "plain arguments should take the fast path"
        with monkeypatch.context() as m:
            _general(m)
            ref = F.normalize(x, rm, inv, weight, bias, axis=axis, activation=activation)
        assert got.dtype == ref.dtype and np.array_equal(got, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_invstd_fast_path_matches_the_numpy_formula(monkeypatch, dtype):
    var = np.array([0.0, -0.0, 1e-30, 0.25, 2.0, 1e30, np.inf, np.nan, -1.0, 3.0], dtype)
    for eps in (0.0, 1e-5, 1.0):
        got = _kernels.invstd_fast(var, eps)
        assert got is not None and got.dtype == np.float64
        with monkeypatch.context() as m:
            _general(m)
            with np.errstate(invalid="ignore"):
                ref = F.invstd_from_var(var, eps)
        assert np.array_equal(got, ref, equal_nan=True)
    assert _kernels.invstd_fast(var[::2], 0.0) is None
    assert _kernels.invstd_fast(var.reshape(2, 5), 0.0) is None
    assert _kernels.invstd_fast(var.tolist(), 0.0) is None
    assert _kernels.invstd_fast(np.ones(3, np.float16), 0.0) is None


def test_normalize_takes_the_general_path_for_non_plain_arguments(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    m, s = np.zeros(4), np.ones(4)
    fast = _kernels.normalize_fast
    assert fast(np.asfortranarray(x), m, s, None, None, 1, None, 1) is None
    assert fast(x, None, s, None, None, 1, None, 1) is None
    assert fast(x, m[:3], s, None, None, 1, None, 1) is None
    assert fast(x, m, s.tolist(), None, None, 1, None, 1) is None
    assert fast(x, m, s, None, None, 1, "gelu", 1) is None
    with pytest.raises(ValueError, match=r"invstd: expected shape \(4,\)"):
        F.normalize(x, m, s[:3])


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pdtype", [np.float32, np.float64], ids=["p32", "p64"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_backward_fast_path_is_taken_and_matches_the_general_path(
        rng, monkeypatch, shape, axis, dtype, pdtype, activation):
    x, w, b, _, _ = _args(rng, shape, axis, dtype, pdtype, True)
    dy = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd = F.batch_norm_forward(x, w, b, axis=axis, activation=activation)
    mean, invstd = mean.astype(pdtype), invstd.astype(pdtype)
    for training in (True, False):
        for weight in (w, None):
            got = _kernels.batch_norm_backward_fast(dy, x, mean, invstd, weight, axis,
                                                    training, activation, y, 1)
            assert got is not None, "plain arguments should take the fast path"
            with monkeypatch.context() as m:
                _general(m)
                ref = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                            training=training, activation=activation, y=y)
            for g, r in zip(got, ref):
                assert g.dtype == r.dtype and g.shape == r.shape
                assert np.array_equal(g, r)


def _plain(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    return dict(x=x, weight=np.ones(4, np.float32), bias=np.zeros(4, np.float32),
                running_mean=np.zeros(4, np.float32), running_var=np.ones(4, np.float32),
                training=True, momentum=0.1, eps=1e-5, axis=1, activation=None)


NOT_PLAIN = {
    "x Fortran order": dict(x=lambda a: np.asfortranarray(a)),
    "x strided": dict(x=lambda a: np.repeat(a, 2, axis=0)[::2]),
    "x float16": dict(x=lambda a: a.astype(np.float16)),
    "x int": dict(x=lambda a: a.astype(np.int32)),
    "x list": dict(x=lambda a: a.tolist()),
    "x 1-D": dict(x=lambda a: a[0]),
    "x empty": dict(x=lambda a: a[:0]),
    "x one row in training": dict(x=lambda a: a[:1]),
    "axis numpy int": dict(axis=lambda v: np.int64(v)),
    "axis out of range": dict(axis=lambda v: 2),
    "axis bool": dict(axis=lambda v: True),
    "activation other": dict(activation=lambda v: "gelu"),
    "weight wrong length": dict(weight=lambda a: a[:3]),
    "weight list": dict(weight=lambda a: a.tolist()),
    "weight int": dict(weight=lambda a: a.astype(np.int64)),
    "weight 2-D": dict(weight=lambda a: a[None]),
    "bias strided": dict(bias=lambda a: np.repeat(a, 2)[::2]),
    "running_var read-only": dict(running_var=lambda a: np.frombuffer(a.tobytes(), a.dtype)),
    "running_mean missing in eval": dict(running_mean=lambda a: None, training=lambda v: False),
}


# eps, momentum and training reach the fast paths already validated (fastbn._validation), so
# they are not part of what makes a call plain; tests/test_front_door.py checks their rules.

@pytest.mark.parametrize("case", list(NOT_PLAIN), ids=list(NOT_PLAIN))
def test_anything_else_takes_the_general_path(rng, case):
    kw = _plain(rng)
    for k, f in NOT_PLAIN[case].items():
        kw[k] = f(kw[k])
    assert _kernels.batch_norm_fast(*kw.values(), 1) is None
    # forward_with_stats has no running statistics or momentum: the cases on its arguments
    if not {"running_mean", "running_var", "momentum"} & set(NOT_PLAIN[case]):
        got = _kernels.forward_with_stats_fast(kw["x"], kw["weight"], kw["bias"], kw["eps"],
                                               kw["axis"], kw["activation"], 1)
        assert got is None


def test_the_general_path_still_reports_bad_arguments(rng):
    kw = _plain(rng)
    kw["weight"] = kw["weight"][:3]
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\)"):
        F.batch_norm(kw.pop("x"), **kw)
    kw = _plain(rng)
    with pytest.raises(ValueError, match="momentum"):
        F.batch_norm(kw.pop("x"), **dict(kw, momentum=2.0))


def test_backward_takes_the_general_path_for_mismatched_or_missing_arrays(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    m, s = np.zeros(4), np.ones(4)
    fast = _kernels.batch_norm_backward_fast
    assert fast(x.astype(np.float64), x, m, s, None, 1, True, None, None, 1) is None
    assert fast(x[:4], x, m, s, None, 1, True, None, None, 1) is None
    assert fast(x, x, m, None, None, 1, True, None, None, 1) is None
    assert fast(x, x, m, s, None, 1, True, "relu", None, 1) is None  # relu needs y
    assert fast(x, x, m[:3], s, None, 1, True, None, None, 1) is None
    assert fast(x[:1], x[:1], m, s, None, 1, True, None, None, 1) is None  # one value a channel
    with pytest.raises(ValueError, match="y: expected the forward's output"):
        F.batch_norm_backward(x, x, m, s, activation="relu")
