"""Reused buffers for the CPU backend's float32 temporaries of float16/bfloat16 input.

Half-precision input is computed in float32: each call converts x (and dy) into float32 arrays
that live only for the call. Fresh multi-MB arrays come from mmap, and the kernel that fills
one first page-faults on every 4 KiB of it: on (16, 64, 56, 56) that cost more than the
conversions themselves (float16 forward 4.5x float32's time with fresh temporaries, 1.6x with
reused ones). So each thread keeps up to ``KEEP`` buffers and hands them out again.

A buffer is handed out again only when no array made from it is alive: every array ``empty``
returns is a view whose ``base`` is the buffer, so the buffer's reference count says whether
one still exists. A temporary that escapes (kept by a caller, returned by mistake) therefore
keeps its buffer to itself; it can never be overwritten under it.
"""
import math
import sys
import threading

import numpy as np

KEEP = 4               # buffers kept per thread
MIN_BYTES = 1 << 20    # smaller temporaries come from NumPy (malloc reuses them anyway)


class _Pool(threading.local):
    def __init__(self):
        self.bufs = []


_pool = _Pool()


def _free(bufs, i):
    # Referenced only by the pool's list (and getrefcount's argument): no array uses it.
    return sys.getrefcount(bufs[i]) == 2


def empty(shape, dtype):
    """An uninitialised C-contiguous array, as ``np.empty(shape, dtype)``, in a buffer of this
    thread's pool when the array is large."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    bufs = _pool.bufs
    free = [i for i in range(len(bufs)) if _free(bufs, i)]
    fits = [i for i in free if bufs[i].nbytes >= nbytes]
    if fits:
        buf = bufs[min(fits, key=lambda i: bufs[i].nbytes)]
    else:
        buf = np.empty(nbytes, np.uint8)
        if len(bufs) < KEEP:
            bufs.append(buf)
        elif free:  # in place of the smallest free buffer
            bufs[min(free, key=lambda i: bufs[i].nbytes)] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def clear():
    """Drop this thread's buffers (their memory is freed once no array made from them lives)."""
    _pool.bufs = []


def held_bytes():
    """Bytes this thread's pool holds."""
    return sum(b.nbytes for b in _pool.bufs)
