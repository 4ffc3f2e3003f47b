"""Cross-device batch norm on 8 host CPU devices against torch on the concatenated batch (float64).

Not collected by the main test run (the file name does not start with ``test_``): the device
count is fixed when JAX starts, so tests/functional/test_scaling.py runs this file with pytest in
a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Run it by hand with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/functional/multidevice_sync.py

Every comparison is against real torch BatchNorm on the concatenation of the devices' valid
rows (:func:`jaxbn.testing.oracle.vjp`, which with a mask also gives the padded rows' torch
outputs and gradients): outputs, running statistics, counter, dx, dweight, dbias.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.testing import oracle as torch_oracle

if jax.device_count() != 8:
    raise RuntimeError(
        f"tests/functional/multidevice_sync.py needs 8 devices, found {jax.device_count()}: run it through "
        "tests/functional/test_scaling.py or with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )

TOL = dict(rtol=1e-10, atol=1e-10)
C = 3
EVEN = (4,) * 8
UNEVEN = (5, 3, 0, 2, 4, 1, 6, 3)
MESH = jax.make_mesh((8,), ("d",))
ROWS = P("d")


class Batch:
    """A global batch of 8 device shards of ``rows`` rows each, the first ``counts[i]`` valid."""

    def __init__(self, counts, rows, feature_shape=(C, 3, 2), pad=0.0, seed=0, axis=1):
        rng = np.random.RandomState(seed)
        self.shape = (8 * rows,) + feature_shape
        x = rng.randn(*self.shape) * 2.0 + 3.0
        mask = np.zeros(8 * rows, dtype=bool)
        for device, count in enumerate(counts):
            mask[device * rows : device * rows + count] = True
        x[~mask] = pad
        self.x = np.moveaxis(x, 1, axis) if axis != 1 else x
        self.mask = mask
        self.cot = rng.randn(*self.x.shape)
        self.axis = axis
        self.masked = any(c != rows for c in counts)

    def sharded(self, mesh=MESH, spec=ROWS):
        put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))  # noqa: E731
        return put(self.x), (put(self.mask) if self.masked else None), put(self.cot)

    def torch_reference(self, state, params, flags, calls=1):
        """torch on the concatenated valid rows (``calls`` times); padded rows per torch_oracle.vjp."""
        module = torch_oracle.build_module(C, len(self.shape), state, params, flags, torch.float64)
        for _ in range(calls):
            y, dx, dp = torch_oracle.vjp(
                module, self.x, self.cot, self.axis, self.mask if self.masked else None)
        return y, dx, dp, torch_oracle.module_state(module)


def state_and_params(seed=1):
    rng = np.random.RandomState(seed)
    state = jaxbn.BatchNormState(
        jnp.asarray(rng.randn(C)), jnp.asarray(rng.rand(C) + 0.5), jnp.asarray(5, jnp.int64))
    params = jaxbn.BatchNormParams(jnp.asarray(rng.rand(C) + 0.5), jnp.asarray(rng.randn(C)))
    return state, params


def assert_close(name, ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    diff = np.nanmax(np.abs(ours - theirs)) if ours.size else 0.0
    print(f"  {name}: max |diff| = {diff:.3e}")
    np.testing.assert_allclose(ours, theirs, **TOL, err_msg=name)


def assert_matches(tag, got, ref, old_state, calls=1):
    """``got`` / ``ref``: ``(y, dx, dparams, state)`` from jaxbn and torch."""
    print(tag)
    y, dx, dp, state = got
    y_ref, dx_ref, dp_ref, state_ref = ref
    assert_close("y", y, y_ref)
    if dx is not None:
        assert_close("dx", dx, dx_ref)
        assert_close("dweight", dp.weight, dp_ref.weight)
        assert_close("dbias", dp.bias, dp_ref.bias)
    if state_ref is not None:
        assert_close("running_mean", state.running_mean, state_ref.running_mean)
        assert_close("running_var", state.running_var, state_ref.running_var)
        assert int(state.num_batches_tracked) == int(state_ref.num_batches_tracked)
        assert int(state.num_batches_tracked) == int(old_state.num_batches_tracked) + calls


def shard_map_step(flags, mesh=MESH, spec=ROWS, check_vma=True, state_spec=P()):
    """``jit(value_and_grad)`` of ``sum(y * cot)`` over a shard_map'ed jaxbn.batch_norm."""

    def local(x, mask, state, params):
        return jaxbn.batch_norm(x, state, params, flags, mask=mask)

    def loss(x, mask, cot, state, params):
        y, new_state = jax.shard_map(
            local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=(spec, state_spec),
            check_vma=check_vma,
        )(x, mask, state, params)
        return jnp.sum(y * cot), (y, new_state)

    grad = jax.value_and_grad(loss, argnums=(0, 4), has_aux=True)

    @jax.jit
    def step(x, mask, cot, state, params):
        (_, (y, new_state)), (dx, dp) = grad(x, mask, cot, state, params)
        return y, dx, dp, new_state

    return step


