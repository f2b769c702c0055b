"""PyTorch drop-ins running fastbn's CPU kernels: ``fastbn.torch``.

Importing this module imports torch (``import fastbn`` alone never does). It provides

- ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: subclasses of ``torch.nn.BatchNorm1d/2d/3d``
  (same constructor, parameters, buffers, ``state_dict``, momentum=None cumulative average,
  ``num_batches_tracked``) whose ``forward`` runs fastbn on CPU float32/float64 tensors, in
  any memory format (the output keeps the input's strides), and ``super().forward``
  otherwise (other devices or dtypes, parameters of another dtype than the input, ...).
- ``convert(model)``: turns every ``nn.BatchNorm1d/2d/3d`` of a model into the equivalent
  above, in place (the module objects stay, only their class changes, so Parameters, buffers,
  hooks and an existing optimizer are untouched).
- ``batch_norm(...)``: ``torch.nn.functional.batch_norm``'s signature on fastbn.
- ``BatchNormFunction``: a ``torch.autograd.Function`` (eager only) with the same arguments.
- ``state_dict_to_torch`` / ``state_dict_from_torch``: convert state dicts between
  ``fastbn.BatchNorm`` (NumPy arrays) and torch (tensors).

The modules and ``batch_norm`` go through three ``torch.library`` custom ops, each with a fake
(meta) implementation, so ``torch.compile`` and ``torch.export`` trace them as single nodes:

- ``fastbn::batch_norm(x, weight?, bias?, running_mean?, running_var?, training, eps)
  -> (y, mean, invstd, var)``: functional (mutates nothing). In training it normalises with
  the batch statistics and returns them (float64 mean, invstd and biased var); in eval it
  normalises with the running statistics. Its autograd is registered
  (``torch.library.register_autograd``) and calls the next op.
- ``fastbn::batch_norm_backward(dy, x, mean, invstd, weight?, training) -> (dx, dweight,
  dbias)``: differentiable in turn (``create_graph=True``: gradient penalties, Hessian-vector
  products), its autograd calling
- ``fastbn::batch_norm_double_backward(ddx?, ddweight?, ddbias?, dy, x, mean, invstd, weight?,
  training) -> (ddy, dx, dweight)``: ``fastbn.functional.batch_norm_double_backward``; in
  training the statistics are differentiated as functions of x. Not differentiable itself.
- ``fastbn::update_running_stats_(running_mean!, running_var!, mean, var, count, momentum?,
  num_batches_tracked?) -> ()``: the in-place running-statistics update, declared with
  ``mutates_args=("running_mean", "running_var")`` so that functionalization (torch.compile,
  torch.export) sees the mutation. Keeping it out of the differentiable op keeps that op
  functional; the update reads the batch statistics the forward op returned. With momentum
  None the factor 1 / num_batches_tracked is read inside the op, so a compiled graph needs no
  ``.item()`` and does not break.
"""
import collections

import numpy as np
import torch
from torch import nn

from . import batch_norm_backward as _fbn_backward
from . import functional as _F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "batch_norm",
    "convert",
    "state_dict_from_torch",
    "state_dict_to_torch",
    "supports",
]

_DTYPES = (torch.float32, torch.float64)
_FUNCTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def _tensor(a):
    """A NumPy result as a tensor sharing its memory; an ml_dtypes.bfloat16 array (what fastbn
    returns for bfloat16 input: NumPy has no bfloat16 of its own) becomes a torch.bfloat16
    tensor through an int16 view of the same bits."""
    if a.dtype.name == "bfloat16" and a.dtype.kind == "V":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy(t):
    """A CPU tensor as a NumPy view of its memory (bfloat16 through ml_dtypes, which
    fastbn's argument conversion imports or names as missing)."""
    if t.dtype == torch.bfloat16:
        from ._validation import numpy_array

        return numpy_array(t, "running statistics")
    return t.numpy()


# --------------------------------------------------------------------------- kernels

