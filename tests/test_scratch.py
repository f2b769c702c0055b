"""The CPU backend's reused float32 temporaries for half-precision input (fastbn._scratch)."""
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _scratch as S

BIG = (512, 1024)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def _fresh_pool():
    S.clear()
    yield
    S.clear()


def _addr(a):
    return a.__array_interface__["data"][0]


def test_live_temporaries_never_share_a_buffer():
    arrays = [S.empty(BIG, np.float32) for _ in range(S.KEEP + 2)]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)
    assert len(S._pool.bufs) <= S.KEEP


def test_a_dead_temporary_is_reused_and_a_kept_one_is_not():
    a = S.empty(BIG, np.float32)
    kept = a[::2]  # a view keeps the buffer alive even after `a` goes
    first = _addr(a)
    del a
    b = S.empty(BIG, np.float32)
    assert not np.shares_memory(b, kept), "a buffer still in use was handed out again"
    del b
    c = S.empty((256, 1024), np.float32)  # smaller: the free buffer fits
    assert _addr(c) != first  # `kept` still holds the first buffer
    assert len(S._pool.bufs) == 2


def test_small_requests_bypass_the_pool():
    a = S.empty((10, 10), np.float32)
    assert a.shape == (10, 10) and a.dtype == np.float32 and not S._pool.bufs


def test_the_pool_holds_at_most_keep_buffers():
    for k in range(3 * S.KEEP):
        S.empty((256 * (k + 1), 1024), np.float32)
    assert len(S._pool.bufs) <= S.KEEP
    assert S.held_bytes() <= S.KEEP * 256 * 3 * S.KEEP * 1024 * 4


def test_each_thread_has_its_own_pool():
    got = {}

    def work(name):
        got[name] = S.empty(BIG, np.float32)

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not np.shares_memory(got["a"], got["b"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_results_survive_later_calls(dtype):
    """Outputs are never pool buffers: a later call cannot change an earlier result."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed")
        dt = ml_dtypes.bfloat16
    else:
        dt = np.float16
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((8, 64, 32, 32)).astype(dt) for _ in range(3)]
    first = fastbn.batch_norm_forward(xs[0])
    snapshot = [np.array(a, copy=True) for a in first]
    dx0 = fastbn.batch_norm_backward(xs[1], xs[0], first[1], first[2])
    dsnap = [np.array(a, copy=True) for a in dx0]
    for x in xs[1:]:
        y, m, i = fastbn.batch_norm_forward(x)
        fastbn.batch_norm_backward(x, x, m, i)
    for a, b in zip(first + dx0, snapshot + dsnap):
        assert np.array_equal(a.view(np.uint16) if a.dtype.itemsize == 2 else a,
                              b.view(np.uint16) if b.dtype.itemsize == 2 else b)
    # and the pool did serve those calls
    assert S._pool.bufs
