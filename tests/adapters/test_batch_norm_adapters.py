"""The Flax adapters against real torch modules (``jaxbn.testing.oracle``).

Every row of the behaviour table (docs/semantics.md) is reached through each adapter the way its users would reach
it: on linen through call-time overrides (linen modules are immutable), on NNX by assigning the
attributes after construction, exactly as torch users do. Plus the adapter-specific rules: torch
variable names, ``mutable=['batch_stats']``, ``init`` leaves the statistics alone, lazy
``num_features``, NNX's ``train()`` / ``eval()`` / ``nnx.view`` and attribute flips under
``nnx.jit``; the eps torch refuses, and a traced momentum schedule compiled once.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn.linen
import jaxbn.nnx
from helpers import F64_TOL, MOMENTUM_SCHEDULE, TraceCounter, assert_close, assert_state_matches, random_input
from jaxbn import BatchNormFlags, BatchNormParams, BatchNormState
from jaxbn.functional.families import FAMILIES
from jaxbn.functional.torch_rules import Family
from jaxbn.testing import oracle as torch_oracle

C = 5
TOL = 1e-10
RNG = np.random.default_rng(11)


def nonfresh_state(rng: np.random.Generator, dtype=np.float64) -> BatchNormState:
    """Buffers that have seen batches: a wrong update factor or counter cannot hide."""
    return BatchNormState(
        running_mean=rng.normal(size=C).astype(dtype),
        running_var=rng.uniform(0.5, 2.0, size=C).astype(dtype),
        num_batches_tracked=np.asarray(3, np.int64),
    )


def random_params(rng: np.random.Generator, dtype=np.float64) -> BatchNormParams:
    return BatchNormParams(rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype))


def input_with_features_on(axis: int, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    shape = [4, 3, 2, 3]
    shape[axis] = C
    return (rng.normal(size=shape) * 2 + 1).astype(dtype)


def variable_dtype(x, state, params):
    """The dtype the module's variables are built in: that of the given arrays, else ``x``'s."""
    reference = state if state is not None else params
    return x.dtype if reference is None else np.asarray(reference[0]).dtype


def run_linen(x, state, params, flags: BatchNormFlags, mask=None):
    """One call of a linen module built like the torch one, with ``flags`` as call overrides."""
    module = jaxbn.linen.BatchNorm(
        affine=params is not None,
        track_running_stats=state is not None,
        axis=flags.axis,
        param_dtype=variable_dtype(x, state, params),
        axis_name=flags.axis_name,
    )
    variables = {}
    if params is not None:
        variables["params"] = jax.tree.map(jnp.asarray, params._asdict())
    if state is not None:
        variables["batch_stats"] = jax.tree.map(jnp.asarray, state._asdict())
    y, updates = module.apply(
        variables,
        x,
        train=flags.training,
        track_running_stats=flags.track_running_stats,
        momentum=flags.momentum,
        eps=flags.eps,
        mask=mask,
        mutable=["batch_stats"],
    )
    new_state = None if state is None else BatchNormState(**updates["batch_stats"])
    return y, new_state


def nnx_module(x, state, params, flags: BatchNormFlags) -> jaxbn.nnx.BatchNorm:
    """An NNX module built like the torch one (affine / buffers), loaded with state and params."""
    bn = jaxbn.nnx.BatchNorm(
        C, affine=params is not None, track_running_stats=state is not None, axis=flags.axis,
        param_dtype=variable_dtype(x, state, params), axis_name=flags.axis_name,
    )
    for name, value in {**(state or BatchNormState(None, None, None))._asdict(),
                        **(params or BatchNormParams(None, None))._asdict()}.items():
        if value is not None:
            getattr(bn, name)[...] = jnp.asarray(value)
    return bn


def set_nnx_attributes(bn: jaxbn.nnx.BatchNorm, flags: BatchNormFlags) -> None:
    """What a torch user does between calls: assign attributes, switch mode."""
    bn.track_running_stats = flags.track_running_stats
    bn.momentum = flags.momentum
    bn.eps = flags.eps
    bn.train() if flags.training else bn.eval()


def nnx_state(bn: jaxbn.nnx.BatchNorm) -> BatchNormState | None:
    if bn.running_mean is None:
        return None
    return BatchNormState(*(getattr(bn, name)[...] for name in BatchNormState._fields))


def run_nnx(x, state, params, flags: BatchNormFlags, mask=None):
    """One call of an NNX module whose attributes were set after construction."""
    bn = nnx_module(x, state, params, flags)
    set_nnx_attributes(bn, flags)
    return bn(jnp.asarray(x), mask=mask), nnx_state(bn)


RUNNERS = {"linen": run_linen, "nnx": run_nnx}


def assert_state_close(actual: BatchNormState | None, expected: BatchNormState | None, tol=TOL):
    assert (actual is None) == (expected is None)
    if expected is None:
        return
    for name, a, e in zip(BatchNormState._fields, actual, expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=tol, err_msg=name)
    assert int(actual.num_batches_tracked) == int(expected.num_batches_tracked)


def assert_stats_match_module(batch_stats: dict, torch_bn: torch.nn.Module):
    """A linen ``batch_stats`` collection equals the torch module's buffers."""
    assert_state_close(BatchNormState(**batch_stats), torch_oracle.module_state(torch_bn))


