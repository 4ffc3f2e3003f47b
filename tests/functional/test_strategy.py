"""The speed choices as one static value (jaxbn.functional.strategy): part of the jit cache key,
defaults resolved in one place, no switch outside it."""

import ast
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxbn
from jaxbn import OneRead, Strategy
from jaxbn.functional.strategy import resolve_strategy

C = 16


def test_a_strategy_is_a_frozen_hashable_value():
    a = Strategy(running_mean_shift=True, backward_wait_bytes=1024, one_read="interpreted")
    b = Strategy(running_mean_shift=True, backward_wait_bytes=1024,
                 one_read=OneRead.INTERPRETED)
    assert a == b and hash(a) == hash(b) and a.one_read is OneRead.INTERPRETED
    assert a.replace(one_read="off") == Strategy(running_mean_shift=True, backward_wait_bytes=1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.running_mean_shift = False


@pytest.mark.parametrize("fields,error", [
    ({"running_mean_shift": 1}, TypeError),
    ({"backward_wait_bytes": 2.5}, TypeError),
    ({"backward_wait_bytes": -1}, TypeError),
    ({"backward_wait_bytes": True}, TypeError),
    ({"one_read": "gpu"}, ValueError),
])
def test_a_strategy_refuses_what_it_cannot_mean(fields, error):
    with pytest.raises(error):
        Strategy(**fields)


def test_flags_take_a_strategy_or_none():
    assert jaxbn.BatchNormFlags().strategy is None
    strategy = Strategy(one_read="cuda")
    assert jaxbn.BatchNormFlags().replace(strategy=strategy).strategy is strategy
    assert jaxbn.InstanceNormFlags(strategy=strategy).strategy is strategy
    with pytest.raises(TypeError, match="jaxbn.Strategy"):
        jaxbn.BatchNormFlags(strategy={"one_read": "cuda"})


def test_the_defaults_are_the_cpu_s_choices_on_the_cpu_and_none_elsewhere():
    assert jaxbn.default_strategy("cpu") == Strategy(running_mean_shift=True,
                                                     backward_wait_bytes=2 * 2**20)
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert jaxbn.default_strategy(backend) == Strategy()
    assert resolve_strategy(None) == jaxbn.default_strategy(jax.default_backend())
    explicit = Strategy(backward_wait_bytes=0)
    assert resolve_strategy(explicit) is explicit


def layer_vjp(x, flags):
    """One training layer's output and input gradient (buffers that have seen a batch)."""
    state = jaxbn.init_state(C)._replace(num_batches_tracked=jnp.asarray(1, jnp.int32))
    y, pullback = jax.vjp(lambda x: jaxbn.batch_norm(x, state, None, flags)[0], x)
    return y, pullback(jnp.ones_like(y))[0]


@pytest.mark.parametrize("a,b", [
    (Strategy(), Strategy(running_mean_shift=True)),
    (Strategy(), Strategy(backward_wait_bytes=0)),
    (Strategy(), Strategy(one_read="interpreted")),
])
def test_two_strategies_under_one_jit_are_two_programs(a, b):
    """The strategy is in the flags, the flags are static: one ``jax.jit`` traces each strategy
    once and never hands one strategy's program to the other."""
    traces = []

    def fn(x, flags):
        traces.append(flags.strategy)
        return layer_vjp(x, flags)

    jitted = jax.jit(fn)
    x = jax.random.normal(jax.random.key(0), (64, C), jnp.float32) + 3
    flags_a = jaxbn.BatchNormFlags(strategy=a)
    flags_b = flags_a.replace(strategy=b)
    for flags in (flags_a, flags_b, flags_a, flags_b):
        jitted(x, flags)
    assert traces == [a, b]
    assert jitted.lower(x, flags_a).as_text() != jitted.lower(x, flags_b).as_text()


def test_no_strategy_is_the_backend_s_default_strategy():
    x = jnp.ones((8, C), jnp.float32)
    lowered = [jax.jit(layer_vjp).lower(x, jaxbn.BatchNormFlags(strategy=s)).as_text()
               for s in (None, jaxbn.default_strategy(jax.default_backend()))]
    assert lowered[0] == lowered[1]


def test_the_functional_core_has_no_switch_of_its_own():
    """No ``global`` statement and no environment read in ``jaxbn/functional``: every choice
    comes in with the call."""
    for path in Path(jaxbn.functional.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], path.name
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"environ", "getenv"}, path.name
