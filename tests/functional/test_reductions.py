"""The per-channel statistics (``jaxbn.functional.reductions``): their shift and its guards.

The running mean as the shift of the batch statistics (``reductions.running_shifted``): with
the CPU's default strategy (``Strategy.running_mean_shift``) a training call with buffers sums
``x - running_mean`` instead of reading a shift from the batch first. Whether or not the running
mean can be trusted as a shift, the statistics must stay exact for data at a mean of 1e5 standard
deviations, with torch in float64 as the oracle. A plain float32 mean of this data errs by more
than 1e-3, so a path that trusted a far-off shift (or skipped the residual read) breaks
the 1e-3 bound on ``y``.

A channel whose first element is infinite: torch's mean is infinite, and the shift must not turn
``inf`` into ``inf - inf = NaN`` (plain, masked and instance norm), while finite data keeps the
shift's float32 accuracy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from helpers import F64_TOL, max_abs_diff, random_input, random_params, random_state, same_with_nan
from jaxbn import BatchNormFlags, BatchNormState, InstanceNormFlags
from jaxbn.functional.reductions import ShiftHint, trusts_running_shift
from jaxbn.testing import oracle as torch_oracle

C = 64
SHAPE = (32, 28, 28, C)  # NHWC; 25,088 elements per channel, as in test_kernel
RNG = np.random.default_rng(41)
X = (1e5 + RNG.standard_normal(SHAPE)).astype(np.float32)
BATCH_MEAN = X.astype(np.float64).mean(axis=(0, 1, 2))


def state(mean, var, batches):
    return BatchNormState(
        jnp.asarray(np.broadcast_to(mean, (C,)), jnp.float32),
        jnp.asarray(np.broadcast_to(var, (C,)), jnp.float32),
        jnp.asarray(batches, jnp.int32),
    )


STATES = {
    # the running mean within half a standard deviation of the batch's: trusted as the shift
    "tracking": (BATCH_MEAN + 0.5, 1.0, 7),
    # the same statistics in a layer that has seen no batch: not trusted
    "fresh layer": (BATCH_MEAN + 0.5, 1.0, 0),
    # torch's initial buffers against data at 1e5: the shift is 1e5 standard deviations off
    "initial buffers": (0.0, 1.0, 0),
    # statistics of other data in a layer that has seen batches: not trusted
    "stale": (0.0, 1.0, 7),
    "non-finite mean": (np.nan, 1.0, 7),
    "infinite variance": (BATCH_MEAN, np.inf, 7),
}


@pytest.mark.parametrize("name", STATES)
def test_statistics_keep_two_pass_accuracy_whatever_the_running_mean(name):
    flags = BatchNormFlags(axis=-1, strategy=jaxbn.Strategy(running_mean_shift=True))
    given = state(*STATES[name])
    y, new = jax.jit(jaxbn.batch_norm, static_argnums=3)(jnp.asarray(X), given, None, flags)
    as64 = jax.tree.map(lambda a: np.asarray(a, np.float64), given)
    reference, expected = torch_oracle.batch_norm(X.astype(np.float64), as64, None, flags)
    assert max_abs_diff(y, reference) <= 1e-3
    finite = np.isfinite(np.asarray(expected.running_mean))  # NaN buffers stay NaN in both
    assert np.array_equal(finite, np.isfinite(np.asarray(new.running_mean)))
    for field in ("running_mean", "running_var"):
        e, a = np.asarray(getattr(expected, field)), np.asarray(getattr(new, field), np.float64)
        np.testing.assert_allclose(a[finite], e[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mean,var,batches,offset,trusted",
    [
        (0.0, 1.0, 1, np.full(C, 3.9), True),
        (5.0, 1.0, 1, np.full(C, -3.9), True),
        (0.0, 1.0, 1, np.r_[np.zeros(C - 1), 4.1], False),  # one channel too far is enough
        (0.0, 1.0, 0, np.full(C, 3.9), False),  # a fresh layer
        (0.0, 4.0, 1, np.full(C, 7.9), True),  # in running standard deviations, not units
        (0.0, np.nan, 1, np.zeros(C), False),
        (0.0, np.inf, 1, np.zeros(C), False),
        (np.nan, 1.0, 1, np.zeros(C), False),
        (np.inf, 1.0, 1, np.zeros(C), False),
        (0.0, 1.0, 1, np.r_[np.zeros(C - 1), np.nan], False),
    ],
)
def test_the_running_mean_is_trusted_only_within_four_running_deviations(mean, var, batches,
                                                                        offset, trusted):
    hint = ShiftHint(jnp.full((C,), mean, jnp.float32), jnp.full((C,), var, jnp.float32),
                     jnp.asarray(batches, jnp.int32))
    assert bool(trusts_running_shift(hint, jnp.asarray(offset, jnp.float32))) is trusted


def cpu_program(with_state: bool, strategy: jaxbn.Strategy | None = None) -> str:
    """The compiled CPU program of a training layer; ``strategy`` None: the default one."""
    x = jnp.zeros((8, 4, 4, C), jnp.float32)
    flags = BatchNormFlags(axis=-1, strategy=strategy)
    if with_state:
        fn = jax.jit(lambda x, s: jaxbn.batch_norm(x, s, None, flags)[0])
        return fn.lower(x, jaxbn.init_state(C)).compile().as_text()
    return jax.jit(lambda x: jaxbn.batch_norm(x, None, None, flags)[0]).lower(x).compile().as_text()


def test_with_the_gpu_default_strategy_the_shift_is_read_from_the_batch():
    """An XLA:GPU conditional reads its predicate on the host: the GPU's default strategy keeps
    the data shift."""
    program = cpu_program(True, jaxbn.default_strategy("gpu"))  # compiled for the CPU all the same
    assert "conditional(" not in program
    assert " slice(" in program or "dynamic-slice(" in program


def test_with_buffers_the_cpu_program_reads_no_shift_from_the_batch():
    """The point of the running shift, on by default on the CPU: no kernel slices the batch
    before its first sum. Without buffers the shift is still read from the batch (the first
    row), a slice."""
    cpu = jaxbn.default_strategy("cpu")
    with_state, without = cpu_program(True, cpu), cpu_program(False, cpu)
    assert " slice(" not in with_state and "dynamic-slice(" not in with_state
    assert "conditional(" in with_state  # the residual read, for untrusted running statistics
    assert " slice(" in without or "dynamic-slice(" in without


# ---------------------------------------------------------------- an infinite first element (the shift must not turn inf into NaN)


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
