"""torch's tensor functions in JAX, with torch's signatures and layout (channels on axis 1).

What :func:`jaxbn.from_torch` and the files ``python -m jaxbn port`` emits call for
``torch.nn.functional`` / ``torch`` functions and ``Tensor`` methods (``F.relu(x)``,
``torch.flatten(x, 1)``, ``x.view(n, -1)``). Pure JAX: no torch, no flax. Pools and padding
follow torch's formulas exactly (``ceil_mode``, ``count_include_pad``, adaptive bins).
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# ---------------------------------------------------------------- activations


def relu(x: jax.Array, inplace: bool = False) -> jax.Array:
    """``F.relu``."""
    return jnp.maximum(x, 0)


def relu6(x: jax.Array, inplace: bool = False) -> jax.Array:
    """``F.relu6``: ``min(max(x, 0), 6)``."""
    return jnp.minimum(jnp.maximum(x, 0), 6)


def hardsigmoid(x: jax.Array, inplace: bool = False) -> jax.Array:
    """``F.hardsigmoid``: ``min(max(x + 3, 0), 6) / 6``."""
    return relu6(x + 3) / 6


def hardswish(x: jax.Array, inplace: bool = False) -> jax.Array:
    """``F.hardswish``: ``x * min(max(x + 3, 0), 6) / 6``."""
    return x * relu6(x + 3) / 6


def sigmoid(x: jax.Array) -> jax.Array:
    """``torch.sigmoid``."""
    return jax.nn.sigmoid(x)


def silu(x: jax.Array, inplace: bool = False) -> jax.Array:
    """``F.silu``: ``x * sigmoid(x)``."""
    return x * jax.nn.sigmoid(x)


def tanh(x: jax.Array) -> jax.Array:
    """``torch.tanh``."""
    return jnp.tanh(x)


def gelu(x: jax.Array, approximate: str = "none") -> jax.Array:
    """``F.gelu`` (``approximate='none'`` or ``'tanh'``)."""
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def leaky_relu(x: jax.Array, negative_slope: float = 0.01, inplace: bool = False) -> jax.Array:
    """``F.leaky_relu``."""
    return jnp.where(x >= 0, x, x * negative_slope)


def prelu(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``F.prelu``: ``x if x > 0 else weight * x``, ``weight`` (one value, or one per channel)
    along axis 1 (a 0-d or 1-d input: one channel)."""
    if weight.size > 1:
        if x.ndim < 2 or x.shape[1] != weight.size:
            raise ValueError(f"prelu: {weight.size} parameters for an input of shape {x.shape}")
        weight = weight.reshape((-1,) + (1,) * (x.ndim - 2))
    return jnp.where(x > 0, x, weight * x)


def softmax(x: jax.Array, dim: int | None = None, _stacklevel: Any = 3, dtype: Any = None) -> jax.Array:
    """``F.softmax(input, dim=None, _stacklevel=3, dtype=None)``, ``torch.softmax(input, dim,
    dtype)`` and ``Tensor.softmax(dim, dtype)`` (their third positional argument is the dtype).

    ``dim=None`` is torch's implicit choice (``F._get_softmax_dim``): axis 0 for 0-, 1- and 3-d
    inputs, else axis 1.
    """
    if not isinstance(_stacklevel, int):  # torch.softmax(x, dim, dtype)
        dtype = _stacklevel
    if dim is None:
        dim = 0 if x.ndim in (0, 1, 3) else 1
    x = x if dtype is None else x.astype(dtype)
    if x.ndim == 0:  # torch: a 0-d tensor is its own single slice
        return jax.nn.softmax(x.reshape(1), axis=0).reshape(())
    return jax.nn.softmax(x, axis=dim)


# ---------------------------------------------------------------- shapes


def size(x: jax.Array, dim: int | None = None) -> Any:
    """``Tensor.size()``: the shape (a tuple of ints), or one dimension."""
    return tuple(x.shape) if dim is None else x.shape[dim]


