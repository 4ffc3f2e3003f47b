"""A captured block computing channels-last (NHWC) inside: :func:`channels_last`.

A pure rewrite of the IR, so the in-memory module and the emitted file are the same NHWC model.
Every value is either *plain* (torch's layout) or *NHWC* (a tensor of rank >= 3 whose torch axes
``(N, C, *spatial)`` are stored as ``(N, *spatial, C)``). Blocks take and return their tensors of
rank >= 3 in NHWC (so a child returning a list returns its entries that way). Then:

- convolutions and linear layers become Flax's own ``nn.Conv`` / ``nn.Dense`` (same ``kernel`` /
  ``bias`` variables, so porting and the round trip to torch are unchanged), BatchNorm /
  InstanceNorm normalize ``axis=-1``, max / average pools are ``nn.max_pool`` / ``nn.avg_pool``,
  a global adaptive average pool is a mean over the spatial axes;
- elementwise layers and functions, ``cat`` and reductions keep NHWC, their axes renumbered;
- anything else (a reshape, a shape read, a ``Linear`` on a rank-4 tensor, a conv with
  ``padding_mode='reflect'``, ...) reads its tensors in torch's layout: the rewrite inserts the
  transpose (``F.to_channels_first``), so the model is always torch's, and idiomatic wherever
  the network is a CNN. A transpose read only for its shape costs nothing (XLA drops it).

Needs each value's rank (:func:`.module.value_ranks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..porting.errors import UnsupportedError
from .ir import Block, Dict, Layer, Op, Ref, fresh_name

__all__ = ["channels_last"]

NHWC, PLAIN, PARTS = "nhwc", "plain", "parts"

_ELEMENTWISE_LAYERS = frozenset({
    "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "Sigmoid", "Tanh", "GELU", "LeakyReLU",
    "Identity", "Dropout", "StochasticDepth"})
_ELEMENTWISE_OPS = frozenset({
    "relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid", "tanh", "gelu", "leaky_relu",
    "hardtanh", "elu", "softplus", "mish", "identity", "add", "sub", "mul", "div", "neg", "abs",
    "sqrt", "rsqrt", "exp", "log", "pow", "clamp", "contiguous",
    *(f"operator.{n}" for n in ("add", "sub", "mul", "truediv", "floordiv", "neg", "pow", "mod"))})
"""Ops whose result has the layout of their tensor arguments when those agree in rank."""
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin"})


def _axis(dim: int, rank: int) -> int:
    """A torch axis of a rank-``rank`` tensor -> its position in NHWC storage."""
    dim = dim % rank
    return 0 if dim == 0 else rank - 1 if dim == 1 else dim - 1


def _storage(rank: int) -> list[int]:
    """NHWC storage order as torch axes: ``[0, 2, ..., rank - 1, 1]``."""
    return [0, *range(2, rank), 1]


def channels_last(block: Block, ranks: Mapping[int, Mapping[str, int]]) -> Block:
    """``block`` (and the blocks below it) rewritten to compute in NHWC: same inputs and outputs
    as torch's but every tensor of rank >= 3 in NHWC, same variables."""
    return _Rewrite(block, ranks).run()


