"""A typed use of fastbn's public API: `mypy --strict` checks it in CI (.ci/run).

The annotations below are what a user's type checker infers from fastbn's own (py.typed):
NumPy arrays out, ints and float64 statistics where the API promises them.
"""
import numpy as np
import numpy.typing as npt

import fastbn
from fastbn import functional as F


def train_step(bn: fastbn.BatchNorm, x: npt.NDArray[np.float32], lr: float) -> float:
    y: npt.NDArray[np.float32] = bn(x)
    dy = (2.0 * (y - 1.0) / y.size).astype(np.float32)
    bn.backward(dy)
    for (_name, p), (_n, g) in zip(bn.named_parameters(), bn.named_grads()):
        if g is not None:
            p -= lr * g
    bn.zero_grad()
    return float(np.mean((y - 1.0) ** 2))


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 4, 4), dtype=np.float32)
    bn = fastbn.BatchNorm(8)
    losses = [train_step(bn, x, 0.5) for _ in range(3)]
    y, mean, invstd = fastbn.batch_norm_forward(x)
    n, mean2, m2 = F.channel_moments(x)
    dx, dw, db = fastbn.batch_norm_backward(np.ones_like(y), x, mean, invstd)
    z = fastbn.batch_norm(x, bn.running_mean, bn.running_var)
    count: int = n
    stats: npt.NDArray[np.float64] = mean2 + m2 / count
    state = bn.state_dict()
    fastbn.BatchNorm(8).load_state_dict(state)
    fastbn.set_num_threads(1)
    threads: int = fastbn.get_num_threads()
    print(losses, z.shape, dx.shape, dw.shape, db.shape, stats.shape, threads)


if __name__ == "__main__":
    main()