def dim(x: jax.Array) -> int:
    """``Tensor.dim()``."""
    return x.ndim


def _shape_arguments(shape: Sequence[Any]) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(int(s) for s in shape)


def reshape(x: jax.Array, *shape: Any) -> jax.Array:
    """``Tensor.view(*shape)`` / ``Tensor.reshape`` / ``torch.reshape`` (C order, like a
    contiguous torch tensor)."""
    return jnp.reshape(x, _shape_arguments(shape))


view = reshape


def flatten(x: jax.Array, start_dim: int = 0, end_dim: int = -1) -> jax.Array:
    """``torch.flatten``."""
    if x.ndim == 0:
        return x.reshape(1)
    start, end = start_dim % x.ndim, end_dim % x.ndim
    return x.reshape(*x.shape[:start], math.prod(x.shape[start:end + 1]), *x.shape[end + 1:])


def transpose(x: jax.Array, dim0: int, dim1: int) -> jax.Array:
    """``torch.transpose``."""
    return jnp.swapaxes(x, dim0, dim1)


def permute(x: jax.Array, *dims: Any) -> jax.Array:
    """``Tensor.permute``."""
    return jnp.transpose(x, _shape_arguments(dims))


def contiguous(x: jax.Array, memory_format: Any = None) -> jax.Array:
    """``Tensor.contiguous``: a no-op for JAX arrays."""
    return x


def squeeze(x: jax.Array, dim: int | None = None) -> jax.Array:
    """``torch.squeeze`` (a size-1 ``dim`` only; other sizes are left alone, as torch does)."""
    if dim is None:
        return jnp.squeeze(x)
    return jnp.squeeze(x, dim) if x.shape[dim] == 1 else x


def unsqueeze(x: jax.Array, dim: int) -> jax.Array:
    """``torch.unsqueeze``."""
    return jnp.expand_dims(x, dim if dim >= 0 else dim + x.ndim + 1)


def cat(tensors: Sequence[jax.Array], dim: int = 0) -> jax.Array:
    """``torch.cat``."""
    return jnp.concatenate(list(tensors), axis=dim)