class _Rewrite:
    def __init__(self, block: Block, ranks: Mapping[int, Mapping[str, int]]):
        self.block, self.all_ranks = block, ranks
        self.ranks = dict(ranks.get(id(block), {}))
        self.layout: dict[str, str] = {}
        self.ops: list[Op] = []
        self.children = dict(block.children)
        self.new_children: dict[str, Any] = {}
        self.names = {n for n, _ in block.inputs} | {op.out for op in block.ops}
        self.converted: dict[tuple[str, str], str] = {}

    def run(self) -> Block:
        for name, _ in self.block.inputs:
            self.layout[name] = NHWC if self.ranks.get(name, 0) >= 3 else PLAIN
        for op in self.block.ops:
            self._op(op)
        output = self._as_convention(self.block.output)
        children = tuple((n, self.new_children.get(n, c)) for n, c in self.block.children
                         if n in self.new_children or any(o.kind == "module" and o.target == n for o in self.ops))
        return dataclasses.replace(self.block, ops=tuple(self.ops), output=output, children=children)

    # ---------------------------------------------------------------- values

    def _rank(self, value: Any) -> int:
        return self.ranks.get(value.name, 0) if isinstance(value, Ref) else 0

    def _fresh(self, base: str) -> str:
        return fresh_name(self.names, base)

    def _convert(self, value: Any, to: str) -> Any:
        """``value`` (an argument, possibly nested) with its tensors in layout ``to``."""
        if isinstance(value, tuple):
            return tuple(self._convert(v, to) for v in value)
        if isinstance(value, Dict):
            return Dict(tuple((k, self._convert(v, to)) for k, v in value.items))
        if not isinstance(value, Ref) or self._rank(value) < 3:
            if isinstance(value, Ref) and self.layout.get(value.name) == PARTS:
                raise UnsupportedError(
                    f"{self.block.torch_path or 'the model'} ({self.block.torch_type}): a list "
                    "returned by a submodule is used whole; channels_last=True does not support "
                    "this: translate with channels_last=False")
            return value
        if self.layout.get(value.name, PLAIN) == to:
            return value
        key = (value.name, to)
        if key not in self.converted:
            out = self._fresh(f"{value.name}_{'nchw' if to == PLAIN else 'nhwc'}")
            function = "to_channels_first" if to == PLAIN else "to_channels_last"
            self.ops.append(Op(out, "function", function, (value,)))
            self.ranks[out], self.layout[out] = self._rank(value), to
            self.converted[key] = out
        return Ref(self.converted[key])

    def _as_convention(self, value: Any) -> Any:
        """Tensors of rank >= 3 in NHWC (what a block takes and returns)."""
        if isinstance(value, tuple):
            return tuple(self._as_convention(v) for v in value)
        if isinstance(value, Dict):
            return Dict(tuple((k, self._as_convention(v)) for k, v in value.items))
        return self._convert(value, NHWC) if isinstance(value, Ref) and self._rank(value) >= 3 else value

    def _emit(self, op: Op, layout: str) -> None:
        self.ops.append(op)
        self.layout[op.out] = layout if self.ranks.get(op.out, 0) >= 3 else PLAIN

    def _plain(self, op: Op) -> None:
        """Torch's layout in, torch's layout out."""
        if op.kind == "module":
            self._decide(op.target, self.children[op.target])
        args = self._convert(op.args, PLAIN)
        kwargs = tuple((k, self._convert(v, PLAIN)) for k, v in op.kwargs)
        self._emit(dataclasses.replace(op, args=args, kwargs=kwargs), PLAIN)

    # ---------------------------------------------------------------- ops

    def _op(self, op: Op) -> None:
        if op.kind == "variable":
            self._emit(op, PLAIN)
        elif op.kind == "module":
            child = self.children[op.target]
            if isinstance(child, Block):
                self._block_call(op, child)
            else:
                self._layer_call(op, child)
        elif op.target == "operator.getitem" and self.layout.get(getattr(op.args[0], "name", ""), PLAIN) == PARTS:
            self._emit(op, NHWC)  # an entry of a child's list: NHWC by the convention
        else:
            self._function(op)

    def _block_call(self, op: Op, child: Block) -> None:
        self.new_children[op.target] = self.new_children.get(op.target) or channels_last(child, self.all_ranks)
        args = self._as_convention(op.args)
        kwargs = tuple((k, self._as_convention(v)) for k, v in op.kwargs)
        self.ops.append(dataclasses.replace(op, args=args, kwargs=kwargs))
        rank = self.ranks.get(op.out)
        self.layout[op.out] = PARTS if rank is None else NHWC if rank >= 3 else PLAIN

    def _tensor_args(self, op: Op) -> list[Ref]:
        return [v for v in (*op.args, *(v for _, v in op.kwargs)) if isinstance(v, Ref) and self._rank(v) > 0]

    def _all_nhwc(self, op: Op, rank: int | None = None) -> bool:
        tensors = self._tensor_args(op)
        return bool(tensors) and all(self.layout.get(t.name) == NHWC and (rank is None or self._rank(t) == rank)
                                     for t in tensors)

    def _layer_call(self, op: Op, layer: Layer) -> None:
        x = op.args[0] if op.args else None
        nhwc = isinstance(x, Ref) and self.layout.get(x.name) == NHWC and not op.kwargs and len(op.args) == 1
        if nhwc and layer.cls in _ELEMENTWISE_LAYERS:
            self._decide(op.target, layer)
            self._emit(op, NHWC)
            return
        if nhwc and layer.is_norm:
            kwargs = tuple((k, -1 if k == "axis" else v) for k, v in layer.kwargs)
            self._replace_layer(op, dataclasses.replace(layer, kwargs=kwargs), NHWC)
            return
        flax = _flax_layer(layer, self._rank(x)) if isinstance(x, Ref) else None
        if flax is not None and (nhwc or layer.cls == "Linear"):
            if layer.cls == "Linear":
                self._replace_layer(dataclasses.replace(op, args=self._convert(op.args, PLAIN)), flax, PLAIN)
            else:
                self._replace_layer(op, flax, NHWC)
            return
        function = _pool_function(layer, self._rank(x)) if nhwc else None
        if function is not None:
            name, kwargs = function
            self._emit(Op(op.out, "function", name, (x,), kwargs), NHWC)
            return
        self._plain(op)

    def _replace_layer(self, op: Op, layer: Layer, layout: str) -> None:
        self._decide(op.target, layer)
        self._emit(op, layout)

    def _decide(self, target: str, layer: Layer) -> None:
        """The layer a child becomes; a child called in both layouts is refused."""
        decided = self.new_children.setdefault(target, layer)
        if decided != layer:
            raise UnsupportedError(
                f"{layer.torch_path} ({layer.torch_type}) is called on tensors in different layouts; "
                "channels_last=True does not support this: translate with channels_last=False")

    def _function(self, op: Op) -> None:
        target, rank = op.target, self._rank(Ref(op.out))
        if target in _ELEMENTWISE_OPS and self._all_nhwc(op, rank):
            self._emit(op, NHWC)
        elif target == "cat" and self._cat_nhwc(op):
            dim = dict(op.kwargs).get("dim", op.args[1] if len(op.args) > 1 else 0)
            kwargs = tuple((k, _axis(v, rank) if k == "dim" else v) for k, v in op.kwargs)
            args = op.args if len(op.args) < 2 else (op.args[0], _axis(dim, rank))
            self._emit(dataclasses.replace(op, args=args, kwargs=kwargs), NHWC)
        elif target in _REDUCTIONS and self._reduction(op):
            return
        else:
            self._plain(op)

    def _cat_nhwc(self, op: Op) -> bool:
        tensors = op.args[0] if op.args else dict(op.kwargs).get("tensors")
        rank = self._rank(Ref(op.out))
        return (isinstance(tensors, tuple) and rank >= 3 and all(
            isinstance(t, Ref) and self.layout.get(t.name) == NHWC and self._rank(t) == rank for t in tensors))

    def _reduction(self, op: Op) -> bool:
        """``mean`` / ``sum`` / ``amax`` / ``amin`` over given axes of an NHWC tensor: the axes
        renumbered; the result NHWC (kept dims) or plain (the remaining axes in torch's order)."""
        x = op.args[0]
        if not (isinstance(x, Ref) and self.layout.get(x.name) == NHWC):
            return False
        arguments = dict(zip(("dim", "keepdim"), op.args[1:])) | dict(op.kwargs)
        dim, keepdim, rank = arguments.get("dim"), bool(arguments.get("keepdim", False)), self._rank(x)
        if dim is None or set(arguments) - {"dim", "keepdim", "dtype"}:
            return False
        dims = {d % rank for d in (dim if isinstance(dim, tuple) else (dim,))}
        if keepdim:
            layout = NHWC
        else:
            remaining = [a for a in _storage(rank) if a not in dims]
            if remaining != sorted(remaining):
                return False  # the kept axes would be in neither layout
            layout = PLAIN
        axes = tuple(sorted(_axis(d, rank) for d in dims))
        kwargs = {**arguments, "dim": axes if len(axes) > 1 else axes[0]}
        self._emit(dataclasses.replace(op, args=(x,), kwargs=tuple(kwargs.items())), layout)
        return True


