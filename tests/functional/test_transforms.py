"""jaxbn.batch_norm under jax.jit, jax.vmap and jit(grad), each result checked against torch.

Flags are static (one trace per flags value, NaN-valued ones included); call-time ``momentum`` /
``eps`` overrides are static when Python numbers and traced when JAX scalars (a schedule compiles
once, for both families); eager and jitted calls see the same dtypes.
"""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import (
    F64_TOL,
    MOMENTUM_SCHEDULE,
    LayerPair,
    TraceCounter,
    assert_close,
    assert_grads_match,
    assert_state_matches,
    input_shape,
    jaxbn_grads,
    random_input,
    random_params,
    random_state,
    seed_of,
    torch_grads,
)
from jaxbn import BatchNormFlags, InstanceNormFlags
from jaxbn.functional.families import pure_function
from jaxbn.functional.torch_rules import BATCH_NORM, INSTANCE_NORM
from jaxbn.testing import oracle as torch_oracle

C = 3
RNG = np.random.default_rng(11)


def trace_counted(fn):
    """``fn`` wrapped to record each Python-level call, which under jit means each trace."""
    traces = []

    def counted(*args):
        traces.append(args[-1])
        return fn(*args)

    return counted, traces


@pytest.mark.parametrize("buffers", (True, False), ids=("buffers", "no_buffers"))
def test_jit_traces_once_for_many_batches(buffers):
    """Flags passed positionally, no static_argnames: new data and new state never retrace."""
    rng = np.random.default_rng(seed_of("one trace", buffers))
    flags = BatchNormFlags(momentum=None, axis=-1)
    counted, traces = trace_counted(jaxbn.batch_norm)
    step = jax.jit(counted)
    state = random_state(rng, C) if buffers else None
    pair = LayerPair.build(C, 4, state, random_params(rng, C), flags)
    for i in range(5):
        x = random_input(rng, input_shape(4, C, -1), loc=i)
        pair.step_and_compare(x, flags, what=f"batch {i}", fn=step)
    assert len(traces) == 1


def test_jit_retraces_when_flags_change_and_only_then():
    rng = np.random.default_rng(5)
    base = BatchNormFlags()
    sequence = [
        base, base,
        base.replace(training=False), base.replace(training=False),
        BatchNormFlags(),  # equal to base: a cache hit, not a new trace
        base.replace(momentum=None), base.replace(momentum=None),
        base.replace(eps=1e-3),
        base.replace(track_running_stats=False),
        base,
    ]
    counted, traces = trace_counted(jaxbn.batch_norm)
    step = jax.jit(counted)
    pair = LayerPair.build(C, 3, random_state(rng, C), random_params(rng, C), base)
    for i, flags in enumerate(sequence):
        x = random_input(rng, input_shape(3, C, 1), loc=i)
        pair.step_and_compare(x, flags, what=f"call {i} {flags}", fn=step)
    assert traces == list(dict.fromkeys(sequence))  # one trace per distinct flags, in order


def stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree, index):
    return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