CASES = {
    "even-4x8-rank4": dict(counts=EVEN, rows=4),
    "uneven-5,3,0,2,4,1,6,3-rank4": dict(counts=UNEVEN, rows=6),
    "uneven-rank2": dict(counts=UNEVEN, rows=6, feature_shape=(C,)),
    "uneven-rank3-channels-last": dict(counts=UNEVEN, rows=6, feature_shape=(C, 4), axis=-1),
    "uneven-rank5": dict(counts=UNEVEN, rows=6, feature_shape=(C, 2, 2, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_matches_torch_on_concatenated_batch(case, check_vma):
    batch = Batch(**CASES[case])
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d", axis=batch.axis, momentum=0.3)
    got = shard_map_step(flags, check_vma=check_vma)(*batch.sharded(), state, params)
    ref = batch.torch_reference(state, params, flags)
    assert_matches(f"shard_map {case} check_vma={check_vma}", got, ref, state)


@pytest.mark.parametrize("training,buffers", [(False, False), (False, True), (True, False)])
def test_shard_map_other_modes(training, buffers):
    """Eval without buffers syncs batch statistics (global-batch semantics; torch's SyncBatchNorm
    would use local ones there, see docs/scaling.md); eval with buffers uses running stats."""
    batch = Batch(UNEVEN, 6)
    state, params = state_and_params()
    state = state if buffers else None
    flags = jaxbn.BatchNormFlags(axis_name="d", training=training)
    state_spec = P() if buffers else None
    step = shard_map_step(flags, state_spec=state_spec)
    got = step(*batch.sharded(), state, params)
    ref = batch.torch_reference(state, params, flags)
    assert_matches(f"shard_map training={training} buffers={buffers}", got, ref, state, calls=0)


def test_nan_padding_does_not_reach_the_statistics():
    batch = Batch(UNEVEN, 6, pad=np.nan)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d")
    x, mask, _ = batch.sharded()
    y, new_state = jax.jit(jax.shard_map(
        lambda x, m, s, p: jaxbn.batch_norm(x, s, p, flags, mask=m), mesh=MESH,
        in_specs=(ROWS, ROWS, P(), P()), out_specs=(ROWS, P())))(x, mask, state, params)
    y_ref, state_ref = torch_oracle.batch_norm(batch.x[batch.mask], state, params, flags)
    print("NaN padding")
    assert_close("y (valid rows)", np.asarray(y)[batch.mask], y_ref)
    assert_close("running_mean", new_state.running_mean, state_ref.running_mean)
    assert_close("running_var", new_state.running_var, state_ref.running_var)
    assert np.isnan(np.asarray(y)[~batch.mask]).all()


def test_counter_once_per_call_and_cumulative_average():
    """momentum=None: three calls = torch's cumulative average over three concatenated batches."""
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d", momentum=None)
    module = torch_oracle.build_module(C, 4, state, params, flags, torch.float64)
    step = shard_map_step(flags)
    for call, counts in enumerate([UNEVEN, EVEN, UNEVEN[::-1]]):
        batch = Batch(counts, 6, seed=call)
        *_, state = step(*batch.sharded(), state, params)
        with torch.no_grad():
            torch_oracle.forward(module, batch.x[batch.mask])
        ref = torch_oracle.module_state(module)
        print(f"momentum=None call {call}")
        assert_close("running_mean", state.running_mean, ref.running_mean)
        assert_close("running_var", state.running_var, ref.running_var)
        assert int(state.num_batches_tracked) == int(ref.num_batches_tracked) == 6 + call


def test_empty_global_batch_counts_but_keeps_stats():
    batch = Batch((0,) * 8, 2)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d")
    *_, new_state = shard_map_step(flags)(*batch.sharded(), state, params)
    _, state_ref = torch_oracle.batch_norm(batch.x[:0], state, params, flags)
    assert_close("running_mean", new_state.running_mean, state_ref.running_mean)
    assert_close("running_var", new_state.running_var, state_ref.running_var)
    assert int(new_state.num_batches_tracked) == int(state_ref.num_batches_tracked) == 6


def test_vmap_with_axis_name():
    batch = Batch(UNEVEN, 6)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d")
    per_device = lambda a: jnp.asarray(a).reshape((8, -1) + a.shape[1:])  # noqa: E731

    def loss(x, params):
        y, new_state = jax.vmap(
            lambda x, m: jaxbn.batch_norm(x, state, params, flags, mask=m),
            axis_name="d", out_axes=(0, None),
        )(x, per_device(batch.mask))
        return jnp.sum(y * per_device(batch.cot)), (y, new_state)

    (_, (y, new_state)), (dx, dp) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(per_device(batch.x), params)
    got = (y.reshape(batch.shape), dx.reshape(batch.shape), dp, new_state)
    assert_matches("vmap(axis_name='d')", got, batch.torch_reference(state, params, flags), state)


def pmap_step(batch, state, params, flags):
    """The pmap idiom: grad of each device's local loss inside the map, param grads psum'ed
    (within the same groups). Returns ``(y, dx, dparams, new_state)``: y and dx as global
    batches, dparams and new_state with a leading device axis."""

    @functools.partial(jax.pmap, axis_name="d", in_axes=(0, 0, 0, None, None))
    def step(x, mask, cot, state, params):
        def loss(x, params):
            y, new_state = jaxbn.batch_norm(x, state, params, flags, mask=mask)
            return jnp.sum(y * cot), (y, new_state)

        (_, (y, new_state)), (dx, dp) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        return y, dx, jax.lax.psum(dp, "d", axis_index_groups=flags.axis_index_groups), new_state

    per_device = lambda a: jnp.asarray(a).reshape((8, -1) + a.shape[1:])  # noqa: E731
    y, dx, dp, new_state = step(
        per_device(batch.x), per_device(batch.mask), per_device(batch.cot), state, params)
    return y.reshape(batch.shape), dx.reshape(batch.shape), dp, new_state


def on_device(tree, device):
    return jax.tree.map(lambda a: a[device], tree)


def test_pmap_gradients_inside_the_map():
    batch = Batch(UNEVEN, 6)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d")
    y, dx, dp, new_state = pmap_step(batch, state, params, flags)
    ref = batch.torch_reference(state, params, flags)
    for device in range(8):
        got = (y, dx, on_device(dp, device), on_device(new_state, device))
        assert_matches(f"pmap device {device}", got, ref, state)


def group_references(batch, groups, state, params, flags):
    """torch per device group: each group's concatenated rows through its own module."""
    refs = []
    for group in groups:
        rows = np.zeros_like(batch.mask)
        per = len(batch.mask) // 8
        for device in group:
            rows[device * per : (device + 1) * per] = True
        module = torch_oracle.build_module(C, 4, state, params, flags, torch.float64)
        y, dx, dp = torch_oracle.vjp(module, batch.x[rows], batch.cot[rows], mask=batch.mask[rows])
        refs.append((rows, y, dx, dp, torch_oracle.module_state(module)))
    return refs


def test_axis_index_groups_under_pmap_are_independent_sync_bns():
    groups = ((0, 1, 2, 3), (4, 5, 6, 7))
    batch = Batch(UNEVEN, 6)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d", axis_index_groups=groups)
    y, dx, dp, new_state = pmap_step(batch, state, params, flags)
    for group, (rows, y_ref, dx_ref, dp_ref, state_ref) in zip(groups, group_references(
            batch, groups, state, params, flags)):
        for device in group:
            got = (y[rows], dx[rows], on_device(dp, device), on_device(new_state, device))
            assert_matches(f"pmap group {group} device {device}", got,
                           (y_ref, dx_ref, dp_ref, state_ref), state)


def test_two_dimensional_mesh_inner_axis_is_two_independent_groups():
    """shard_map has no axis_index_groups (JAX: pmap only); a mesh axis per group does it."""
    mesh = jax.make_mesh((2, 4), ("g", "d"))
    spec = P(("g", "d"))
    batch = Batch(UNEVEN, 6)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d")
    with_group_axis = lambda s: jax.tree.map(lambda a: a[None], s)  # noqa: E731

    def loss(x, mask, cot, params):
        y, new_state = jax.shard_map(
            lambda x, m, p: (lambda y, s: (y, with_group_axis(s)))(
                *jaxbn.batch_norm(x, state, p, flags, mask=m)),
            mesh=mesh, in_specs=(spec, spec, P()), out_specs=(spec, P("g")),
        )(x, mask, params)
        return jnp.sum(y * cot), (y, new_state)

    x, mask, cot = batch.sharded(mesh, spec)
    (_, (y, new_state)), (dx, dp) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 3), has_aux=True))(x, mask, cot, params)
    groups = ((0, 1, 2, 3), (4, 5, 6, 7))
    refs = group_references(batch, groups, state, params, flags)
    new_state = jax.tree.map(np.asarray, new_state)  # (2, C): one row per group
    dp_ref = jax.tree.map(lambda a, b: a + b, refs[0][3], refs[1][3])  # shared params: grads add
    print("2-D mesh, axis_name='d'")
    assert_close("dweight", dp.weight, dp_ref.weight)
    assert_close("dbias", dp.bias, dp_ref.bias)
    for g, (rows, y_ref, dx_ref, _, state_ref) in enumerate(refs):
        assert_close(f"group {g} y", np.asarray(y)[rows], y_ref)
        assert_close(f"group {g} dx", np.asarray(dx)[rows], dx_ref)
        assert_close(f"group {g} running_mean", new_state.running_mean[g], state_ref.running_mean)
        assert_close(f"group {g} running_var", new_state.running_var[g], state_ref.running_var)
        assert int(new_state.num_batches_tracked[g]) == 6


