"""The rows the benchmark times: the shape suite, ResNet-50's batch-norm layers, selection.

A row is one array shape in one layout (nc, nchw, or nhwc: the (N, H, W, C) array fastbn
receives with axis=-1) and dtype; its tags (layout, f32/f64, tiny/large/small, the network)
are the groups ``--subset`` picks, its name what ``--rows`` matches. The CPU and the GPU
benchmark run the same rows.
"""
import math

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1
SEED = 1234
MB = 1e6                      # decimal: "rows of >= 1 MB" in the issue
FLOOR_TARGET = 0.75           # share of the floor every row of >= 1 MB should reach
FLOOR_MIN_BYTES = 1 * MB
SCALING_MIN_BYTES = 16 * MB   # rows on which 2 threads should be >= 1.6x faster than 1
SCALING_TARGET = 1.6
TINY_BYTES = 64 * 1024        # rows where the per-call cost of the Python layer dominates

# Traffic of each op in copies of x (a copy reads |x| and writes |x| bytes): training forward
# 1.5 (x read twice, y written), inference 1, backward 2.5 (x and dy read twice, dx written),
# the ReLU variants as their base op (the fused backward also reads y: a conservative floor).
OPS = {
    "fwd-train": (1.5, "training forward: batch statistics, normalise, running-stat update"),
    "fwd-eval": (1.0, "inference forward with running statistics"),
    "bwd-train": (2.5, "training backward: dx, dweight, dbias"),
    "fwd-relu": (1.5, "training forward with fused ReLU"),
    "bwd-relu": (2.5, "training backward through ReLU (y read as the mask)"),
}


class Row:
    """One array shape of the suite: layout nc/nchw/nhwc, the shape fastbn receives, dtype."""

    __slots__ = ("layout", "shape", "dtype", "tags")

    def __init__(self, layout, shape, dtype="float32", tiny=False):
        self.layout = layout
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        tags = {layout, {"float32": "f32", "float64": "f64"}[self.dtype.name]}
        tags.add("tiny" if tiny else ("large" if self.nbytes >= FLOOR_MIN_BYTES else "small"))
        self.tags = frozenset(tags)

    @property
    def axis(self):
        # Channels-last rows are given as the (N, H, W, C) array with axis=-1.
        return -1 if self.layout == "nhwc" else 1

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def name(self):
        short = {"float32": "f32", "float64": "f64"}[self.dtype.name]
        return f"{self.layout}-{'x'.join(map(str, self.shape))}-{short}"


def _nhwc(n, c, h, w):
    return (n, h, w, c)


_NCHW = [(32, 64, 56, 56), (128, 256, 14, 14), (8, 3, 224, 224), (256, 64, 32, 32),
         (16, 512, 7, 7)]

SUITE = (
    [Row("nc", s) for s in [(256, 1024), (4096, 1024), (65536, 64), (64, 4096)]]
    + [Row("nchw", s) for s in _NCHW]
    + [Row("nhwc", _nhwc(*s)) for s in _NCHW]
    + [Row("nchw", (32, 64, 56, 56), "float64"), Row("nc", (4096, 1024), "float64")]
    + [Row("nc", (32, 16), tiny=True), Row("nchw", (8, 16, 4, 4), tiny=True)]
)
SUBSETS = ("all", "nc", "nchw", "nhwc", "f32", "f64", "tiny", "large", "small")


# --------------------------------------------------------------------------- ResNet-50 suite

RESNET50_BATCH = 16
RESNET50_OPS = ("fwd-train", "bwd-train", "fwd-eval")  # training step = the first two


