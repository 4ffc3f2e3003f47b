"""The translator's op table (``jaxbn.translate.ops.OPS``) against the torch callables it replaces.

For every entry, on random float64 inputs: its ``run`` equals each of its own torch callables
(``torch.*``, ``torch.nn.functional.*``, ``operator.*`` and ``Tensor`` methods, resolved the way
capture resolves them), and the source its ``write`` produces -- a one-operation model written by
:func:`jaxbn.translate.emit_source` (the file ``python -m jaxbn port --emit`` writes), executed --
computes the same. The calls are listed per entry below; an entry without calls fails, so a new
op needs its test.
"""

from __future__ import annotations

import dataclasses
import importlib
import operator
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import seed_of
from jaxbn.porting.errors import UnsupportedError
from jaxbn.translate import emit_source, ops
from jaxbn.translate.ir import NO_DEFAULT, Block, Op, Ref, Slice

TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class T:
    """A random tensor argument: ``name`` (the same name, the same values), ``shape``;
    ``integral`` draws whole numbers (so ``==`` and ``//`` meet ties), ``scale`` widens the range
    (so relu6 and hardsigmoid reach their flat parts), ``positive`` takes absolute values (for
    ``sqrt`` and ``log``), ``dtype`` (float64 unless given) converts them."""

    name: str
    shape: tuple[int, ...]
    integral: bool = False
    scale: float = 1.0
    positive: bool = False
    dtype: str = "float64"


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of an entry: ``args`` and ``kwargs`` as capture records them (tensors as
    :class:`T`, slices as :class:`~jaxbn.translate.ir.Slice`); ``only``: the torch callables it
    applies to (default: all of the entry's)."""

    args: tuple
    kwargs: tuple[tuple[str, Any], ...] = ()
    only: tuple[str, ...] | None = None


X, Y = T("x", (2, 3, 4)), T("y", (2, 3, 4))
WIDE = T("x", (2, 3, 4), scale=5.0)
POSITIVE = T("x", (2, 3, 4), positive=True)
ROW = T("y", (4,))
I, J = T("x", (3, 4), integral=True), T("y", (3, 4), integral=True)
SIGNAL, IMAGE, VOLUME = T("x", (2, 3, 9)), T("x", (2, 3, 7, 8)), T("x", (1, 2, 5, 6, 7))
F64, F32 = np.dtype("float64"), np.dtype("float32")


def binary(*extra: Call) -> list[Call]:
    """Tensor with tensor, with a broadcast row and with a Python number, then ``extra``."""
    return [Call((X, Y)), Call((X, ROW)), Call((X, 2.5)), *extra]


def unary(*extra: Call) -> list[Call]:
    """A wide-ranged tensor alone, then ``extra``."""
    return [Call((WIDE,)), *extra]


def comparison() -> list[Call]:
    """A comparison: tensors, a broadcast row, a number, whole numbers (ties), numbers alone."""
    return binary(Call((I, J)), Call((X, X)), Call((3, 4)), Call((4, 4)))


def convolutions(n: int) -> list[Call]:
    """``F.conv{n}d`` with torch's weight: bias, stride, padding (ints, tuples, ``'same'`` with
    an even kernel and dilation, ``'valid'``), dilation, groups, an unbatched input."""
    x = (SIGNAL, IMAGE, VOLUME)[n - 1]
    c = x.shape[1]
    w = T("w", (4, c) + (3, 2, 2)[:n])
    even = T("w", (2, c) + (4, 3, 2)[:n])
    grouped = T("w", (2 * c, 1) + (2,) * n)
    return [Call((x, w)), Call((x, w, T("b", (4,)), 2, 1)), Call((x, w, None, 1, "same", 2)),
            Call((x, even), (("padding", "same"),)), Call((x, even, T("b", (2,)), 1, "valid")),
            Call((x, w), (("stride", (2, 1, 1)[:n]), ("padding", (1, 0, 2)[:n]), ("dilation", (1, 2, 1)[:n]))),
            Call((x, grouped, T("b", (2 * c,))), (("groups", c), ("padding", 1))),
            Call((T("x", x.shape[1:]), w, T("b", (4,))))]


def pools(kind: str, n: int) -> list[Call]:
    """Calls of ``{kind}_pool{n}d`` with torch's positional order, ceil_mode and padding."""
    x = (SIGNAL, IMAGE, VOLUME)[n - 1]
    if kind == "max":  # kernel, stride, padding, dilation, ceil_mode
        return [Call((x, 2)), Call((x, 3, 2, 1, 1, True)), Call((x, 2, 1, 0, 2, False)),
                Call((x,), (("kernel_size", 3), ("stride", 2), ("ceil_mode", True)))]
    if kind == "avg":  # kernel, stride, padding, ceil_mode, count_include_pad (divisor_override)
        calls = [Call((x, 2)), Call((x, 3, 2, 1, True, False)), Call((x, 2, 2, 1, True, True))]
        return calls + ([Call((x, 2), (("divisor_override", 3),))] if n > 1 else [])
    sizes = {1: (4, 1), 2: ((3, None), 4), 3: ((2, None, 3), 1)}[n]
    return [Call((x, size)) for size in sizes]


def interpolations() -> list[Call]:
    """``F.interpolate``: nearest and (bi/tri)linear, by size and by scale factor (torch's
    float32 nearest index, its output size floor(n * s), the given scale vs a recomputed one)."""
    calls = []
    for x in (SIGNAL, IMAGE, VOLUME):
        calls += [Call((x,), (("scale_factor", 2),)), Call((x, 5)), Call((x, 13)),
                  Call((x,), (("scale_factor", 0.7),)), Call((x,), (("scale_factor", 1.7),)),
                  Call((x,), (("scale_factor", 1.7), ("recompute_scale_factor", True))),
                  Call((x,), (("scale_factor", 1 / 3),))]
    calls += [Call((IMAGE, (3, 17))), Call((IMAGE, None, (2.5, 0.5))), Call((T("x", (1, 2, 10, 7)), (3, 3)))]
    for mode, x in (("linear", SIGNAL), ("bilinear", IMAGE), ("trilinear", VOLUME)):
        for corners in (False, True):
            flags = (("mode", mode), ("align_corners", corners))
            calls += [Call((x,), (("scale_factor", 2), *flags)), Call((x, 3), flags),
                      Call((x, 11), flags), Call((x, 1), flags),
                      Call((x,), (("scale_factor", 1.7), *flags)),
                      Call((x,), (("scale_factor", 0.45), ("recompute_scale_factor", True), *flags))]
    calls += [Call((IMAGE, (5, 12)), (("mode", "bilinear"),))]
    return calls


def attentions() -> list[Call]:
    """``F.scaled_dot_product_attention`` on (N, heads, L, E) queries and (N, heads, S, E) keys:
    boolean masks (some False, a whole row False: zeros), float masks, broadcast ones,
    ``is_causal`` (alone and with a mask), a given ``scale``, grouped-query heads."""
    q, k, v = T("q", (2, 3, 5, 4)), T("k", (2, 3, 6, 4)), T("v", (2, 3, 6, 4))
    keep = T("m", (5, 6), integral=True, dtype="bool")  # False where a draw is 0
    rows = T("m", (2, 3, 5, 1), integral=True, dtype="bool")  # whole rows False
    keys = T("m", (2, 1, 1, 6), integral=True, dtype="bool")
    bias = T("m", (2, 3, 5, 6), scale=3.0)
    return [Call((q, k, v)), Call((q, k, v, keep)), Call((q, k, v), (("attn_mask", rows),)),
            Call((q, k, v, keys)), Call((q, k, v, bias)), Call((q, k, v), (("attn_mask", T("m", (1, 6))),)),
            Call((q, k, v, None, 0.0, True)), Call((q, k, v), (("is_causal", True), ("scale", 0.3))),
            Call((T("q", (2, 3, 7, 4)), k, v), (("is_causal", True),)),
            Call((q, k, v, keep, 0.0, True)), Call((q, k, v, bias), (("is_causal", True),)),
            Call((q, k, v, bias, 0.0, False), (("scale", 2.5),)), Call((q, k, v), (("scale", -0.5),)),
            Call((T("q", (2, 6, 5, 4)), k, v, keys), (("enable_gqa", True),)),
            Call((T("q", (5, 4)), T("k", (6, 4)), T("v", (6, 3)), keep))]


CALLS: dict[str, list[Call]] = {
    "operator.add": binary(),
    "operator.sub": binary(),
    "operator.mul": binary(),
    "operator.truediv": binary(),
    "operator.floordiv": binary(Call((I, J))),
    "operator.eq": binary(Call((I, J)), Call((X, X))),
    **{f"operator.{n}": comparison() for n in ("ne", "lt", "le", "gt", "ge")},
    "operator.mod": binary(Call((I, J)), Call((WIDE, -1.5)), Call((7, 3)), Call((-7, 3))),
    "operator.pow": [Call((POSITIVE, Y)), Call((X, 2)), Call((X, -1)), Call((POSITIVE, 0.5)),
                     Call((2.0, X)), Call((-2.0, 2))],
    "operator.matmul": [Call((X, T("y", (2, 4, 5)))), Call((X, ROW)), Call((ROW, T("z", (4, 3)))),
                        Call((T("x", (5, 1, 3, 4)), T("y", (2, 4, 2)))), Call((ROW, T("z", (4,))))],
    "operator.neg": [Call((X,))],
    "operator.getitem": [Call((X, 1)), Call((X, (Slice(None, None, None), 0))),
                         Call((X, Slice(1, None, None))), Call((X, (Ellipsis, Slice(None, 3, 2)))),
                         Call((X, (0, Slice(None, -1, None), Slice(1, 3, None))))],
    "getattr": [Call((X, "shape")), Call((X, "ndim"))],
    "identity": [Call((X,))],
    "guard": [Call((3, "int", 3)), Call((True, "bool", True)), Call((2.5, "float", 2.5))],
    "to_channels_first": [Call((T("x", (2, 7, 8, 3)),)), Call((T("x", (2, 5, 3)),))],
    "to_channels_last": [Call((IMAGE,)), Call((SIGNAL,))],
    "nn.max_pool": [Call((T("x", (2, 7, 8, 3)),), (("window_shape", (3, 3)), ("strides", (2, 2)),
                                                   ("padding", ((1, 1), (1, 1)))))],
    "nn.avg_pool": [Call((T("x", (2, 7, 8, 3)),), (("window_shape", (3, 2)), ("strides", (2, 1)),
                                                   ("padding", ((1, 1), (1, 1))), ("count_include_pad", flag)))
                    for flag in (True, False)],
    **{f"math.{n}": [Call((2.5,)), Call((7.0,))] for n in ("ceil", "floor", "sqrt", "log", "log2", "exp")},
    "relu": unary(),
    "relu6": unary(),
    "hardswish": unary(),
    "hardsigmoid": unary(),
    "silu": unary(),
    "sigmoid": unary(),
    "tanh": unary(),
    "gelu": unary(Call((WIDE,), (("approximate", "tanh"),))),
    "hardtanh": unary(Call((WIDE, -2.0, 3.0)), Call((WIDE,), (("max_val", 0.5),))),
    "elu": unary(Call((WIDE, 0.5))),
    "softplus": unary(Call((WIDE, 2.0, 3.0)), Call((WIDE,), (("beta", 0.5), ("threshold", 1.0)))),
    "mish": unary(),
    "leaky_relu": unary(Call((WIDE, 0.2)), Call((WIDE,), (("negative_slope", 0.3),))),
    "prelu": [Call((WIDE, T("w", (3,)))), Call((WIDE, T("w", (1,)))), Call((IMAGE, T("w", (3,)))),
              Call((T("x", (5,)), T("w", (1,))))],
    "softmax": [Call((X, 1)), Call((X,), (("dim", -1),))],
    "add": [Call((X, Y)), Call((X, ROW)), Call((X, 2.5)),
            Call((X, Y), (("alpha", 2),), only=("torch.add", "Tensor.add"))],
    "mul": [Call((X, Y)), Call((X, ROW)), Call((X, 2.5))],
    "sub": [Call((X, Y)), Call((X, ROW)), Call((X, 2.5)),
            Call((X, Y), (("alpha", 2),), only=("torch.sub", "torch.subtract", "Tensor.sub", "Tensor.subtract"))],
    "div": [Call((X, Y)), Call((X, ROW)), Call((X, 2.5)), Call((X, Y), (("rounding_mode", None),)),
            *[Call((x, y), (("rounding_mode", mode),)) for mode in ("trunc", "floor")
              for x, y in ((WIDE, Y), (I, J), (WIDE, -1.5), (WIDE, ROW))]],
    "pow": [Call((POSITIVE, Y)), Call((X, 2)), Call((X, -1)), Call((POSITIVE, 0.5)),
            Call((X,), (("exponent", 3),))],
    "neg": [Call((X,))],
    "abs": [Call((X,))],
    "sqrt": [Call((POSITIVE,))],
    "rsqrt": [Call((POSITIVE,))],
    "exp": [Call((X,))],
    "log": [Call((POSITIVE,))],
    "clamp": [Call((WIDE, -1.0, 2.0)), Call((WIDE, None, 0.5)), Call((WIDE,), (("min", 0.25),)),
              Call((WIDE, 2.0, 1.0)), Call((WIDE, ROW, T("z", (4,))))],
    "to": [Call((X, F32)), Call((X,), (("dtype", F32),)), Call((X, F64)), Call((X, F32, False, True)),
           Call((X,), (("dtype", F64), ("copy", True))), Call((WIDE, np.dtype("int64"))),
           Call((X, np.dtype("bool"))), Call((T("x", (2, 3), dtype="float32"), F64))],
    "type_as": [Call((X, T("y", (2,), dtype="float32"))), Call((X, Y)),
                Call((T("x", (3,), scale=5.0), T("y", (1,), dtype="int64")))],
    "float": [Call((X,)), Call((T("x", (2, 3), dtype="float32"),))],
    "double": [Call((X,)), Call((T("x", (2, 3), dtype="float32"),))],
    "half": [Call((X,)), Call((T("x", (2, 3), dtype="float16"),))],
    "matmul": [Call((X, T("y", (2, 4, 5)))), Call((X, ROW)), Call((ROW, T("z", (4, 3)))),
               Call((T("x", (5, 1, 3, 4)), T("y", (2, 4, 2)))), Call((ROW, T("z", (4,))))],
    "bmm": [Call((X, T("y", (2, 4, 5))))],
    "einsum": [Call(("bij,bjk->bik", X, T("y", (2, 4, 5)))), Call(("...j,j", X, ROW)),
               Call(("bij->bji", X)), Call(("bij,bij->", (X, Y)))],
    "scaled_dot_product_attention": attentions(),
    "cat": [Call(((X, Y), 1)), Call(((X, Y, X),)), Call(((X, T("z", (2, 1, 4))),), (("dim", 1),))],
    "stack": [Call(((X, Y),)), Call(((X, Y, X), 1)), Call(((X,),), (("dim", -1),))],
    "repeat": [Call((X, 2, 1, 3)), Call((X, (1, 2, 1, 2))), Call((ROW, 3, 2)), Call((X, 1, 1, 1))],
    "reshape_as": [Call((X, T("y", (4, 6)))), Call((X, X)), Call((T("x", (4,)), T("y", (2, 2))))],
    "flatten": [Call((X,)), Call((X, 1)), Call((X, 0, 1)), Call((T("x", ()),))],
    "mean": [Call((X,)), Call((X, 1)), Call((X, (0, 2), True)), Call((X,), (("dim", -1), ("keepdim", True)))],
    "sum": [Call((X,)), Call((X, 1)), Call((X, (0, 2), True)), Call((X,), (("dim", -1), ("keepdim", True)))],
    **{name: [Call((X,)), Call((X, 1)), Call((X, 0)), Call((X, (0, 2), True)), Call((X, ())),
              Call((X,), (("dim", -1), ("keepdim", True)))] for name in ("amax", "amin")},
    **{name: [Call((X,)), Call((X, 1)), Call((X, (0, 2), False, True)), Call((X, False)), Call((X, True)),
              Call((X,), (("dim", -1), ("unbiased", False))), Call((X, 2), (("correction", 0),)),
              Call((X, (1, 2)), (("correction", 2.5), ("keepdim", True))), Call((X,), (("keepdim", True),)),
              Call((T("x", (3, 1)), 1))] for name in ("var", "std")},
    "transpose": [Call((X, 0, 2)), Call((X, -1, 1))],
    "permute": [Call((X, (2, 0, 1))), Call((X, 1, 2, 0), only=("Tensor.permute",))],
    "reshape": [Call((X, (4, -1))), Call((X, 6, 4), only=("Tensor.reshape",))],
    "view": [Call((X, (4, -1))), Call((X, 2, -1))],
    "chunk": [Call((X, 2)), Call((X, 3, 2)), Call((X, 2), (("dim", 1),))],
    "split": [Call((X, 2)), Call((X, 3, 2)), Call((X, 2), (("dim", 1),)), Call((X, (1, 2), 1)),
              Call((X, (3, 0, 1)), (("dim", -1),)), Call((X, 5, 1)), Call((X, 1))],
    "unbind": [Call((X,)), Call((X, 1)), Call((X,), (("dim", -1),)), Call((ROW, 0))],
    "expand": [Call((T("x", (3, 1)), 2, 3, 4)), Call((T("x", (3, 1)), (3, -1))),
               Call((T("x", (3, 1)), (2, -1, 5))), Call((T("x", (1, 4)), -1, -1))],
    "expand_as": [Call((T("x", (3, 1)), T("y", (2, 3, 4)))), Call((ROW, X))],
    "squeeze": [Call((T("x", (2, 1, 3, 1)),)), Call((T("x", (2, 1, 3, 1)), 1)), Call((T("x", (2, 1, 3, 1)), 0))],
    "unsqueeze": [Call((X, 0)), Call((X, -1)), Call((X, 2))],
    "size": [Call((X,)), Call((X, 1)), Call((X, -1))],
    "dim": [Call((X,))],
    "contiguous": [Call((X,))],
    "interpolate": interpolations(),
    "layer_norm": [Call((X, (4,))), Call((X, (3, 4), T("w", (3, 4)), T("b", (3, 4)))),
                   Call((X, (4,), T("w", (4,))), (("eps", 0.3),)),
                   Call((X, (3, 4)), (("bias", T("b", (3, 4))), ("eps", 1e-3)))],
    "group_norm": [Call((IMAGE, 1)), Call((IMAGE, 3, T("w", (3,)), T("b", (3,)))),
                   Call((T("x", (2, 6, 5)), 2, T("w", (6,)), None, 0.2)),
                   Call((T("x", (2, 4, 3, 2, 2)), 2), (("bias", T("b", (4,))),))],
    "batch_norm": [Call((IMAGE, None, None), (("training", True),)),
                   Call((IMAGE, None, None, T("w", (3,)), T("b", (3,)), True, 0.1, 0.5)),
                   Call((T("x", (1, 4, 18)), None, None), (("training", True), ("momentum", 0.0), ("eps", 1e-6))),
                   Call((T("x", (5, 3)), None, None, None, T("b", (3,)), True)),
                   Call((IMAGE, T("m", (3,)), T("v", (3,), positive=True))),
                   Call((IMAGE, T("m", (3,)), T("v", (3,), positive=True), T("w", (3,)), T("b", (3,)))),
                   Call((SIGNAL, T("m", (3,)), T("v", (3,), positive=True), T("w", (3,))), (("eps", 0.25),))],
    "normalize": [Call((X,)), Call((X, 1.0, -1)), Call((X,), (("p", float("inf")), ("dim", 0))),
                  Call((X, 3.0, (1, 2))), Call((X,), (("eps", 10.0),))],
    **{f"conv{n}d": convolutions(n) for n in (1, 2, 3)},
    "linear_torch_layout": [Call((X, T("w", (5, 4)), T("b", (5,)))), Call((X, T("w", (5, 4)))),
                            Call((ROW, T("w", (2, 4)), T("b", (2,)))), Call((X, T("w", (4,))))],
    "pad": [Call((IMAGE, (1, 2))), Call((IMAGE, (1, 2, 0, 3)), (("value", -1.5),)),
            Call((IMAGE, (-1, 2, 3, -2), "constant", 0.25)), Call((X, (1, 1, 1, 1, 1, 1))),
            *[Call((x, p), (("mode", mode),)) for mode in ("reflect", "replicate", "circular")
              for x, p in ((SIGNAL, (2, 3)), (IMAGE, (1, 2, 3, 0)), (IMAGE, (-1, 2, 2, -3)),
                           (VOLUME, (1, 0, 2, 1, 0, 3)), (VOLUME, (-1, 1, 2, -2, 1, 1)))]],
    **{f"{kind}_pool{n}d": pools(kind, n) for kind in ("max", "avg") for n in (1, 2, 3)},
    **{f"{kind}_pool{n}d": pools(kind, n) for kind in ("adaptive_avg", "adaptive_max") for n in (1, 2, 3)},
}

def _nhwc_pool(pool):
    """torch's 2-d pool on an NHWC tensor, with Flax's pool arguments (what the channels-last
    rewrite replaces ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with)."""
    def run(x, window_shape, strides, padding, **kwargs):
        y = pool(x.permute(0, 3, 1, 2), window_shape, strides, [low for low, _ in padding], **kwargs)
        return y.permute(0, 2, 3, 1)
    return run


STANDS_IN_FOR = {
    # capture writes functional dropout with p=0 (its training flag fixed) as the identity
    "identity": {"torch.nn.functional.dropout(p=0)":
                 lambda x: torch.nn.functional.dropout(x, p=0.0, training=True)},
    # the channels-last rewrite (jaxbn/translate/layout.py): layout changes and Flax's pools
    "to_channels_first": {"torch.movedim(x, -1, 1)": lambda x: torch.movedim(x, -1, 1)},
    "to_channels_last": {"torch.movedim(x, 1, -1)": lambda x: torch.movedim(x, 1, -1)},
    "nn.max_pool": {"F.max_pool2d on NCHW": _nhwc_pool(torch.nn.functional.max_pool2d)},
    "nn.avg_pool": {"F.avg_pool2d on NCHW": _nhwc_pool(torch.nn.functional.avg_pool2d)},
}


def torch_callables(name: str) -> dict[str, Any]:
    """The entry's torch callables by path; each one capture finds this entry for."""
    found = {}
    for path in ops.OPS[name].torch:
        module, _, attribute = path.rpartition(".")
        if module == "Tensor":
            assert ops.tensor_methods()[attribute] == name, path
            found[path] = getattr(torch.Tensor, attribute)
        else:
            found[path] = getattr(importlib.import_module(module), attribute)
            assert ops.torch_callables()[found[path]] == name, path
    return {**found, **STANDS_IN_FOR.get(name, {})}


def tensors(value: Any, found: dict[str, T]) -> dict[str, T]:
    """The tensor arguments in ``value`` (nested), by name, in order of appearance."""
    if isinstance(value, T):
        assert found.setdefault(value.name, value) == value, f"two tensors named {value.name}"
    elif isinstance(value, tuple):
        for v in value:
            tensors(v, found)
    return found


def draw(t: T, rng: np.random.Generator) -> np.ndarray:
    """Random values for ``t``."""
    if t.integral:
        values = rng.integers(-4, 5, t.shape).astype(np.float64)
    else:
        values = np.asarray(t.scale * rng.standard_normal(t.shape))
    return (np.abs(values) if t.positive else values).astype(t.dtype)


def bind(value: Any, values: dict[str, Any], torch_dtypes: bool = False) -> Any:
    """``value`` with each :class:`T` replaced by its array and each ``Slice`` by a ``slice``;
    with ``torch_dtypes``, each NumPy dtype by torch's (capture gives the op NumPy's)."""
    if isinstance(value, T):
        return values[value.name]
    if isinstance(value, tuple):
        return tuple(bind(v, values, torch_dtypes) for v in value)
    if isinstance(value, Slice):
        return slice(value.start, value.stop, value.step)
    if isinstance(value, np.dtype) and torch_dtypes:
        return getattr(torch, value.name)
    return value


def as_ir(value: Any) -> Any:
    """``value`` as capture records it: each :class:`T` a :class:`~jaxbn.translate.ir.Ref`."""
    if isinstance(value, T):
        return Ref(value.name)
    if isinstance(value, tuple):
        return tuple(as_ir(v) for v in value)
    return value


def comparable(value: Any) -> Any:
    """Tensors and arrays as NumPy, ``torch.Size`` as a tuple, sequences element by element."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, (tuple, list)):
        return tuple(comparable(v) for v in value)
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return np.asarray(value)


def assert_same(actual: Any, expected: Any, what: str) -> None:
    """Equal structure, types of Python values, shapes and dtypes; arrays within ``TOL``."""
    actual, expected = comparable(actual), comparable(expected)
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), (what, actual, expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]")
        return
    if not isinstance(expected, np.ndarray):
        assert type(actual) is type(expected) and actual == expected, (what, actual, expected)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual, expected)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL, err_msg=what)


def written_model(name: str, call: Call, inputs: list[str]) -> tuple[str, Any]:
    """The source ``emit_source`` writes for a model whose forward is this one call, and its
    ``Model`` (the source executed)."""
    block = Block(torch_type="OneOp", torch_path="", inputs=tuple((n, NO_DEFAULT) for n in inputs),
                  ops=(Op("out", "function", name, as_ir(call.args),
                          tuple((k, as_ir(v)) for k, v in call.kwargs)),),
                  output=None if name == "guard" else Ref("out"), children=())  # a guard has no value
    source = emit_source(block)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<{name}>", "exec"), namespace)  # noqa: S102 - the emitted file
    return source, namespace["Model"]()


def test_every_entry_has_calls_and_every_call_an_entry():
    assert set(CALLS) == set(ops.OPS), {"without calls": sorted(set(ops.OPS) - set(CALLS)),
                                        "not an entry": sorted(set(CALLS) - set(ops.OPS))}


def drawn(name: str):
    """The entry's calls, each with random values for its tensors (by name)."""
    rng = np.random.default_rng(seed_of(name))
    for call in CALLS[name]:
        yield call, {n: draw(t, rng) for n, t in tensors((call.args, call.kwargs), {}).items()}


def torch_results(name: str, call: Call, arrays: dict[str, np.ndarray]):
    """``(path, result, tensor arguments)`` of each of the entry's torch callables ``call``
    applies to, on fresh tensors holding ``arrays``."""
    callables = torch_callables(name)
    applicable = [p for p in callables if call.only is None or p in call.only]
    assert applicable, (name, call)
    for path in applicable:
        values = {n: torch.from_numpy(np.array(a)) for n, a in arrays.items()}
        args, kwargs = bind(call.args, values, True), dict(bind(call.kwargs, values, True))
        yield path, callables[path](*args, **kwargs), values


def storages(value: Any) -> set[int]:
    """The addresses of the storages of the tensors in ``value`` (nested)."""
    if isinstance(value, torch.Tensor):
        return {value.untyped_storage().data_ptr()}
    if isinstance(value, (tuple, list)):
        return set().union(*map(storages, value))
    return set()


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_run_and_written_source_equal_torch(name):
    if name not in CALLS:
        pytest.fail(f"{name} is an op table entry this test has no calls for: add them to CALLS")
    rule = ops.OPS[name]
    assert torch_callables(name), f"{name} replaces no torch callable: say what it stands in for (STANDS_IN_FOR)"
    for call, arrays in drawn(name):
        jax_values = {n: jnp.asarray(a) for n, a in arrays.items()}
        result = rule.run(*bind(call.args, jax_values), **dict(bind(call.kwargs, jax_values)))
        for path, expected, _ in torch_results(name, call, arrays):
            assert_same(result, expected, f"{name} run vs {path} on {call}")
        source, model = written_model(name, call, list(arrays))
        assert_same(model.apply({}, *jax_values.values()), result, f"{name} written as\n{source}")


def in_place(path: str) -> bool:
    """An in-place variant: ``Tensor.add_``, ``torch.relu_``, ``operator.iadd``."""
    module, _, attribute = path.rpartition(".")
    return attribute.endswith("_") or (module == "operator" and attribute[0] == "i"
                                        and hasattr(operator, attribute[1:]))


@pytest.mark.parametrize("name", sorted(set(ops.OPS) & set(CALLS)))
def test_view_marks_the_ops_whose_torch_result_shares_memory(name):
    """``view=True`` exactly where torch's result shares memory with a tensor argument in one of
    the calls (ops returning numbers or shapes, ``size``, ``dim``, ``getattr``, are views)."""
    shared, tensor_results = [], False
    for call, arrays in drawn(name):
        for path, expected, inputs in torch_results(name, call, arrays):
            if in_place(path) or dict(call.kwargs).get("inplace"):
                continue  # returns its argument: capture rebinds it (never asks ``view``)
            tensor_results |= bool(storages(expected))
            if storages(expected) & storages(tuple(inputs.values())):
                shared.append(f"{path} on {call}")
    if shared:
        assert ops.OPS[name].view, f"{name}: torch's result shares memory with an argument ({shared[0]})"
    elif tensor_results:
        assert not ops.OPS[name].view, f"{name} is marked view=True, but no call's result shares memory"


@pytest.mark.parametrize("name, args, kwargs, error", [
    # torch would update the running statistics in place
    ("batch_norm", (IMAGE, T("m", (3,)), T("v", (3,), positive=True)), (("training", True),), UnsupportedError),
    ("to", (X, "cpu"), (), UnsupportedError),
    # random
    ("scaled_dot_product_attention", (T("q", (2, 3, 5, 4)), T("k", (2, 3, 6, 4)), T("v", (2, 3, 6, 4)), None, 0.1),
     (), UnsupportedError),
    ("to", (X,), (("device", "cpu"), ("dtype", F32)), UnsupportedError),
    ("to", (X, Y), (), UnsupportedError),
    # refused by torch too
    ("batch_norm", (IMAGE, None, None), (), ValueError),
    ("conv2d", (IMAGE, T("w", (4, 3, 3, 3)), None, 2, "same"), (), ValueError),
    ("clamp", (X,), (), ValueError),
    ("hardtanh", (X, 1.0, -1.0), (), ValueError),
    ("var", (X,), (("unbiased", True), ("correction", 0)), ValueError),
])
def test_refused_calls(name, args, kwargs, error):
    rng = np.random.default_rng(0)
    values = {n: jnp.asarray(draw(t, rng)) for n, t in tensors((args, kwargs), {}).items()}
    with pytest.raises(error):
        ops.OPS[name].run(*bind(args, values), **dict(bind(kwargs, values)))