def chunk(x: jax.Array, chunks: int, dim: int = 0) -> tuple[jax.Array, ...]:
    """``torch.chunk``: pieces of ``ceil(size / chunks)`` (the last one smaller)."""
    step = -(-x.shape[dim] // chunks)
    return tuple(lax.slice_in_dim(x, i, min(i + step, x.shape[dim]), axis=dim)
                 for i in range(0, x.shape[dim], step))


def split(x: jax.Array, split_size_or_sections: Any, dim: int = 0) -> tuple[jax.Array, ...]:
    """``torch.split`` / ``Tensor.split``: pieces of ``split_size`` (the last one smaller), or of
    the listed sizes (which must add up to the axis' size, as torch requires)."""
    n = x.shape[dim]
    if isinstance(split_size_or_sections, (tuple, list)):
        sizes = [int(s) for s in split_size_or_sections]
        if builtins.sum(sizes) != n or builtins.min(sizes, default=0) < 0:
            raise ValueError(f"split: sizes {sizes} do not add up to the size {n} of dim {dim}")
    else:
        step = int(split_size_or_sections)
        if step < 0 or (step == 0 and n != 0):
            raise ValueError(f"split: split_size {step} must be positive")
        sizes = [step] * (n // step) + ([n % step] if n % step else []) if step else [0]
    starts = np.cumsum([0] + sizes[:-1])
    return tuple(lax.slice_in_dim(x, int(a), int(a) + s, axis=dim) for a, s in zip(starts, sizes))


def expand(x: jax.Array, *sizes: Any) -> jax.Array:
    """``Tensor.expand(*sizes)``: broadcast to ``sizes`` (``-1`` keeps an existing axis' size;
    new axes go in front and cannot be ``-1``; only size-1 axes grow)."""
    sizes = _shape_arguments(sizes)
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise ValueError(f"expand: {len(sizes)} sizes for a tensor of rank {x.ndim}")
    shape = []
    for i, s in enumerate(sizes):
        if s == -1:
            if i < lead:
                raise ValueError("expand: -1 is not allowed for a new leading dimension")
            s = x.shape[i - lead]
        elif i >= lead and x.shape[i - lead] not in (1, s):
            raise ValueError(f"expand: size {x.shape[i - lead]} of dim {i - lead} cannot become {s}")
        shape.append(s)
    return jnp.broadcast_to(x, tuple(shape))


def expand_as(x: jax.Array, other: jax.Array) -> jax.Array:
    """``Tensor.expand_as(other)``: ``x.expand(other.size())``."""
    return expand(x, tuple(other.shape))


def mean(x: jax.Array, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> jax.Array:
    """``torch.mean``."""
    return jnp.mean(x, axis=_axes(dim), keepdims=keepdim, dtype=dtype)


def sum(x: jax.Array, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> jax.Array:  # noqa: A001
    """``torch.sum``."""
    return jnp.sum(x, axis=_axes(dim), keepdims=keepdim, dtype=dtype)


def _axes(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def add(x: Any, other: Any, alpha: float = 1) -> Any:
    """``torch.add``."""
    return x + other * alpha if alpha != 1 else x + other


def mul(x: Any, other: Any) -> Any:
    """``torch.mul``."""
    return x * other


def matmul(x: jax.Array, other: jax.Array) -> jax.Array:
    """``torch.matmul`` / ``@`` (1-d operands, batch broadcasting: NumPy's rules, as torch's),
    at full precision (torch does not use TF32 for matmul by default)."""
    return jnp.matmul(x, other, precision=lax.Precision.HIGHEST)


def bmm(x: jax.Array, mat2: jax.Array) -> jax.Array:
    """``torch.bmm``: ``(b, n, m) @ (b, m, p)``, both 3-d (torch refuses others)."""
    if x.ndim != 3 or mat2.ndim != 3:
        raise ValueError(f"bmm: both operands must be 3-d, got {x.ndim}-d and {mat2.ndim}-d")
    return jnp.matmul(x, mat2, precision=lax.Precision.HIGHEST)


def einsum(equation: str, *operands: Any) -> jax.Array:
    """``torch.einsum(equation, *operands)`` (or the operands as one list), full precision."""
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = tuple(operands[0])
    return jnp.einsum(equation, *operands, precision=lax.Precision.HIGHEST)


def identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    """A function that returns its input (``nn.Identity``, ``dropout`` with ``p=0``)."""
    return x


def to_channels_first(x: jax.Array) -> jax.Array:
    """NHWC (any rank >= 3) -> NCHW: the translated model's entry for ``channels_last=True``."""
    return jnp.moveaxis(x, -1, 1) if x.ndim >= 3 else x


def to_channels_last(x: jax.Array) -> jax.Array:
    """NCHW -> NHWC, the inverse of :func:`to_channels_first`."""
    return jnp.moveaxis(x, 1, -1) if x.ndim >= 3 else x


# ---------------------------------------------------------------- pools


def spatial_tuple(value: Any, spatial: int) -> tuple[int, ...]:
    """torch's ``_pair`` / ``_triple``: an int repeated, or the tuple given."""
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * spatial


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                     ceil_mode: bool) -> int:
    """torch's ``pooling_output_shape``: the number of windows along one axis."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def _pool_geometry(x: jax.Array, spatial: int, kernel_size: Any, stride: Any, padding: Any,
                   dilation: Any, ceil_mode: bool):
    kernel = spatial_tuple(kernel_size, spatial)
    stride = spatial_tuple(kernel_size if stride is None or stride == [] else stride, spatial)
    padding = spatial_tuple(padding, spatial)
    dilation = spatial_tuple(dilation, spatial)
    sizes = x.shape[-spatial:]
    outs = [pool_output_size(*a, ceil_mode) for a in zip(sizes, kernel, stride, padding, dilation)]
    # right padding: torch's (p, p), plus what ceil_mode's last window reaches beyond it
    pads = [(p, max(p, (o - 1) * s + d * (k - 1) + 1 - n - p))
            for n, k, s, p, d, o in zip(sizes, kernel, stride, padding, dilation, outs)]
    lead = x.ndim - spatial
    return kernel, stride, padding, dilation, outs, pads, lead


def max_pool(x: jax.Array, spatial: int, kernel_size: Any, stride: Any = None, padding: Any = 0,
             dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> jax.Array:
    """``F.max_pool{1,2,3}d`` over the last ``spatial`` axes (padding never wins the max)."""
    if return_indices:
        raise NotImplementedError("max_pool with return_indices=True is not supported")
    kernel, stride, _, dilation, _, pads, lead = _pool_geometry(
        x, spatial, kernel_size, stride, padding, dilation, ceil_mode)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1,) * lead + kernel, (1,) * lead + stride,
        ((0, 0),) * lead + tuple(pads), window_dilation=(1,) * lead + dilation)


def _avg_divisor(size: int, kernel: int, stride: int, padding: int, out: int,
                 count_include_pad: bool) -> np.ndarray:
    """torch's per-window divisor along one axis (``avg_pool2d``'s ``pool_size``)."""
    starts = np.arange(out) * stride - padding
    if count_include_pad:
        return np.minimum(starts + kernel, size + padding) - starts
    return np.minimum(starts + kernel, size) - np.maximum(starts, 0)


def avg_pool(x: jax.Array, spatial: int, kernel_size: Any, stride: Any = None, padding: Any = 0,
             ceil_mode: bool = False, count_include_pad: bool = True,
             divisor_override: int | None = None) -> jax.Array:
    """``F.avg_pool{1,2,3}d`` over the last ``spatial`` axes, with torch's divisor."""
    kernel, stride, padding, _, outs, pads, lead = _pool_geometry(
        x, spatial, kernel_size, stride, padding, 1, ceil_mode)
    total = lax.reduce_window(x, 0.0, lax.add, (1,) * lead + kernel,
                              (1,) * lead + stride, ((0, 0),) * lead + tuple(pads))
    if divisor_override:
        return total / divisor_override
    divisor = np.ones((), np.int64)
    for n, k, s, p, o in zip(x.shape[-spatial:], kernel, stride, padding, outs):
        divisor = np.multiply.outer(divisor, _avg_divisor(n, k, s, p, o, count_include_pad))
    return total / jnp.asarray(divisor, x.dtype)


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling bins: ``[floor(i * n / out), ceil((i + 1) * n / out))``."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def _adaptive(x: jax.Array, spatial: int, output_size: Any, reduce) -> jax.Array:
    sizes = spatial_tuple(output_size, spatial) if not isinstance(output_size, (tuple, list)) \
        else tuple(output_size)
    for axis_offset, out in enumerate(sizes):
        axis = x.ndim - spatial + axis_offset
        n = x.shape[axis]
        if out is None or out == n:
            continue
        x = jnp.stack([reduce(lax.slice_in_dim(x, a, b, axis=axis), axis)
                       for a, b in _adaptive_bins(n, int(out))], axis=axis)
    return x


def adaptive_avg_pool(x: jax.Array, spatial: int, output_size: Any) -> jax.Array:
    """``F.adaptive_avg_pool{1,2,3}d`` (torch's bins; one axis after the other)."""
    return _adaptive(x, spatial, output_size, lambda v, axis: jnp.mean(v, axis=axis))


def adaptive_max_pool(x: jax.Array, spatial: int, output_size: Any,
                      return_indices: bool = False) -> jax.Array:
    """``F.adaptive_max_pool{1,2,3}d`` (torch's bins)."""
    if return_indices:
        raise NotImplementedError("adaptive_max_pool with return_indices=True is not supported")
    return _adaptive(x, spatial, output_size, lambda v, axis: jnp.max(v, axis=axis))


def _spatial_variant(function, spatial: int):
    def variant(x, *args, **kwargs):
        return function(x, spatial, *args, **kwargs)

    variant.__name__ = f"{function.__name__}{spatial}d"
    variant.__doc__ = f"``F.{function.__name__}{spatial}d``."
    return variant


max_pool1d, max_pool2d, max_pool3d = (_spatial_variant(max_pool, n) for n in (1, 2, 3))
avg_pool1d, avg_pool2d, avg_pool3d = (_spatial_variant(avg_pool, n) for n in (1, 2, 3))
adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_avg_pool3d = (
    _spatial_variant(adaptive_avg_pool, n) for n in (1, 2, 3))
adaptive_max_pool1d, adaptive_max_pool2d, adaptive_max_pool3d = (
    _spatial_variant(adaptive_max_pool, n) for n in (1, 2, 3))


# ---------------------------------------------------------------- resampling, padding

_LINEAR_MODES = {"linear": 1, "bilinear": 2, "trilinear": 3}


def interpolate(x: jax.Array, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> jax.Array:
    """``F.interpolate`` (``nn.Upsample``) on ``(N, C, *spatial)``: ``mode='nearest'`` (torch's
    legacy nearest, ``floor(dst * scale)`` in float32, not ``'nearest-exact'``) and
    ``'linear'`` / ``'bilinear'`` / ``'trilinear'`` (torch's source index, clamped at 0 unless
    ``align_corners``), with torch's output size and scales: ``floor(in * scale_factor)``, and the
    given ``scale_factor`` used for the indices unless ``recompute_scale_factor`` (or ``size``)."""
    from ..porting.errors import UnsupportedError

    spatial = x.ndim - 2
    if mode not in ("nearest", *_LINEAR_MODES):
        raise UnsupportedError(f"F.interpolate: mode={mode!r} is not supported (only 'nearest', "
                               "'linear', 'bilinear', 'trilinear')")
    if mode != "nearest" and _LINEAR_MODES[mode] != spatial:
        raise ValueError(f"F.interpolate: mode {mode!r} needs a {_LINEAR_MODES[mode] + 2}-d input")
    if antialias:
        raise UnsupportedError("F.interpolate: antialias=True is not supported")
    if (size is None) == (scale_factor is None):
        raise ValueError("F.interpolate: exactly one of size and scale_factor must be given")
    if size is not None:
        outs = spatial_tuple(size, spatial)
        scales: tuple[Any, ...] = (None,) * spatial
    else:
        factors = tuple(float(f) for f in scale_factor) if isinstance(scale_factor, (tuple, list)) \
            else (float(scale_factor),) * spatial
        outs = tuple(math.floor(n * f) for n, f in zip(x.shape[2:], factors))
        scales = (None,) * spatial if recompute_scale_factor else factors
    for axis, (n, out, scale) in enumerate(zip(x.shape[2:], outs, scales), start=2):
        if mode == "nearest":
            x = jnp.take(x, jnp.asarray(_nearest_indices(n, out, scale)), axis=axis)
        else:
            x = _linear_along(x, axis, n, out, scale, bool(align_corners))
    return x


def _nearest_indices(n: int, out: int, scale: float | None) -> np.ndarray:
    """torch's ``nearest_idx``: ``min(floor(dst * s), n - 1)`` with ``s`` = ``1 / scale_factor``
    or ``n / out``, all in float32 (and the shortcuts for ``out == n`` and ``out == 2n``)."""
    dst = np.arange(out)
    if out == n:
        return dst
    if out == 2 * n:
        return dst >> 1
    s = np.float32(1.0 / scale) if scale is not None and scale > 0 else np.float32(n) / np.float32(out)
    return np.minimum(np.floor(dst.astype(np.float32) * s).astype(np.int64), n - 1)


def _linear_along(x: jax.Array, axis: int, n: int, out: int, scale: float | None,
                  align_corners: bool) -> jax.Array:
    """Linear interpolation along one axis with torch's ``area_pixel_compute_source_index``,
    computed in torch's opmath type (float64 for float64 inputs, else float32)."""
    t = np.float64 if x.dtype == jnp.float64 else np.float32
    if align_corners:
        s = t(n - 1) / t(out - 1) if out > 1 else t(0)
        source = s * np.arange(out, dtype=t)
    else:
        s = t(1.0 / scale) if scale is not None and scale > 0 else t(n) / t(out)
        source = np.maximum(s * (np.arange(out, dtype=t) + t(0.5)) - t(0.5), t(0))
    low = np.minimum(np.floor(source).astype(np.int64), n - 1)
    high = low + (low < n - 1)
    weight_high = np.clip(source - low.astype(t), t(0), t(1))
    weight_low = t(1) - weight_high
    shape = (-1,) + (1,) * (x.ndim - 1 - axis)
    return (jnp.take(x, jnp.asarray(low), axis=axis) * jnp.asarray(weight_low.reshape(shape), x.dtype)
            + jnp.take(x, jnp.asarray(high), axis=axis) * jnp.asarray(weight_high.reshape(shape), x.dtype))


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad(x: jax.Array, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> jax.Array:
    """``F.pad``: ``pad = (last_low, last_high, second_last_low, ...)``; ``mode`` ``'constant'``
    (with ``value``, default 0), ``'reflect'``, ``'replicate'`` or ``'circular'``. A negative pad
    removes elements from that side."""
    pad = [int(p) for p in pad]
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ValueError(f"F.pad: {len(pad)} pads for a tensor of rank {x.ndim}")
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [
        (pad[2 * i], pad[2 * i + 1]) for i in reversed(range(len(pad) // 2))]
    if mode == "constant":
        fill = jnp.asarray(0 if value is None else value, x.dtype)
        return lax.pad(x, fill, [(lo, hi, 0) for lo, hi in pairs])
    if mode not in _PAD_MODES:
        raise ValueError(f"F.pad: unknown mode {mode!r}")
    # crop the negative sides, then pad the positive ones
    x = x[tuple(slice(max(-lo, 0), x.shape[i] - max(-hi, 0)) for i, (lo, hi) in enumerate(pairs))]
    return jnp.pad(x, [(max(lo, 0), max(hi, 0)) for lo, hi in pairs], mode=_PAD_MODES[mode])


# ---------------------------------------------------------------- layer and group norm


def _normalized(x: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over ``axes``, with the biased variance."""
    mu = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=axes, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps)


def layer_norm(x: jax.Array, normalized_shape: Any, weight: jax.Array | None = None,
               bias: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    """``F.layer_norm``: normalized over the last ``len(normalized_shape)`` axes, then
    ``* weight + bias`` (each of ``normalized_shape``)."""
    shape = spatial_tuple(normalized_shape, 1)
    if tuple(x.shape[x.ndim - len(shape):]) != shape:
        raise ValueError(f"layer_norm: normalized_shape {shape} does not end the shape {x.shape}")
    y = _normalized(x, tuple(range(x.ndim - len(shape), x.ndim)), eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def group_norm(x: jax.Array, num_groups: int, weight: jax.Array | None = None,
               bias: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    """``F.group_norm`` on ``(N, C, *)``: each sample's channels in ``num_groups`` groups,
    normalized over the group's channels and positions, then ``* weight + bias`` per channel."""
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {num_groups} groups")
    y = _normalized(x.reshape(n, num_groups, -1), (2,), eps).reshape(x.shape)
    per_channel = (-1,) + (1,) * (x.ndim - 2)
    y = y if weight is None else y * weight.reshape(per_channel)
    return y if bias is None else y + bias.reshape(per_channel)


# ---------------------------------------------------------------- convolution, linear


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: Sequence[int],
         padding: Any, dilation: Sequence[int], groups: int, padding_mode: str = "zeros") -> jax.Array:
    """``F.conv{1,2,3}d`` on ``(N, C, *spatial)`` with a Flax-layout kernel ``(*k, I / groups, O)``.

    ``padding`` is torch's: ints (symmetric, explicit -- never Flax's ``'SAME'``), ``'valid'`` or
    ``'same'`` (torch's split: the extra element on the right). A ``padding_mode`` other than
    ``'zeros'`` pads the input first (``reflect``, ``replicate``, ``circular``).
    """
    spatial = kernel.ndim - 2
    pads = conv_padding(kernel.shape[:spatial], padding, dilation)
    if padding_mode != "zeros":
        mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[padding_mode]
        x = jnp.pad(x, ((0, 0), (0, 0), *pads), mode=mode)
        pads = [(0, 0)] * spatial
    numbers = lax.ConvDimensionNumbers(
        lhs_spec=tuple(range(spatial + 2)),
        rhs_spec=(spatial + 1, spatial, *range(spatial)),
        out_spec=tuple(range(spatial + 2)),
    )
    y = lax.conv_general_dilated(x, kernel, tuple(stride), pads, rhs_dilation=tuple(dilation),
                                 dimension_numbers=numbers, feature_group_count=groups)
    if bias is not None:
        y = y + bias.reshape((-1,) + (1,) * spatial)
    return y


def conv_transpose(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: Sequence[int],
                   padding: Sequence[int], output_padding: Sequence[int], groups: int,
                   dilation: Sequence[int]) -> jax.Array:
    """``F.conv_transpose{1,2,3}d`` on ``(N, C, *spatial)`` with a Flax-layout kernel
    ``(*k, out_channels / groups, in_channels)`` (torch's ``(in, out / groups, *k)`` moved as a
    conv kernel's axes are: :mod:`jaxbn.porting.layouts`). Output size per axis:
    ``(n - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.

    Computed as torch defines it, the gradient of a convolution: the input dilated by
    ``stride``, padded by ``dilation * (k - 1) - padding`` (plus ``output_padding`` on the
    right), convolved with the kernel flipped and its in/out axes swapped within each group.
    """
    spatial = kernel.ndim - 2
    k = kernel.shape[:spatial]
    w = jnp.transpose(kernel, (spatial + 1, spatial, *range(spatial)))  # torch's (in, out/g, *k)
    cin, cout_g = w.shape[:2]
    w = w.reshape(groups, cin // groups, cout_g, *k).swapaxes(1, 2)
    w = w.reshape(groups * cout_g, cin // groups, *k)
    w = jnp.flip(w, axis=tuple(range(2, spatial + 2)))
    pads = [(d * (n - 1) - p, d * (n - 1) - p + o)
            for n, p, o, d in zip(k, padding, output_padding, dilation)]
    numbers = lax.ConvDimensionNumbers(lhs_spec=tuple(range(spatial + 2)),
                                       rhs_spec=tuple(range(spatial + 2)),
                                       out_spec=tuple(range(spatial + 2)))
    y = lax.conv_general_dilated(x, w, (1,) * spatial, pads, lhs_dilation=tuple(stride),
                                 rhs_dilation=tuple(dilation), dimension_numbers=numbers,
                                 feature_group_count=groups)
    if bias is not None:
        y = y + bias.reshape((-1,) + (1,) * spatial)
    return y


def conv_padding(kernel: Sequence[int], padding: Any, dilation: Sequence[int]) -> list[tuple[int, int]]:
    """torch's conv padding as explicit ``(low, high)`` pairs per spatial axis."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in spatial_tuple(padding, len(kernel))]


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``F.linear`` with a Flax-layout kernel ``(in, out)``."""
    y = jnp.matmul(x, kernel)
    return y if bias is None else y + bias
