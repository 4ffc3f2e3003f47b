"""jaxbn.batch_norm against torch.nn.BatchNorm1d/2d/3d in float64, step after step.

Every combination of the behaviour table in docs/semantics.md (training x buffers at construction x current
track_running_stats x momentum) times affine, rank 2..5, feature axis and eps; then random
sequences that mutate the torch module between calls the way users do. Outputs, running_mean,
running_var and num_batches_tracked must agree to 1e-10 (counter exactly) after every step. An
int32 counter (no x64) saturates at its limit where torch's int64 one keeps counting.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import (
    MOMENTA,
    LayerPair,
    assert_close,
    assert_state_matches,
    feature_axes,
    input_shape,
    random_input,
    random_params,
    random_state,
    seed_of,
)
from jaxbn import BatchNormFlags
from jaxbn.testing import oracle as torch_oracle

NUM_FEATURES = 3
RNG = np.random.default_rng(11)
STEP_BATCHES = (3, 2, 4)  # the batch size changes between steps, so n/(n-1) changes too
LAYOUTS = [(rank, axis) for rank in (2, 3, 4, 5) for axis in feature_axes(rank)]


@pytest.mark.parametrize("eps", (1e-5, 0.5))
@pytest.mark.parametrize("affine", (True, False), ids=("affine", "no_affine"))
@pytest.mark.parametrize("momentum", MOMENTA, ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("track_running_stats", (True, False), ids=("track", "no_track"))
@pytest.mark.parametrize("buffers", (True, False), ids=("buffers", "no_buffers"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("rank,axis", LAYOUTS, ids=[f"rank{r}_axis{a}" for r, a in LAYOUTS])
def test_cross_product_matches_torch(rank, axis, training, buffers, track_running_stats,
                                     momentum, affine, eps):
    rng = np.random.default_rng(
        seed_of(rank, axis, training, buffers, track_running_stats, momentum, affine, eps))
    flags = BatchNormFlags(training=training, track_running_stats=track_running_stats,
                           momentum=momentum, eps=eps, axis=axis)
    state = random_state(rng, NUM_FEATURES) if buffers else None
    params = random_params(rng, NUM_FEATURES) if affine else None
    pair = LayerPair.build(NUM_FEATURES, rank, state, params, flags)
    for step, batch in enumerate(STEP_BATCHES):
        x = random_input(rng, input_shape(rank, NUM_FEATURES, axis, batch=batch))
        pair.step_and_compare(x, flags, what=f"step {step}")


def test_init_matches_torch_constructor():
    """init_state/init_params hold exactly what torch's constructor registers (values and dtypes)."""
    module = torch.nn.BatchNorm2d(NUM_FEATURES).double()
    for ours, theirs in ((jaxbn.init_state(NUM_FEATURES, jnp.float64), torch_oracle.module_state(module)),
                         (jaxbn.init_params(NUM_FEATURES, jnp.float64), torch_oracle.module_params(module))):
        for name, value in ours._asdict().items():
            np.testing.assert_array_equal(value, getattr(theirs, name), err_msg=name)
            assert value.dtype == getattr(theirs, name).dtype, name


@pytest.mark.parametrize("rank,axis", [(2, 1), (4, 1), (5, -1)])
def test_fresh_layer_cumulative_average_matches_torch(rank, axis):
    """From init (counter 0), momentum=None makes the first batch's stats the running stats."""
    flags = BatchNormFlags(momentum=None, axis=axis)
    state = jaxbn.init_state(NUM_FEATURES, jnp.float64)
    params = jaxbn.init_params(NUM_FEATURES, jnp.float64)
    pair = LayerPair.build(NUM_FEATURES, rank, state, params, flags)
    rng = np.random.default_rng(rank)
    for step, batch in enumerate(STEP_BATCHES):
        x = random_input(rng, input_shape(rank, NUM_FEATURES, axis, batch=batch), loc=step)
        pair.step_and_compare(x, flags, what=f"step {step}")


def random_choice(rng, options):
    """``rng.choice`` that keeps Python objects (None, floats) as they are."""
    return options[int(rng.integers(len(options)))]


def mutate(rng, flags: BatchNormFlags) -> BatchNormFlags:
    """What a torch user does between calls: .train()/.eval(), and attribute assignments."""
    changes = {}
    if rng.random() < 0.4:
        changes["training"] = not flags.training
    if rng.random() < 0.3:
        changes["track_running_stats"] = not flags.track_running_stats
    if rng.random() < 0.3:
        changes["momentum"] = random_choice(rng, (0.1, 0.5, None, 0.0, 1.0))
    if rng.random() < 0.3:
        changes["eps"] = random_choice(rng, (1e-5, 1e-3, 0.25))
    return flags.replace(**changes)


