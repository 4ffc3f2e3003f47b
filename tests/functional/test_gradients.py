"""jax.grad through jaxbn.batch_norm equals torch autograd (dx, dweight, dbias) in float64.

Also pins that no gradient flows into the running statistics: torch updates its buffers under
no_grad and declares them non-differentiable, so jaxbn stops gradients there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import (
    F64_TOL,
    LayerPair,
    assert_grads_match,
    input_shape,
    jaxbn_grads,
    random_input,
    random_params,
    random_state,
    seed_of,
    torch_grads,
)
from jaxbn import BatchNormFlags
from jaxbn.testing import oracle as torch_oracle

NUM_FEATURES = 4
LAYOUTS = [(2, 1), (2, 0), (3, 1), (3, -1), (4, 1), (4, -1), (5, 1), (5, 2)]


@pytest.mark.parametrize("affine", (True, False), ids=("affine", "no_affine"))
@pytest.mark.parametrize("track_running_stats", (True, False), ids=("track", "no_track"))
@pytest.mark.parametrize("buffers", (True, False), ids=("buffers", "no_buffers"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("rank,axis", LAYOUTS, ids=[f"rank{r}_axis{a}" for r, a in LAYOUTS])
def test_grad_matches_torch_autograd(rank, axis, training, buffers, track_running_stats, affine):
    rng = np.random.default_rng(seed_of(rank, axis, training, buffers, track_running_stats, affine))
    flags = BatchNormFlags(training=training, track_running_stats=track_running_stats,
                           momentum=0.1, eps=1e-3, axis=axis)
    state = random_state(rng, NUM_FEATURES) if buffers else None
    params = random_params(rng, NUM_FEATURES) if affine else None
    x = random_input(rng, input_shape(rank, NUM_FEATURES, axis))
    dy = rng.standard_normal(x.shape)

    module = torch_oracle.build_module(NUM_FEATURES, rank, state, params, flags, torch.float64)
    expected = torch_grads(module, x, dy, axis)
    actual = jaxbn_grads(jnp.asarray(x), params, state, dy, flags)
    assert_grads_match(actual, expected, F64_TOL)


@pytest.mark.parametrize("rank,axis", [(2, 1), (4, -1)])
def test_grad_matches_torch_across_steps(rank, axis):
    """Gradients after the running stats moved (eval uses them) still match torch."""
    rng = np.random.default_rng(seed_of("steps", rank, axis))
    flags = BatchNormFlags(momentum=None, axis=axis)
    params = random_params(rng, NUM_FEATURES)
    pair = LayerPair.build(NUM_FEATURES, rank, random_state(rng, NUM_FEATURES), params, flags)
    for step in range(3):
        pair.step(random_input(rng, input_shape(rank, NUM_FEATURES, axis), loc=step), flags)
    # eval first: a training-mode torch forward moves the buffers the next check reads.
    for mode in (flags.replace(training=False), flags):
        torch_oracle.apply_flags(pair.module, mode)
        x = random_input(rng, input_shape(rank, NUM_FEATURES, axis))
        dy = rng.standard_normal(x.shape)
        expected = torch_grads(pair.module, x, dy, axis)
        actual = jaxbn_grads(jnp.asarray(x), params, pair.state, dy, mode)
        assert_grads_match(actual, expected, F64_TOL, f"training={mode.training}")


def state_floats(state):
    return state.running_mean, state.running_var


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_no_gradient_into_running_stats_from_output(training):
    """d y / d running stats is zero: torch rejects requires_grad on them as non-differentiable."""
    rng = np.random.default_rng(1)
    flags = BatchNormFlags(training=training)
    state = random_state(rng, NUM_FEATURES)
    params = random_params(rng, NUM_FEATURES)
    x = jnp.asarray(random_input(rng, (5, NUM_FEATURES, 3)))
    dy = rng.standard_normal(x.shape)

    module = torch_oracle.build_module(NUM_FEATURES, 3, state, params, flags, torch.float64)
    module.running_mean.requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
        torch_oracle.forward(module, x, 1)

    def loss(floats):
        mean, var = floats
        y, _ = jaxbn.batch_norm(x, state._replace(running_mean=mean, running_var=var), params, flags)
        return jnp.sum(y * dy)

    grads = jax.grad(loss)(state_floats(state))
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros(NUM_FEATURES))
    if not training:  # the output does depend on the running stats: stop_gradient, not absence
        assert not np.allclose(loss(state_floats(state)),
                               loss((state.running_mean + 1, state.running_var)))


def test_no_gradient_from_updated_stats_into_input():
    """The new running stats carry no gradient to x (torch updates them under no_grad)."""
    rng = np.random.default_rng(2)
    flags = BatchNormFlags(momentum=0.5)
    state = random_state(rng, NUM_FEATURES)
    x = random_input(rng, (5, NUM_FEATURES, 3))

    module = torch_oracle.build_module(NUM_FEATURES, 3, state, None, flags, torch.float64)
    xt = torch_oracle.to_torch(x).requires_grad_(True)
    torch_oracle.forward(module, xt, 1)
    assert module.running_mean.grad_fn is None and not module.running_var.requires_grad

    def updated_stats(x):
        _, new_state = jaxbn.batch_norm(x, state, None, flags)
        return jnp.sum(new_state.running_mean) + jnp.sum(new_state.running_var)

    np.testing.assert_array_equal(jax.grad(updated_stats)(jnp.asarray(x)), np.zeros(x.shape))
    # ...although the updated stats do depend on x (so a zero gradient is not vacuous).
    assert updated_stats(jnp.asarray(x)) != updated_stats(jnp.asarray(x) * 2)