ROWS = list(itertools.product([True, False], [True, False], [True, False]))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize(
    "training,buffers,tracking", ROWS, ids=[f"train{t}-buffers{b}-track{k}" for t, b, k in ROWS]
)
@pytest.mark.parametrize("axis", [-1, 1], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("adapter", sorted(RUNNERS))
def test_every_semantics_row_matches_torch(
    adapter, axis, training, buffers, tracking, momentum, affine
):
    rng = np.random.default_rng(0)
    x = input_with_features_on(axis, rng)
    state = nonfresh_state(rng) if buffers else None
    params = random_params(rng) if affine else None
    flags = BatchNormFlags(training, tracking, momentum, eps=1e-3, axis=axis)

    y, new_state = RUNNERS[adapter](x, state, params, flags)
    y_torch, state_torch = torch_oracle.batch_norm(x, state, params, flags)

    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)
    assert_state_close(new_state, state_torch)


@pytest.mark.parametrize("adapter", sorted(RUNNERS))
def test_axis_name_merges_shards_like_sync_batchnorm_over_the_whole_batch(adapter):
    rng = np.random.default_rng(10)
    x = input_with_features_on(-1, rng)
    state, params = nonfresh_state(rng), random_params(rng)
    flags = BatchNormFlags(axis=-1, axis_name="batch")
    shards = x.reshape(2, x.shape[0] // 2, *x.shape[1:])
    run = lambda shard: RUNNERS[adapter](shard, state, params, flags)  # noqa: E731
    y, new_state = jax.vmap(run, axis_name="batch")(shards)
    y_torch, state_torch = torch_oracle.batch_norm(x, state, params, flags.replace(axis_name=None))
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y_torch, rtol=0, atol=TOL)
    assert_state_close(jax.tree.map(lambda a: a[1], new_state), state_torch)


@pytest.mark.parametrize("adapter", sorted(RUNNERS))
def test_mask_leaves_padding_rows_out_of_the_statistics(adapter):
    rng = np.random.default_rng(11)
    x = input_with_features_on(-1, rng)
    state, params = nonfresh_state(rng), random_params(rng)
    valid = np.array([True, False, True, True])
    flags = BatchNormFlags(axis=-1)
    y, new_state = RUNNERS[adapter](x, state, params, flags, mask=jnp.asarray(valid))
    y_torch, state_torch = torch_oracle.batch_norm(x[valid], state, params, flags)
    np.testing.assert_allclose(np.asarray(y)[valid], y_torch, rtol=0, atol=TOL)
    assert_state_close(new_state, state_torch)


# --- NNX: torch's attribute flips on a live module, under nnx.jit --------------------------------

# (attribute assignments made before the call, training?) applied to both modules in turn
FLIPS = [
    ({}, True),
    ({}, True),
    ({"momentum": None}, True),
    ({"momentum": None}, True),
    ({"track_running_stats": False}, True),
    ({"track_running_stats": False}, False),
    ({"track_running_stats": True, "eps": 1e-2}, False),
    ({"momentum": 0.0}, True),
    ({"momentum": 0.3}, True),
]


def test_nnx_attribute_flips_under_jit_match_a_live_torch_module():
    rng = np.random.default_rng(1)
    bn = jaxbn.nnx.BatchNorm(C, param_dtype=jnp.float64)
    model = nnx.Sequential(bn)  # mode switched on the parent, the NNX way
    torch_bn = torch.nn.BatchNorm2d(C).double()
    step = nnx.jit(lambda m, x: m(x))
    for assignments, training in FLIPS:
        for name, value in assignments.items():
            setattr(bn, name, value)
            setattr(torch_bn, name, value)
        model.train() if training else model.eval()
        torch_bn.train(training)
        x = input_with_features_on(-1, rng)
        y = step(model, jnp.asarray(x))
        with torch.no_grad():
            y_torch = torch_oracle.forward(torch_bn, x, axis=-1).numpy()
        np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)
        assert_state_close(nnx_state(bn), torch_oracle.module_state(torch_bn))


