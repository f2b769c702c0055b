"""Short segments read as rows, and a few wide rows finished inside the tasks (_kernels).

NCL arrays whose inner extent is short (axis=(1, 2) on (N, C, 7, 7) merges to inner 7; 1-D
convolutions of short sequences) are read as rows of C * inner lanes, inner lanes per channel
(statistics up to inner 15, the other passes below a 64-byte segment); channels-last arrays of
a few rows (one row block: (16, 25088)) compute each tile's shift, sums and mean/M2 in its own
task, with no merge. Both against float64 NumPy, against the segment path of the same input
(_set_short_inner), bitwise across thread counts, and through the robust-statistics checks.
"""
import numpy as np
import pytest

import fastbn
from fastbn import _kernels as K
from fastbn import _reference as ref, functional as F

from conftest import rel_err

# (shape, dtype): inner 2..15 in both dtypes (rows for every pass, or for the statistics only),
# super-rows (C * inner < 1024 lanes, and < 64), tiles of whole channels (1022 lanes at 7),
# a ragged last tile, one row block of wide rows, and rows past one block.
SHAPES = [
    ((16, 3584, 7), np.float32),
    ((16, 3584, 7), np.float64),
    ((5, 97, 3), np.float32),
    ((9, 5, 2), np.float64),
    ((3, 1001, 15), np.float32),
    ((4, 301, 11), np.float64),
    ((64, 1000, 3), np.float32),
    ((130, 203, 5), np.float64),
    ((16, 25088), np.float32),
    ((2, 4096), np.float64),
    ((3, 5003), np.float32),
    ((70, 2100), np.float32),
    ((6, 301, 49), np.float32),   # 7x7 maps: the statistics read rows, the other passes segments
    ((5, 97, 56), np.float32),
    ((7, 150, 24), np.float64),
    ((4, 80, 28), np.float64),
]
IDS = [f"{s}-{np.dtype(d).name}" for s, d in SHAPES]


def _all(x, seed=3):
    r = np.random.default_rng(seed)
    C = x.shape[1]
    w, b = r.standard_normal(C), r.standard_normal(C)
    dy = r.standard_normal(x.shape).astype(x.dtype)
    n, mean0, m2 = F.channel_moments(x, axis=1)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=1, activation="relu")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=1, activation="relu",
                                            y=y)
    y2 = F.normalize(x, mean, invstd, w, b, axis=1)
    dx2, dw2, db2 = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=1)
    dxe, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=1, training=False)
    return dict(mean0=mean0, m2=m2, y=y, mean=mean, invstd=invstd, dx=dx, dw=dw, db=db, y2=y2,
                dx2=dx2, dw2=dw2, db2=db2, dxe=dxe), (w, b, dy)


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=IDS)
def test_matches_float64_reference(shape, dtype, rng):
    x = (2.0 + rng.standard_normal(shape)).astype(dtype)
    got, (w, b, dy) = _all(x)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    red = tuple(i for i in range(x.ndim) if i != 1)
    xd = x.astype(np.float64)
    emean = xd.mean(axis=red)
    assert rel_err(got["mean0"], emean) < tol
    assert rel_err(got["m2"], ((xd - np.expand_dims(emean, red)) ** 2).sum(axis=red)) < tol
    ye, mean, var, invstd = ref.forward(x, w, b, axis=1, activation="relu")
    assert rel_err(got["mean"], mean) < tol
    assert rel_err(got["invstd"], invstd) < tol
    assert rel_err(got["y"], ye) < 10 * tol
    assert rel_err(got["y2"], ref.forward(x, w, b, axis=1, mean=mean, var=var)[0]) < 10 * tol
    for key, act, yy, train in (("dx", "relu", got["y"], True), ("dx2", None, None, True),
                                ("dxe", None, None, False)):
        edx, edw, edb = ref.backward(dy, x, got["mean"], got["invstd"], w, axis=1,
                                     training=train, y=yy)
        assert rel_err(got[key], edx) < 50 * tol, key
    edx, edw, edb = ref.backward(dy, x, got["mean"], got["invstd"], w, axis=1, y=got["y"])
    assert rel_err(got["dw"], edw, np.abs(edw).max() + x.size / x.shape[1]) < 10 * tol
    assert rel_err(got["db"], edb, np.abs(edb).max() + x.size / x.shape[1]) < 10 * tol