@pytest.mark.parametrize("seed", range(40))
def test_random_mutation_sequence_matches_torch(seed):
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(2, 6))
    axis = random_choice(rng, feature_axes(rank))
    num_features = int(rng.integers(1, 5))
    buffers = rng.random() < 0.75
    affine = rng.random() < 0.5
    flags = BatchNormFlags(training=True, track_running_stats=buffers,
                           momentum=random_choice(rng, MOMENTA), axis=axis)
    state = random_state(rng, num_features) if buffers else None
    params = random_params(rng, num_features) if affine else None
    pair = LayerPair.build(num_features, rank, state, params, flags)
    for step in range(8):
        x = random_input(rng, input_shape(rank, num_features, axis, batch=int(rng.integers(2, 5))),
                         loc=float(rng.normal(0, 3)), scale=float(rng.uniform(0.1, 3)))
        pair.step_and_compare(x, flags, what=f"step {step} {flags}")
        flags = mutate(rng, flags)


F32_TOL = 1e-5  # outputs are O(1) here; torch folds into x * alpha + beta, jaxbn subtracts first


@pytest.mark.parametrize("momentum", MOMENTA, ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("rank,axis", LAYOUTS, ids=[f"rank{r}_axis{a}" for r, a in LAYOUTS])
def test_float32_matches_torch_float32(rank, axis, training, momentum):
    """jaxbn in float32 is within float32 rounding of torch's exact (float64) result.

    The reference is torch in float64 on the same float32-valued inputs and buffers, not torch's
    float32 kernel: that one folds the mean into ``x * alpha + beta`` and is itself up to 1.2e-5
    off the float64 result on these inputs (n = 2 at the second step), while jaxbn stays ~4e-7.
    """
    rng = np.random.default_rng(seed_of("float32", rank, axis, training, momentum))
    flags = BatchNormFlags(training=training, momentum=momentum, axis=axis)
    state = random_state(rng, NUM_FEATURES, jnp.float32)
    params = random_params(rng, NUM_FEATURES, jnp.float32)
    reference = torch_oracle.build_module(NUM_FEATURES, rank, state, params, flags, torch.float64)
    for step, batch in enumerate(STEP_BATCHES):
        x = random_input(rng, input_shape(rank, NUM_FEATURES, axis, batch=batch), np.float32,
                         loc=step, scale=2.0)
        torch_oracle.apply_flags(reference, flags)
        with torch.no_grad():
            y_exact = torch_oracle.forward(reference, x.astype(np.float64), axis)
        y, state = jaxbn.batch_norm(jnp.asarray(x), state, params, flags)
        assert y.dtype == jnp.float32
        assert_close(y, torch_oracle.to_numpy(y_exact), F32_TOL, f"step {step} output")
        assert_state_matches(state, torch_oracle.module_state(reference), F32_TOL, f"step {step}")
        assert state.running_mean.dtype == jnp.float32


# ---------------------------------------------------------------- the int32 counter


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_an_int32_counter_saturates_instead_of_wrapping(momentum):
    top = np.iinfo(np.int32).max
    x = random_input(RNG, (4, NUM_FEATURES))
    state = random_state(RNG, NUM_FEATURES)._replace(num_batches_tracked=jnp.asarray(top, jnp.int32))
    _, new = jaxbn.batch_norm(jnp.asarray(x), state, None, BatchNormFlags(momentum=momentum))
    assert new.num_batches_tracked.dtype == jnp.int32 and int(new.num_batches_tracked) == top
    # torch's int64 counter reaches 2**31; the factor differs by 1/2**31 - 1/(2**31 - 1) ~ 5e-19.
    torch_state = state._replace(num_batches_tracked=np.asarray(top, np.int64))
    _, new_t = torch_oracle.batch_norm(x, torch_state, None, BatchNormFlags(momentum=momentum))
    assert_close(new.running_mean, new_t.running_mean, 1e-15, "running_mean")
    assert_close(new.running_var, new_t.running_var, 1e-15, "running_var")

def test_the_int32_counter_keeps_counting_below_its_limit():
    state = jaxbn.init_state(NUM_FEATURES, jnp.float64)._replace(num_batches_tracked=jnp.asarray(7, jnp.int32))
    _, new = jaxbn.batch_norm(jnp.ones((4, NUM_FEATURES)), state, None, BatchNormFlags())
    assert int(new.num_batches_tracked) == 8
