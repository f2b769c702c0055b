"""Data-parallel training with fastbn's SyncBatchNorm: every MPI rank holds a slice of each batch.

Run (from a source checkout or with fastbn installed with its ``mpi`` extra)::

    mpiexec -n 2 python -m mpi4py examples/ddp_train.py
    mpiexec -n 3 python -m mpi4py examples/ddp_train.py --epochs 3 --check

(``python -m mpi4py`` makes an uncaught exception on one rank abort every rank.)

The model is a two-layer perceptron on scikit-learn's digits (8x8 images, 10 classes; a
synthetic stand-in when scikit-learn is missing): Linear(64, 128) -> BatchNorm(128) + ReLU ->
Linear(128, 10), built with plain ``fastbn.BatchNorm`` and then converted with
``convert_sync_batchnorm``. Each global batch of 64 rows is split across the ranks (unevenly
when 64 is not a multiple of their number). The loss is the mean over the whole batch, so:

* the Linear gradients are sums over a rank's rows: an ``Allreduce`` (sum) gives the whole
  batch's;
* SyncBatchNorm's ``grad_weight``/``grad_bias`` already are the whole batch's (the same on
  every rank): they need no communication.

Rank 0 evaluates the test set alone between epochs (eval mode does not communicate). With
``--check``, rank 0 then repeats the training in one process on the whole batches with plain
BatchNorm and prints how far the parameters are from the data-parallel ones.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import fastbn
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import fastbn

from mpi4py import MPI

from fastbn.distributed import SyncBatchNorm, convert_sync_batchnorm


class Linear:
    """y = x @ weight.T + bias; backward accumulates into grad_weight/grad_bias."""

    def __init__(self, n_in, n_out, rng):
        self.weight = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
        self.bias = np.zeros(n_out)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)

    def __call__(self, x):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grad_weight += dy.T @ self._x
        self.grad_bias += dy.sum(axis=0)
        return dy @ self.weight


class MLP:
    """A "model" for convert_sync_batchnorm: an object whose attributes hold the layers."""

    def __init__(self, n_in, hidden, n_out, seed):
        rng = np.random.default_rng(seed)
        self.fc1 = Linear(n_in, hidden, rng)
        self.bn1 = fastbn.BatchNorm(hidden, activation="relu", dtype=np.float64)
        self.fc2 = Linear(hidden, n_out, rng)

    def __call__(self, x):
        return self.fc2(self.bn1(self.fc1(x)))

    def backward(self, dlogits):
        self.fc1.backward(self.bn1.backward(self.fc2.backward(dlogits)))

    def linear_layers(self):
        return (self.fc1, self.fc2)

    def parameters(self):
        """(parameter, gradient) pairs, updated in place by the optimizer."""
        pairs = []
        for lin in self.linear_layers():
            pairs += [(lin.weight, lin.grad_weight), (lin.bias, lin.grad_bias)]
        # the layer's module protocol: its parameters and, beside them, their gradients
        pairs += [(p, g) for p, (_name, g) in zip(self.bn1.parameters(), self.bn1.named_grads())]
        return pairs

    def zero_grad(self):
        for lin in self.linear_layers():
            lin.grad_weight[...] = 0
            lin.grad_bias[...] = 0
        self.bn1.zero_grad(set_to_none=False)

    def train(self, mode=True):
        self.bn1.train(mode)


def load_data(seed=0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # a synthetic stand-in: 10 Gaussian clusters in 64 dimensions
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((10, 64)) * 2
        y = rng.integers(0, 10, 1797)
        X = centres[y] + rng.standard_normal((1797, 64))
    else:
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
    perm = np.random.default_rng(seed).permutation(len(X))
    X, y = X[perm], y[perm]
    n_test = len(X) // 5
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def softmax_xent(logits, labels, n_total):
    """Summed cross-entropy of these rows and its gradient for the mean over n_total rows."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels]).sum()
    p[np.arange(len(labels)), labels] -= 1.0
    return loss, p / n_total


def train(model, comm, X, y, *, epochs, batch, lr, seed, evaluate=None):
    rank, k = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(seed)  # the same on every rank: the same batches everywhere
    velocity = [np.zeros_like(p) for p, _ in model.parameters()]
    for epoch in range(epochs):
        model.train()
        perm = rng.permutation(len(X))
        loss_sum = 0.0
        for start in range(0, len(X), batch):
            idx = perm[start:start + batch]
            if len(idx) < 2:
                continue  # batch norm needs two values per feature
            mine = np.array_split(idx, k)[rank]  # this rank's slice (possibly uneven)
            model.zero_grad()
            loss, dlogits = softmax_xent(model(X[mine]), y[mine], len(idx))
            model.backward(dlogits)
            for lin in model.linear_layers():  # sums over rows: add up the ranks' parts
                comm.Allreduce(MPI.IN_PLACE, lin.grad_weight, op=MPI.SUM)
                comm.Allreduce(MPI.IN_PLACE, lin.grad_bias, op=MPI.SUM)
            for (p, g), v in zip(model.parameters(), velocity):
                v *= 0.9
                v += g
                p -= lr * v
            loss_sum += loss
        loss_mean = comm.allreduce(loss_sum, op=MPI.SUM) / len(X)
        if evaluate is not None:
            evaluate(epoch, loss_mean)
    return model


def accuracy(model, X, y):
    model.train(False)
    acc = float(np.mean(np.argmax(model(X), axis=1) == y))
    model.train(True)
    return acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="compare with a single-process run on the whole batches")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, k = comm.Get_rank(), comm.Get_size()
    X, y, X_test, y_test = load_data()
    model = convert_sync_batchnorm(MLP(64, 128, 10, seed=args.seed), comm)
    assert isinstance(model.bn1, SyncBatchNorm)

    def report(epoch, loss):
        if rank == 0:  # rank 0 evaluates alone: eval mode does not communicate
            print(f"epoch {epoch + 1}: train loss {loss:.4f}, "
                  f"test accuracy {accuracy(model, X_test, y_test):.3f}", flush=True)

    if rank == 0:
        print(f"{k} rank(s), {len(X)} training rows, global batch {args.batch} "
              f"(about {args.batch // k} rows per rank)", flush=True)
    t0 = time.perf_counter()
    train(model, comm, X, y, epochs=args.epochs, batch=args.batch, lr=args.lr,
          seed=args.seed, evaluate=report)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        print(f"trained in {elapsed:.2f} s", flush=True)

    if args.check and rank == 0:
        single = train(MLP(64, 128, 10, seed=args.seed), MPI.COMM_SELF, X, y,
                       epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed)
        # Relative to the largest value of each kind: fc1's bias is ~1e-16 (batch norm right
        # after it cancels its gradient), so an elementwise relative error would mean nothing.
        pairs = [(p, q) for (p, _), (q, _) in zip(model.parameters(), single.parameters())]
        pairs += [(getattr(model.bn1, n), getattr(single.bn1, n))
                  for n in ("running_mean", "running_var")]
        scale = max(float(np.max(np.abs(q))) for _, q in pairs)
        worst = max(float(np.max(np.abs(p - q))) for p, q in pairs) / scale
        print(f"check: data-parallel vs one process on the whole batches: max relative "
              f"parameter difference {worst:.1e}", flush=True)
    comm.Barrier()


if __name__ == "__main__":
    main()
