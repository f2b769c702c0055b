"""Property tests over generated shapes, axes and dtypes (hypothesis)."""
import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref

from conftest import rel_err

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:  # training needs 2+ values per channel
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape[:1] + (shape[1] + 1,) + shape[2:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 1.0, 100.0]))
    relu = draw(st.booleans())
    layout = draw(st.sampled_from(["C", "F", "reversed"]))
    return shape, axis, dtype, seed, offset, relu, layout


@settings(max_examples=150, deadline=None)
@given(problems())
def test_forward_backward_match_reference(problem):
    shape, axis, dtype, seed, offset, relu, layout = problem
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "reversed":
        x = x[::-1]  # negative strides: fastbn copies
    C = shape[axis]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    act = "relu" if relu else None
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, activation=act)
    ry, rmean, _, rinv = ref.forward(x, w, b, axis=axis, activation=act)
    tol = 1e-11 if dtype == np.float64 else 1e-5
    assert rel_err(y, ry) < tol
    assert rel_err(mean, rmean, np.abs(rmean).max() + 1) < tol
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, activation=act,
                                            y=y)
    rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, axis=axis, y=y if relu else None)
    scale = np.abs(w).max() * max(invstd.max(), 1.0) * np.abs(dy).max()
    n = x.size // C
    assert rel_err(dx, rdx, scale) < tol * 10
    assert rel_err(dw, rdw, n * np.abs(dy).max() * 4) < tol * 10
    assert rel_err(db, rdb, n * np.abs(dy).max()) < tol * 10