def test_nnx_view_and_set_attributes_switch_mode():
    bn = jaxbn.nnx.BatchNorm(C, param_dtype=jnp.float64)
    x = jnp.asarray(input_with_features_on(-1, np.random.default_rng(2)))
    eval_view = nnx.view(nnx.Sequential(bn), use_running_average=True)
    eval_view(x)
    assert int(bn.num_batches_tracked[...]) == 0 and bn.use_running_average is False
    bn.eval()
    assert bn.use_running_average is True
    bn(x)
    assert int(bn.num_batches_tracked[...]) == 0
    nnx.Sequential(bn).set_attributes(use_running_average=False)
    bn(x)
    assert int(bn.num_batches_tracked[...]) == 1
    bn(x, use_running_average=True)  # call-time mode, like flax.nnx.BatchNorm
    assert int(bn.num_batches_tracked[...]) == 1


def test_nnx_variables_have_torch_names_types_and_fresh_values():
    bn = jaxbn.nnx.BatchNorm(C, param_dtype=jnp.float64)
    torch_bn = torch.nn.BatchNorm2d(C).double()
    params = nnx.to_pure_dict(nnx.state(bn, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))
    assert set(params) == {"weight", "bias"}
    assert set(stats) == {"running_mean", "running_var", "num_batches_tracked"}
    for name, value in {**params, **stats}.items():
        np.testing.assert_array_equal(np.asarray(value), torch_bn.state_dict()[name].numpy())


def test_nnx_without_affine_or_buffers_holds_none_like_torch():
    bn = jaxbn.nnx.BatchNorm(C, affine=False, track_running_stats=False)
    torch_bn = torch.nn.BatchNorm2d(C, affine=False, track_running_stats=False)
    for name in (*BatchNormParams._fields, *BatchNormState._fields):
        assert getattr(bn, name) is None and getattr(torch_bn, name) is None
    assert len(nnx.to_flat_state(nnx.state(bn))) == 0


# --- linen: variables, mutability, init, lazy num_features ---------------------------------------


def test_linen_variables_have_torch_names_and_exist_only_when_built():
    x = jnp.asarray(input_with_features_on(-1, np.random.default_rng(3)))
    for affine, tracking in itertools.product([True, False], repeat=2):
        module = jaxbn.linen.BatchNorm(affine=affine, track_running_stats=tracking)
        variables = module.init(jax.random.key(0), x.astype(jnp.float32), train=True)
        torch_bn = torch.nn.BatchNorm2d(C, affine=affine, track_running_stats=tracking)
        names = {name for name, _ in torch_bn.named_parameters()}
        buffers = {name for name, _ in torch_bn.named_buffers()}
        assert set(variables.get("params", {})) == names
        assert set(variables.get("batch_stats", {})) == buffers


