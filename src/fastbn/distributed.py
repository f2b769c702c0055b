"""Synchronised batch norm across MPI processes (mpi4py).

In data-parallel training each process (rank) holds a slice of the batch. ``SyncBatchNorm``
normalises every slice with the statistics of the whole batch, so that a run on k ranks equals a
single-process ``BatchNorm`` run on the concatenated batch: outputs, dx, running statistics and
``grad_weight``/``grad_bias`` (the whole batch's, the same on every rank).

How a training step communicates (two collectives per forward, two per backward):

1. A small fixed-size header (layer number, call number, operation, C, dtype, ndim, axis,
   options) is allgathered first. Every rank compares all headers, so ranks that disagree (a
   different C or dtype, a rank in backward while another is in forward, a rank whose own input
   was refused) all raise the same ``SyncError`` instead of hanging or mixing data.
2. The per-rank payload is allgathered (a plain blocking collective: the headers showed that
   every rank is in this same call): (count, mean, M2) per channel in the forward,
   (sum g, sum g * (x - mean)) in the backward, all float64. Every rank then merges the k
   contributions itself in rank order (Chan et al. for the moments, a plain left-to-right sum
   for the backward), so the result is deterministic and bitwise identical on every rank; MPI's
   own reduction order (which may depend on the algorithm it picks) never enters.

Eval mode (with running statistics) does not communicate, so ranks may evaluate alone (the
usual "evaluate on rank 0" pattern works). A rank that never arrives at a collective cannot be
told apart from a slow one, so every wait has a ``timeout`` (seconds): a rank that times out
raises ``SyncTimeoutError`` and posts a notice that makes every other rank raise at its next
SyncBatchNorm call (eval-mode forwards included). After a timeout the communicator is left with
an unfinished collective and cannot be used again; end the job (run scripts as
``mpiexec -n 4 python -m mpi4py train.py`` so that an uncaught exception on one rank aborts all).

The collectives run on a private duplicate of the communicator (created at the first training
call, collectively), so they never match the program's own collectives on ``comm``.

mpi4py is imported on first use; ``import fastbn`` never needs it.
"""
import copy
import itertools
import os
import time
import types

import numpy as np

from .functional import (
    backward_dx,
    backward_sums,
    channel_moments,
    invstd_from_var,
    normalize,
)
from . import _validation
from .layer import BatchNorm

__all__ = [
    "SyncBatchNorm",
    "SyncError",
    "SyncTimeoutError",
    "convert_sync_batchnorm",
    "merge_moments",
]

# Seconds a rank waits for the others: PyTorch's default for NCCL process groups (its gloo
# default is 30 min). Single-rank work between two training steps (evaluating on rank 0 alone,
# saving a checkpoint) must fit in it.
DEFAULT_TIMEOUT = 600.0


class SyncError(RuntimeError):
    """Ranks disagree, or another rank failed: raised on every rank of the communicator."""


