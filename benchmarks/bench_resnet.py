"""asv benchmarks of a real network: every batch-norm layer of torchvision's ResNet-50.

Batch 16 on 224x224 inputs: 53 batch-norm layers of 12 distinct shapes (the list is written
out below from the architecture; torchvision is not needed). One call of a benchmark is the
whole network's batch norm for one step, each of the 53 layers called in turn:

- ``ResNet50TrainingStep``: the training forward of every layer in network order (batch
  statistics, running-statistic update), then the backward of every layer in reverse order
  (dx, dweight, dbias), as a training step runs them;
- ``ResNet50Inference``: the inference forward of every layer in network order.

Parameters: ``impl`` (fastbn, torch), ``layout`` (channels_first = NCHW; channels_last =
fastbn's (N, H, W, C) array with axis=-1, the same memory as PyTorch's channels_last tensor),
``n_threads`` (1, 2). The layers of one shape share one set of inputs (made in ``setup`` from
a fixed seed, pages touched), so the inputs take ~216 MB (inference) or ~432 MB (training)
instead of the network's ~0.7 / 1.4 GB; every call allocates its outputs, as a user's does.
The backward uses the batch statistics computed in ``setup``, so it times the backward only.
``python -m fastbn bench --suite resnet50`` gives the per-layer breakdown of the same sums.

The per-op adapters are those of bench_batchnorm.py; like it, this file uses fastbn's public
API only, so that asv can run it against older commits.
"""
import numpy as np

import fastbn

from .bench_batchnorm import EPS, _Arrays, _fastbn, _pytorch, _torch

BATCH = 16


def resnet50_layers(batch=BATCH):
    """[(module name, (N, C, H, W))] of ResNet-50's batch norms (v1.5, as torchvision).

    The stem's bn1 at 112x112; then layer1..layer4 of [3, 4, 6, 3] Bottleneck blocks of widths
    64/128/256/512, expansion 4, from 56x56; the stride 2 of the first block of layers 2-4 is
    on conv2, so bn1 sees the block's input resolution and bn2, bn3 and the first block's
    downsample bn the output resolution. (fastbn.benchmark.suites has the same list; a test
    compares.)
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


LAYERS = resnet50_layers()


class _ResNet50:
    params = (["fastbn", "torch"], ["channels_first", "channels_last"], [1, 2])
    param_names = ["impl", "layout", "n_threads"]
    timeout = 600
    training = None  # set by each class

    def setup(self, impl, layout, n_threads):
        fastbn.set_num_threads(n_threads)
        if impl == "torch":
            _torch().set_num_threads(n_threads)
        make = {"fastbn": _fastbn, "torch": _pytorch}[impl]
        per_shape = {}
        for shape in dict.fromkeys(s for _, s in LAYERS):
            a = _Arrays(np.dtype("float32"), layout, shape)
            if self.training:
                _, a.mean, a.invstd = fastbn.batch_norm_forward(a.x, a.w, a.b, axis=a.axis,
                                                                eps=EPS)
                a.y = None
                per_shape[shape] = (make("fwd-train", a, False), make("bwd-train", a, False))
            else:
                per_shape[shape] = (make("fwd-eval", a, False),)
        # One call per layer, in the order a step runs them.
        fwd = [per_shape[s][0] for _, s in LAYERS]
        bwd = [per_shape[s][1] for _, s in reversed(LAYERS)] if self.training else []
        self.calls = fwd + bwd
        self.step()  # first step: warms the allocator, caches and thread pool

    def teardown(self, *params):
        fastbn.set_num_threads(None)

    def step(self):
        for f in self.calls:
            f()


class ResNet50TrainingStep(_ResNet50):
    """Training forward of the 53 layers in order, then their backward in reverse order."""
    training = True

    def time_training_step(self, *params):
        self.step()


class ResNet50Inference(_ResNet50):
    """Inference forward (running statistics) of the 53 layers in order."""
    training = False

    def time_inference(self, *params):
        self.step()