def _like_input(a, x):
    """A NumPy result of fastbn as a tensor with the strides ``torch.empty_like(x)`` has.

    fastbn returns outputs in x's layout when x is dense (C-contiguous up to a permutation of
    its axes, which covers contiguous and channels_last); the fake implementations promise
    ``empty_like(x)``, so the rare input where the two could differ (a non-dense view, size-1
    dimensions with unusual strides) gets a copy into exactly that layout.
    """
    t = _tensor(a)
    if t.stride() != x.stride():
        ref = torch.empty_like(x)
        if ref.stride() != t.stride():
            ref.copy_(t)
            return ref
    return t


def _f64(a):
    """A float64 tensor that never aliases its argument (custom-op outputs must be fresh)."""
    return a.detach().to(torch.float64, copy=True)


def _grad_dtype(x):
    return torch.float32 if x.dtype in _HALF else x.dtype


def _forward(x, weight, bias, running_mean, running_var, training, eps):
    """(y, mean, invstd, var) as tensors; var is the biased batch variance in training."""
    if training:
        y, mean, invstd, var, _n = _F.forward_with_stats(x, weight, bias, axis=1, eps=eps)
        mean, invstd, var = torch.from_numpy(mean), torch.from_numpy(invstd), torch.from_numpy(var)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("fastbn.torch: eval mode needs running_mean and running_var")
        mean, var = _f64(running_mean), _f64(running_var)
        invstd = torch.from_numpy(_F.invstd_from_var(var, eps))
        y = _F.normalize(x, mean, invstd, weight, bias, axis=1)
    return _like_input(y, x), mean, invstd, var


def _backward(dy, x, mean, invstd, weight, training):
    dx, dw, db = _fbn_backward(dy, x, mean, invstd, weight, axis=1, training=training)
    return _like_input(dx, x), _tensor(dw), _tensor(db)


def _update(running_mean, running_var, mean, var, count, momentum, num_batches_tracked):
    if count <= 0:  # an empty batch leaves the running statistics as they are (PyTorch)
        return
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    # fastbn writes only into NumPy arrays: views sharing the buffers' memory.
    _F.update_running_stats(_numpy(running_mean.detach()), _numpy(running_var.detach()),
                            mean, var, count, momentum)


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("fastbn::batch_norm", mutates_args=(), device_types="cpu")
def _op_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   training: bool, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, running_mean, running_var, training, eps)


@_op_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps):
    C = x.shape[1]
    stat = lambda: x.new_empty((C,), dtype=torch.float64)  # noqa: E731
    return torch.empty_like(x), stat(), stat(), stat()


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=(), device_types="cpu")
def _op_batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                            invstd: torch.Tensor, weight: torch.Tensor | None, training: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, mean, invstd, weight, training)


@_op_batch_norm_backward.register_fake
def _(dy, x, mean, invstd, weight, training):
    C = x.shape[1]
    g = _grad_dtype(x)
    return torch.empty_like(x), x.new_empty((C,), dtype=g), x.new_empty((C,), dtype=g)


@torch.library.custom_op("fastbn::batch_norm_double_backward", mutates_args=(),
                         device_types="cpu")
