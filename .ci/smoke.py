"""Smoke test of an installed fastbn (run from outside the source tree): import, then one
training forward and backward against the float64 reference, and the compiled kernels' origin."""
import sys

import numpy as np

import fastbn
from fastbn import _reference

assert "site-packages" in fastbn.__file__, f"fastbn imported from the source tree: {fastbn.__file__}"
x = np.random.default_rng(0).standard_normal((16, 8, 5, 5)).astype(np.float32) * 3 + 1
w = np.linspace(0.5, 2.0, 8).astype(np.float32)
y, mean, invstd = fastbn.batch_norm_forward(x, w)
dy = np.cos(x)
dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
ry, rmean, _rvar, rinv = _reference.forward(x, w)
rdx, rdw, rdb = _reference.backward(dy, x, rmean, rinv, w)
for name, got, ref in (("y", y, ry), ("dx", dx, rdx), ("dweight", dw, rdw), ("dbias", db, rdb)):
    err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
    assert err < 1e-5, f"{name}: relative error {err:.2e}"
print(f"smoke: fastbn {fastbn.__version__} from {fastbn.__file__}, OpenMP "
      f"{'on' if fastbn.openmp_enabled() else 'off'}, y/dx/dw/db within 1e-5 of float64 "
      f"(python {sys.version.split()[0]})")