def _flax_layer(layer: Layer, rank: int) -> Layer | None:
    """``nn.Conv`` for a zero-padded convolution, ``nn.Dense`` for a linear layer on a matrix:
    the same variables as the torch-layout layers."""
    k = dict(layer.kwargs)
    if layer.cls == "Conv" and k.get("padding_mode", "zeros") == "zeros" and rank >= 3:
        kernel = tuple(k["kernel_size"])
        spatial = len(kernel)
        dilation = _tuple(k.get("dilation", 1), spatial)
        padding = _pairs(k.get("padding", 0), kernel, dilation)
        kwargs = dict(features=k["out_channels"], kernel_size=kernel, strides=_tuple(k.get("stride", 1), spatial),
                      padding=padding, kernel_dilation=dilation, feature_group_count=k.get("groups", 1),
                      use_bias=k.get("bias", True), param_dtype=k["param_dtype"])
        return dataclasses.replace(layer, cls="nn.Conv", kwargs=tuple(kwargs.items()))
    if layer.cls == "Linear" and rank == 2:
        kwargs = dict(features=k["out_features"], use_bias=k.get("bias", True), param_dtype=k["param_dtype"])
        return dataclasses.replace(layer, cls="nn.Dense", kwargs=tuple(kwargs.items()))
    return None


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


def _pairs(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """torch's conv padding as explicit ``(low, high)`` pairs (``'same'``: the extra on the right)."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _pool_function(layer: Layer, rank: int) -> tuple[str, tuple] | None:
    """A pool layer on NHWC as Flax's pool function (or a mean), where it is torch's pool."""
    k = dict(layer.kwargs)
    spatial = k.get("spatial")
    if spatial is None or rank != spatial + 2:
        return None
    if layer.cls == "AdaptiveAvgPool" and all(s == 1 for s in _tuple(k["output_size"], spatial)):
        return "mean", (("dim", tuple(range(1, spatial + 1))), ("keepdim", True))
    if layer.cls not in ("MaxPool", "AvgPool") or k.get("ceil_mode") or k.get("divisor_override") is not None:
        return None
    if layer.cls == "MaxPool" and _tuple(k.get("dilation", 1), spatial) != (1,) * spatial:
        return None
    window = _tuple(k["kernel_size"], spatial)
    strides = _tuple(k.get("stride") or k["kernel_size"], spatial)
    padding = tuple((p, p) for p in _tuple(k.get("padding", 0), spatial))
    kwargs = (("window_shape", window), ("strides", strides), ("padding", padding))
    if layer.cls == "AvgPool":
        return "nn.avg_pool", kwargs + (("count_include_pad", bool(k.get("count_include_pad", True))),)
    return "nn.max_pool", kwargs