def _op_double_backward(ddx: torch.Tensor | None, ddweight: torch.Tensor | None,
                        ddbias: torch.Tensor | None, dy: torch.Tensor, x: torch.Tensor,
                        mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
                        training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ddy, dx, dw = _F.batch_norm_double_backward(ddx, ddweight, ddbias, dy, x, mean, invstd,
                                                weight, axis=1, training=training)
    return _like_input(ddy, x), _like_input(dx, x), torch.from_numpy(dw)


@_op_double_backward.register_fake
def _(ddx, ddweight, ddbias, dy, x, mean, invstd, weight, training):
    return (torch.empty_like(x), torch.empty_like(x),
            x.new_empty((x.shape[1],), dtype=_grad_dtype(x)))


def _backward_setup_context(ctx, inputs, output):
    dy, x, mean, invstd, weight, training = inputs
    ctx.save_for_backward(dy, x, mean, invstd, weight)
    ctx.training = training


def _backward_autograd(ctx, ddx, ddweight, ddbias):
    dy, x, mean, invstd, weight = ctx.saved_tensors
    need_dy, need_x, _nm, _ni, need_w = ctx.needs_input_grad[:5]
    if not (need_dy or need_x or need_w):
        return (None,) * 6
    ddy, dx, dweight = torch.ops.fastbn.batch_norm_double_backward(
        ddx, ddweight, ddbias, dy, x, mean, invstd, weight, ctx.training)
    return (ddy if need_dy else None, dx if need_x else None, None, None,
            dweight.to(weight.dtype) if need_w and weight is not None else None, None)


_op_batch_norm_backward.register_autograd(_backward_autograd,
                                          setup_context=_backward_setup_context)


@torch.library.custom_op("fastbn::update_running_stats_",
                         mutates_args=("running_mean", "running_var"), device_types="cpu")
def _op_update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                             mean: torch.Tensor, var: torch.Tensor, count: int,
                             momentum: float | None,
                             num_batches_tracked: torch.Tensor | None) -> None:
    _update(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)


@_op_update_running_stats.register_fake
def _(running_mean, running_var, mean, var, count, momentum, num_batches_tracked):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _rm, _rv, training, _eps = inputs
    _y, mean, invstd, var = output
    ctx.mark_non_differentiable(mean, invstd, var)
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training = training


def _op_autograd(ctx, dy, _dmean, _dinvstd, _dvar):
    x, weight, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return (None,) * 7
    dx, dw, db = torch.ops.fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                                      ctx.training)
    return (dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(weight.dtype if weight is not None else db.dtype) if need_b else None,
            None, None, None, None)


_op_batch_norm.register_autograd(_op_autograd, setup_context=_setup_context)


# --------------------------------------------------------------------------- functional