@pytest.mark.parametrize("shared_input", (True, False), ids=("shared_x", "own_x"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_vmap_over_ensemble_matches_torch_per_member(training, shared_input):
    """An ensemble of layers (stacked states/params, different counters) in one vmapped call."""
    members, rank, axis = 4, 3, -1
    rng = np.random.default_rng(seed_of("ensemble", training, shared_input))
    flags = BatchNormFlags(training=training, momentum=None, axis=axis)
    states = [random_state(rng, C, count=k) for k in range(members)]
    params = [random_params(rng, C) for _ in range(members)]
    modules = [torch_oracle.build_module(C, rank, s, p, flags, torch.float64)
               for s, p in zip(states, params)]
    ensemble = jax.jit(jax.vmap(jaxbn.batch_norm, in_axes=(None if shared_input else 0, 0, 0, None)))
    state, stacked_params = stack(states), stack(params)
    shape = input_shape(rank, C, axis, batch=4)
    for step in range(3):
        xs = [random_input(rng, shape, loc=step + k) for k in range(members)]
        x = xs[0] if shared_input else np.stack(xs)
        ys, state = ensemble(jnp.asarray(x), state, stacked_params, flags)
        for k, module in enumerate(modules):
            with torch.no_grad():
                y_torch = torch_oracle.forward(module, xs[0] if shared_input else xs[k], axis)
            what = f"step {step} member {k}"
            assert_close(ys[k], torch_oracle.to_numpy(y_torch), F64_TOL, what)
            assert_state_matches(member(state, k), torch_oracle.module_state(module), F64_TOL, what)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_grad_under_jit_matches_torch(training):
    """jit(grad) traced once for several batches, each gradient equal to torch autograd's."""
    rng = np.random.default_rng(seed_of("jit grad", training))
    flags = BatchNormFlags(training=training, axis=-1)
    state, params = random_state(rng, C), random_params(rng, C)
    counted, traces = trace_counted(jaxbn.batch_norm)
    grads = jax.jit(functools.partial(jaxbn_grads, fn=counted))
    for i in range(3):
        x = random_input(rng, input_shape(4, C, -1), loc=i)
        dy = rng.standard_normal(x.shape)
        module = torch_oracle.build_module(C, 4, state, params, flags, torch.float64)
        actual = grads(jnp.asarray(x), params, state, jnp.asarray(dy), flags)
        assert_grads_match(actual, torch_grads(module, x, dy, -1), F64_TOL, f"batch {i}")
    assert len(traces) == 1


# ---------------------------------------------------------------- call-time overrides: traced values compile once, static ones are flags


@pytest.mark.parametrize("family", [BATCH_NORM, INSTANCE_NORM], ids=lambda f: f.name)
def test_a_traced_momentum_schedule_compiles_once_and_matches_torch(family):
    pure = pure_function(family)
    flags = BatchNormFlags(axis=1) if family is BATCH_NORM else InstanceNormFlags(track_running_stats=True)
    counted = TraceCounter(lambda x, s, p, m, e: pure(x, s, p, flags, momentum=m, eps=e))
    step = jax.jit(counted)
    state, params = random_state(RNG, C), random_params(RNG, C)
    module = torch_oracle.build_module(C, 3, state, params, flags, torch.float64, family)
    for i, momentum in enumerate(MOMENTUM_SCHEDULE):
        eps = 1e-5 * (i + 1)
        x = random_input(RNG, (4, C, 3))
        y, state = step(jnp.asarray(x), state, params, jnp.float64(momentum), jnp.float64(eps))
        torch_oracle.apply_flags(module, flags.replace(momentum=momentum, eps=eps))
        with torch.no_grad():
            y_t = torch_oracle.forward(module, x)
        assert_close(y, torch_oracle.to_numpy(y_t), F64_TOL, f"y step {i}")
        assert_state_matches(state, torch_oracle.module_state(module), F64_TOL)
    assert counted.traces == 1

def test_static_overrides_are_flags():
    x, state = jnp.asarray(random_input(RNG, (4, C))), random_state(RNG, C)
    for momentum, eps in ((None, 1e-3), (0.25, 2e-5)):
        got = jaxbn.batch_norm(x, state, None, momentum=momentum, eps=eps)
        expected = jaxbn.batch_norm(x, state, None, BatchNormFlags(momentum=momentum, eps=eps))
        jax.tree.map(np.testing.assert_array_equal, got, expected)

def test_nan_valued_flags_hit_the_jit_cache():
    counted = TraceCounter(lambda x, flags: jaxbn.batch_norm(x, None, None, flags)[0])
    step = jax.jit(counted, static_argnums=())
    for _ in range(3):
        step(jnp.ones((4, C)), BatchNormFlags(momentum=float("nan"), eps=float("nan")))
    assert counted.traces == 1

def test_eager_and_jit_agree_on_numpy_float64_input_without_x64():
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, jaxbn
        assert not jax.config.jax_enable_x64
        x = np.random.default_rng(0).normal(size=(4, 3))          # float64 NumPy
        state = jaxbn.init_state(3)                              # float32, as jit sees x
        flags = jaxbn.BatchNormFlags()
        y_eager, s_eager = jaxbn.batch_norm(x, state, None, flags)
        y_jit, s_jit = jax.jit(jaxbn.batch_norm)(x, state, None, flags)
        assert y_eager.dtype == y_jit.dtype == jnp.float32, (y_eager.dtype, y_jit.dtype)
        np.testing.assert_allclose(y_eager, y_jit, rtol=0, atol=1e-6)  # fusion may round differently
        np.testing.assert_allclose(s_eager.running_var, s_jit.running_var, rtol=1e-6)
        print("agree")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "agree" in out.stdout, out.stderr[-2000:]