def test_linen_training_with_immutable_batch_stats_says_to_pass_mutable():
    x = jnp.asarray(input_with_features_on(-1, np.random.default_rng(4)))
    module = jaxbn.linen.BatchNorm(param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        module.apply(variables, x, train=True)
    # No update happens in these calls, so nothing has to be mutable:
    module.apply(variables, x, train=False)
    module.apply(variables, x, train=True, track_running_stats=False)
    untracked = jaxbn.linen.BatchNorm(track_running_stats=False, param_dtype=jnp.float64)
    untracked.apply({"params": variables["params"]}, x, train=True)


def torch_writes_buffers(family: Family, state, flags: BatchNormFlags, x) -> bool | None:
    """Whether torch's module modifies its buffers in place in this call (their version
    counters move), or ``None`` when torch refuses the call."""
    module = torch_oracle.build_module(C, x.ndim, state, None, flags, torch.float64, family)
    versions = [b._version for b in module.buffers()]
    try:
        with torch.no_grad():
            torch_oracle.forward(module, x)
    except (RuntimeError, ValueError):
        return None
    return [b._version for b in module.buffers()] != versions


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_adapters_store_statistics_exactly_when_torch_writes_its_buffers(family):
    """linen asks for ``mutable=['batch_stats']``, and NNX assigns its variables, in exactly the
    calls where torch writes its buffers (all modes, flips and momenta, with and without them)."""
    x = input_with_features_on(1, np.random.default_rng(6))
    for training, buffers, tracking, momentum in itertools.product(
        (True, False), (True, False), (True, False), (0.1, None)
    ):
        state = nonfresh_state(np.random.default_rng(7)) if buffers else None
        flags = BatchNormFlags(training=training, track_running_stats=tracking, momentum=momentum,
                               axis=1)
        writes = torch_writes_buffers(family, state, flags, x)
        if writes is None:
            continue
        case = f"training={training} buffers={buffers} tracking={tracking} momentum={momentum}"

        linen_module = getattr(jaxbn.linen, family.name)(
            momentum=momentum, affine=False, track_running_stats=buffers, axis=1,
            param_dtype=jnp.float64)
        variables = {} if state is None else {"batch_stats": dict(state._asdict())}
        call = lambda: linen_module.apply(  # noqa: E731
            variables, jnp.asarray(x), train=training, track_running_stats=tracking)
        if writes:
            with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
                call()
        else:
            call()

        nnx_module = getattr(jaxbn.nnx, family.name)(
            C, momentum=momentum, affine=False, track_running_stats=buffers, axis=1,
            use_running_average=not training, param_dtype=jnp.float64)
        nnx_module.track_running_stats = tracking
        names = BatchNormState._fields if buffers else ()
        before = [getattr(nnx_module, n).get_value() for n in names]
        nnx_module(jnp.asarray(x))
        after = [getattr(nnx_module, n).get_value() for n in names]
        assert any(a is not b for a, b in zip(after, before)) == writes, case


def test_linen_init_leaves_stats_as_torch_constructs_them():
    x = jnp.asarray(input_with_features_on(-1, np.random.default_rng(5)))
    module = jaxbn.linen.BatchNorm(momentum=None, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x, train=True)
    torch_bn = torch.nn.BatchNorm2d(C, momentum=None).double()
    assert_stats_match_module(variables["batch_stats"], torch_bn)
    # ... and the first real training call is torch's first call (momentum=None: f = 1).
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    torch_oracle.forward(torch_bn, x, axis=-1)
    assert_stats_match_module(updates["batch_stats"], torch_bn)


@pytest.mark.parametrize("axis", [-1, 1], ids=["nhwc", "nchw"])
def test_linen_infers_num_features_like_lazy_batchnorm(axis):
    x = input_with_features_on(axis, np.random.default_rng(6))
    module = jaxbn.linen.BatchNorm(axis=axis, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), jnp.asarray(x), train=False)
    y, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    lazy = torch.nn.LazyBatchNorm2d().double()
    y_torch = torch_oracle.forward(lazy, x, axis=axis).detach().numpy()
    assert lazy.num_features == C == variables["params"]["weight"].shape[0]
    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)
    assert_stats_match_module(updates["batch_stats"], lazy)


def test_linen_num_features_mismatch_raises_torchs_message():
    x = jnp.asarray(input_with_features_on(-1, np.random.default_rng(7)), jnp.float32)
    with pytest.raises(ValueError, match=f"running_mean should contain {C} elements not 3"):
        jaxbn.linen.BatchNorm(num_features=3).init(jax.random.key(0), x, train=True)


def test_linen_init_runs_outside_the_mapped_axis():
    x = jnp.ones((4, C), jnp.float32)
    variables = jaxbn.linen.BatchNorm(axis_name="batch").init(jax.random.key(0), x, train=True)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_strategy_attribute_reaches_the_pure_function(family, monkeypatch):
    strategy = jaxbn.Strategy(running_mean_shift=True, backward_wait_bytes=0)
    seen = []

    def recording(f):
        def pure(x, state, params, flags, **keywords):
            seen.append(flags.strategy)
            return jaxbn.functional.families.PURE_FUNCTIONS[f](x, state, params, flags, **keywords)
        return pure

    monkeypatch.setattr(jaxbn.functional.families, "pure_function", recording)
    x = jnp.asarray(input_with_features_on(-1, np.random.default_rng(8)))
    linen_module = getattr(jaxbn.linen, family.name)(strategy=strategy, param_dtype=jnp.float64)
    variables = linen_module.init(jax.random.key(0), x, train=True)
    linen_module.apply(variables, x, train=True, mutable=["batch_stats"])
    nnx_module = getattr(jaxbn.nnx, family.name)(C, strategy=strategy, param_dtype=jnp.float64)
    nnx_module(x)
    nnx_module.strategy = None  # an attribute, set the torch way
    nnx_module(x)
    assert seen == [strategy, strategy, strategy, None]


