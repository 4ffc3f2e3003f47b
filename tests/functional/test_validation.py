"""Trace-time validation: jaxbn rejects what torch rejects, with torch's wording where it has one.

Each error is also provoked in torch on the same input, so the test pins torch's behaviour too
(the eps torch refuses, for every mode). The rest is jaxbn's own contract, where torch has no such
call: arguments of the wrong type, mixed dtypes and traced overrides are errors that name the
argument and the fix.
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import (
    F64_TOL,
    assert_close,
    assert_state_matches,
    random_input,
    random_params,
    random_state,
    same_with_nan,
    torch_dtype,
)
from jaxbn import BatchNormFlags, BatchNormState, InstanceNormFlags
from jaxbn.functional.torch_rules import INSTANCE_NORM
from jaxbn.testing import oracle as torch_oracle

C = 5
RNG = np.random.default_rng(0)


def torch_error(module, x, axis=1):
    """The exception torch raises for ``module(x)`` (fails the test if it raises none)."""
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            torch_oracle.forward(module, torch_oracle.to_torch(x), axis)
    return info.value


def jaxbn_error(expected_type, x, state, params, flags):
    """The exception ``jaxbn.batch_norm`` raises, eagerly and at trace time under jit (same text)."""
    with pytest.raises(expected_type) as eager:
        jaxbn.batch_norm(x, state, params, flags)
    with pytest.raises(expected_type) as traced:
        jax.eval_shape(jaxbn.batch_norm, x, state, params, flags)
    assert str(traced.value) == str(eager.value)
    return str(eager.value)


# -- rank ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(C,), ()])
def test_rank_below_two(shape):
    x = jnp.ones(shape, jnp.float64)
    message = jaxbn_error(ValueError, x, None, None, BatchNormFlags(axis=0))
    wording = f"(got {len(shape)}D input)"
    assert wording in message and str(shape) in message
    if shape:  # torch's BatchNorm1d, same wording
        with pytest.raises(ValueError, match=re.escape(wording)):
            torch.nn.BatchNorm1d(C).double()(torch_oracle.to_torch(x))


@pytest.mark.parametrize("axis", [2, -3, 7])
def test_feature_axis_out_of_range(axis):
    message = jaxbn_error(ValueError, jnp.ones((4, C), jnp.float64), None, None,
                          BatchNormFlags(axis=axis))
    assert f"feature axis {axis}" in message and "(4, 5)" in message


# -- feature count ------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("field", ["running_mean", "running_var", "weight", "bias"])
def test_feature_count_mismatch_uses_torch_wording(field, axis):
    """x has 5 features, one field has 3: torch's "<field> should contain 5 elements not 3"."""
    owner = "state" if field.startswith("running") else "params"
    state, params = random_state(RNG, C), random_params(RNG, C)
    bad = jnp.ones((3,), jnp.float64)
    if owner == "state":
        state = state._replace(**{field: bad})
    else:
        params = params._replace(**{field: bad})
    x = jnp.asarray(random_input(RNG, (4, C, 2) if axis == 1 else (4, 2, C)))
    flags = BatchNormFlags(axis=axis)
    message = jaxbn_error(ValueError, x, state, params, flags)

    module = torch_oracle.build_module(C, 3, random_state(RNG, C), random_params(RNG, C),
                                       flags, torch.float64)
    tensor = getattr(module, field)
    tensor.data = torch.ones(3, dtype=torch.float64)
    torch_message = str(torch_error(module, x, axis))
    assert torch_message == f"{field} should contain 5 elements not 3"
    assert torch_message in message
    assert f"{owner}.{field}" in message and "(3,)" in message and str(x.shape) in message


def test_feature_count_mismatch_of_whole_layer():
    """A 3-feature layer on a 5-feature input: torch reports running_mean first, so do we."""
    x = jnp.asarray(random_input(RNG, (4, C)))
    message = jaxbn_error(ValueError, x, jaxbn.init_state(3, jnp.float64),
                          jaxbn.init_params(3, jnp.float64), BatchNormFlags())
    torch_message = str(torch_error(torch.nn.BatchNorm1d(3).double(), x))
    assert torch_message == "running_mean should contain 5 elements not 3"
    assert torch_message in message


# -- input dtype --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int64, jnp.bool_, jnp.complex64, jnp.uint8])
def test_non_floating_input_is_a_type_error(dtype):
    x = jnp.ones((4, C), dtype)
    message = jaxbn_error(TypeError, x, None, None, BatchNormFlags())
    assert jnp.dtype(dtype).name in message
    assert '"batch_norm" not implemented for' in message
    assert '"batch_norm" not implemented for' in str(
        torch_error(torch.nn.BatchNorm1d(C, affine=False, track_running_stats=False),
                    np.ones((4, C), jnp.dtype(dtype))))


# -- one value per channel ----------------------------------------------------------------------

def torch_size_to_tuple(message):
    """torch prints the size as ``torch.Size([1, 5])``; jaxbn (no torch) prints ``(1, 5)``."""
    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)",
                  lambda m: str(tuple(int(d) for d in m.group(1).split(", ") if d)), message)