def test_tuple_axis_name_syncs_the_whole_two_dimensional_mesh():
    mesh = jax.make_mesh((2, 4), ("g", "d"))
    spec = P(("g", "d"))
    batch = Batch(UNEVEN, 6)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name=("g", "d"))
    got = shard_map_step(flags, mesh=mesh, spec=spec)(*batch.sharded(mesh, spec), state, params)
    assert_matches("2-D mesh, axis_name=('g', 'd')", got,
                   batch.torch_reference(state, params, flags), state)


def test_axis_index_groups_under_shard_map_says_use_a_mesh_axis():
    batch = Batch(EVEN, 4)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(axis_name="d", axis_index_groups=((0, 1, 2, 3), (4, 5, 6, 7)))
    with pytest.raises(NotImplementedError, match="only supported by JAX under jax.pmap"):
        shard_map_step(flags)(*batch.sharded(), state, params)


def collective_lines(hlo: str) -> list[str]:
    ops = ("all-reduce(", "all-gather(", "all-to-all(", "collective-permute(", "reduce-scatter(")
    return [line.strip() for line in hlo.splitlines() if any(op in line for op in ops)]


@pytest.mark.parametrize("masked", [False, True])
def test_plain_jit_with_batch_sharding_needs_no_axis_name(masked):
    """No axis_name: XLA partitions the reductions itself. The result is the global-batch result;
    the compiled HLO all-reduces per-channel vectors (f64[3]) and never gathers the batch."""
    batch = Batch((5, 3, 6, 2, 4, 1, 6, 3) if masked else EVEN, 6 if masked else 4)
    state, params = state_and_params()
    flags = jaxbn.BatchNormFlags(momentum=0.3)
    x, mask, cot = batch.sharded()

    def loss(x, params):
        y, new_state = jaxbn.batch_norm(x, state, params, flags, mask=mask)
        return jnp.sum(y * cot), (y, new_state)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, new_state)), (dx, dp) = step(x, params)
    assert_matches(f"plain jit, batch-sharded NamedSharding, mask={masked}", (y, dx, dp, new_state),
                   batch.torch_reference(state, params, flags), state)
    assert y.sharding.spec[0] == "d" and dx.sharding.spec[0] == "d"  # stays sharded

    forward = jax.jit(lambda x: jaxbn.batch_norm(x, state, params, flags, mask=mask))
    for name, fn, args in [("forward", forward, (x,)), ("value_and_grad", step, (x, params))]:
        lines = collective_lines(fn.lower(*args).compile().as_text())
        print(f"HLO collectives ({name}, mask={masked}):")
        for line in lines:
            print("   ", line[:160])
        reduced = [line for line in lines if "all-reduce(" in line]
        assert reduced, "expected XLA to insert an all-reduce"
        assert not any(op in line for line in lines for op in ("all-gather(", "all-to-all("))
        for line in reduced:  # only per-channel vectors (f64[3]) and scalars cross devices
            result_type = line.split(" = ", 1)[1].split(" all-reduce(", 1)[0]
            for dims in re.findall(r"f64\[([\d,]*)\]", result_type):
                assert math.prod(int(d) for d in dims.split(",") if d) <= C, line