class SyncTimeoutError(SyncError, TimeoutError):
    """A collective did not complete within the timeout; the communicator is unusable after it."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "fastbn.distributed needs mpi4py and an MPI library: install the `mpi` extra "
            "(pip install 'fastbn[mpi]', which brings mpi4py and the mpich wheel), then run "
            f"the script with `mpiexec -n 4 python -m mpi4py train.py` ({exc})"
        ) from exc
    return MPI


# --------------------------------------------------------------------------- exact merges

def merge_moments(counts, means, m2s):
    """Merge per-part (count, mean, M2) into those of the union, in the order given.

    Chan, Golub & LeVeque's pairwise update, applied left to right: exact in exact arithmetic,
    stable in floating point (no E[x^2] - E[x]^2), and deterministic because the order is fixed.
    Parts with count 0 are skipped. Returns (count, mean, M2) with mean and M2 float64 (C,).
    """
    n = 0
    mean = m2 = None
    for nb, mb, m2b in zip(counts, means, m2s):
        nb = int(nb)
        if nb == 0:
            continue
        mb = np.asarray(mb, dtype=np.float64)
        m2b = np.asarray(m2b, dtype=np.float64)
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta * delta * (n * nb / total)
        n = total
    if mean is None:
        C = len(np.asarray(means[0])) if len(means) else 0
        mean, m2 = np.zeros(C), np.zeros(C)
    return n, mean, m2


def _ordered_sum(rows):
    """Sum of the rows of a (k, C) array, left to right (rank order) whatever numpy would do."""
    total = rows[0].copy()
    for r in rows[1:]:
        total += r
    return total


# --------------------------------------------------------------------------- header

_MAGIC = 0x4642_4E31  # "FBN1", the protocol version: ranks running other fastbn versions differ
_OP_FORWARD, _OP_BACKWARD, _OP_FAILED = 1, 2, 3
_OP_NAMES = {_OP_FORWARD: "forward (training)", _OP_BACKWARD: "backward (training)",
             _OP_FAILED: "a call that failed on that rank"}
_MSG_WORDS = 40  # room for 320 bytes of a failing rank's error message
# Fields compared across ranks, in this order; the first one that differs is reported.
_FIELDS = ("magic", "op", "layer", "call", "num_features", "dtype", "ndim", "axis", "flags",
           "eps", "momentum")
_FIELD_TEXT = {
    "magic": "the protocol (not a fastbn SyncBatchNorm collective)",
    "op": "the operation",
    "layer": "which SyncBatchNorm layer is called (layers are numbered in creation order; "
             "create them in the same order on every rank)",
    "call": "the number of synchronised calls made so far on this layer (a rank skipped or "
            "repeated a forward/backward)",
    "num_features": "the number of features (C)",
    "dtype": "the input dtype",
    "ndim": "the number of dimensions of x",
    "axis": "the feature axis",
    "flags": "the options (affine, track_running_stats, activation, training)",
    "eps": "eps",
    "momentum": "momentum",
}
_HEADER_LEN = len(_FIELDS) + _MSG_WORDS
_DTYPE_CODES = {np.dtype(np.float16): 16, np.dtype(np.float32): 32, np.dtype(np.float64): 64}


def _dtype_code(dtype):
    # bfloat16 (ml_dtypes) is a 'V' dtype NumPy cannot key on without ml_dtypes: by name
    if dtype is not None and _validation.is_bfloat16(np.dtype(dtype)):
        return 116
    return _DTYPE_CODES.get(dtype, 0)


def _float_bits(v):
    # Exact comparison of float options: their bit patterns (None -> NaN's pattern).
    return int(np.float64(np.nan if v is None else v).view(np.int64))


def _header(op, layer, call, *, C=0, dtype=None, ndim=0, axis=0, flags=0, eps=0.0,
            momentum=0.0, message=""):
    h = np.zeros(_HEADER_LEN, dtype=np.int64)
    h[:len(_FIELDS)] = [_MAGIC, op, layer, call, C, _dtype_code(dtype), ndim, axis,
                        flags, _float_bits(eps), _float_bits(momentum)]
    raw = message.encode("utf-8", "replace")[: 8 * _MSG_WORDS]
    h[len(_FIELDS):].view(np.uint8)[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return h


def _header_message(h):
    raw = h[len(_FIELDS):].tobytes().rstrip(b"\0")
    return raw.decode("utf-8", "replace")


def _show(field, v):
    v = int(v)
    if field == "op":
        return _OP_NAMES.get(v, str(v))
    if field == "dtype":
        return {16: "float16", 32: "float32", 64: "float64", 116: "bfloat16"}.get(v, str(v))
    if field in ("eps", "momentum"):
        f = float(np.int64(v).view(np.float64))
        return "None" if np.isnan(f) and field == "momentum" else repr(f)
    if field == "flags":
        return ", ".join(name for bit, name in _FLAG_NAMES if v & bit) or "none"
    return str(v)


_FLAG_AFFINE, _FLAG_TRACK, _FLAG_RELU, _FLAG_TRAINING = 1, 2, 4, 8
_FLAG_NAMES = ((_FLAG_AFFINE, "affine"), (_FLAG_TRACK, "track_running_stats"),
               (_FLAG_RELU, "relu"), (_FLAG_TRAINING, "training"))


def _check_headers(headers, what):
    """Raise SyncError (the same on every rank) unless all the gathered headers are equal.

    Called by the ranks whose own call succeeded: a rank whose call failed re-raises its own
    exception instead, and the others learn of it here, with its message.
    """
    if (headers == headers[0]).all() and headers[0, 1] != _OP_FAILED:
        return  # the common case, checked in one pass
    k = len(headers)
    failed = [r for r in range(k) if headers[r][1] == _OP_FAILED]
    if failed:
        r = failed[0]
        raise SyncError(
            f"{what}: rank {r} failed before communicating and raised: "
            f"{_header_message(headers[r])}"
            + (f" (ranks {failed} failed)" if len(failed) > 1 else "")
        )
    for i, field in enumerate(_FIELDS):
        col = headers[:, i]
        if np.all(col == col[0]):
            continue
        values = ", ".join(f"rank {r}: {_show(field, col[r])}" for r in range(k))
        raise SyncError(f"{what}: ranks disagree on {_FIELD_TEXT[field]}: {values}")


# --------------------------------------------------------------------------- communicator

_yield = getattr(os, "sched_yield", lambda: time.sleep(0))
_SPIN_S = 0.01       # seconds of busy polling before a waiting rank starts to sleep
_GROUPS: list = []    # one _Group per user communicator, looked up by comparison
_ABANDONED: list = []  # requests and buffers of timed-out collectives: MPI may still write them
_LAYER_IDS = itertools.count()


class _Group:
    """The private communicator behind one user communicator, and its failure state."""

    def __init__(self, MPI, comm):
        self.MPI = MPI
        self.user = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.comm = None  # private duplicate, made at the first synchronised call
        self.broken = None
        tag_ub = comm.Get_attr(MPI.TAG_UB) or 32767
        # Notices travel on the user's communicator under one reserved tag (probed for by that
        # tag only, so the program's own messages are never touched).
        self.notice_tag = int(tag_ub) - 0x0FB0
        self._notice_sends = []

    @classmethod
    def of(cls, comm):
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(
                f"comm: expected an mpi4py intracommunicator (such as MPI.COMM_WORLD), got "
                f"{type(comm).__module__}.{type(comm).__name__}"
            )
        for g in _GROUPS:
            if g.user == comm:
                return g
        g = cls(MPI, comm)
        _GROUPS.append(g)
        return g

    # -- failure handling

    def check_notices(self):
        """Raise if another rank gave up (a local probe: sends nothing, never waits)."""
        if self.broken is not None:
            raise SyncError(f"fastbn SyncBatchNorm: the communicator is unusable: {self.broken}")
        if self.size == 1:
            return
        MPI = self.MPI
        status = MPI.Status()
        if self.user.Iprobe(source=MPI.ANY_SOURCE, tag=self.notice_tag, status=status):
            src = status.Get_source()
            msg = self.user.recv(source=src, tag=self.notice_tag)
            self.broken = f"rank {src} gave up: {msg}"
            raise SyncError(f"fastbn SyncBatchNorm: rank {src} gave up: {msg}")

    def _give_up(self, req, buffers, what, timeout):
        _ABANDONED.append((req, buffers))
        msg = (
            f"{what}: rank {self.rank} waited {timeout:g} s for the other ranks of its "
            f"communicator ({self.size} ranks) to reach the same call. A rank is in eval mode "
            "while others train, skipped or repeated a layer, failed outside fastbn, or is "
            "still busy (raise the timeout for long single-rank work between steps)"
        )
        self.broken = msg
        for r in range(self.size):
            if r != self.rank:
                self._notice_sends.append(self.user.isend(msg, dest=r, tag=self.notice_tag))
        raise SyncTimeoutError(msg)

    # -- collectives

    def _wait(self, req, buffers, what, timeout):
        # A nonblocking collective advances only while its ranks call into MPI, so poll
        # continuously, yielding the core between polls (k ranks may share fewer cores); look
        # for notices and the deadline about every millisecond; after _SPIN_S back off to
        # sleeps so that a rank waiting for a slow one stops competing with it for a core.
        start = last = time.monotonic()
        pause = 0.0
        while not req.Test():
            if pause:
                time.sleep(pause)
            else:
                _yield()
            now = time.monotonic()
            if now - last < 1e-3:
                continue
            last = now
            try:
                self.check_notices()
            except SyncError:
                _ABANDONED.append((req, buffers))
                raise
            if timeout is not None and now - start > timeout:
                self._give_up(req, buffers, what, timeout)
            if now - start > _SPIN_S:
                pause = min(1e-3, 2 * pause or 1e-5)

    def _private(self, what, timeout):
        if self.comm is None:
            self.check_notices()
            comm, req = self.user.Idup()
            self._wait(req, (comm,), what, timeout)
            self.comm = comm
        return self.comm

    def allgather(self, send, what, timeout, *, agreed=False):
        """Allgather a 1-D array of the same length on every rank; returns (size, n).

        ``agreed``: every rank is known to be in this same call (their headers matched just
        before), so MPI's blocking collective, which progresses without Python polling, cannot
        hang. Otherwise the wait is bounded by ``timeout``.
        """
        comm = self._private(what, timeout)
        self.check_notices()
        recv = np.empty((self.size, send.shape[0]), dtype=send.dtype)
        if agreed:
            comm.Allgather(send, recv)
            return recv
        req = comm.Iallgather(send, recv)
        self._wait(req, (send, recv), what, timeout)
        return recv


# --------------------------------------------------------------------------- the layer

def _compute_dtype(dtype):
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if _validation.is_half(dtype) else dtype


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose batch statistics are those of the whole batch across MPI ranks.

    Parameters
    ----------
    num_features : int
        C, as in ``BatchNorm``; every option of ``BatchNorm`` (``axis``, ``eps``, ``momentum``,
        ``affine``, ``track_running_stats``, ``activation``, ``dtype``) is accepted and means
        the same.
    comm : mpi4py intracommunicator, optional
        The ranks that share the batch (default ``MPI.COMM_WORLD``). Constructing the layer
        does not communicate; the first synchronised call duplicates ``comm`` collectively.
    timeout : float or None
        Seconds a rank waits for the others at a synchronised call before raising
        ``SyncTimeoutError`` (None waits forever). Default 600.

    Every rank runs the same sequence of calls on each layer, with its own slice of the batch
    (any number of rows, zero included; the other dimensions may differ, C may not). Training
    forwards, and forwards with ``track_running_stats=False`` in either mode, are collective;
    so is ``backward`` after them. Eval-mode forwards with running statistics, and their
    backward, are local. After a synchronised forward every rank holds the same running
    statistics; after a synchronised backward the same ``grad_weight``/``grad_bias``: those of
    the whole batch, so no averaging across ranks is needed for them.

    Layers are numbered in creation order (per process) and the number is checked at every
    call, so create SyncBatchNorm layers in the same order on every rank.
    """

    def __init__(self, num_features, comm=None, *, timeout=DEFAULT_TIMEOUT, **options):
        super().__init__(num_features, **options)
        self._group = _Group.of(comm)
        self._comm = self._group.user
        self.timeout = timeout
        self._sync_id = next(_LAYER_IDS)
        self._calls = 0

    @property
    def comm(self):
        """The user communicator the layer synchronises over."""
        return self._comm

    @property
    def timeout(self):
        """Seconds to wait for the other ranks at a synchronised call (None: forever)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value):
        self._timeout = _validation.timeout(value)

    # ----------------------------------------------------------------- collectives

    def _what(self, op):
        return (f"SyncBatchNorm #{self._sync_id} {_OP_NAMES[op]} on rank {self._group.rank} "
                f"of {self._group.size}")

    def _flags(self, batch_training):
        f = 0
        f |= _FLAG_AFFINE if self._affine else 0
        f |= _FLAG_TRACK if self._track else 0
        f |= _FLAG_RELU if self._activation == "relu" else 0
        f |= _FLAG_TRAINING if batch_training else 0
        return f

    def _synchronise(self, op, local):
        """Run ``local()`` -> (header fields, payload), then agree and allgather payloads.

        ``local`` does this rank's checks and work; if it raises, the other ranks are told
        (they raise SyncError) and this rank re-raises its own exception. Returns the (k, n)
        gathered payloads, identical on every rank.
        """
        what = self._what(op)
        group = self._group
        try:
            fields, payload = local()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            failed = _header(_OP_FAILED, self._sync_id, self._calls, message=msg)
            try:
                group.allgather(failed, what, self._timeout)
            finally:
                self._calls += 1
            raise
        header = _header(op, self._sync_id, self._calls, **fields)
        headers = group.allgather(header, what, self._timeout)
        self._calls += 1
        _check_headers(headers, what)
        return group.allgather(payload, what, self._timeout, agreed=True)

    def _fields(self, x, batch_training):
        return dict(C=self._num_features, dtype=x.dtype, ndim=x.ndim,
                    axis=self._axis % x.ndim, flags=self._flags(batch_training),
                    eps=self._eps, momentum=self._momentum)

    # ----------------------------------------------------------------- forward / backward

    def forward(self, x, *, training=None):
        """Normalise x with the whole batch's statistics (training) or the running ones (eval).

        Collective in training mode (and always with ``track_running_stats=False``): every
        rank of ``comm`` must call it, each with its own slice of the batch. The running
        statistics follow BatchNorm's policy, with the whole batch's statistics.
        """
        self._group.check_notices()
        return super().forward(x, training=training)

    __call__ = forward

    def _batch_forward(self, x, training):
        def local():
            nonlocal x
            x = self._check_input(x)  # the layer is on the CPU: refuses CuPy arrays
            n, mean, m2 = channel_moments(x, axis=self._axis)
            # Counts travel as float64: exact up to 2**53 values per channel.
            payload = np.concatenate([np.full(1, float(n)), mean, m2])
            return self._fields(x, training), payload

        gathered = self._synchronise(_OP_FORWARD, local)
        C = self._num_features
        counts = gathered[:, 0].astype(np.int64)
        count, mean, m2 = merge_moments(counts, gathered[:, 1:1 + C], gathered[:, 1 + C:])
        if count == 1:
            raise ValueError(
                f"x: expected more than 1 value per channel when training, got 1 "
                f"value(s) per channel in the whole batch across {self._group.size} ranks "
                f"(this rank's input shape {x.shape})"
            )
        var = m2 / count if count else np.zeros(C)
        invstd = invstd_from_var(var, self._eps)
        y = normalize(x, mean, invstd, self._weight, self._bias, axis=self._axis,
                      activation=self._activation)
        return x, y, mean, invstd, var, count

    def backward(self, dy):
        """dx for this rank's slice; grad_weight/grad_bias accumulate the whole batch's.

        Collective after a synchronised forward (every rank calls it with its own dy); local
        after an eval-mode forward with running statistics.
        """
        ctx = self._ctx
        self._group.check_notices()
        synced = ctx is not None and ctx.training  # batch statistics: a synchronised forward
        if not synced and (ctx is not None or not (self.training or not self._track)):
            return super().backward(dy)  # inference-mode gradient: local

        def local():
            if not synced:
                raise RuntimeError(
                    "SyncBatchNorm.backward: no forward to differentiate; call the layer on "
                    "an input first (pickling, deepcopy and .to() drop the cached forward)"
                )
            _n, s1, s2 = backward_sums(dy, ctx.x, ctx.mean, axis=ctx.axis,
                                       activation=ctx.activation, y=ctx.y)
            return self._fields(ctx.x, True), np.concatenate([s1, s2])

        gathered = self._synchronise(_OP_BACKWARD, local)
        C = self._num_features
        sum_dy = _ordered_sum(gathered[:, :C])
        sum_dy_xmu = _ordered_sum(gathered[:, C:])
        dx = backward_dx(dy, ctx.x, ctx.mean, ctx.invstd, sum_dy, sum_dy_xmu, ctx.count,
                         ctx.weight, axis=ctx.axis, training=True,
                         activation=ctx.activation, y=ctx.y)
        cdt = _compute_dtype(ctx.x.dtype)
        self._accumulate_grads((sum_dy_xmu * ctx.invstd).astype(cdt), sum_dy.astype(cdt))
        return dx

    # ----------------------------------------------------------------- device, copies

    def to(self, device):
        """SyncBatchNorm stays on the CPU: 'cpu' returns self, 'gpu' raises ValueError."""
        if isinstance(device, str) and device.lower() == "cpu":
            return self
        raise ValueError(
            f"device: SyncBatchNorm runs on NumPy arrays (CPU) only, got {device!r}"
        )

    def __getstate__(self):
        MPI = _mpi()
        if self._comm != MPI.COMM_WORLD:
            raise TypeError(
                "SyncBatchNorm: cannot pickle a layer bound to a communicator other than "
                "MPI.COMM_WORLD (communicators cannot be serialised); save state_dict() instead"
            )
        return self._plain_state()

    def _plain_state(self):
        state = super().__getstate__()
        state["_group"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group = _Group.of(self._comm)

    def __deepcopy__(self, memo):
        # A copy shares the communicator (communicators cannot be copied) and the layer
        # number, and starts without a cached forward like BatchNorm's copies.
        memo[id(self._comm)] = self._comm
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._plain_state(), memo))
        return new

    def __repr__(self):
        r = super().__repr__()
        return "Sync" + r[:-1] + f", comm of size {self._group.size})"


# --------------------------------------------------------------------------- conversion

def convert_sync_batchnorm(model, comm=None, *, timeout=DEFAULT_TIMEOUT):
    """Replace every ``BatchNorm`` reachable from ``model`` by an equivalent SyncBatchNorm.

    A *model* is a ``BatchNorm``, a list, tuple or dict of models, or any object whose instance
    attributes (``vars(obj)``) hold models: layers are found through lists, tuples, dicts and
    object attributes, recursively (cycles and shared layers are handled: a layer reached
    twice becomes one SyncBatchNorm). Lists, dicts and attributes are updated in place; tuples
    are rebuilt. Returns the converted model: the same object, or a new SyncBatchNorm (or
    tuple) when ``model`` itself is one.

    Each SyncBatchNorm takes the layer's options, training flag, ``num_batches_tracked`` and
    gradients, and *shares* its ``weight``, ``bias`` and running-statistics arrays (as
    PyTorch's ``convert_sync_batchnorm`` shares parameters), so an optimizer that holds them
    keeps working. Layers that already are SyncBatchNorm are left alone. Does not
    communicate; call it in the same way on every rank (layers are numbered in the order met).
    """
    group = _Group.of(comm)
    return _convert(model, group.user, timeout, {}, set())


def _convert(obj, comm, timeout, done, active):
    # done: id -> (object, its replacement); the object is kept so that its id stays unique.
    key = id(obj)
    if key in done:
        return done[key][1]
    if isinstance(obj, SyncBatchNorm):
        return obj
    if isinstance(obj, BatchNorm):
        done[key] = (obj, _sync_from(obj, comm, timeout))
        return done[key][1]
    if not (isinstance(obj, (list, tuple, dict)) or _has_attrs(obj)):
        return obj
    if key in active:
        return obj  # a cycle: this container is being converted further up
    active.add(key)
    try:
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                obj[i] = _convert(item, comm, timeout, done, active)
            result = obj
        elif isinstance(obj, tuple):
            items = [_convert(item, comm, timeout, done, active) for item in obj]
            same = all(a is b for a, b in zip(items, obj))
            result = obj if same else _rebuild_tuple(obj, items)
        elif isinstance(obj, dict):
            for k in list(obj):
                obj[k] = _convert(obj[k], comm, timeout, done, active)
            result = obj
        else:
            attrs = vars(obj)
            for k in list(attrs):
                new = _convert(attrs[k], comm, timeout, done, active)
                if new is not attrs[k]:
                    attrs[k] = new
            result = obj
    finally:
        active.discard(key)
    done[key] = (obj, result)
    return result


def _has_attrs(obj):
    # Plain user objects only: not classes, modules, functions or arrays, whose attributes
    # are not model structure.
    if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType,
                        np.ndarray, str, bytes)):
        return False
    return isinstance(getattr(obj, "__dict__", None), dict)


def _rebuild_tuple(old, items):
    if hasattr(old, "_fields"):  # a namedtuple
        return type(old)(*items)
    return type(old)(items)


def _sync_from(bn, comm, timeout):
    if bn.device != "cpu":
        raise ValueError(
            f"model: SyncBatchNorm runs on NumPy arrays (CPU) only, got a BatchNorm on "
            f"device {bn.device!r} (move it with .to('cpu') first)"
        )
    sbn = SyncBatchNorm(
        bn.num_features, comm, timeout=timeout, axis=bn.axis, eps=bn.eps,
        momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats,
        activation=bn.activation, dtype=bn.dtype,
    )
    # Share the arrays (not copies): optimizers and callers holding them keep working.
    for name in ("_weight", "_bias", "_running_mean", "_running_var"):
        setattr(sbn, name, getattr(bn, name))
    sbn._num_batches_tracked = bn.num_batches_tracked
    sbn.grad_weight = bn.grad_weight
    sbn.grad_bias = bn.grad_bias
    sbn.training = bn.training
    return sbn
