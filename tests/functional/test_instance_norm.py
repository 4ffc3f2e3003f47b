"""jaxbn.instance_norm against torch.nn.InstanceNorm{1,2,3}d in float64 (the oracle)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.functional.torch_rules import INSTANCE_NORM
from jaxbn.testing import oracle as torch_oracle

TOL = dict(rtol=1e-10, atol=1e-10)
SHAPES = {3: (4, 3, 7), 4: (3, 2, 4, 5), 5: (2, 3, 3, 2, 4)}


def data(shape, seed=0, offset=3.0):
    rng = np.random.RandomState(seed)
    return rng.randn(*shape) * 2.0 + offset


def fresh_state(c, seed=1):
    rng = np.random.RandomState(seed)
    return jaxbn.BatchNormState(
        running_mean=jnp.asarray(rng.randn(c)),
        running_var=jnp.asarray(rng.rand(c) + 0.5),
        num_batches_tracked=jnp.asarray(7, jnp.int64),
    )


def fresh_params(c, seed=2):
    rng = np.random.RandomState(seed)
    return jaxbn.BatchNormParams(jnp.asarray(rng.rand(c) + 0.5), jnp.asarray(rng.randn(c)))


def assert_state_equal(ours, theirs):
    if theirs is None:
        assert ours is None
        return
    np.testing.assert_allclose(np.asarray(ours.running_mean), theirs.running_mean, **TOL)
    np.testing.assert_allclose(np.asarray(ours.running_var), theirs.running_var, **TOL)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


instance_norm = jax.jit(jaxbn.instance_norm)


def test_default_flags_are_torch_module_defaults():
    module = torch.nn.InstanceNorm2d(3)
    flags = jaxbn.InstanceNormFlags()
    assert (flags.track_running_stats, flags.momentum, flags.eps) == (
        module.track_running_stats, module.momentum, module.eps)
    assert module.weight is None and module.running_mean is None  # -> params=None, state=None
    assert flags.training == module.training


@pytest.mark.parametrize("ndim", [3, 4, 5])
@pytest.mark.parametrize(
    "affine,buffers,training,track,momentum",
    list(itertools.product([False, True], [False, True], [True, False], [True, False], [0.1, None])),
)
def test_matches_torch_across_flags(ndim, affine, buffers, training, track, momentum):
    x = data(SHAPES[ndim])
    c = x.shape[1]
    state = fresh_state(c) if buffers else None
    params = fresh_params(c) if affine else None
    flags = jaxbn.InstanceNormFlags(training=training, track_running_stats=track, momentum=momentum)
    if not buffers and track and not training:
        # torch: RuntimeError "Expected running_mean and running_var to be defined when
        # use_input_stats is false"; jaxbn raises ValueError with the same words.
        with pytest.raises(RuntimeError, match="Expected running_mean and running_var to be defined"):
            torch_oracle.instance_norm(x, state, params, flags)
        with pytest.raises(ValueError, match="Expected running_mean and running_var to be defined"):
            jaxbn.instance_norm(jnp.asarray(x), state, params, flags)
        return
    y_ref, state_ref = torch_oracle.instance_norm(x, state, params, flags)
    y, new_state = instance_norm(jnp.asarray(x), state, params, flags)
    np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
    assert_state_equal(new_state, state_ref)


def test_attribute_flips_over_a_sequence_of_calls():
    """One torch module, attributes changed between calls; jaxbn threads its state alongside."""
    shape = (3, 2, 5, 4)
    c = shape[1]
    module = torch.nn.InstanceNorm2d(c, affine=True, track_running_stats=True).double()
    state, params = fresh_state(c), fresh_params(c)
    torch_oracle.load_state(module, state, params)
    schedule = [
        dict(training=True, track_running_stats=True, momentum=0.1),
        dict(training=True, track_running_stats=True, momentum=None),  # m=0: no change
        dict(training=True, track_running_stats=False, momentum=0.3),  # still updated
        dict(training=False, track_running_stats=False, momentum=0.2),  # eval, input stats, updated
        dict(training=False, track_running_stats=True, momentum=0.2),  # eval with running stats
        dict(training=True, track_running_stats=True, momentum=0.5),
    ]
    for step, attrs in enumerate(schedule):
        x = data(shape, seed=10 + step, offset=step)
        flags = jaxbn.InstanceNormFlags(**attrs)
        torch_oracle.apply_flags(module, flags)
        with torch.no_grad():
            y_ref = torch_oracle.to_numpy(torch_oracle.forward(module, x))
        y, state = instance_norm(jnp.asarray(x), state, params, flags)
        np.testing.assert_allclose(np.asarray(y), y_ref, **TOL, err_msg=f"step {step}: {attrs}")
        assert_state_equal(state, torch_oracle.module_state(module))
    assert int(state.num_batches_tracked) == 7  # never incremented


@pytest.mark.parametrize("ndim", [3, 4, 5])
def test_channels_last_axis(ndim):
    x = data(SHAPES[ndim])
    c = x.shape[1]
    flags = jaxbn.InstanceNormFlags(track_running_stats=True)
    y_ref, state_ref = torch_oracle.instance_norm(x, fresh_state(c), fresh_params(c), flags)
    x_last = np.moveaxis(x, 1, -1)
    y, new_state = instance_norm(jnp.asarray(x_last), fresh_state(c), fresh_params(c), flags.replace(axis=-1))
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), y_ref, **TOL)
    assert_state_equal(new_state, state_ref)


@pytest.mark.parametrize("training,track", [(True, True), (True, False), (False, False), (False, True)])
def test_gradients_match_torch(training, track):
    shape = (3, 2, 4, 5)
    c = shape[1]
    x = data(shape)
    cot = np.random.RandomState(5).randn(*shape)
    state, params = fresh_state(c), fresh_params(c)
    flags = jaxbn.InstanceNormFlags(training=training, track_running_stats=track)
    module = torch_oracle.build_module(c, 4, state, params, flags, torch.float64, INSTANCE_NORM)
    y_ref, dx_ref, dp_ref = torch_oracle.vjp(module, x, cot)

    def loss(x, params):
        y, _ = jaxbn.instance_norm(x, state, params, flags)
        return jnp.sum(y * cot)

    dx, dp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), params)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, **TOL)
    np.testing.assert_allclose(np.asarray(dp.weight), dp_ref.weight, **TOL)
    np.testing.assert_allclose(np.asarray(dp.bias), dp_ref.bias, **TOL)


def test_one_spatial_element_raises_torch_error_when_input_stats_are_used():
    x = data((4, 3, 1))
    with pytest.raises(ValueError, match=r"Expected more than 1 spatial element when training"):
        torch_oracle.instance_norm(x, None, None, jaxbn.InstanceNormFlags())
    with pytest.raises(ValueError, match=r"Expected more than 1 spatial element when training, got input size \(4, 3, 1\)"):
        jaxbn.instance_norm(jnp.asarray(x), None, None, jaxbn.InstanceNormFlags())
    # Eval with running statistics does not need input statistics: both accept it.
    flags = jaxbn.InstanceNormFlags(training=False, track_running_stats=True)
    y_ref, _ = torch_oracle.instance_norm(x, fresh_state(3), None, flags)
    y, _ = jaxbn.instance_norm(jnp.asarray(x), fresh_state(3), None, flags)
    np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)


def test_batch_of_one_instance_is_fine_unlike_batch_norm():
    x = data((1, 3, 6))
    flags = jaxbn.InstanceNormFlags(track_running_stats=True)
    y_ref, state_ref = torch_oracle.instance_norm(x, fresh_state(3), None, flags)
    y, new_state = jaxbn.instance_norm(jnp.asarray(x), fresh_state(3), None, flags)
    np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
    assert_state_equal(new_state, state_ref)


def test_empty_batch_sets_running_stats_to_nan_like_torch():
    x = data((0, 3, 6))
    flags = jaxbn.InstanceNormFlags(track_running_stats=True)
    y_ref, state_ref = torch_oracle.instance_norm(x, fresh_state(3), None, flags)
    assert np.isnan(state_ref.running_mean).all() and np.isnan(state_ref.running_var).all()
    y, new_state = jaxbn.instance_norm(jnp.asarray(x), fresh_state(3), None, flags)
    assert y.shape == y_ref.shape == (0, 3, 6)
    assert_state_equal(new_state, state_ref)  # NaN == NaN under assert_allclose


def test_momentum_none_still_poisons_with_nan_like_torch():
    """momentum=None is m=0 for instance norm, and 0 * NaN is NaN: torch's buffers go NaN."""
    x = data((3, 2, 6))
    x[0, 0, 0] = np.nan
    flags = jaxbn.InstanceNormFlags(track_running_stats=True, momentum=None)
    _, state_ref = torch_oracle.instance_norm(x, fresh_state(2), None, flags)
    assert np.isnan(state_ref.running_mean[0]) and not np.isnan(state_ref.running_mean[1])
    _, new_state = jaxbn.instance_norm(jnp.asarray(x), fresh_state(2), None, flags)
    assert_state_equal(new_state, state_ref)
    # The opt-in guard keeps the old buffers instead.
    _, guarded = jaxbn.instance_norm(
        jnp.asarray(x), fresh_state(2), None, flags.replace(skip_nonfinite_updates=True))
    np.testing.assert_array_equal(np.asarray(guarded.running_mean), np.asarray(fresh_state(2).running_mean))
    np.testing.assert_array_equal(np.asarray(guarded.running_var), np.asarray(fresh_state(2).running_var))


