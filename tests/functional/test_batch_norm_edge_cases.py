"""Edge cases against torch: empty batches, half precision, large means, frozen statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import (
    LayerPair,
    assert_close,
    assert_state_matches,
    input_shape,
    max_abs_diff,
    random_input,
    random_params,
    random_state,
    seed_of,
    torch_dtype,
)
from jaxbn import BatchNormFlags
from jaxbn.testing import oracle as torch_oracle

C = 4


# -- zero-size batch ----------------------------------------------------------------------------

EMPTY_SHAPES = [((0, C), 1), ((0, C, 3), 1), ((4, C, 0), 1), ((2, C, 3, 0), 1), ((0, 3, C), -1),
                ((2, 0, 3, C), -1)]


@pytest.mark.parametrize("jit", [False, True], ids=("eager", "jit"))
@pytest.mark.parametrize("shape,axis", EMPTY_SHAPES, ids=[str(s) for s, _ in EMPTY_SHAPES])
def test_zero_size_batch_counts_but_does_not_update(shape, axis, jit):
    """torch increments the counter for an empty batch and returns before touching the stats, so
    a later momentum=None (cumulative) step is diluted by the empty batches."""
    rng = np.random.default_rng(seed_of(shape, axis))
    flags = BatchNormFlags(momentum=None, axis=axis)
    state, params = random_state(rng, C, count=0), random_params(rng, C)
    pair = LayerPair.build(C, len(shape), state, params, flags)
    fn = jax.jit(jaxbn.batch_norm) if jit else jaxbn.batch_norm
    for step in range(2):
        empty = np.zeros(shape)
        pair.step_and_compare(empty, flags, what=f"empty step {step}", fn=fn)
        assert pair.state.num_batches_tracked == step + 1
        np.testing.assert_array_equal(pair.state.running_mean, state.running_mean)
        np.testing.assert_array_equal(pair.state.running_var, state.running_var)
    # The first real batch is averaged in with factor 1/3, not 1: torch's dilution, reproduced.
    x = random_input(rng, input_shape(len(shape), C, axis), loc=5.0)
    pair.step_and_compare(x, flags, what="after empty", fn=fn)
    assert pair.state.num_batches_tracked == 3
    assert np.all(np.abs(np.asarray(pair.state.running_mean) - state.running_mean) > 0.1)


@pytest.mark.parametrize("training,buffers", [(True, False), (False, True), (False, False)])
def test_zero_size_batch_without_update_is_empty_and_harmless(training, buffers):
    """Rows of the table that never update: an empty output, no error, nothing changed."""
    rng = np.random.default_rng(3)
    flags = BatchNormFlags(training=training)
    state = random_state(rng, C) if buffers else None
    pair = LayerPair.build(C, 3, state, random_params(rng, C), flags)
    pair.step_and_compare(np.zeros((0, C, 5)), flags)
    if state is not None:
        for name, value in state._asdict().items():
            np.testing.assert_array_equal(getattr(pair.state, name), value, err_msg=name)


# -- half precision -----------------------------------------------------------------------------

HALF = [jnp.bfloat16, jnp.float16]


def ulp_tolerance(reference, dtype, ulps):
    """``ulps`` units in the last place of ``dtype`` at the largest magnitude of ``reference``."""
    return ulps * float(jnp.finfo(dtype).eps) * max(1.0, float(np.max(np.abs(reference))))


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False], ids=("train", "eval"))
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
def test_half_input_with_float32_state_and_params(dtype, training, axis):
    """torch's mixed precision: y in the input dtype, statistics accumulated/stored in float32."""
    rng = np.random.default_rng(seed_of(jnp.dtype(dtype).name, training, axis))
    flags = BatchNormFlags(training=training, axis=axis, momentum=None)
    state, params = random_state(rng, C, jnp.float32), random_params(rng, C, jnp.float32)
    pair = LayerPair.build(C, 4, state, params, flags, dtype=torch.float32)
    for step in range(3):
        x = random_input(rng, input_shape(4, C, axis, batch=8, spatial=5), dtype, loc=2.0, scale=3.0)
        y, y_torch = pair.step(x, flags)
        assert y.dtype == dtype
        assert_close(y, y_torch, ulp_tolerance(y_torch, dtype, 1), f"step {step} output")
        torch_state = pair.torch_state()
        for name in ("running_mean", "running_var"):
            ours = getattr(pair.state, name)
            assert ours.dtype == jnp.float32 and getattr(torch_state, name).dtype == np.float32
            assert_close(ours, getattr(torch_state, name), 1e-5, f"step {step} {name}")
        assert int(pair.state.num_batches_tracked) == int(torch_state.num_batches_tracked)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