def supports(x, *tensors):
    """Whether fastbn's CPU kernels take x (and the per-channel tensors given with it).

    True for strided CPU float32/float64 tensors of at least 2 dimensions whose non-None
    companions are CPU tensors of x's dtype; fake tensors of that kind (torch.compile) count.
    """
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    if x.layout != torch.strided or x.is_quantized or x.dim() < 2 or x.is_complex():
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != x.dtype
                              or t.layout != torch.strided):
            return False
    return True


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on fastbn (CPU float32/float64; otherwise torch's).

    In training with running statistics given, they are updated in place. ``momentum=None``
    is accepted only from the modules (where num_batches_tracked gives the factor); here it
    means a factor of 0, as in torch.
    """
    if not supports(input, running_mean, running_var, weight, bias):
        return nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                        training, momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training,
                       0.0 if momentum is None else momentum, eps, None)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                num_batches_tracked):
    # In training the op does not read the running statistics: they are not passed, so a
    # traced graph has no false dependency between the forward and the update.
    y, mean, _invstd, var = torch.ops.fastbn.batch_norm(
        x, weight, bias, None if training else running_mean,
        None if training else running_var, bool(training), float(eps))
    if training and running_mean is not None and running_var is not None:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        torch.ops.fastbn.update_running_stats_(
            running_mean, running_var, mean, var, count,
            None if momentum is None else float(momentum), num_batches_tracked)
    return y


class BatchNormFunction(torch.autograd.Function):
    """Batch norm as an autograd Function, with ``F.batch_norm``'s argument order:

    ``BatchNormFunction.apply(input, running_mean, running_var, weight, bias, training,
    momentum, eps)``. CPU tensors, float16 or bfloat16 (computed in float32; bfloat16 needs
    ml_dtypes, through which NumPy reads it), float32 or float64; running statistics are
    updated in place in training when given. Eager only: for torch.compile
    use ``batch_norm`` or the modules, which go through the custom ops.
    """

    @staticmethod
    def forward(ctx, input, running_mean=None, running_var=None, weight=None, bias=None,
                training=False, momentum=0.1, eps=1e-5):
        if input.device.type != "cpu" or input.dtype not in _FUNCTION_DTYPES:
            raise TypeError("BatchNormFunction: expected a CPU float16/bfloat16/float32/float64 "
                            "tensor, "
                            f"got {input.dtype} on {input.device}")
        training = bool(training)
        y, mean, invstd, var = _forward(input, weight, bias, running_mean, running_var,
                                        training, eps)
        if training and running_mean is not None and running_var is not None:
            count = input.numel() // input.shape[1] if input.shape[1] else 0
            _update(running_mean, running_var, mean, var, count,
                    0.0 if momentum is None else momentum, None)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, _nrm, _nrv, need_w, need_b = ctx.needs_input_grad[:5]
        if not (need_x or need_w or need_b):
            return (None,) * 8
        # Through the custom op, whose autograd makes this backward differentiable in turn
        # (create_graph=True).
        dx, dw, db = torch.ops.fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                                          ctx.training)
        return (dx if need_x else None, None, None,
                dw.to(weight.dtype) if need_w else None,
                db.to(weight.dtype if weight is not None else db.dtype) if need_b else None,
                None, None, None)


# --------------------------------------------------------------------------- modules

class _FastBatchNorm:
    """forward of torch's _BatchNorm, with the batch-norm call going to fastbn."""

    def forward(self, input):
        if not supports(input, self.weight, self.bias, self.running_mean, self.running_var):
            return super().forward(input)
        self._check_input_dim(input)
        # The same bookkeeping as torch.nn.modules.batchnorm._BatchNorm.forward.
        momentum = 0.0 if self.momentum is None else self.momentum
        nbt = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum, nbt = None, self.num_batches_tracked  # 1/n, read inside the op
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        use_running = not self.training or self.track_running_stats
        return _batch_norm(input,
                           self.running_mean if use_running else None,
                           self.running_var if use_running else None,
                           self.weight, self.bias, bn_training, momentum, self.eps, nbt)


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels for CPU float32/float64 input."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels for CPU float32/float64 input."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels for CPU float32/float64 input."""


_SWAP = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert(model):
    """Make every ``nn.BatchNorm1d/2d/3d`` in ``model`` (itself included) fastbn's, in place.

    Only modules whose class is exactly torch's BatchNorm1d/2d/3d change, and only their class:
    the module objects, their Parameters (so an optimizer built before keeps working),
    buffers, hooks, training flag and device stay as they were. ``SyncBatchNorm``, a
    ``LazyBatchNorm*`` not yet initialised, and user subclasses of the torch classes (which
    may override ``forward``) are left alone. Returns ``model``.
    """
    for module in model.modules():
        new = _SWAP.get(type(module))
        if new is not None:
            module.__class__ = new
    return model


# --------------------------------------------------------------------------- state dicts

def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "get") and type(v).__module__.startswith("cupy"):
        return v.get()  # a fastbn layer on the GPU: its state as host arrays
    return v


def state_dict_to_torch(state_dict):
    """A fastbn state dict (NumPy arrays, ``num_batches_tracked`` a 0-d int64 array) as
    CPU tensors that ``torch.nn.Module.load_state_dict`` accepts.

    Keys are kept as they are (prefixed model-level keys too); NumPy arrays (and CuPy arrays,
    copied to the host) become tensors of the same dtype and shape, copied; NumPy scalars and
    Python numbers become 0-d tensors; tensors and other values pass through unchanged.
    """
    out = collections.OrderedDict()
    for k, v in state_dict.items():
        v = _to_numpy(v)
        if isinstance(v, (np.ndarray, np.generic)):
            v = torch.from_numpy(np.array(v, copy=True))
        elif isinstance(v, (int, float)):
            v = torch.tensor(v)
        out[k] = v
    return out


def state_dict_from_torch(state_dict):
    """A torch state dict as NumPy arrays for ``fastbn.BatchNorm.load_state_dict``.

    Keys are kept as they are; every tensor becomes a NumPy array copied to the host (so the
    result is a snapshot, as fastbn's own state dicts are), 0-d tensors such as
    ``num_batches_tracked`` become 0-d arrays; other values pass through unchanged.
    """
    out = collections.OrderedDict()
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy().copy()
        out[k] = v
    return out
