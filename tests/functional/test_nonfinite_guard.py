"""The opt-in guard BatchNormFlags(skip_nonfinite_updates=True) against torch's NaN poisoning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.testing import oracle as torch_oracle

TOL = dict(rtol=1e-10, atol=1e-10)
C = 3


def batch(seed, bad=None):
    x = np.random.RandomState(seed).randn(6, C, 4) + 2.0
    if bad is not None:
        x[1, 0, 2] = bad
    return x


def start():
    return jaxbn.init_state(C, jnp.float64), jaxbn.init_params(C, jnp.float64)


def test_default_is_torch_parity():
    assert jaxbn.BatchNormFlags().skip_nonfinite_updates is False


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_poisons_forever_the_guard_skips_the_batch(bad, momentum):
    """torch: one non-finite batch makes running stats NaN/inf for good (clean batches cannot
    wash it out). jaxbn default: the same. Guarded: the batch leaves no trace in the buffers, so
    afterwards the state equals torch's for a module that never saw it."""
    state, params = start()
    flags = jaxbn.BatchNormFlags(momentum=momentum)
    guarded_flags = flags.replace(skip_nonfinite_updates=True)
    batches = [batch(0), batch(1, bad=bad), batch(2), batch(3)]
    poisoned = torch_oracle.build_module(C, 3, state, params, flags, torch.float64)
    clean = torch_oracle.build_module(C, 3, state, params, flags, torch.float64)
    step = jax.jit(jaxbn.batch_norm)
    parity, guarded = state, state
    for i, x in enumerate(batches):
        with torch.no_grad():
            y_poisoned = torch_oracle.to_numpy(torch_oracle.forward(poisoned, x))
            if i != 1:
                torch_oracle.forward(clean, x)
        y, parity = step(jnp.asarray(x), parity, params, flags)
        y_guarded, guarded = step(jnp.asarray(x), guarded, params, guarded_flags)
        # Outputs are computed either way (NaN where torch's are NaN).
        np.testing.assert_allclose(np.asarray(y), y_poisoned, **TOL)
        np.testing.assert_allclose(np.asarray(y_guarded), y_poisoned, **TOL)
        ref = torch_oracle.module_state(poisoned)
        for ours, theirs in [(parity.running_mean, ref.running_mean), (parity.running_var, ref.running_var)]:
            np.testing.assert_allclose(np.asarray(ours), theirs, **TOL)
        assert int(parity.num_batches_tracked) == int(ref.num_batches_tracked) == i + 1
        clean_ref = torch_oracle.module_state(clean)
        np.testing.assert_allclose(np.asarray(guarded.running_mean), clean_ref.running_mean, **TOL)
        np.testing.assert_allclose(np.asarray(guarded.running_var), clean_ref.running_var, **TOL)
        assert int(guarded.num_batches_tracked) == int(clean_ref.num_batches_tracked)
    ref = torch_oracle.module_state(poisoned)
    assert not np.isfinite(ref.running_mean[0]) or not np.isfinite(ref.running_var[0])
    assert np.isfinite(np.asarray(guarded.running_mean)).all()
    assert np.isfinite(np.asarray(guarded.running_var)).all()


def test_finite_input_whose_variance_overflows():
    """float32 data around 1e20: every input is finite but the variance is inf. torch stores inf."""
    x = (np.random.RandomState(0).randn(6, C, 4) * 1e20).astype(np.float32)
    state, params = jaxbn.init_state(C), jaxbn.init_params(C)
    flags = jaxbn.BatchNormFlags()
    _, ref = torch_oracle.batch_norm(x, state, params, flags)
    assert np.isinf(ref.running_var).all()
    _, parity = jaxbn.batch_norm(jnp.asarray(x), state, params, flags)
    assert np.isinf(np.asarray(parity.running_var)).all()
    _, guarded = jaxbn.batch_norm(jnp.asarray(x), state, params, flags.replace(skip_nonfinite_updates=True))
    jax.tree.map(np.testing.assert_array_equal, guarded, state)


def test_guard_with_mask_empty_batch_still_counts_and_one_valid_row_is_skipped():
    """An all-padding batch is torch's empty batch (counter +1) -- not a non-finite one. A single
    valid row has an undefined unbiased variance (0/0; torch would raise): the guard skips it."""
    state, params = start()
    flags = jaxbn.BatchNormFlags(skip_nonfinite_updates=True)
    x = jnp.asarray(batch(0))
    _, empty = jaxbn.batch_norm(x, state, params, flags, mask=jnp.zeros(6, bool))
    jax.tree.map(np.testing.assert_array_equal, empty, state._replace(num_batches_tracked=state.num_batches_tracked + 1))
    one = jnp.zeros(6, bool).at[2].set(True)
    x = x[:, :, 0]  # (N, C): one valid row is one value per channel
    _, unguarded = jaxbn.batch_norm(x, state, params, flags.replace(skip_nonfinite_updates=False), mask=one)
    assert np.isnan(np.asarray(unguarded.running_var)).all()
    _, guarded = jaxbn.batch_norm(x, state, params, flags, mask=one)
    jax.tree.map(np.testing.assert_array_equal, guarded, state)


def test_guard_is_static_and_hashable():
    flags = jaxbn.BatchNormFlags(skip_nonfinite_updates=True)
    assert flags != flags.replace(skip_nonfinite_updates=False)
    hash(flags)
    assert jax.tree.leaves(flags) == []
    with pytest.raises(TypeError, match="skip_nonfinite_updates must be a Python bool"):
        jaxbn.BatchNormFlags(skip_nonfinite_updates=1)
