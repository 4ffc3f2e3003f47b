"""A captured torch module (:class:`~.ir.Block`) as a ``flax.linen`` module: :class:`TracedModule`.

It interprets the block, one node kind at a time like ``torch.fx.Interpreter``: a module call runs
the child built from its :class:`~.ir.Layer` (or a nested :class:`TracedModule`), a function call
runs its entry of the op table (:data:`.ops.OPS`), a variable reads the block's own parameter or
buffer (:class:`~.ir.Variable`). No torch.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from ..porting.errors import UnsupportedError
from .ir import NO_DEFAULT, Block, Dict, Layer, Op, Ref, Slice, Variable, call_kwargs, join_path
from .layers import build_layer
from .ops import OPS

__all__ = ["TracedModule", "bind_inputs", "resolve", "value_ranks"]

_RESERVED = frozenset(dir(nn.Module)) | {"block"}


def resolve(value: Any, env: Mapping[str, Any]) -> Any:
    """An IR argument with every :class:`~.ir.Ref` replaced by its value."""
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return tuple(resolve(v, env) for v in value)
    if isinstance(value, Slice):
        return slice(resolve(value.start, env), resolve(value.stop, env), resolve(value.step, env))
    if isinstance(value, Dict):
        return {k: resolve(v, env) for k, v in value.items}
    return value


class TracedModule(nn.Module):
    """A captured torch module (:class:`~.ir.Block`) as a linen module.

    ``__call__(*inputs, train=False)``: torch's forward, with ``train`` in place of
    ``module.training`` for every norm, dropout and stochastic-depth layer below whose mode was
    the model's (the others keep their own: :func:`.tracing.fixed_modes`). Submodules carry the
    torch attribute names (``Sequential`` children as ``features_0``, ...).
    """

    block: Block

    def setup(self) -> None:
        for name, child in self.block.children:
            if name in _RESERVED:
                raise UnsupportedError(f"{join_path(self.block.torch_path, name)}: the name {name!r} "
                                       "is reserved by flax.linen.Module")
            setattr(self, name, TracedModule(child) if isinstance(child, Block) else build_layer(child))
            if isinstance(child, Layer) and child.shares_scope:
                nn.share_scope(self, getattr(self, name))
        self._own_variables = {v.name: _declare(self, v) for v in self.block.variables}

    def __call__(self, *args: Any, train: bool = False, **kwargs: Any) -> Any:
        env = bind_inputs(self.block.torch_type, self.block.inputs, args, kwargs)
        children = dict(self.block.children)
        for op in self.block.ops:
            env[op.out] = self._run(op, env, children, train)
        recorder = _RANKS.get()
        if recorder is not None:
            recorder.setdefault(id(self.block), {}).update(
                {name: value.ndim for name, value in env.items() if hasattr(value, "ndim")})
        return resolve(self.block.output, env)

    def _run(self, op: Op, env: Mapping[str, Any], children: Mapping[str, Any], train: bool) -> Any:
        """One operation's result: a child module's call, or the op table's function."""
        args = resolve(op.args, env)
        kwargs = {k: resolve(v, env) for k, v in op.kwargs}
        if op.kind == "module":
            kwargs.update(call_kwargs(children[op.target], train))
            return getattr(self, op.target)(*args, **kwargs)
        if op.kind == "variable":
            return self._own_variables[op.target]
        return OPS[op.target].run(*args, **kwargs)


_RANKS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jaxbn_translate_ranks", default=None)


def value_ranks(block: Block, *inputs: Any) -> dict[int, dict[str, int]]:
    """The rank of every array value of ``block`` and the blocks below it, ``{id(block): {value
    name: rank}}``, from one abstract run (``jax.eval_shape``) on ``inputs`` in torch's layout."""
    ranks: dict[int, dict[str, int]] = {}
    token = _RANKS.set(ranks)
    try:
        module = TracedModule(block)
        key = jax.random.key(0)
        jax.eval_shape(lambda: module.init({"params": key, "dropout": key}, *inputs, train=False))
    finally:
        _RANKS.reset(token)
    return ranks


def _declare(module: nn.Module, variable: Variable) -> jax.Array:
    """A parameter (``params``, initialized to zeros: :func:`~.port.from_torch` ports torch's
    values) or a buffer (``batch_stats``, read only) the block's forward reads itself."""
    if variable.collection == "params":
        return module.param(variable.name, nn.initializers.zeros_init(), variable.shape, variable.dtype)
    return module.variable(variable.collection, variable.name,
                           lambda: jax.numpy.zeros(variable.shape, variable.dtype)).value


def bind_inputs(torch_type: str, inputs: tuple[tuple[str, Any], ...], args: tuple,
                kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A block's ``inputs`` (name, default) by name, from a call's arguments and the defaults."""
    if len(args) > len(inputs):
        raise TypeError(f"{torch_type} takes {len(inputs)} inputs, got {len(args)}")
    unknown = set(kwargs) - {name for name, _ in inputs}
    if unknown:
        raise TypeError(f"{torch_type} got unexpected keyword argument(s) {sorted(unknown)} "
                        f"(inputs: {[name for name, _ in inputs]}, and train=)")
    env = {}
    for i, (name, default) in enumerate(inputs):
        if i < len(args):
            env[name] = args[i]
        elif name in kwargs:
            env[name] = kwargs[name]
        elif default is not NO_DEFAULT:
            env[name] = default
        else:
            raise TypeError(f"{torch_type} is missing its input {name!r}")
    return env
