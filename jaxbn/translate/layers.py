"""torch's ``nn`` layers (besides the norms) as ``flax.linen`` modules, in torch's layout.

The layers :func:`jaxbn.from_torch` builds and the files ``python -m jaxbn port`` emits use:
same constructor arguments as torch, inputs with channels on axis 1 (NCHW), torch's
``state_dict`` leaves under :mod:`jaxbn.porting`'s names (``kernel`` in Flax layout, ``bias``).
Norm layers are :mod:`jaxbn.linen`'s (:func:`layer_class` finds either). Modules that need the
mode take ``train``; dropout-like ones draw from the ``'dropout'`` rng when training.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import torch_ops as F
from .ir import Layer

__all__ = [
    "AdaptiveAvgPool", "AdaptiveMaxPool", "AvgPool", "Conv", "ConvTranspose", "Dropout", "FeatureDropout",
    "Flatten", "GELU", "GroupNorm", "Hardsigmoid", "Hardswish", "Identity", "LayerNorm",
    "LeakyReLU", "Linear", "MaxPool", "PReLU", "Pad", "ReLU", "ReLU6", "SiLU", "Sigmoid", "Softmax",
    "StochasticDepth", "Tanh", "Upsample", "build_layer", "layer_class",
]


def _uniform_fan_in(fan_in: int):
    """torch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def declare_params(module: nn.Module) -> dict[str, jax.Array]:
    """A layer's parameters as its :meth:`param_specs` describes them (``self.param`` for each):
    one declaration, read by linen here and by :mod:`.nnx_layers`."""
    return {name: module.param(name, init, shape, module.param_dtype)
            for name, (shape, init) in module.param_specs().items()}


