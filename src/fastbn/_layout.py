"""The canonical (outer, C, inner) view of x and where a result is written, for any backend.

A backend's kernels work on C-contiguous (outer, C, inner) arrays. ``Layout`` maps x onto that
view once per call: a C-contiguous x is used as is; an x that is C-contiguous after ordering its
axes by decreasing stride (Fortran order, PyTorch's channels_last strides, transposes) is used
through that permutation, without a copy; any other layout (slices with gaps, negative strides,
broadcast views) is copied once into C order. ``Output`` allocates results in x's own layout,
so ``y.strides`` follow ``x.strides``, and writes into a caller's ``out=`` directly when that is
safe, or through a temporary.

Both work for NumPy and CuPy arrays alike: they only use what the two modules share; so does
``update_running_arrays``, the running-statistics formula both backends fall back on.
"""
import math

import numpy as np


class Layout:
    """How x maps onto the kernels' canonical (outer, C, inner) C-contiguous order."""

    __slots__ = ("xp", "perm", "inv", "shape", "O", "C", "I", "convert", "scratch")

    def __init__(self, xp, x, ax, convert=None, scratch=None):
        perm = None
        shape = x.shape
        p = ax
        if not x.flags.c_contiguous:
            order = sorted(range(x.ndim), key=lambda i: -abs(x.strides[i]))
            if x.transpose(order).flags.c_contiguous:
                perm = tuple(order)
                shape = tuple(x.shape[i] for i in perm)
                p = perm.index(ax)
        self.xp = xp
        # convert(src, dst): the backend's cast between a 2-byte float and float32 of two
        # C-contiguous arrays of the same size; True when done, False to leave it to xp (None:
        # always xp). NumPy's casts of float16/bfloat16 run at a tenth of memory speed.
        self.convert = convert
        # scratch(shape, dtype): the backend's np.empty for temporaries that die with the call
        # (the CPU's reused buffers, _scratch); None: xp.empty.
        self.scratch = scratch
        self.perm = perm
        self.inv = None if perm is None else tuple(int(i) for i in np.argsort(perm))
        self.shape = shape
        self.O = math.prod(shape[:p])
        self.C = shape[p]
        self.I = math.prod(shape[p + 1:])

    @property
    def count(self):
        """Values per channel: outer * inner."""
        return self.O * self.I

    @property
    def shape3(self):
        return (self.O, self.C, self.I)

    def _permuted(self, a):
        return a if self.perm is None else a.transpose(self.perm)

    def canon(self, a, dtype=None):
        """a (shaped like x) as a C-contiguous (O, C, I) array of `dtype`: a view if one exists."""
        t = self._permuted(a)
        if dtype is not None and t.dtype != dtype and self.convert is not None \
                and t.flags.c_contiguous:
            r = self.temp(t.shape, dtype)
            if self.convert(t, r):
                return r.reshape(self.shape3)
        if not t.flags.c_contiguous or (dtype is not None and t.dtype != dtype):
            t = self.xp.ascontiguousarray(t, dtype=dtype)
        return t.reshape(self.shape3)

    def temp(self, shape, dtype):
        """An uninitialised array for a temporary of one call (never handed to the caller)."""
        return (self.scratch or self.xp.empty)(shape, dtype)

    def direct(self, a):
        """a's canonical (O, C, I) view if it exists without a copy, else None."""
        t = self._permuted(a)
        return t.reshape(self.shape3) if t.flags.c_contiguous else None

    def empty(self, dtype):
        """A new array shaped like x, in x's layout: (the array, its canonical view)."""
        t = self.xp.empty(self.shape, dtype)
        user = t if self.perm is None else t.transpose(self.inv)
        return user, t.reshape(self.shape3)

    def to_user(self, t3):
        """A canonical (O, C, I) array viewed with x's shape and axis order."""
        t = t3.reshape(self.shape)
        return t if self.perm is None else t.transpose(self.inv)


def update_running_arrays(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's running-statistics update with array arithmetic (NumPy or CuPy): both new
    values are formed in float64 before either buffer is written, then rounded into it. The
    backends use it for buffers their kernels cannot write (and the CUDA backend for all)."""
    unbiased = var.astype(np.float64) * (count / (count - 1) if count > 1 else 1.0)
    new = [None if run is None else
           (1.0 - momentum) * run.astype(np.float64) + momentum * batch.astype(np.float64)
           for run, batch in ((running_mean, mean), (running_var, unbiased))]
    for run, value in zip((running_mean, running_var), new):
        if run is not None:
            run[...] = value


class Output:
    """Where a kernel writes its result: the caller's out, a new array, or a temporary.

    ``target`` is the canonical (O, C, I) array the kernel writes, of the backend's compute
    dtype; ``finish()`` returns the user's array, copying (and casting) from a temporary when one
    was needed (float16 computed in float32, an out= in another layout, of another byte order,
    or overlapping an input other than exactly).
    """

    __slots__ = ("result", "target", "_final", "_layout")

    def __init__(self, backend, layout, x, out, inputs):
        cdt = backend.compute_dtype(x.dtype)
        self._layout = layout
        self._final = None
        if out is None:
            self.result, self.target = layout.empty(x.dtype)
            if cdt != x.dtype:
                self._final = self.result
                self.target = layout.temp(layout.shape3, cdt)
            return
        self.result = out
        direct = None
        if cdt == out.dtype and backend.kernel_writable(out):
            direct = layout.direct(out)
        if direct is not None:
            # Writing straight into out is safe when it is exactly one of the inputs (the
            # kernels are elementwise in their last pass) or overlaps none of them.
            for a in inputs:
                if (a is not None and layout.xp.may_share_memory(out, a)
                        and not backend.same_view(out, a)):
                    direct = None
                    break
        if direct is not None:
            self.target = direct
        else:
            self._final = out
            self.target = layout.temp(layout.shape3, cdt)

    def source(self, x, dtype):
        """x's canonical view in `dtype` for a kernel that may write this target over x (the
        forward's normalize, elementwise in its last pass, as out=x; the backward's dx over
        dy): when x had to be cast into a new array and the target is a temporary, that array
        becomes the target too (y overwrites the float32 copy of a float16 x in place), one
        x-sized buffer less to fill."""
        x3 = self._layout.canon(x, dtype)
        if self._final is not None and x3.dtype != x.dtype and x3.dtype == self.target.dtype:
            self.target = x3
        return x3

    def finish(self):
        if self._final is not None:
            lay = self._layout
            if lay.convert is not None and self._final.dtype != self.target.dtype:
                d = lay.direct(self._final)
                if d is not None and lay.convert(self.target, d):
                    return self.result
            lay.xp.copyto(self._final, lay.to_user(self.target))
        return self.result
