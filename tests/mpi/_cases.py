"""Data shared by the MPI workers (run under mpiexec) and tests/test_distributed.py.

Every rank builds the same whole batch from the same seed and keeps its own rows, so the
pytest side can rebuild the whole batch and run the single-process BatchNorm on it.
"""
import numpy as np

# name -> options of the layer and the shape of one sample (the batch axis is axis 0).
CONFIGS = {
    "nchw_f64": dict(sample=(3, 4, 5), axis=1, dtype="float64", activation=None,
                     momentum=0.1, affine=True),
    "nhwc_f64_relu_cumulative": dict(sample=(4, 5, 3), axis=-1, dtype="float64",
                                     activation="relu", momentum=None, affine=True),
    "nc_f64_no_affine": dict(sample=(6,), axis=1, dtype="float64", activation=None,
                             momentum=0.3, affine=False),
    "nchw_f32": dict(sample=(3, 4, 5), axis=1, dtype="float32", activation=None,
                     momentum=0.1, affine=True),
    "nhwc_f32_relu": dict(sample=(4, 5, 3), axis=-1, dtype="float32", activation="relu",
                          momentum=0.1, affine=True),
    # float16 input, float32 parameters (mixed precision as in PyTorch)
    "nchw_f16": dict(sample=(3, 4, 5), axis=1, dtype="float32", xdtype="float16",
                     activation=None, momentum=0.1, affine=True),
    # batch statistics in eval mode too: eval forwards and backwards are collective
    "nc_f64_no_running_stats": dict(sample=(5,), axis=1, dtype="float64", activation=None,
                                    momentum=0.1, affine=True, track=False),
}

# Rows held by each rank at each training step: uneven, with ranks that hold none.
SPLITS = {
    1: [[13], [13], [13]],
    2: [[3, 10], [13, 0], [0, 13], [1, 12]],
    3: [[5, 0, 8], [1, 1, 11], [0, 13, 0], [4, 4, 5]],
}
EVAL_SPLIT = {1: [9], 2: [0, 9], 3: [2, 0, 7]}


def layer_options(cfg):
    c = CONFIGS[cfg]
    return dict(axis=c["axis"], dtype=np.dtype(c["dtype"]), activation=c["activation"],
                momentum=c["momentum"], affine=c["affine"],
                track_running_stats=c.get("track", True))


def input_dtype(cfg):
    c = CONFIGS[cfg]
    return np.dtype(c.get("xdtype", c["dtype"]))


def num_features(cfg):
    c = CONFIGS[cfg]
    # axis counts the batch axis, which sample leaves out
    return c["sample"][c["axis"] - 1] if c["axis"] > 0 else c["sample"][c["axis"]]


def parameters(cfg):
    """Non-trivial weight and bias (None without affine), the same on every rank."""
    if not CONFIGS[cfg]["affine"]:
        return None, None
    C = num_features(cfg)
    rng = np.random.default_rng(7)
    dt = np.dtype(CONFIGS[cfg]["dtype"])
    return (rng.uniform(0.5, 2.0, C).astype(dt), rng.standard_normal(C).astype(dt))


def batch(cfg, step, n):
    """The whole batch (x, dy) of a step: n samples, offset mean so centring matters."""
    c = CONFIGS[cfg]
    dt = input_dtype(cfg)
    rng = np.random.default_rng(1000 + step)
    shape = (n,) + c["sample"]
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    return x, dy


def rows(split, rank):
    """The slice of the whole batch held by ``rank``."""
    start = sum(split[:rank])
    return slice(start, start + split[rank])