def test_linen_needs_a_mode():
    x = jnp.ones((4, C), jnp.float32)
    with pytest.raises(ValueError, match="train=True/False"):
        jaxbn.linen.BatchNorm().init(jax.random.key(0), x)
    variables = jaxbn.linen.BatchNorm(train=False).init(jax.random.key(0), x)  # attribute default
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0


def test_linen_under_jit_retraces_only_for_new_overrides():
    rng = np.random.default_rng(8)
    module = jaxbn.linen.BatchNorm(param_dtype=jnp.float64)
    x = jnp.asarray(input_with_features_on(-1, rng))
    variables = module.init(jax.random.key(0), x, train=False)
    traces = []

    @jax.jit
    def step(variables, x):
        traces.append(1)
        return module.apply(variables, x, train=True, momentum=None, mutable=["batch_stats"])

    torch_bn = torch.nn.BatchNorm2d(C, momentum=None).double()
    for _ in range(3):
        x = input_with_features_on(-1, rng)
        _, updates = step(variables, jnp.asarray(x))
        variables = {**variables, **updates}
        torch_oracle.forward(torch_bn, x, axis=-1)
    assert len(traces) == 1
    assert_stats_match_module(variables["batch_stats"], torch_bn)


@pytest.mark.parametrize("adapter", sorted(RUNNERS))
def test_half_precision_input_with_float32_variables_is_torchs_mixed_precision(adapter):
    rng = np.random.default_rng(9)
    x = jnp.asarray(input_with_features_on(-1, rng, np.float32), jnp.bfloat16)
    state, params = nonfresh_state(rng, np.float32), random_params(rng, np.float32)
    flags = BatchNormFlags(axis=-1)
    y, new_state = RUNNERS[adapter](x, state, params, flags)
    torch_bn = torch_oracle.build_module(C, x.ndim, state, params, flags)  # float32, like state
    x_torch = torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)  # NumPy has no bf16
    with torch.no_grad():
        y_torch = torch_oracle.to_numpy(torch_oracle.forward(torch_bn, x_torch, axis=-1))
    state_torch = torch_oracle.module_state(torch_bn)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y_torch, rtol=0, atol=0.05)
    assert_state_close(new_state, state_torch, tol=1e-5)


# ---------------------------------------------------------------- eps and traced momentum through the adapters


def test_the_adapters_refuse_eps_zero_in_training():
    x = jnp.asarray(random_input(RNG, (4, 2, C)))
    message = "batch_norm eps must be positive during training, but got 0.0"
    with pytest.raises(ValueError, match=message):
        jaxbn.linen.BatchNorm(eps=0.0, param_dtype=jnp.float64).init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match=message):
        jaxbn.nnx.BatchNorm(C, eps=0.0, param_dtype=jnp.float64)(x)

def test_adapters_take_a_traced_momentum_and_compile_once():
    x = jnp.asarray(random_input(RNG, (4, 2, C)))
    model = jaxbn.linen.BatchNorm(param_dtype=jnp.float64)
    variables = model.init(jax.random.key(0), x, train=True)
    counted = TraceCounter(lambda v, x, m: model.apply(v, x, train=True, momentum=m, mutable=["batch_stats"]))
    step = jax.jit(counted)
    state = BatchNormState(**variables["batch_stats"])
    params = BatchNormParams(**variables["params"])
    nnx_model = jaxbn.nnx.BatchNorm(C, param_dtype=jnp.float64)
    nnx_counted = TraceCounter(lambda m, x, momentum: m(x, momentum=momentum))
    nnx_step = nnx.jit(nnx_counted)
    for momentum in MOMENTUM_SCHEDULE:
        y, updates = step(variables, x, jnp.float64(momentum))
        variables = {**variables, **updates}
        y_nnx = nnx_step(nnx_model, x, jnp.float64(momentum))
        y_ref, state = jaxbn.batch_norm(x, state, params, BatchNormFlags(axis=-1, momentum=momentum))
        assert_close(y, y_ref, F64_TOL, "linen y")
        assert_close(y_nnx, y_ref, F64_TOL, "nnx y")
        assert_state_matches(BatchNormState(**variables["batch_stats"]), state, F64_TOL)
        assert_state_matches(BatchNormState(*(nnx_model.running_mean[...], nnx_model.running_var[...],
                                              nnx_model.num_batches_tracked[...])), state, F64_TOL)
    assert counted.traces == 1 and nnx_counted.traces == 1
