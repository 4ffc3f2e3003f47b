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
    "AdaptiveAvgPool", "AdaptiveMaxPool", "AvgPool", "Conv", "Dropout", "Flatten", "GELU",
    "Hardsigmoid", "Hardswish", "Identity", "LeakyReLU", "Linear", "MaxPool", "ReLU", "ReLU6",
    "SiLU", "Sigmoid", "Softmax", "StochasticDepth", "Tanh", "build_layer", "layer_class",
]


def _uniform_fan_in(fan_in: int):
    """torch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = len(self.kernel_size)
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        kernel = self.param("kernel", _uniform_fan_in(fan_in),
                            (*self.kernel_size, self.in_channels // self.groups, self.out_channels),
                            self.param_dtype)
        bias = self.param("bias", _uniform_fan_in(fan_in), (self.out_channels,),
                          self.param_dtype) if self.bias else None
        return F.conv(x, kernel, bias, F.spatial_tuple(self.stride, spatial), self.padding,
                      F.spatial_tuple(self.dilation, spatial), self.groups, self.padding_mode)


class Linear(nn.Module):
    """``torch.nn.Linear``. Variables: ``params: {kernel (in, out), bias}``."""

    in_features: int
    out_features: int
    bias: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = _uniform_fan_in(self.in_features)
        kernel = self.param("kernel", init, (self.in_features, self.out_features), self.param_dtype)
        bias = self.param("bias", init, (self.out_features,), self.param_dtype) if self.bias else None
        return F.linear(x, kernel, bias)


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


class Dropout(nn.Module):
    """``torch.nn.Dropout``: zeroes with probability ``p`` and scales by ``1 / (1 - p)`` when
    training (draws from the ``'dropout'`` rng); the identity in eval or with ``p = 0``."""

    p: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dropout(rate=self.p, deterministic=not train or self.p == 0)(x)


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
    """The linen class a :class:`~.ir.Layer` names: a :mod:`jaxbn.linen` norm, or one of these."""
    if layer.is_norm:
        from .. import linen

        return getattr(linen, layer.cls)
    return globals()[layer.cls]


def build_layer(layer: Layer) -> nn.Module:
    """The linen module a :class:`~.ir.Layer` describes (unbound, unnamed)."""
    return layer_class(layer)(**dict(layer.kwargs))
