"""Row mask on one device: masked batch norm == torch batch norm on the unpadded rows (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.testing import oracle as torch_oracle

TOL = dict(rtol=1e-10, atol=1e-10)


def padded_batch(shape, valid_rows, pad_value, seed=0):
    """``(x, mask)``: ``shape[0]`` rows of data (mean 3, sd 2) of which ``valid_rows`` are valid
    (scattered, not a prefix) and the rest hold ``pad_value``."""
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape) * 2.0 + 3.0
    mask = np.zeros(shape[0], dtype=bool)
    mask[rng.permutation(shape[0])[:valid_rows]] = True
    x[~mask] = pad_value
    return x, mask


def state_and_params(c, seed=1):
    rng = np.random.RandomState(seed)
    state = jaxbn.BatchNormState(
        jnp.asarray(rng.randn(c)), jnp.asarray(rng.rand(c) + 0.5), jnp.asarray(3, jnp.int64))
    params = jaxbn.BatchNormParams(jnp.asarray(rng.rand(c) + 0.5), jnp.asarray(rng.randn(c)))
    return state, params


def assert_state_equal(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours.running_mean), theirs.running_mean, **TOL)
    np.testing.assert_allclose(np.asarray(ours.running_var), theirs.running_var, **TOL)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


batch_norm = jax.jit(jaxbn.batch_norm)


@pytest.mark.parametrize("shape", [(9, 3), (7, 2, 5), (6, 3, 4, 2), (5, 2, 3, 2, 2)])
@pytest.mark.parametrize("pad_value", [0.0, np.nan, np.inf, 1e300])
def test_valid_rows_match_torch_on_unpadded_rows(shape, pad_value):
    x, mask = padded_batch(shape, valid_rows=shape[0] - 3, pad_value=pad_value)
    state, params = state_and_params(shape[1])
    flags = jaxbn.BatchNormFlags(momentum=0.3)
    y_ref, state_ref = torch_oracle.batch_norm(x[mask], state, params, flags)
    y, new_state = batch_norm(jnp.asarray(x), state, params, flags, mask=jnp.asarray(mask))
    assert y.shape == x.shape  # padded rows' outputs are produced too
    np.testing.assert_allclose(np.asarray(y)[mask], y_ref, **TOL)
    assert_state_equal(new_state, state_ref)


@pytest.mark.parametrize(
    "training,buffers", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("axis", [1, -1])
def test_gradients_padded_rows_get_only_the_direct_path(training, buffers, axis):
    """Outputs and gradients of all rows, padded ones included in the loss, against torch autograd.

    torch: valid rows through BatchNorm; padded rows normalized with the valid rows' statistics
    (:func:`jaxbn.torch_oracle.vjp` with a mask). Their dx is dy*invstd*w only.
    """
    x, mask = padded_batch((8, 3, 5), valid_rows=5, pad_value=0.0)
    x[~mask] = np.random.RandomState(3).randn(3, 3, 5) * 10  # finite padding with its own spread
    x = np.moveaxis(x, 1, axis)
    cot = np.random.RandomState(4).randn(*x.shape)
    state, params = state_and_params(3)
    state = state if buffers else None
    flags = jaxbn.BatchNormFlags(training=training, axis=axis)
    module = torch_oracle.build_module(3, 3, state, params, flags, torch.float64)
    y_ref, dx_ref, dp_ref = torch_oracle.vjp(module, x, cot, axis=axis, mask=mask)

    def loss(x, params):
        y, _ = jaxbn.batch_norm(x, state, params, flags, mask=jnp.asarray(mask))
        return jnp.sum(y * cot), y

    (_, y), (dx, dp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(jnp.asarray(x), params)
    np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, **TOL)
    np.testing.assert_allclose(np.asarray(dp.weight), dp_ref.weight, **TOL)
    np.testing.assert_allclose(np.asarray(dp.bias), dp_ref.bias, **TOL)
    if training or not buffers:  # batch statistics: padded rows' dx = cot * invstd * w only
        xv = np.moveaxis(x, axis, 1)[mask]
        invstd = 1 / np.sqrt(xv.var(axis=(0, 2)) + flags.eps)
        direct = np.moveaxis(cot, axis, 1)[~mask] * (invstd * np.asarray(params.weight))[None, :, None]
        np.testing.assert_allclose(np.moveaxis(np.asarray(dx), axis, 1)[~mask], direct, **TOL)


def test_all_true_mask_equals_no_mask():
    x, _ = padded_batch((6, 3, 4), valid_rows=6, pad_value=0.0)
    state, params = state_and_params(3)
    y0, s0 = batch_norm(jnp.asarray(x), state, params, jaxbn.BatchNormFlags())
    y1, s1 = batch_norm(jnp.asarray(x), state, params, jaxbn.BatchNormFlags(), mask=jnp.ones(6, bool))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL), s1, s0)


def test_all_false_mask_is_torchs_empty_batch():
    """No valid row: torch's empty batch -- stats unchanged, counter +1 (so momentum=None dilutes)."""
    x, mask = padded_batch((4, 3, 5), valid_rows=0, pad_value=np.nan)
    state, params = state_and_params(3)
    flags = jaxbn.BatchNormFlags(momentum=None)
    _, state_ref = torch_oracle.batch_norm(x[:0], state, params, flags)
    _, new_state = batch_norm(jnp.asarray(x), state, params, flags, mask=jnp.asarray(mask))
    assert_state_equal(new_state, state_ref)
    assert int(new_state.num_batches_tracked) == 4


def test_momentum_none_cumulative_average_over_masked_batches():
    """Several padded batches with momentum=None == torch fed the unpadded batches."""
    state, params = state_and_params(2)
    flags = jaxbn.BatchNormFlags(momentum=None)
    module = torch_oracle.build_module(2, 3, state, params, flags, torch.float64)
    for step, valid in enumerate([5, 2, 7, 3]):
        x, mask = padded_batch((7, 2, 3), valid_rows=valid, pad_value=np.nan, seed=step)
        with torch.no_grad():
            y_ref = torch_oracle.to_numpy(torch_oracle.forward(module, x[mask]))
        y, state = batch_norm(jnp.asarray(x), state, params, flags, mask=jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(y)[mask], y_ref, **TOL)
        assert_state_equal(state, torch_oracle.module_state(module))


def test_mask_validation():
    x = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\); expected \(4,\)"):
        jaxbn.batch_norm(x, None, None, mask=jnp.ones(3, bool))
    with pytest.raises(TypeError, match="mask has dtype int32; expected bool"):
        jaxbn.batch_norm(x, None, None, mask=jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match="axis 0 is the feature axis"):
        jaxbn.batch_norm(x, None, None, jaxbn.BatchNormFlags(axis=0), mask=jnp.ones(4, bool))
