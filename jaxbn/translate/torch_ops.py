"""torch's tensor functions in JAX, with torch's signatures and layout (channels on axis 1).

What :func:`jaxbn.from_torch` and the files ``python -m jaxbn port`` emits call for
``torch.nn.functional`` / ``torch`` functions and ``Tensor`` methods (``F.relu(x)``,
``torch.flatten(x, 1)``, ``x.view(n, -1)``). Pure JAX: no torch, no flax. Pools and padding
follow torch's formulas exactly (``ceil_mode``, ``count_include_pad``, adaptive bins).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Sequence
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
    """``F.hardsigmoid``: ``min(max(x + 3, 0), 6) / 6``, with torch's gradient: its CPU kernel
    multiplies by the float32 constant ``1/6`` in every dtype (``0.1666666716337204``, ~3e-8
    relative off in float64; docs/semantics.md)."""
    return _hardsigmoid(x)


_ONE_SIXTH_FLOAT32 = float(np.float32(1.0) / np.float32(6.0))


@jax.custom_vjp
def _hardsigmoid(x: jax.Array) -> jax.Array:
    return relu6(x + 3) / 6


def _hardsigmoid_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _hardsigmoid(x), x


def _hardsigmoid_backward(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    inside = (x > -3) & (x < 3)  # torch's hardsigmoid_backward: 0 at and beyond +-3
    return (jnp.where(inside, g * jnp.asarray(_ONE_SIXTH_FLOAT32, g.dtype), jnp.zeros_like(g)),)


_hardsigmoid.defvjp(_hardsigmoid_forward, _hardsigmoid_backward)


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


def hardtanh(x: jax.Array, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> jax.Array:
    """``F.hardtanh`` / ``F.hardtanh_``: ``x`` clamped to ``[min_val, max_val]``."""
    if min_val > max_val:
        raise ValueError("hardtanh: min_val cannot be greater than max_val")
    return clamp(x, min_val, max_val)


def elu(x: jax.Array, alpha: float = 1.0, inplace: bool = False) -> jax.Array:
    """``F.elu`` / ``F.elu_``: ``x if x > 0 else alpha * (exp(x) - 1)``."""
    return jnp.where(x > 0, x, alpha * jnp.expm1(x))


def softplus(x: jax.Array, beta: float = 1.0, threshold: float = 20.0) -> jax.Array:
    """``F.softplus``: ``log(1 + exp(beta * x)) / beta``, ``x`` itself where ``beta * x >
    threshold``."""
    return jnp.where(x * beta > threshold, x, jnp.log1p(jnp.exp(x * beta)) / beta)


def mish(x: jax.Array, inplace: bool = False) -> jax.Array:
    """``F.mish``: ``x * tanh(softplus(x))``."""
    return x * jnp.tanh(jnp.log1p(jnp.exp(x)))


# ---------------------------------------------------------------- elementwise


def neg(x: jax.Array) -> jax.Array:
    """``torch.neg``."""
    return -x


def abs(x: jax.Array) -> jax.Array:  # noqa: A001
    """``torch.abs``."""
    return jnp.abs(x)


def sqrt(x: jax.Array) -> jax.Array:
    """``torch.sqrt``."""
    return jnp.sqrt(x)


def rsqrt(x: jax.Array) -> jax.Array:
    """``torch.rsqrt``: ``1 / sqrt(x)``."""
    return lax.rsqrt(x)


def exp(x: jax.Array) -> jax.Array:
    """``torch.exp``."""
    return jnp.exp(x)


def log(x: jax.Array) -> jax.Array:
    """``torch.log``."""
    return jnp.log(x)


def pow(x: Any, exponent: Any) -> Any:  # noqa: A001
    """``torch.pow`` (a tensor or a number as either operand)."""
    return x ** exponent


def clamp(x: jax.Array, min: Any = None, max: Any = None) -> jax.Array:  # noqa: A002
    """``torch.clamp`` / ``torch.clip``: ``min(max(x, min), max)`` (so ``max`` wins where
    ``min > max``); either bound may be ``None``, not both."""
    if min is None and max is None:
        raise ValueError("clamp: at least one of 'min' or 'max' must not be None")
    x = x if min is None else jnp.maximum(x, min)
    return x if max is None else jnp.minimum(x, max)


def sub(x: Any, other: Any, alpha: float = 1) -> Any:
    """``torch.sub``: ``x - alpha * other``."""
    return add(x, other, -alpha)


def div(x: Any, other: Any, rounding_mode: str | None = None) -> Any:
    """``torch.div``: true division, or rounded toward zero (``'trunc'``) or down (``'floor'``,
    Python's ``//``). Integer operands stay integers when rounded, as in torch."""
    if rounding_mode is None:
        return x / other
    if rounding_mode == "floor":
        return x // other
    if rounding_mode != "trunc":
        raise ValueError(f"div: rounding_mode must be None, 'trunc' or 'floor', got {rounding_mode!r}")
    if jnp.issubdtype(jnp.result_type(x, other), jnp.integer):  # exact: C's integer division
        quotient = jnp.abs(x) // jnp.abs(other)
        return jnp.where((x < 0) != (other < 0), -quotient, quotient)
    return jnp.trunc(x / other)


# ---------------------------------------------------------------- dtypes


def to(x: jax.Array, dtype: Any = None, non_blocking: bool = False, copy: bool = False,
       memory_format: Any = None, *, device: Any = None) -> jax.Array:
    """``Tensor.to(dtype, non_blocking=False, copy=False)`` / ``Tensor.to(dtype=...)``: a dtype
    conversion (JAX's rounding, torch's: to nearest, toward zero for integers).
    ``non_blocking`` and ``copy`` mean nothing for JAX arrays.

    Raises:
      UnsupportedError: a device, or another tensor, instead of a dtype.
    """
    from ..porting.errors import UnsupportedError

    if device is not None or isinstance(dtype, (str, jax.Array, np.ndarray)):
        raise UnsupportedError(f"Tensor.to: only a dtype argument is supported, not {device or dtype!r}")
    if dtype is None:
        return x
    try:
        return x.astype(np.dtype(dtype))
    except TypeError:
        raise UnsupportedError(f"Tensor.to: {dtype!r} is not a dtype") from None


def type_as(x: jax.Array, other: jax.Array) -> jax.Array:
    """``Tensor.type_as(other)``: ``x`` converted to ``other``'s dtype."""
    return to(x, other.dtype)


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


def reshape_as(x: jax.Array, other: jax.Array) -> jax.Array:
    """``Tensor.reshape_as(other)`` / ``Tensor.view_as(other)``: ``x.reshape(other.size())``."""
    return reshape(x, tuple(other.shape))


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


def stack(tensors: Sequence[jax.Array], dim: int = 0) -> jax.Array:
    """``torch.stack``."""
    return jnp.stack(list(tensors), axis=dim)


def repeat(x: jax.Array, *sizes: Any) -> jax.Array:
    """``Tensor.repeat(*sizes)``: ``x`` tiled ``sizes[i]`` times along axis ``i``; extra sizes
    add leading axes (fewer sizes than axes: refused, as torch does)."""
    sizes = _shape_arguments(sizes)
    if len(sizes) < x.ndim:
        raise ValueError(f"repeat: {len(sizes)} sizes for a tensor of rank {x.ndim}")
    return jnp.tile(x, sizes)


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


def unbind(x: jax.Array, dim: int = 0) -> tuple[jax.Array, ...]:
    """``torch.unbind`` / ``Tensor.unbind``: the slices along ``dim``, that axis removed."""
    if x.ndim == 0:
        raise ValueError("unbind: a 0-d tensor has no dimension to unbind")
    axis = operator.index(dim) % x.ndim
    return tuple(lax.index_in_dim(x, i, axis=axis, keepdims=False) for i in range(x.shape[axis]))


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
    """``dim`` as JAX's ``axis``: an int, a tuple (``()`` stays ``()``) or ``None``."""
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def _every_axis_if_empty(dim: Any) -> Any:
    """``dim`` of ``amax`` / ``amin``: no axes (``()``, ``[]``) means every axis."""
    axes = _axes(dim)
    return None if axes == () else axes


def amax(x: jax.Array, dim: Any = (), keepdim: bool = False) -> jax.Array:
    """``torch.amax`` (no ``dim``: every axis)."""
    return jnp.max(x, axis=_every_axis_if_empty(dim), keepdims=keepdim)


def amin(x: jax.Array, dim: Any = (), keepdim: bool = False) -> jax.Array:
    """``torch.amin`` (no ``dim``: every axis)."""
    return jnp.min(x, axis=_every_axis_if_empty(dim), keepdims=keepdim)


def var(x: jax.Array, dim: Any = None, unbiased: bool | None = None, keepdim: bool = False, *,
        correction: float | None = None) -> jax.Array:
    """``torch.var(input, dim=None, *, correction=1, keepdim=False)``, also with torch's older
    ``unbiased`` (``var(input, dim, unbiased, keepdim)``, ``var(input, unbiased)``): the sum of
    squared deviations over ``max(0, n - correction)``, ``correction = 1`` unless ``unbiased``
    is False."""
    if isinstance(dim, bool):  # var(input, unbiased)
        dim, unbiased = None, dim
    if correction is not None and unbiased is not None:
        raise ValueError("var: give correction or unbiased, not both")
    if correction is None:
        correction = 0 if unbiased is False else 1
    axes = _axes(dim)
    n = math.prod(x.shape[int(a)] for a in (range(x.ndim) if axes is None else np.atleast_1d(axes)))
    squares = jnp.sum(jnp.square(x - jnp.mean(x, axis=axes, keepdims=True)), axis=axes, keepdims=keepdim)
    return squares / builtins.max(0, n - correction)


def std(x: jax.Array, dim: Any = None, unbiased: bool | None = None, keepdim: bool = False, *,
        correction: float | None = None) -> jax.Array:
    """``torch.std``: the square root of :func:`var` (same arguments)."""
    return jnp.sqrt(var(x, dim, unbiased, keepdim, correction=correction))


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


def scaled_dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                                 attn_mask: jax.Array | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False) -> jax.Array:
    """``F.scaled_dot_product_attention``: ``softmax(query @ key^T * scale + bias) @ value`` over
    ``(..., L, E)`` queries and ``(..., S, E)`` keys, as torch's reference: ``scale`` is
    ``1 / sqrt(E)`` unless given; a boolean ``attn_mask`` keeps the scores where it is True (the
    others -inf), a float one is added to them; ``is_causal`` keeps query ``i``'s keys ``j <= i``
    (with a mask too, both apply: torch's CPU kernel); ``enable_gqa`` repeats each key / value
    head ``heads(query) / heads(key)`` times (axis -3). A query whose every score is -inf gets
    zeros, as in torch (its ``_safe_softmax``), not NaN.

    Raises:
      UnsupportedError: ``dropout_p`` other than 0 (random: not reproducible).
    """
    from ..porting.errors import UnsupportedError

    if dropout_p != 0:
        raise UnsupportedError(f"F.scaled_dot_product_attention: dropout_p={dropout_p!r} drops attention "
                               "weights at random and cannot be reproduced; only dropout_p=0 is supported")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        if query.shape[-3] % key.shape[-3] or query.shape[-3] % value.shape[-3]:
            raise ValueError(f"scaled_dot_product_attention: {query.shape[-3]} query heads are not a "
                             f"multiple of {key.shape[-3]} key / {value.shape[-3]} value heads")
        key = jnp.repeat(key, query.shape[-3] // key.shape[-3], axis=-3)
        value = jnp.repeat(value, query.shape[-3] // value.shape[-3], axis=-3)
    factor = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = matmul(query, jnp.swapaxes(key, -2, -1)) * factor
    if attn_mask is not None and attn_mask.dtype == jnp.bool_:
        scores = jnp.where(attn_mask, scores, -jnp.inf)
    elif attn_mask is not None:
        scores = scores + attn_mask
    if is_causal:
        length, source = scores.shape[-2:]
        scores = jnp.where(np.tril(np.ones((length, source), bool)), scores, -jnp.inf)
    masked = jnp.all(scores == -jnp.inf, axis=-1, keepdims=True)
    weights = jax.nn.softmax(jnp.where(masked, 0, scores), axis=-1)
    return matmul(jnp.where(masked, 0, weights), value)


_CONVERSIONS = {"bool": bool, "int": int, "float": float, "index": operator.index, "len": len}


def guard(value: Any, conversion: str, expected: Any) -> None:
    """A specialization's check (``torch.export``'s guard): when translated, the torch forward
    turned ``value`` -- a shape, or a number computed from shapes -- into the plain Python
    ``expected`` (``conversion``: ``bool`` for a branch, ``int``, ``float``, ``index``, ``len``)
    and took the path that value chose. Shapes are static in JAX, so this runs once per trace.

    Raises:
      ValueError: this input gives another value: torch would run a different forward.
    """
    actual = _CONVERSIONS[conversion](value)
    if actual != expected:
        raise ValueError(
            f"this model was specialized when translated: its torch forward read {conversion}(...) "
            f"= {expected!r} from the example input's shapes, and this input gives {actual!r}, for "
            "which torch runs a different forward; translate again with an example of this shape")


def _math(name: str) -> Callable[[float], Any]:
    function = getattr(math, name)

    def apply(x: float) -> Any:
        return function(x)

    apply.__name__ = f"math_{name}"
    apply.__doc__ = (f"``math.{name}`` of a number computed from shapes (torch.fx records the "
                     "calls of ``math`` functions).")
    return apply


MATH_FUNCTIONS = ("ceil", "floor", "sqrt", "log", "log2", "exp")
math_ceil, math_floor, math_sqrt, math_log, math_log2, math_exp = map(_math, MATH_FUNCTIONS)


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


def _spatial_variant(function, spatial: int, stem: str | None = None):
    """``function(x, spatial, ...)`` as torch's ``F.<stem>{spatial}d(x, ...)`` (``stem``: the
    function's name unless given)."""
    def variant(x, *args, **kwargs):
        return function(x, spatial, *args, **kwargs)

    variant.__name__ = f"{stem or function.__name__}{spatial}d"
    variant.__doc__ = f"``F.{variant.__name__}``."
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


def batch_norm(x: jax.Array, running_mean: jax.Array | None, running_var: jax.Array | None,
               weight: jax.Array | None = None, bias: jax.Array | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5) -> jax.Array:
    """``F.batch_norm`` on ``(N, C, *)`` by :func:`jaxbn.batch_norm`: with the batch's statistics
    (``training=True``, no running statistics: timm's ``StdConv2d`` standardizing its weight) or
    the running ones (``training=False``), then ``* weight + bias`` per channel.

    Raises:
      UnsupportedError: ``training=True`` with running statistics (torch updates them in place).
      ValueError: ``training=False`` without them (torch refuses it too).
    """
    from ..functional import BatchNormFlags, BatchNormParams, BatchNormState, counter_dtype
    from ..functional import batch_norm as core_batch_norm
    from ..porting.errors import UnsupportedError

    given = running_mean is not None, running_var is not None
    if training and any(given):
        raise UnsupportedError("F.batch_norm with training=True and running statistics updates "
                               "running_mean and running_var in place: not supported")
    if not training and not all(given):
        raise ValueError("F.batch_norm: running_mean and running_var must be given in evaluation mode")
    state = None if training else BatchNormState(running_mean, running_var, jnp.zeros((), counter_dtype()))
    params = None
    if weight is not None or bias is not None:
        like = weight if weight is not None else bias
        params = BatchNormParams(jnp.ones_like(like) if weight is None else weight,
                                 jnp.zeros_like(like) if bias is None else bias)
    flags = BatchNormFlags(training=bool(training), momentum=momentum, eps=eps)
    return core_batch_norm(x, state, params, flags)[0]


def normalize(x: jax.Array, p: float = 2.0, dim: Any = 1, eps: float = 1e-12, out: None = None) -> jax.Array:
    """``F.normalize``: ``x / max(norm_p(x, dim), eps)`` (the vector ``p``-norm over ``dim``)."""
    norm = jnp.linalg.vector_norm(x, ord=p, axis=_axes(dim), keepdims=True)
    return x / jnp.maximum(norm, eps)


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


def conv_torch_layout(x: jax.Array, spatial: int, weight: jax.Array, bias: jax.Array | None = None,
                      stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> jax.Array:
    """``F.conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)``: :func:`conv`
    with torch's weight ``(out, in / groups, *kernel)``; an unbatched input ``(C, *spatial)``
    too. ``padding='same'`` with a stride other than 1 is refused, as torch does."""
    if weight.ndim != spatial + 2 or x.ndim not in (spatial + 1, spatial + 2):
        raise ValueError(f"conv{spatial}d: weight of shape {weight.shape}, input of shape {x.shape}")
    stride = spatial_tuple(stride, spatial)
    if padding == "same" and any(s != 1 for s in stride):
        raise ValueError(f"conv{spatial}d: padding='same' is not supported for strided convolutions")
    if x.ndim == spatial + 1:
        return conv_torch_layout(x[None], spatial, weight, bias, stride, padding, dilation, groups)[0]
    kernel = jnp.moveaxis(weight, (0, 1), (-1, -2))  # (*kernel, in / groups, out)
    return conv(x, kernel, bias, stride, padding, spatial_tuple(dilation, spatial), groups)


conv1d, conv2d, conv3d = (_spatial_variant(conv_torch_layout, n, "conv") for n in (1, 2, 3))


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``F.linear`` with a Flax-layout kernel ``(in, out)``."""
    y = jnp.matmul(x, kernel)
    return y if bias is None else y + bias


def linear_torch_layout(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``F.linear(input, weight, bias=None)``: :func:`linear` with torch's weight ``(out, in)``
    (or ``(in,)``)."""
    return linear(x, weight.T, bias)
