"""Real ``torch.nn.BatchNorm*d`` (and ``InstanceNorm*d``) driven with jaxbn's flags: the oracle.

Requires the optional ``torch`` extra. Everything here mirrors how a torch user holds a module:
build it once (``affine`` and ``track_running_stats`` at construction), mutate its attributes
between calls (:func:`apply_flags`), call it, read its buffers back. Arrays cross the boundary as
NumPy copies, never views (torch mutates buffers in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..functional.torch_rules import BATCH_NORM, INSTANCE_NORM, Family
from ..functional.types import BatchNormFlags, BatchNormParams, BatchNormState
from ..porting.tensors import BFLOAT16, numpy_to_tensor, tensor_to_numpy

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jaxbn.testing.oracle needs PyTorch: pip install 'jaxbn[torch]'") from e

_SUFFIXES = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}


def to_numpy(t: "torch.Tensor | None") -> np.ndarray | None:
    """A NumPy *copy* of a tensor (:func:`jaxbn.porting.tensors.tensor_to_numpy`), bf16 widened
    to float32 (exactly) so tests can compare it numerically."""
    if t is None:
        return None
    a = tensor_to_numpy(t)
    return a.astype(np.float32) if a.dtype == BFLOAT16 else a


def to_torch(a: Any) -> "torch.Tensor":
    """A tensor that owns a copy of ``a`` (a NumPy or JAX array; bf16 stays bf16, bit-exact)."""
    return numpy_to_tensor(a)


def build_module(
    num_features: int,
    ndim: int,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags,
    dtype: "torch.dtype" = None,
    family: Family = BATCH_NORM,
) -> "torch.nn.Module":
    """``nn.BatchNorm{1,2,3}d`` for a rank-``ndim`` input, constructed like the jaxbn layer.

    ``affine = params is not None`` and ``track_running_stats = state is not None`` at
    construction; buffers/params are then loaded from ``state``/``params`` and ``flags`` applied.
    ``family=INSTANCE_NORM`` (:mod:`jaxbn.functional.torch_rules`) builds
    ``nn.InstanceNorm{1,2,3}d`` for a *batched* input instead.
    """
    if ndim not in _SUFFIXES or (family is INSTANCE_NORM and ndim < 3):
        raise ValueError(
            f"torch has {family.name} modules for batched inputs of rank 2/3 to 5, not {ndim}")
    cls = getattr(torch.nn, family.name + _SUFFIXES[ndim])
    module = cls(
        num_features,
        eps=flags.eps,
        momentum=flags.momentum,
        affine=params is not None,
        track_running_stats=state is not None,
    )
    if dtype is not None:
        module = module.to(dtype)
    load_state(module, state, params)
    apply_flags(module, flags)
    return module


def load_state(module: "torch.nn.Module", state: BatchNormState | None, params: BatchNormParams | None) -> None:
    """Copy jaxbn state/params into the module's buffers/parameters, keeping their dtypes."""
    with torch.no_grad():
        if state is not None:
            module.running_mean.copy_(to_torch(state.running_mean))
            module.running_var.copy_(to_torch(state.running_var))
            module.num_batches_tracked.copy_(to_torch(state.num_batches_tracked))
        if params is not None:
            module.weight.copy_(to_torch(params.weight))
            module.bias.copy_(to_torch(params.bias))


def apply_flags(module: "torch.nn.Module", flags: BatchNormFlags) -> None:
    """Set the attributes a torch user may change after construction, and train/eval mode."""
    module.momentum = flags.momentum
    module.eps = flags.eps
    module.track_running_stats = flags.track_running_stats
    module.train(flags.training)


def module_state(module: "torch.nn.Module") -> BatchNormState | None:
    """The module's buffers as NumPy copies, or ``None`` if it was built without them."""
    if module.running_mean is None:
        return None
    return BatchNormState(
        running_mean=to_numpy(module.running_mean),
        running_var=to_numpy(module.running_var),
        num_batches_tracked=to_numpy(module.num_batches_tracked),
    )


def module_params(module: "torch.nn.Module") -> BatchNormParams | None:
    """The module's weight and bias as NumPy copies, or ``None`` when ``affine=False``."""
    if module.weight is None:
        return None
    return BatchNormParams(weight=to_numpy(module.weight), bias=to_numpy(module.bias))