SINGLE_VALUE_SHAPES = [(1, C), (1, C, 1), (1, C, 1, 1), (1, C, 1, 1, 1)]
BATCH_STAT_CASES = [  # (training, buffers, track_running_stats): every row that uses batch stats
    (True, True, True), (True, True, False), (True, False, True), (True, False, False),
    (False, False, True), (False, False, False),
]


@pytest.mark.parametrize("training,buffers,track", BATCH_STAT_CASES)
@pytest.mark.parametrize("shape", SINGLE_VALUE_SHAPES, ids=str)
def test_one_value_per_channel_raises_like_torch(shape, training, buffers, track):
    flags = BatchNormFlags(training=training, track_running_stats=track)
    state = random_state(RNG, C) if buffers else None
    x = jnp.asarray(random_input(RNG, shape))
    message = jaxbn_error(ValueError, x, state, None, flags)
    module = torch_oracle.build_module(C, len(shape), state, None, flags, torch.float64)
    error = torch_error(module, x)
    assert isinstance(error, ValueError)
    assert message == torch_size_to_tuple(str(error))
    assert message.startswith("Expected more than 1 value per channel when training, got input size")
    if training and track and state is not None:
        # torch quirk: forward() increments num_batches_tracked *before* the check raises, so the
        # failed call leaves the module's counter one higher. A pure function cannot do that: the
        # caller's state is simply untouched (nothing is returned when an exception is raised).
        np.testing.assert_array_equal(torch_oracle.module_state(module).num_batches_tracked,
                                      np.asarray(state.num_batches_tracked) + 1)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("shape", SINGLE_VALUE_SHAPES, ids=str)
def test_one_value_per_channel_in_eval_with_buffers_is_fine(shape, track):
    """Eval with running stats normalizes with them: a single sample is fine in both."""
    flags = BatchNormFlags(training=False, track_running_stats=track)
    state, params = random_state(RNG, C), random_params(RNG, C)
    x = random_input(RNG, shape)
    y, new_state = jaxbn.batch_norm(jnp.asarray(x), state, params, flags)
    y_torch, torch_state = torch_oracle.batch_norm(x, state, params, flags)
    assert_close(y, y_torch, F64_TOL)
    assert_state_matches(new_state, torch_state, 0.0)


@pytest.mark.parametrize("axis", [-1, 0])
def test_one_value_per_channel_on_other_axes(axis):
    """With features last or first, n is still the product of every other axis."""
    shape = [1, 1, 1]
    shape[axis] = C
    x = jnp.ones(shape, jnp.float64)
    message = jaxbn_error(ValueError, x, None, None, BatchNormFlags(axis=axis))
    assert f"got input size {tuple(shape)}" in message
    jaxbn.batch_norm(x, random_state(RNG, C), None, BatchNormFlags(axis=axis, training=False))


# -- state and params fields --------------------------------------------------------------------

FIELDS = [("state", "running_mean"), ("state", "running_var"), ("params", "weight"), ("params", "bias")]


def with_field(owner, field, value):
    """Valid float64 state/params for C features, with ``owner.field`` replaced by ``value``."""
    state, params = random_state(RNG, C), random_params(RNG, C)
    if owner == "state":
        return state._replace(**{field: value}), params
    return state, params._replace(**{field: value})


@pytest.mark.parametrize("bad_shape", [(C, 1), (1, C), (), (C, C)], ids=str)
@pytest.mark.parametrize("owner,field", FIELDS)
def test_field_with_wrong_shape_names_field_and_shapes(owner, field, bad_shape):
    state, params = with_field(owner, field, jnp.ones(bad_shape, jnp.float64))
    x = jnp.asarray(random_input(RNG, (4, C, 2)))
    message = jaxbn_error(ValueError, x, state, params, BatchNormFlags())
    assert f"{owner}.{field}" in message
    assert str(bad_shape) in message and f"({C},)" in message and str(x.shape) in message


@pytest.mark.parametrize("owner,field", FIELDS)
def test_field_with_wrong_dtype_names_field_and_dtypes(owner, field):
    state, params = with_field(owner, field, jnp.ones((C,), jnp.float32))
    x = jnp.asarray(random_input(RNG, (4, C)))
    message = jaxbn_error(TypeError, x, state, params, BatchNormFlags())
    assert f"{owner}.{field}" in message and "float32" in message and "float64" in message


def test_field_that_is_none_points_to_passing_none():
    state = random_state(RNG, C)._replace(running_var=None)
    message = jaxbn_error(ValueError, jnp.ones((4, C), jnp.float64), state, None, BatchNormFlags())
    assert "state.running_var" in message and "state=None" in message


@pytest.mark.parametrize("value,error", [
    (jnp.zeros((1,), jnp.int64), ValueError),
    (jnp.zeros((), jnp.float64), TypeError),
    (jnp.zeros((), jnp.bool_), TypeError),
])
def test_counter_must_be_an_integer_scalar(value, error):
    state = random_state(RNG, C)._replace(num_batches_tracked=value)
    message = jaxbn_error(error, jnp.ones((4, C), jnp.float64), state, None, BatchNormFlags())
    assert "state.num_batches_tracked" in message
    assert (str(value.shape) if error is ValueError else jnp.dtype(value.dtype).name) in message


DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


def torch_module_with_dtypes(state_dtype, params_dtype):
    """A BatchNorm1d whose buffers/parameters have the given dtypes (None: absent)."""
    module = torch.nn.BatchNorm1d(C, affine=params_dtype is not None,
                                  track_running_stats=state_dtype is not None)
    if state_dtype is not None:
        module.running_mean = module.running_mean.to(torch_dtype(state_dtype))
        module.running_var = module.running_var.to(torch_dtype(state_dtype))
    if params_dtype is not None:
        module.weight.data = module.weight.data.to(torch_dtype(params_dtype))
        module.bias.data = module.bias.data.to(torch_dtype(params_dtype))
    return module


@pytest.mark.parametrize("training", [True, False], ids=("train", "eval"))
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_accepted_dtype_combinations_are_torchs(x_dtype, training):
    """For every (input, state, params) dtype triple, jaxbn raises TypeError iff torch raises.

    torch accepts buffers/parameters in the input's dtype, or all in float32 for a half input,
    and rejects any mixture among them.
    """
    x = jnp.asarray(random_input(RNG, (4, C)), x_dtype)
    for state_dtype, params_dtype in itertools.product([None] + DTYPES, repeat=2):
        module = torch_module_with_dtypes(state_dtype, params_dtype).train(training)
        try:
            with torch.no_grad():
                module(torch_oracle.to_torch(x))
            torch_raised = None
        except RuntimeError as e:
            torch_raised = e
        state = None if state_dtype is None else jaxbn.init_state(C, state_dtype)
        params = None if params_dtype is None else jaxbn.init_params(C, params_dtype)
        case = f"x {jnp.dtype(x_dtype).name}, state {state_dtype}, params {params_dtype}: torch {torch_raised}"
        if torch_raised is None:
            y, _ = jaxbn.batch_norm(x, state, params, BatchNormFlags(training=training))
            assert y.dtype == x.dtype, case
        else:
            message = jaxbn_error(TypeError, x, state, params, BatchNormFlags(training=training))
            assert "mixed dtype" in message, case


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_mixed_state_and_params_dtypes_name_the_fields(x_dtype):
    """Each of float32 and the half dtype is fine alone; a mixture is torch's error."""
    x = jnp.asarray(random_input(RNG, (4, C)), x_dtype)
    state = jaxbn.init_state(C, jnp.float32)
    params = jaxbn.init_params(C, x_dtype)
    message = jaxbn_error(TypeError, x, state, params, BatchNormFlags())
    half = jnp.dtype(x_dtype).name
    assert "state.running_mean has dtype float32" in message
    assert f"params.weight has dtype {half}" in message
    params = params._replace(weight=params.weight.astype(jnp.float32))
    message = jaxbn_error(TypeError, x, state, params, BatchNormFlags())
    assert f"params.bias has dtype {half}" in message


# -- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"training": 1}, {"training": "yes"}, {"training": None}, {"training": jnp.array(True)},
    {"track_running_stats": 0}, {"track_running_stats": "False"},
    {"momentum": "0.1"}, {"momentum": True}, {"momentum": jnp.array(0.1)},
    {"eps": None}, {"eps": "1e-5"}, {"eps": False}, {"eps": jnp.array(1e-5)},
    {"axis": 1.0}, {"axis": True}, {"axis": "1"}, {"axis": None},
], ids=repr)
def test_bad_flag_types(changes):
    field = next(iter(changes))
    with pytest.raises(TypeError, match=f"BatchNormFlags.{field} must be"):
        BatchNormFlags(**changes)


def test_flags_normalize_numpy_and_int_values():
    """NumPy bools/ints/floats and Python ints are fine and become plain Python values (hashable)."""
    flags = BatchNormFlags(training=np.bool_(False), track_running_stats=np.True_,
                           momentum=1, eps=np.float32(0.5), axis=np.int64(-1))
    assert flags == BatchNormFlags(training=False, momentum=1.0, eps=0.5, axis=-1)
    assert {type(v) for v in (flags.training, flags.track_running_stats)} == {bool}
    assert type(flags.momentum) is float and type(flags.eps) is float and type(flags.axis) is int
    assert hash(flags) == hash(BatchNormFlags(training=False, momentum=1.0, eps=0.5, axis=-1))
    assert jax.tree_util.tree_leaves(flags) == []


# ---------------------------------------------------------------- eps: what torch refuses, in its words


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


# ---------------------------------------------------------------- argument types and dtypes: errors that say how to fix them


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

def test_traced_overrides_must_be_floating_scalars():
    x = jnp.ones((4, C))
    with pytest.raises(ValueError, match="momentum must be a scalar"):
        jaxbn.batch_norm(x, None, None, momentum=jnp.ones(2))
    with pytest.raises(TypeError, match="eps must be a floating-point scalar"):
        jaxbn.batch_norm(x, None, None, eps=jnp.asarray(1))
