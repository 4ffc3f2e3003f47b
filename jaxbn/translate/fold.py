"""BatchNorm folded into the layer before it, for inference: :func:`fold_batch_norm`.

In eval a BatchNorm with running statistics is a per-channel affine map, ``y = (x - mean) *
s + bias`` with ``s = weight / sqrt(running_var + eps)``; when ``x`` is a convolution's or a linear
layer's output and nothing else reads it, the map moves into that layer: ``W' = W * s`` (per
output channel) and ``b' = (b - mean) * s + bias`` -- torch's ``fuse_conv_bn_eval``, TensorRT's
and ONNX tools' inference step. Everything else stays and is reported with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ..porting.errors import UnsupportedError
from .ir import Block, Layer, Op, Ref, refs
from .module import TracedModule, value_ranks

__all__ = ["EvalOnlyModule", "FoldReport", "fold_batch_norm"]

_FOLDS_INTO = ("Conv", "Linear", "nn.Conv", "nn.Dense")
"""Layers whose output channels are their kernel's last axis (Flax layout) and that may take a bias."""


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batch_norm` did.

    Attributes:
      folded: ``(norm, layer)`` torch paths: each BatchNorm and the layer it went into.
      kept: ``(norm, reason)``: each norm left as it was, and why.
    """

    folded: tuple[tuple[str, str], ...]
    kept: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} norm(s), kept {len(self.kept)}:"]
        lines += [f"  {norm} -> {layer}" for norm, layer in self.folded]
        lines += [f"  kept {norm}: {reason}" for norm, reason in self.kept]
        return "\n".join(lines)


class EvalOnlyModule(TracedModule):
    """A folded model: ``apply(variables, x)`` is the torch model in eval; ``train=True`` is
    refused (its norms are gone)."""

    def __call__(self, *args: Any, train: bool = False, **kwargs: Any) -> Any:
        if train:
            raise ValueError("a model with BatchNorm folded is for inference only: call it with "
                             "train=False (train the unfolded model)")
        return super().__call__(*args, train=False, **kwargs)


def fold_batch_norm(ported: Any, *example: Any) -> tuple[Any, FoldReport]:
    """Fold every eval-mode BatchNorm that directly follows a convolution or linear layer (no
    other reader of that layer's output in between) into that layer.

    PyTorch equivalent: ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``
    on each such pair of ``model.eval()``, as ``torch.fx`` fusion passes do.

    Args:
      ported: a :class:`~.port.Ported` (``jaxbn.from_torch``'s result).
      example: optional inputs as the module takes them: with them, a BatchNorm1d after a linear
        layer folds where its input is a matrix (normalizing the layer's output features); without,
        such pairs are kept.

    Returns:
      ``(folded, report)``: ``folded`` a :class:`~.port.Ported` whose module is eval-only
      (:class:`EvalOnlyModule`, ``folded.module.apply(folded.variables, x)``), with the folded
      layers' kernels scaled and biases added and the folded norms' variables gone; ``report``
      (:class:`FoldReport`) lists what was folded and what was kept, and why.
    """
    from .port import Ported

    folded: list[tuple[str, str]] = []
    kept: list[tuple[str, str]] = []
    variables = {c: _plain_tree(v) for c, v in ported.variables.items()}
    ranks = value_ranks(ported.module.block, *example) if example else {}
    block = _fold_block(ported.module.block, (), variables, folded, kept, ranks)
    variables = {c: v for c, v in ((c, _pruned(v)) for c, v in variables.items()) if v}
    return (Ported(EvalOnlyModule(block), variables, ported.frozen_params),
            FoldReport(tuple(folded), tuple(kept)))


def _pruned(tree: Any) -> Any:
    """``tree`` without the dicts left empty by removed norms."""
    if not isinstance(tree, dict):
        return tree
    kept = {k: _pruned(v) for k, v in tree.items()}
    return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}


def _plain_tree(tree: Any) -> Any:
    return {k: _plain_tree(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _subtree(variables: dict, collection: str, path: tuple[str, ...]) -> dict | None:
    node = variables.get(collection)
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node


def _remove(variables: dict, path: tuple[str, ...]) -> None:
    for collection in list(variables):
        parent = _subtree(variables, collection, path[:-1])
        if isinstance(parent, dict):
            parent.pop(path[-1], None)


def _fold_block(block: Block, path: tuple[str, ...], variables: dict, folded: list, kept: list,
                ranks: dict) -> Block:
    children = dict(block.children)
    readers: dict[str, int] = {}
    for op in block.ops:
        for name in refs(op.args) | refs(tuple(v for _, v in op.kwargs)):
            readers[name] = readers.get(name, 0) + 1
    for name in refs(block.output):
        readers[name] = readers.get(name, 0) + 1
    made_by = {op.out: op for op in block.ops}
    calls = [op.target for op in block.ops if op.kind == "module"]
    ops, new_children = [], dict(children)
    for op in block.ops:
        child = children.get(op.target) if op.kind == "module" else None
        if isinstance(child, Block):
            new_children[op.target] = _fold_block(child, (*path, op.target), variables, folded, kept, ranks)
            ops.append(op)
            continue
        if not (isinstance(child, Layer) and child.is_norm):
            ops.append(op)
            continue
        reason = _unfoldable(op, child, made_by, children, calls, readers, ranks.get(id(block), {}))
        if reason is not None:
            kept.append((child.torch_path, reason))
            ops.append(op)
            continue
        source = made_by[op.args[0].name]
        layer = children[source.target]
        _fold_variables(variables, (*path, source.target), (*path, op.target), child)
        new_children[source.target] = _with_bias(layer)
        del new_children[op.target]
        ops.append(Op(op.out, "function", "identity", (op.args[0],)))
        folded.append((child.torch_path, layer.torch_path))
    live = {op.target for op in ops if op.kind == "module"}
    return dataclasses.replace(block, ops=tuple(ops),
                               children=tuple((n, c) for n, c in new_children.items()
                                              if n in live or not isinstance(c, Layer)))


def _unfoldable(op: Op, norm: Layer, made_by: dict, children: dict, calls: list, readers: dict,
                ranks: dict) -> str | None:
    """Why a norm call cannot fold, or None (``made_by``: value -> the op making it; ``calls``:
    the block's module calls by child; ``readers``: value -> how many reads)."""
    settings = dict(norm.kwargs)
    fixed = dict(norm.call_kwargs)
    if norm.cls != "BatchNorm":
        return f"{norm.cls} normalizes each sample with its own statistics"
    if not settings.get("track_running_stats", True):
        return "no running statistics: it normalizes with batch statistics in eval too"
    if fixed.get("train") is True:
        return "its mode is fixed to training (batch statistics)"
    if norm.shares_scope:
        return "a BatchNorm subclass with its own forward (its extra ops follow the norm)"
    x = op.args[0] if len(op.args) == 1 and not op.kwargs else None
    source = made_by.get(x.name) if isinstance(x, Ref) else None
    if source is None or source.kind != "module" or not isinstance(children.get(source.target), Layer):
        return "its input is not a convolution's or linear layer's output"
    layer = children[source.target]
    if layer.cls not in _FOLDS_INTO:
        return f"its input comes from {layer.torch_type or layer.cls}, not a convolution or linear layer"
    if readers.get(x.name, 0) != 1:
        return f"{layer.torch_path}'s output is also read elsewhere"
    if calls.count(source.target) != 1 or calls.count(op.target) != 1:
        return f"{layer.torch_path} or the norm is called more than once"
    if layer.cls in ("Linear", "nn.Dense") and ranks.get(x.name) != 2:
        return ("after a linear layer on a tensor of rank 3 or more, or of unknown rank (pass an "
                "example input): it would not normalize the layer's output features")
    return None


def _with_bias(layer: Layer) -> Layer:
    key = "use_bias" if layer.cls.startswith("nn.") else "bias"
    return dataclasses.replace(layer, kwargs=tuple((k, True if k == key else v) for k, v in layer.kwargs))


def _fold_variables(variables: dict, layer_path: tuple[str, ...], norm_path: tuple[str, ...],
                    norm: Layer) -> None:
    """``W' = W * s``, ``b' = (b - mean) * s + bias`` with ``s = weight / sqrt(var + eps)``."""
    params = _subtree(variables, "params", layer_path)
    stats = _subtree(variables, "batch_stats", norm_path)
    if params is None or stats is None:
        raise UnsupportedError(f"{norm.torch_path}: its variables are not where the model keeps them")
    norm_params = _subtree(variables, "params", norm_path) or {}
    kernel = params["kernel"]
    mean, var = stats["running_mean"], stats["running_var"]
    eps = dict(norm.kwargs)["eps"]
    weight = norm_params.get("weight", jnp.ones_like(mean))
    shift = norm_params.get("bias", jnp.zeros_like(mean))
    scale = weight / jnp.sqrt(var + eps)
    bias = params.get("bias", jnp.zeros_like(mean))
    params["kernel"] = (kernel * scale).astype(kernel.dtype)
    params["bias"] = ((bias - mean) * scale + shift).astype(kernel.dtype)
    _remove(variables, norm_path)