def test_unbatched_input_via_leading_axis():
    """torch's unbatched (C, L) input to InstanceNorm1d equals jaxbn on x[None]."""
    x = data((3, 8))
    module = torch.nn.InstanceNorm1d(3).double()
    with torch.no_grad():
        y_ref = module(torch.from_numpy(x.copy())).numpy()
    y, _ = jaxbn.instance_norm(jnp.asarray(x)[None], None, None, jaxbn.InstanceNormFlags())
    np.testing.assert_allclose(np.asarray(y[0]), y_ref, **TOL)
    with pytest.raises(ValueError, match=r"expected at least 3D input \(got 2D input\)"):
        jaxbn.instance_norm(jnp.asarray(x), None, None, jaxbn.InstanceNormFlags())


def test_rejects_axis_name_and_feature_mismatch():
    x = jnp.asarray(data((2, 3, 5)))
    with pytest.raises(ValueError, match="axis_name"):
        jaxbn.instance_norm(x, None, None, jaxbn.InstanceNormFlags(axis_name="d"))
    with pytest.raises(ValueError, match="weight should contain 3 elements not 4"):
        jaxbn.instance_norm(x, None, fresh_params(4), jaxbn.InstanceNormFlags())



def test_momentum_none_leaves_buffers_bitwise_while_torch_moves_them_by_ulps():
    """torch writes back the plain mean of N copies of each buffer: 'no update' moves it by ulps.

    Pinned in docs/scaling.md (section 5): over batch sizes 2..11 torch's buffers move by at most
    four ulps (measured over N = 1..64: three) and do move somewhere; jaxbn averages the
    *changes* and keeps them bitwise.
    """
    flags = jaxbn.InstanceNormFlags(training=True, track_running_stats=True, momentum=None)
    torch_moved = False
    for n in range(2, 12):
        x = data((n, 3, 4, 5), seed=n)
        state = fresh_state(3, seed=n)
        _, state_torch = torch_oracle.instance_norm(x, state, None, flags)
        _, new_state = instance_norm(jnp.asarray(x), state, None, flags)
        for name in ("running_mean", "running_var"):
            old = np.asarray(getattr(state, name))
            theirs = getattr(state_torch, name)
            np.testing.assert_array_equal(np.asarray(getattr(new_state, name)), old, err_msg=f"N={n} {name}")
            assert np.all(np.abs(theirs - old) <= 4 * np.spacing(np.abs(old))), (n, name)
            torch_moved |= not np.array_equal(theirs, old)
    assert torch_moved, "torch kept every buffer bitwise: update docs/scaling.md section 5"