def test_flax_axis_name_averages_per_device_means():
    """flax.linen.BatchNorm(axis_name=...) pmean's per-device statistics: right for even shards,
    wrong for uneven ones (weights a 1-row device like a 6-row one) and NaN when a device has no
    valid row (0/0). jaxbn weights by counts."""
    import flax.linen as nn

    flax_bn = nn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0, axis=1)
    variables = flax_bn.init(jax.random.key(0), jnp.zeros((2, C, 3, 2)))
    flags = jaxbn.BatchNormFlags(axis_name="d", momentum=1.0)  # running_mean := batch mean
    results = {}
    cases = [("even", EVEN), ("uneven", (5, 3, 1, 2, 4, 1, 6, 3)), ("uneven, one empty", UNEVEN)]
    for name, counts in cases:
        batch = Batch(counts, 6)
        x, _, _ = batch.sharded()
        mask = jax.device_put(jnp.asarray(batch.mask), NamedSharding(MESH, ROWS))

        def both(x, m):
            _, flax_vars = flax_bn.apply(variables, x, mask=m[:, None, None, None], mutable=["batch_stats"])
            _, ours = jaxbn.batch_norm(x, jaxbn.init_state(C, jnp.float64), None, flags, mask=m)
            return flax_vars["batch_stats"]["mean"], ours.running_mean

        flax_mean, our_mean = jax.jit(jax.shard_map(
            both, mesh=MESH, in_specs=(ROWS, ROWS), out_specs=(P(), P()), check_vma=False))(x, mask)
        _, ref = torch_oracle.batch_norm(batch.x[batch.mask], jaxbn.init_state(C, jnp.float64), None, flags)
        results[name] = (np.abs(np.asarray(flax_mean) - ref.running_mean).max(),
                         np.abs(np.asarray(our_mean) - ref.running_mean).max())
        print(f"{name}: batch-mean error vs torch: flax {results[name][0]:.3e}, jaxbn {results[name][1]:.3e}")
    assert results["even"][0] < 1e-10 and results["even"][1] < 1e-10
    assert results["uneven"][0] > 1e-2 and results["uneven"][1] < 1e-10
    assert np.isnan(results["uneven, one empty"][0]) and results["uneven, one empty"][1] < 1e-10


def test_guard_decision_is_replicated_across_devices():
    batch = Batch(UNEVEN, 6)
    batch.x[7, 0, 0, 0] = np.nan  # a valid row of device 1
    state, params = state_and_params()
    x, mask, _ = batch.sharded()
    for guard in (False, True):
        flags = jaxbn.BatchNormFlags(axis_name="d", skip_nonfinite_updates=guard)
        _, new_state = jax.jit(jax.shard_map(
            lambda x, m, s, p: jaxbn.batch_norm(x, s, p, flags, mask=m), mesh=MESH,
            in_specs=(ROWS, ROWS, P(), P()), out_specs=(ROWS, P())))(x, mask, state, params)
        _, ref = torch_oracle.batch_norm(batch.x[batch.mask], state, params, flags)
        if guard:
            jax.tree.map(np.testing.assert_array_equal, new_state, state)
        else:
            assert np.isnan(ref.running_mean[0]) and np.isnan(np.asarray(new_state.running_mean[0]))
            assert_close("running_var", new_state.running_var, ref.running_var)
