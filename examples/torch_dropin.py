"""Time a small convolutional network's full training step with torch's batch norm and with
fastbn's drop-ins (``fastbn.torch.convert``), in one run.

    PYTHONPATH=src python examples/torch_dropin.py [--batch 32] [--size 32] [--steps 30]
                                                   [--channels-last] [--threads N]

A step is forward + backward of the whole network + an SGD step. The two models start from
the same weights and see the same batches; their steps alternate (so drifting machine load
hits both alike) and the median step time of each is printed, with the ratio.
"""
import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fastbn
import fastbn.torch as ft


def make_net(width=32, classes=10):
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, width, 1), *block(width, width, 1),
        *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1),
        *block(2 * width, 4 * width, 2), *block(4 * width, 4 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch and fastbn (default: their own defaults)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        fastbn.set_num_threads(a.threads)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    ref = make_net(a.width).to(memory_format=fmt)
    fast = ft.convert(copy.deepcopy(ref))
    models = {"torch": ref, "fastbn": fast}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(a.batch, 3, a.size, a.size, generator=g).to(memory_format=fmt),
                torch.randint(0, 10, (a.batch,), generator=g)) for _ in range(4)]

    def step(name, x, t):
        opts[name].zero_grad(set_to_none=True)
        loss = loss_fn(models[name](x), t)
        loss.backward()
        opts[name].step()
        return loss.item()

    times = {k: [] for k in models}
    losses = {k: [] for k in models}
    for i in range(a.warmup + a.steps):
        x, t = batches[i % len(batches)]
        for name in models:
            t0 = time.perf_counter()
            loss = step(name, x, t)
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times[name].append(dt)
                losses[name].append(loss)

    med = {k: statistics.median(v) for k, v in times.items()}
    drift = max(abs(u - v) for u, v in zip(losses["torch"], losses["fastbn"]))
    print(f"torch {torch.__version__}, fastbn {fastbn.__version__}, "
          f"torch threads {torch.get_num_threads()}, fastbn threads {fastbn.get_num_threads()}")
    print(f"network: 6 x (conv3x3-BN-ReLU), width {a.width}, input ({a.batch}, 3, {a.size}, "
          f"{a.size}) {'channels_last' if a.channels_last else 'NCHW'}, "
          f"{a.steps} timed steps after {a.warmup} warm-up")
    for k in models:
        print(f"  {k:>6}: median {1e3 * med[k]:8.2f} ms/step  "
              f"(min {1e3 * min(times[k]):.2f}, max {1e3 * max(times[k]):.2f})")
    print(f"  speed-up torch/fastbn: {med['torch'] / med['fastbn']:.3f}x "
          f"(max loss difference over the run {drift:.2e})")


if __name__ == "__main__":
    main()