def forward(module: "torch.nn.Module", x: Any, axis: int = 1) -> "torch.Tensor":
    """Call ``module`` on ``x`` whose features are on ``axis``; the result has ``x``'s layout.

    Returns a tensor (so callers can backpropagate); ``x`` may be a tensor that requires grad.
    """
    xt = x if isinstance(x, torch.Tensor) else to_torch(x)
    ndim = xt.dim()
    axis = axis % ndim
    y = module(torch.movedim(xt, axis, 1).contiguous())
    return torch.movedim(y, 1, axis)


def vjp(
    module: "torch.nn.Module", x: Any, cotangent: Any, axis: int = 1, mask: Any = None
) -> tuple[np.ndarray, np.ndarray, BatchNormParams | None]:
    """torch autograd of ``sum(y * cotangent)`` for ``y = module(x)``: ``(y, dx, (dw, db))``.

    The module's buffers are updated as by any forward call; the params entry is ``None`` when
    the module has no affine parameters.

    With ``mask`` this is torch's meaning of ``jaxbn.batch_norm(x, ..., mask=mask)``: the rows
    where ``mask`` (bool, axis 0) is True go through ``module`` -- real torch batch norm on the
    valid rows only. The other (padded) rows are normalized with the statistics the
    module used for the valid rows (their biased batch statistics, or the running ones in eval
    with buffers) and the same affine map, written as torch ops so that autograd gives their
    gradient too (they only have the direct path: no statistic depends on them). The loss
    ``sum(y * cotangent)`` runs over all rows.
    """
    xt = to_torch(x).requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    if mask is None:
        y = forward(module, xt, axis)
    else:
        y = _masked_forward(module, xt, np.asarray(mask, dtype=bool), axis)
    (y * to_torch(cotangent)).sum().backward()
    grads = None
    if module.weight is not None:
        grads = BatchNormParams(weight=to_numpy(module.weight.grad), bias=to_numpy(module.bias.grad))
    return to_numpy(y), to_numpy(xt.grad), grads


def _masked_forward(module: "torch.nn.Module", xt: "torch.Tensor", mask: np.ndarray, axis: int) -> "torch.Tensor":
    """The masked forward of :func:`vjp` (differentiable)."""
    channels_first = torch.movedim(xt, axis % xt.dim(), 1)
    keep = torch.from_numpy(mask.copy())
    valid, padded = channels_first[keep], channels_first[~keep]
    if module.training or module.running_mean is None:
        dims = [d for d in range(valid.dim()) if d != 1]
        var, mean = torch.var_mean(valid, dim=dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    per_channel = [1, -1] + [1] * (valid.dim() - 2)
    y_padded = (padded - mean.view(per_channel)) * torch.rsqrt(var.view(per_channel) + module.eps)
    if module.weight is not None:
        y_padded = y_padded * module.weight.view(per_channel) + module.bias.view(per_channel)
    y = channels_first.new_zeros(channels_first.shape)
    y[keep] = module(valid)
    y[~keep] = y_padded
    return torch.movedim(y, 1, axis % xt.dim())


def batch_norm(
    x: Any,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags = BatchNormFlags(),
    family: Family = BATCH_NORM,
) -> tuple[np.ndarray, BatchNormState | None]:
    """What torch computes for ``jaxbn.batch_norm(x, state, params, flags)``: ``(y, new_state)``.

    Arrays are NumPy; ``x``'s dtype decides the module's dtype unless state/params are float32
    with a half-precision input (torch's mixed precision). ``family=INSTANCE_NORM`` gives what
    torch computes for ``jaxbn.instance_norm`` (see :func:`instance_norm`).
    """
    x = np.asarray(x)
    axis = flags.axis % x.ndim
    reference = state if state is not None else params
    dtype = None
    if reference is not None:
        dtype = to_torch(np.asarray(reference[0])).dtype
    module = build_module(x.shape[axis], x.ndim, state, params, flags, dtype, family)
    with torch.no_grad():
        y = forward(module, x, axis)
    return to_numpy(y), module_state(module)


def instance_norm(
    x: Any,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags,
) -> tuple[np.ndarray, BatchNormState | None]:
    """What torch's ``nn.InstanceNorm{1,2,3}d`` computes for ``jaxbn.instance_norm(...)``."""
    return batch_norm(x, state, params, flags, family=INSTANCE_NORM)