def resnet50_layers(batch=RESNET50_BATCH):
    """The 53 batch-norm layers of torchvision's ``resnet50`` on 224x224 inputs, forward order.

    [(module name, (N, C, H, W))], written out from the architecture (torchvision is not
    needed): the stem's bn1 at 112x112 (after the stride-2 7x7 conv; the max pool then halves
    to 56x56), then layer1..layer4 of [3, 4, 6, 3] Bottleneck blocks of widths 64/128/256/512,
    expansion 4. ResNet v1.5, as torchvision: the stride 2 of the first block of layers 2-4 is
    on conv2 (the 3x3), so bn1 sees the block's input resolution and bn2, bn3 and the
    downsample's bn (``downsample.1``, first block of each layer) the output resolution.
    """
    layers = [("bn1", (batch, 64, 112, 112))]
    res = 56
    for li, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for bi in range(blocks):
            out = res // 2 if (bi == 0 and li > 1) else res
            name = f"layer{li}.{bi}."
            layers.append((name + "bn1", (batch, width, res, res)))
            layers.append((name + "bn2", (batch, width, out, out)))
            layers.append((name + "bn3", (batch, 4 * width, out, out)))
            if bi == 0:
                layers.append((name + "downsample.1", (batch, 4 * width, out, out)))
            res = out
    return layers


class NetRow(Row):
    """A distinct layer shape of a network: timed once, counted ``count`` times in its sums."""

    __slots__ = ("net", "nchw", "count", "layers")

    def __init__(self, net, layout, nchw, layers, dtype="float32"):
        super().__init__(layout, _nhwc(*nchw) if layout == "nhwc" else nchw, dtype)
        self.tags = self.tags | {net}
        self.net = net
        self.nchw = tuple(nchw)
        self.layers = tuple(layers)
        self.count = len(self.layers)


def _net_rows(net, layers):
    by_shape = {}
    for name, shape in layers:  # first appearance keeps the network's order
        by_shape.setdefault(tuple(shape), []).append(name)
    return tuple(NetRow(net, layout, shape, names)
                 for layout in ("nchw", "nhwc") for shape, names in by_shape.items())


RESNET50_LAYERS = tuple(resnet50_layers())
RESNET50 = _net_rows("resnet50", RESNET50_LAYERS)


# --------------------------------------------------------------------------- variants suite
# Each variant of fastbn.functional / fastbn.variants timed beside plain batch norm's same op
# (training forward or backward) on the same arrays, in the same interleaved rounds.

VARIANTS = (Row("nchw", (32, 64, 56, 56)), Row("nhwc", _nhwc(32, 64, 56, 56)),
            Row("nchw", (16, 512, 7, 7)))
GHOST_BATCH = 8  # virtual_batch_size of the ghost rows
# op: (the plain op it is compared with, what it times)
VARIANT_OPS = {
    "plain-fwd": (None, "batch_norm_forward (training, batch statistics)"),
    "plain-bwd": (None, "batch_norm_backward (training)"),
    "fixed-fwd": ("plain-fwd", "fixed_batch_norm (given mean/var)"),
    "fixed-bwd": ("plain-bwd", "fixed_batch_norm_backward (dx, dmean, dvar, dweight, dbias)"),
    "renorm-fwd": ("plain-fwd", "batch_renorm_forward (rmax 3, rmin 1/3, dmax 5)"),
    "renorm-bwd": ("plain-bwd", "batch_renorm_backward"),
    "ghost-fwd": ("plain-fwd", f"ghost_batch_norm_forward (virtual_batch_size {GHOST_BATCH})"),
    "ghost-bwd": ("plain-bwd", f"ghost_batch_norm_backward (virtual_batch_size {GHOST_BATCH})"),
    "masked-fwd": ("plain-fwd", "batch_norm_forward(mask=...) (random boolean mask, p=0.8)"),
    "masked-bwd": ("plain-bwd", "batch_norm_backward(mask=...)"),
    "double-bwd": ("plain-bwd", "batch_norm_double_backward (ddx, ddweight, ddbias given)"),
    "axes-fwd": ("plain-fwd", "batch_norm_forward over two feature axes (nchw (1, 2), "
                              "nhwc (2, 3))"),
    "axes-bwd": ("plain-bwd", "batch_norm_backward over the same two feature axes"),
}

SUITES = {"shapes": SUITE, "resnet50": RESNET50, "variants": VARIANTS}


def select_rows(subset="all", patterns=None, suite="shapes"):
    """Rows of ``suite`` in the tag group ``subset`` whose name contains one of ``patterns``."""
    rows = [r for r in SUITES[suite] if subset == "all" or subset in r.tags]
    if patterns:
        rows = [r for r in rows if any(p in r.name for p in patterns)]
    return rows

