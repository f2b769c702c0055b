"""What float16 and bfloat16 input cost against float32: forward, backward and eval.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \\
        FASTBN_CPU_LEVEL=x86-64-v4 python examples/half_precision_cost.py [threads]

fastbn computes half-precision input in float32; the conversions in and out are the extra
work. Prints each dtype's median time and its ratio to float32's, on (16, 64, 56, 56) NCHW.
bfloat16 needs ml_dtypes (``pip install fastbn[bfloat16]``); without it that row is left out.
"""
import sys
import timeit

import numpy as np

import fastbn


def main(threads=1):
    fastbn.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64, 56, 56), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    dtypes = [("float32", np.float32), ("float16", np.float16)]
    try:
        import ml_dtypes
        dtypes.append(("bfloat16", ml_dtypes.bfloat16))
    except ImportError:
        print("ml_dtypes is not installed: no bfloat16 row")
    rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)

    def t(f):
        return float(np.median(timeit.repeat(f, number=5, repeat=9))) / 5 * 1e3

    res = {}
    for name, dt in dtypes:
        a, g = x.astype(dt), dy.astype(dt)
        _y, m, i = fastbn.batch_norm_forward(a)
        res[name] = (t(lambda: fastbn.batch_norm_forward(a)),
                     t(lambda: fastbn.batch_norm_backward(g, a, m, i)),
                     t(lambda: fastbn.batch_norm(a, rm, rv, training=False)))
    print(f"{threads} thread(s); forward, backward, eval (ms, and x float32)")
    for name, v in res.items():
        print(f"{name:9s}", "  ".join(f"{a:.3f} ({a / b:.2f}x)" for a, b in zip(v, res["float32"])))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
