"""Defects found by an adversarial and a newcomer pass over the pure functions, each pinned here.

Torch is the oracle wherever it has an answer: non-finite first elements, eps ranges, the counter
near int32's limit, momentum schedules. The rest (argument types, dtype advice, eager vs jit) are
jaxbn's own contract.
"""

import itertools
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
from helpers import F64_TOL, assert_close, assert_state_matches, random_input, random_params, random_state
from jaxbn import BatchNormFlags, BatchNormParams, BatchNormState, InstanceNormFlags
from jaxbn.functional.families import pure_function
from jaxbn.functional.torch_rules import BATCH_NORM, INSTANCE_NORM
from jaxbn.testing import oracle as torch_oracle

C = 3
RNG = np.random.default_rng(11)


def same_with_nan(actual, expected, tol=0.0):
    """Equal where finite (to ``tol``), and non-finite in the same places with the same value."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    assert np.array_equal(np.isnan(a), np.isnan(e)), (a, e)
    assert np.array_equal(np.isposinf(a), np.isposinf(e)) and np.array_equal(np.isneginf(a), np.isneginf(e)), (a, e)
    finite = np.isfinite(e)
    assert np.all(np.abs(a[finite] - e[finite]) <= tol), (a, e)


# ---------------------------------------------------------------- 1. inf read first


@pytest.mark.parametrize("value", [np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_infinite_first_element_gives_torchs_infinite_running_mean(value, dtype):
    x = np.array([[value, 0.5], [1.0, 1.5], [2.0, -3.0]], dtype)  # channel 0 starts with inf
    state, params = jaxbn.init_state(2, dtype), jaxbn.init_params(2, dtype)
    y, new = jaxbn.batch_norm(jnp.asarray(x), state, params, BatchNormFlags())
    y_t, new_t = torch_oracle.batch_norm(x, state, params, BatchNormFlags())
    tol = 1e-6 if dtype == np.float32 else F64_TOL
    same_with_nan(y, y_t, tol)
    same_with_nan(new.running_mean, new_t.running_mean, tol)  # [+-inf, finite], not NaN
    same_with_nan(new.running_var, new_t.running_var, tol)
    assert np.isinf(np.asarray(new.running_mean)[0])


def test_an_infinite_first_valid_row_under_a_mask_matches_torch_on_the_valid_rows():
    x = np.array([[7.0], [np.inf], [1.0], [2.0]])
    mask = np.array([False, True, True, True])  # the first *valid* row holds the inf
    state = jaxbn.init_state(1, jnp.float64)
    _, new = jaxbn.batch_norm(jnp.asarray(x), state, None, BatchNormFlags(), mask=jnp.asarray(mask))
    _, new_t = torch_oracle.batch_norm(x[mask], state, None, BatchNormFlags())
    same_with_nan(new.running_mean, new_t.running_mean, F64_TOL)
    same_with_nan(new.running_var, new_t.running_var, F64_TOL)


def test_an_infinite_first_element_in_instance_norm_matches_torch():
    x = random_input(RNG, (2, C, 4))
    x[0, 1, 0] = np.inf
    state, params = random_state(RNG, C), random_params(RNG, C)
    flags = InstanceNormFlags(track_running_stats=True)
    y, new = jaxbn.instance_norm(jnp.asarray(x), state, params, flags)
    y_t, new_t = torch_oracle.instance_norm(x, state, params, flags)
    same_with_nan(y, y_t, F64_TOL)
    same_with_nan(new.running_mean, new_t.running_mean, F64_TOL)
    same_with_nan(new.running_var, new_t.running_var, F64_TOL)


def test_the_shift_still_guards_float32_accuracy_for_large_means():
    # The fallback only replaces a non-finite shift: data offset by 1e4 keeps its digits.
    x = (1e4 + RNG.normal(size=(64, C))).astype(np.float32)
    state = jaxbn.init_state(C)
    _, new = jaxbn.batch_norm(jnp.asarray(x), state, None, BatchNormFlags(momentum=1.0))
    exact = x.astype(np.float64).var(axis=0, ddof=1)
    assert np.max(np.abs(np.asarray(new.running_var) - exact)) < 1e-4


# ---------------------------------------------------------------- 2. eps torch refuses


EPS_CASES = list(itertools.product((0.0, -1e-5, 1e-5), (True, False), (True, False), (True, False)))


def _torch_outcome(module, x):
    try:
        with torch.no_grad():
            module(torch_oracle.to_torch(x))
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


@pytest.mark.parametrize("eps,training,buffers,tracking", EPS_CASES)
def test_batch_norm_refuses_the_eps_torch_refuses_with_torchs_words(eps, training, buffers, tracking):
    x = random_input(RNG, (4, C, 2))
    state = random_state(RNG, C) if buffers else None
    flags = BatchNormFlags(training=training, track_running_stats=tracking, eps=eps)
    module = torch_oracle.build_module(C, x.ndim, state, None, flags, dtype=torch.float64)
    expected = _torch_outcome(module, x)
    if expected is None:
        jaxbn.batch_norm(jnp.asarray(x), state, None, flags)
    else:
        with pytest.raises(ValueError) as info:
            jaxbn.batch_norm(jnp.asarray(x), state, None, flags)
        assert str(info.value) == expected


@pytest.mark.parametrize("eps,training,buffers,tracking", EPS_CASES)
def test_instance_norm_accepts_every_eps_as_torch_does(eps, training, buffers, tracking):
    x = random_input(RNG, (2, C, 4))
    state = random_state(RNG, C) if buffers else None
    flags = InstanceNormFlags(training=training, track_running_stats=tracking, eps=eps)
    if not training and tracking and not buffers:
        return  # torch's own error (no running stats to use), pinned in test_instance_norm
    module = torch_oracle.build_module(C, x.ndim, state, None, flags, torch.float64, INSTANCE_NORM)
    assert _torch_outcome(module, x) is None
    y, _ = jaxbn.instance_norm(jnp.asarray(x), state, None, flags)
    y_t, _ = torch_oracle.instance_norm(x, state, None, flags)
    same_with_nan(y, y_t, 1e-6)


def test_the_adapters_refuse_eps_zero_in_training():
    x = jnp.asarray(random_input(RNG, (4, 2, C)))
    message = "batch_norm eps must be positive during training, but got 0.0"
    with pytest.raises(ValueError, match=message):
        jaxbn.linen.BatchNorm(eps=0.0, param_dtype=jnp.float64).init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match=message):
        jaxbn.nnx.BatchNorm(C, eps=0.0, param_dtype=jnp.float64)(x)


# ---------------------------------------------------------------- 3. the int32 counter


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_an_int32_counter_saturates_instead_of_wrapping(momentum):
    top = np.iinfo(np.int32).max
    x = random_input(RNG, (4, C))
    state = random_state(RNG, C)._replace(num_batches_tracked=jnp.asarray(top, jnp.int32))
    _, new = jaxbn.batch_norm(jnp.asarray(x), state, None, BatchNormFlags(momentum=momentum))
    assert new.num_batches_tracked.dtype == jnp.int32 and int(new.num_batches_tracked) == top
    # torch's int64 counter reaches 2**31; the factor differs by 1/2**31 - 1/(2**31 - 1) ~ 5e-19.
    torch_state = state._replace(num_batches_tracked=np.asarray(top, np.int64))
    _, new_t = torch_oracle.batch_norm(x, torch_state, None, BatchNormFlags(momentum=momentum))
    assert_close(new.running_mean, new_t.running_mean, 1e-15, "running_mean")
    assert_close(new.running_var, new_t.running_var, 1e-15, "running_var")


def test_the_int32_counter_keeps_counting_below_its_limit():
    state = jaxbn.init_state(C, jnp.float64)._replace(num_batches_tracked=jnp.asarray(7, jnp.int32))
    _, new = jaxbn.batch_norm(jnp.ones((4, C)), state, None, BatchNormFlags())
    assert int(new.num_batches_tracked) == 8


# ---------------------------------------------------------------- 14. dtype advice, eager == jit


def test_mixed_dtype_errors_say_how_to_fix_them():
    x = jnp.ones((4, 2, C))  # float64: x64 is on in the test session
    with pytest.raises(TypeError, match=r"param_dtype=.*") as info:
        jaxbn.linen.BatchNorm().init(jax.random.key(0), x, train=True)
    assert "init_state(C, dtype)" in str(info.value) and "float64" in str(info.value)
    with pytest.raises(TypeError, match=r"param_dtype="):
        jaxbn.nnx.BatchNorm(C)(x)
    with pytest.raises(TypeError, match=r"init_state\(C, dtype\)"):
        jaxbn.batch_norm(x, jaxbn.init_state(C), None, BatchNormFlags(axis=-1))
    with pytest.raises(TypeError, match=r"init_params\(C, dtype\)"):
        jaxbn.batch_norm(x, jaxbn.init_state(C, jnp.float64), jaxbn.init_params(C), BatchNormFlags(axis=-1))


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


# ---------------------------------------------------------------- 15. wrong argument types


def _error(exc, *args, **kwargs):
    with pytest.raises(exc) as info:
        jaxbn.batch_norm(*args, **kwargs)
    return str(info.value)


def test_wrong_argument_types_are_named():
    x = jnp.ones((4, C))
    state, params = jaxbn.init_state(C, jnp.float64), jaxbn.init_params(C, jnp.float64)
    message = _error(TypeError, torch.ones(4, C, dtype=torch.float64), state, params)
    assert "x must be a JAX or NumPy array, got torch.Tensor" in message and "jnp.asarray" in message
    message = _error(TypeError, x, dict(state._asdict()), params)
    assert "state must be a jaxbn.BatchNormState" in message and "dict" in message
    message = _error(TypeError, x, tuple(state), params)
    assert "state must be a jaxbn.BatchNormState" in message and "tuple" in message
    message = _error(TypeError, x, params, state)
    assert "swapped" in message and "batch_norm(x, state, params, flags)" in message
    torch_state = BatchNormState(torch.zeros(C), torch.ones(C), torch.tensor(0))
    message = _error(TypeError, x, torch_state, params)
    assert "state.running_mean must be a JAX or NumPy array, got torch.Tensor" in message
    message = _error(TypeError, x, state, params, {"training": True})
    assert "flags must be a jaxbn.BatchNormFlags, got dict" in message
    with pytest.raises(TypeError, match="mask must be a JAX or NumPy array"):
        jaxbn.batch_norm(x, state, params, mask=[True] * 4)


def test_instance_norm_names_wrong_argument_types_too():
    with pytest.raises(TypeError, match="params must be a jaxbn.BatchNormParams"):
        jaxbn.instance_norm(jnp.ones((2, C, 4)), None, {"weight": 1.0, "bias": 0.0})


# ---------------------------------------------------------------- 20. momentum schedules


class TraceCounter:
    def __init__(self, fn):
        self.traces = 0
        self.fn = fn

    def __call__(self, *args, **kwargs):
        self.traces += 1
        return self.fn(*args, **kwargs)


MOMENTA = (0.1, 0.05, 0.3, 0.01, 0.9, 0.5)


@pytest.mark.parametrize("family", [BATCH_NORM, INSTANCE_NORM], ids=lambda f: f.name)
def test_a_traced_momentum_schedule_compiles_once_and_matches_torch(family):
    pure = pure_function(family)
    flags = BatchNormFlags(axis=1) if family is BATCH_NORM else InstanceNormFlags(track_running_stats=True)
    counted = TraceCounter(lambda x, s, p, m, e: pure(x, s, p, flags, momentum=m, eps=e))
    step = jax.jit(counted)
    state, params = random_state(RNG, C), random_params(RNG, C)
    module = torch_oracle.build_module(C, 3, state, params, flags, torch.float64, family)
    for i, momentum in enumerate(MOMENTA):
        eps = 1e-5 * (i + 1)
        x = random_input(RNG, (4, C, 3))
        y, state = step(jnp.asarray(x), state, params, jnp.float64(momentum), jnp.float64(eps))
        torch_oracle.apply_flags(module, flags.replace(momentum=momentum, eps=eps))
        with torch.no_grad():
            y_t = torch_oracle.forward(module, x)
        assert_close(y, torch_oracle.to_numpy(y_t), F64_TOL, f"y step {i}")
        assert_state_matches(state, torch_oracle.module_state(module), F64_TOL)
    assert counted.traces == 1


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
    for momentum in MOMENTA:
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


def test_traced_overrides_must_be_floating_scalars():
    x = jnp.ones((4, C))
    with pytest.raises(ValueError, match="momentum must be a scalar"):
        jaxbn.batch_norm(x, None, None, momentum=jnp.ones(2))
    with pytest.raises(TypeError, match="eps must be a floating-point scalar"):
        jaxbn.batch_norm(x, None, None, eps=jnp.asarray(1))


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