def test_half_input_with_half_state_and_params(dtype):
    """All in the half dtype. torch rounds its saved mean/invstd to the parameter dtype before
    normalizing (for fp16, rounding both reproduces torch bit for bit), jaxbn keeps them in
    float32: outputs may differ by 2 ulps in training; eval and running stats agree to 1 ulp."""
    rng = np.random.default_rng(seed_of(jnp.dtype(dtype).name))
    flags = BatchNormFlags(momentum=0.3)
    state, params = random_state(rng, C, dtype), random_params(rng, C, dtype)
    pair = LayerPair.build(C, 4, state, params, flags, dtype=torch_dtype(dtype))
    for step, mode in enumerate((flags, flags, flags.replace(training=False))):
        x = random_input(rng, input_shape(4, C, 1, batch=8, spatial=5), dtype, loc=2.0, scale=3.0)
        y, y_torch = pair.step(x, mode)
        assert y.dtype == dtype
        assert_close(y, y_torch, ulp_tolerance(y_torch, dtype, 2 if mode.training else 1), f"step {step}")
        torch_state = pair.torch_state()
        for name in ("running_mean", "running_var"):
            ours, theirs = getattr(pair.state, name), getattr(torch_state, name)
            assert ours.dtype == dtype
            assert_close(ours, theirs, ulp_tolerance(theirs, dtype, 1), f"step {step} {name}")


# -- large mean in float32 ----------------------------------------------------------------------

def naive_batch_norm(x, axis, eps):
    """The one-pass ``E[x^2] - E[x]^2`` normalization (flax's default) that loses every digit."""
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x), axes, keepdims=True) - jnp.square(mean)
    return (x - mean) * jax.lax.rsqrt(var + eps)


@pytest.mark.parametrize("axis", [1, -1])
def test_large_mean_float32_matches_float64_torch(axis):
    """Mean 1e4, unit variance, float32: max abs error <= 1e-3 against torch in float64.

    The same bound rejects the naive one-pass variance, so this test can fail.
    """
    rng = np.random.default_rng(seed_of("large mean", axis))
    shape = input_shape(4, 8, axis, batch=32, spatial=16)
    x32 = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    flags = BatchNormFlags(axis=axis)
    reference, torch_state = torch_oracle.batch_norm(
        x32.astype(np.float64), jaxbn.init_state(8, jnp.float64), None, flags)

    y, state = jax.jit(jaxbn.batch_norm)(jnp.asarray(x32), jaxbn.init_state(8, jnp.float32), None, flags)
    assert y.dtype == jnp.float32
    error = max_abs_diff(y, reference)
    assert error <= 1e-3, f"two-pass error {error:.2e}"
    for name in ("running_mean", "running_var"):  # ~1e3 and ~1: float32-relative agreement
        expected = getattr(torch_state, name)
        assert_close(getattr(state, name), expected, 1e-6 * float(np.max(np.abs(expected))), name)

    naive_error = max_abs_diff(jax.jit(naive_batch_norm, static_argnums=(1, 2))(jnp.asarray(x32), axis, 1e-5),
                               reference)
    # NaN counts as failing too: the one-pass variance can come out negative.
    assert not naive_error <= 1e-3, f"naive error {naive_error:.2e} should break the bound"


# -- momentum 0 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,axis", [(2, 1), (4, -1)])
def test_momentum_zero_freezes_stats_but_counts(rank, axis):
    rng = np.random.default_rng(seed_of("momentum 0", rank))
    flags = BatchNormFlags(momentum=0.0, axis=axis)
    state = random_state(rng, C, count=7)
    pair = LayerPair.build(C, rank, state, None, flags)
    for step in range(3):
        pair.step_and_compare(random_input(rng, input_shape(rank, C, axis), loc=3.0), flags)
        np.testing.assert_array_equal(pair.state.running_mean, state.running_mean)
        np.testing.assert_array_equal(pair.state.running_var, state.running_var)
        assert int(pair.state.num_batches_tracked) == 7 + step + 1


# -- constant channels --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_constant_channels_have_zero_variance(dtype, tol):
    """Zero spread: y is exactly the bias and running_var decays towards 0, as in float64 torch.

    The reference is torch in float64 even for float32: torch normalizes as ``x * alpha + beta``
    (alpha = invstd * weight), which for a constant 1e4 channel in float32 is off by 2.7e-2,
    whereas jaxbn subtracts the mean first and is exact.
    """
    rng = np.random.default_rng(4)
    flags = BatchNormFlags(momentum=0.5)
    x = np.broadcast_to(np.array([100.0, -3.0, 0.0, 0.1])[None, :, None], (6, C, 5)).copy()
    state, params = random_state(rng, C), random_params(rng, C)
    module = torch_oracle.build_module(C, 3, state, params, flags, torch.float64)
    state = jax.tree_util.tree_map(lambda v: v.astype(dtype) if v.ndim else v, state)
    params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)
    for step in range(2):
        y, state = jaxbn.batch_norm(jnp.asarray(x, dtype), state, params, flags)
        with torch.no_grad():
            y_torch = torch_oracle.forward(module, x)
        np.testing.assert_array_equal(y, np.broadcast_to(np.asarray(params.bias)[None, :, None], x.shape))
        assert_close(y, torch_oracle.to_numpy(y_torch), tol, f"step {step} output")
        assert_state_matches(state, torch_oracle.module_state(module), tol, f"step {step}")
        assert np.all(np.asarray(state.running_var) >= 0)