@pytest.mark.parametrize("shape,dtype", [s for s in SHAPES if len(s[0]) == 3],
                         ids=[i for s, i in zip(SHAPES, IDS) if len(s[0]) == 3])
def test_rows_agree_with_segments(shape, dtype, rng):
    x = (-1.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
    rows, _ = _all(x)
    prev = K._set_short_inner(1)
    try:
        segs, _ = _all(x)
    finally:
        K._set_short_inner(prev)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for key in rows:
        assert rel_err(rows[key], segs[key], np.abs(segs[key]).max() + 1) < 10 * tol, key


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=IDS)
def test_bitwise_identical_for_any_thread_count(shape, dtype, rng):
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    try:
        fastbn.set_num_threads(1)
        base, _ = _all(x)
        for n in (2, 3):
            fastbn.set_num_threads(n)
            got, _ = _all(x)
            for key in base:
                assert np.array_equal(base[key].view(np.uint8), got[key].view(np.uint8)), key
    finally:
        fastbn.set_num_threads(None)


@pytest.mark.parametrize("shape", [(16, 1200, 7), (12, 3000)])
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_stable_statistics_float32(shape, offset, rng):
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    x[0, 5] = offset + 1000.0  # a channel whose first value is an outlier
    x[:, 9] = np.sort(x[:, 9], axis=0)  # one whose values are sorted
    _, mean, m2 = F.channel_moments(x, axis=1)
    red = tuple(i for i in range(x.ndim) if i != 1)
    xd = x.astype(np.float64)
    emean = xd.mean(axis=red)
    em2 = ((xd - np.expand_dims(emean, red)) ** 2).sum(axis=red)
    assert np.max(np.abs(mean - emean) / np.abs(emean)) < 1e-5
    assert np.max(np.abs(m2 - em2) / em2) < 1e-5


@pytest.mark.parametrize("shape", [(16, 200, 7), (10, 3000)])
def test_careful_channels_in_the_tasks(shape, rng):
    """Channels the one-pass check refuses (NaN, inf, a bad shift, constant, tiny scale) are
    recomputed; the others are untouched by them."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 1] = 7.0  # constant
    x[3, 2] = np.nan
    x[4, 3] = np.inf
    x[:, 4] = rng.standard_normal(x[:, 4].shape) * 1e-30  # squares underflow in float
    x[:, 6] = 0.0
    x[x.shape[0] // 2, 6] = 1.0  # the shift (median of 3) is 0, the mean is not
    x[:, 8] = x[:, 8] * 1e-3 + 1e4
    _, mean, m2 = F.channel_moments(x, axis=1)
    red = tuple(i for i in range(x.ndim) if i != 1)
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        emean = xd.mean(axis=red)
        em2 = ((xd - np.expand_dims(emean, red)) ** 2).sum(axis=red)
    assert np.isnan(mean[2]) and np.isnan(m2[2])
    assert not np.isfinite(mean[3]) and np.isnan(m2[3])
    ok = np.isfinite(emean)
    assert np.all(np.isfinite(mean[ok])) and np.all(np.isfinite(m2[ok]))
    assert mean[1] == 7.0 and m2[1] == 0.0
    scale = np.abs(emean[ok]) + np.sqrt(em2[ok] / (x.size // x.shape[1]))  # (means near 0)
    assert np.max(np.abs(mean[ok] - emean[ok]) / np.maximum(scale, 1e-300)) < 1e-5
    assert np.max(np.abs(m2[ok] - em2[ok]) / np.maximum(em2[ok], 1e-300)) < 1e-5


@pytest.mark.parametrize("shape", [(8, 300, 7), (8, 3000)])
def test_float32_scale_beyond_float_range(shape, rng):
    """A float32 channel whose invstd overflows float (std 1e-40) is normalised in double,
    on the lanes of the rows path too."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 2] = (rng.standard_normal(x[:, 2].shape) * 1e-40).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=1, eps=0.0)
    assert invstd[2] > 3e38
    ye = ref.forward(x, axis=1, eps=0.0)[0]
    assert np.all(np.isfinite(y))
    assert rel_err(y, ye) < 1e-5