class Conv(nn.Module):
    """``torch.nn.Conv{1,2,3}d`` (``spatial`` = 1, 2, 3) on ``(N, C, *spatial)``.

    Variables: ``params: {kernel (*kernel_size, in_channels / groups, out_channels), bias}``.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    param_dtype: Any = jnp.float32

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{name: (shape, initializer)}`` of its parameters (torch's init)."""
        init = _uniform_fan_in(self.in_channels // self.groups * math.prod(self.kernel_size))
        specs = {"kernel": ((*self.kernel_size, self.in_channels // self.groups, self.out_channels), init)}
        return specs | ({"bias": ((self.out_channels,), init)} if self.bias else {})

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = declare_params(self)
        spatial = len(self.kernel_size)
        return F.conv(x, p["kernel"], p.get("bias"), F.spatial_tuple(self.stride, spatial), self.padding,
                      F.spatial_tuple(self.dilation, spatial), self.groups, self.padding_mode)


class ConvTranspose(nn.Module):
    """``torch.nn.ConvTranspose{1,2,3}d`` (``len(kernel_size)`` = 1, 2, 3) on ``(N, C, *spatial)``.

    Variables: ``params: {kernel (*kernel_size, out_channels / groups, in_channels), bias}`` --
    torch's weight ``(in, out / groups, *k)`` with a conv kernel's axis move
    (:mod:`jaxbn.porting.layouts`).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    output_padding: tuple[int, ...] = (0, 0)
    groups: int = 1
    bias: bool = True
    dilation: tuple[int, ...] = (1, 1)
    param_dtype: Any = jnp.float32

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{name: (shape, initializer)}`` of its parameters (torch's init)."""
        init = _uniform_fan_in(self.out_channels // self.groups * math.prod(self.kernel_size))  # torch's weight.size(1) * k
        specs = {"kernel": ((*self.kernel_size, self.out_channels // self.groups, self.in_channels), init)}
        return specs | ({"bias": ((self.out_channels,), init)} if self.bias else {})

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Any = None) -> jax.Array:
        """``output_size`` (torch's forward argument; its last ``spatial`` sizes count) picks
        the output padding instead of ``output_padding``, in torch's allowed range."""
        p = declare_params(self)
        kernel, bias = p["kernel"], p.get("bias")
        spatial = len(self.kernel_size)
        def axes(value):
            return F.spatial_tuple(value, spatial)

        stride, padding, dilation = axes(self.stride), axes(self.padding), axes(self.dilation)
        output_padding = axes(self.output_padding)
        if output_size is not None:
            output_padding = _output_padding(x.shape[2:], tuple(output_size)[-spatial:], stride,
                                             padding, self.kernel_size, dilation)
        return F.conv_transpose(x, kernel, bias, stride, padding, output_padding, self.groups, dilation)


def _output_padding(sizes, wanted, stride, padding, kernel, dilation) -> tuple[int, ...]:
    """torch's ``_ConvTransposeNd._output_padding``: ``output_size`` minus the smallest output,
    which must be less than ``stride`` (else ``ValueError``, as torch)."""
    smallest = [(n - 1) * s - 2 * p + d * (k - 1) + 1
                for n, s, p, k, d in zip(sizes, stride, padding, kernel, dilation)]
    if len(wanted) != len(smallest) or not all(
            m <= int(w) < m + s for w, m, s in zip(wanted, smallest, stride)):
        raise ValueError(f"ConvTranspose: output_size {wanted} is not between {smallest} and "
                         f"{[m + s - 1 for m, s in zip(smallest, stride)]}")
    return tuple(int(w) - m for w, m in zip(wanted, smallest))


class Linear(nn.Module):
    """``torch.nn.Linear``. Variables: ``params: {kernel (in, out), bias}``."""

    in_features: int
    out_features: int
    bias: bool = True
    param_dtype: Any = jnp.float32

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{name: (shape, initializer)}`` of its parameters (torch's init)."""
        init = _uniform_fan_in(self.in_features)
        specs = {"kernel": ((self.in_features, self.out_features), init)}
        return specs | ({"bias": ((self.out_features,), init)} if self.bias else {})

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = declare_params(self)
        return F.linear(x, p["kernel"], p.get("bias"))


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm``: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last
    ``len(normalized_shape)`` axes (biased variance). Variables: ``params: {weight, bias}`` of
    ``normalized_shape`` (``elementwise_affine=False``: neither; ``bias=False``: no bias), torch's
    init (ones, zeros)."""

    normalized_shape: tuple[int, ...]
    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True
    param_dtype: Any = jnp.float32

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{name: (shape, initializer)}`` of its parameters (torch's init)."""
        shape = tuple(self.normalized_shape)
        specs = {"weight": (shape, nn.initializers.ones)} if self.elementwise_affine else {}
        return specs | ({"bias": (shape, nn.initializers.zeros)} if self.elementwise_affine and self.bias else {})

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = declare_params(self)
        return F.layer_norm(x, tuple(self.normalized_shape), p.get("weight"), p.get("bias"), self.eps)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` on ``(N, C, *)``: :func:`~.torch_ops.group_norm`. Variables:
    ``params: {weight (C,), bias (C,)}`` when ``affine``, torch's init (ones, zeros)."""

    num_groups: int
    num_channels: int
    eps: float = 1e-5
    affine: bool = True
    param_dtype: Any = jnp.float32

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{name: (shape, initializer)}`` of its parameters (torch's init)."""
        shape = (self.num_channels,)
        return {"weight": (shape, nn.initializers.ones), "bias": (shape, nn.initializers.zeros)} if self.affine else {}

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = declare_params(self)
        return F.group_norm(x, self.num_groups, p.get("weight"), p.get("bias"), self.eps)


class MaxPool(nn.Module):
    """``torch.nn.MaxPool{1,2,3}d`` over the last ``spatial`` axes."""

    spatial: int
    kernel_size: Any
    stride: Any = None
    padding: Any = 0
    dilation: Any = 1
    ceil_mode: bool = False

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.max_pool(x, self.spatial, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.ceil_mode)


class AvgPool(nn.Module):
    """``torch.nn.AvgPool{1,2,3}d`` over the last ``spatial`` axes."""

    spatial: int
    kernel_size: Any
    stride: Any = None
    padding: Any = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.avg_pool(x, self.spatial, self.kernel_size, self.stride, self.padding,
                          self.ceil_mode, self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool(nn.Module):
    """``torch.nn.AdaptiveAvgPool{1,2,3}d``."""

    spatial: int
    output_size: Any

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.adaptive_avg_pool(x, self.spatial, self.output_size)


class AdaptiveMaxPool(nn.Module):
    """``torch.nn.AdaptiveMaxPool{1,2,3}d``."""

    spatial: int
    output_size: Any

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.adaptive_max_pool(x, self.spatial, self.output_size)


class _Elementwise(nn.Module):
    """A parameter-free torch activation module: ``__call__`` is its functional form."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.function(x)


class ReLU(_Elementwise):
    """``torch.nn.ReLU``."""

    function = staticmethod(F.relu)


class ReLU6(_Elementwise):
    """``torch.nn.ReLU6``."""

    function = staticmethod(F.relu6)


class Hardswish(_Elementwise):
    """``torch.nn.Hardswish``."""

    function = staticmethod(F.hardswish)


class Hardsigmoid(_Elementwise):
    """``torch.nn.Hardsigmoid``."""

    function = staticmethod(F.hardsigmoid)


class SiLU(_Elementwise):
    """``torch.nn.SiLU``."""

    function = staticmethod(F.silu)


class Sigmoid(_Elementwise):
    """``torch.nn.Sigmoid``."""

    function = staticmethod(F.sigmoid)


class Tanh(_Elementwise):
    """``torch.nn.Tanh``."""

    function = staticmethod(F.tanh)


class Identity(_Elementwise):
    """``torch.nn.Identity``."""

    function = staticmethod(F.identity)


class GELU(nn.Module):
    """``torch.nn.GELU``."""

    approximate: str = "none"

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.gelu(x, self.approximate)


class LeakyReLU(nn.Module):
    """``torch.nn.LeakyReLU``."""

    negative_slope: float = 0.01

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.leaky_relu(x, self.negative_slope)


class PReLU(nn.Module):
    """``torch.nn.PReLU``: ``x if x > 0 else weight * x`` with a trainable ``weight`` of
    ``num_parameters`` values (1, or one per channel on axis 1), initialized to ``init``.
    Variables: ``params: {weight (num_parameters,)}``."""

    num_parameters: int = 1
    init: float = 0.25
    param_dtype: Any = jnp.float32

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{name: (shape, initializer)}`` of its parameters (torch's init)."""
        return {"weight": ((self.num_parameters,), lambda key, shape, dtype: jnp.full(shape, self.init, dtype))}

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return F.prelu(x, declare_params(self)["weight"])


class Softmax(nn.Module):
    """``torch.nn.Softmax``."""

    dim: int

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.softmax(x, self.dim)


class Flatten(nn.Module):
    """``torch.nn.Flatten``."""

    start_dim: int = 1
    end_dim: int = -1

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.flatten(x, self.start_dim, self.end_dim)


class Upsample(nn.Module):
    """``torch.nn.Upsample`` (and ``UpsamplingNearest2d``, ``UpsamplingBilinear2d``, which are
    ``Upsample`` with ``mode='nearest'`` / ``mode='bilinear', align_corners=True``):
    :func:`~.torch_ops.interpolate`."""

    size: Any = None
    scale_factor: Any = None
    mode: str = "nearest"
    align_corners: bool | None = None
    recompute_scale_factor: bool | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                             self.recompute_scale_factor)


class Pad(nn.Module):
    """``torch.nn.ZeroPad``/``ConstantPad``/``ReflectionPad``/``ReplicationPad``/
    ``CircularPad{1,2,3}d``: :func:`~.torch_ops.pad` with the layer's ``padding`` (torch's
    ``(last_low, last_high, ...)``), ``mode`` and ``value``."""

    padding: tuple[int, ...]
    mode: str = "constant"
    value: float = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.pad(x, self.padding, self.mode, self.value if self.mode == "constant" else None)


class Dropout(nn.Module):
    """``torch.nn.Dropout``: zeroes with probability ``p`` and scales by ``1 / (1 - p)`` when
    training (draws from the ``'dropout'`` rng); the identity in eval or with ``p = 0``."""

    p: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dropout(rate=self.p, deterministic=not train or self.p == 0)(x)


class FeatureDropout(nn.Module):
    """``torch.nn.Dropout1d/2d/3d`` (``spatial`` = 1, 2, 3) on ``(N, C, *spatial)``: when
    training, zeroes whole channels (one draw per sample and channel) with probability ``p`` and
    scales the others by ``1 / (1 - p)`` (``'dropout'`` rng); the identity in eval or with
    ``p = 0``. An input without the batch axis is refused (torch's rank-dependent handling)."""

    p: float = 0.5
    spatial: int = 2

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != self.spatial + 2:
            from ..porting.errors import UnsupportedError

            raise UnsupportedError(f"Dropout{self.spatial}d on a {x.ndim}-d input is not supported "
                                   f"(only batched {self.spatial + 2}-d inputs)")
        if not train or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        keep = jax.random.bernoulli(self.make_rng("dropout"), survival, x.shape[:2] + (1,) * self.spatial)
        return x * (keep.astype(x.dtype) / survival if survival > 0.0 else keep.astype(x.dtype))


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth``: when training, drops whole rows (``mode='row'``) or
    the whole batch (``'batch'``) with probability ``p``, scaling survivors by ``1 / (1 - p)``
    (``'dropout'`` rng); the identity in eval or with ``p = 0``."""

    p: float
    mode: str = "row"

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
        noise = jax.random.bernoulli(self.make_rng("dropout"), survival, shape).astype(x.dtype)
        return x * (noise / survival if survival > 0.0 else noise)


def layer_class(layer: Layer) -> type[nn.Module]:
    """The linen class a :class:`~.ir.Layer` names: a :mod:`jaxbn.linen` norm, Flax's own
    (``nn.Conv``, ``nn.Dense``: the channels-last rewrite, :mod:`.layout`), or one of these."""
    if layer.cls.startswith("nn."):
        return getattr(nn, layer.cls.removeprefix("nn."))
    if layer.is_norm:
        from .. import linen

        return getattr(linen, layer.cls)
    return globals()[layer.cls]


def build_layer(layer: Layer) -> nn.Module:
    """The linen module a :class:`~.ir.Layer` describes (unbound, unnamed)."""
    return layer_class(layer)(**dict(layer.kwargs))
