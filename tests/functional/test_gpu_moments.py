"""The one-read GPU statistics kernel (jaxbn.functional.gpu_moments).

The kernel is a choice of the strategy (``jaxbn.Strategy(one_read=...)``), passed in the flags. On
a machine without a GPU the kernel runs in Pallas' interpreter (the same kernel body, the same
tiling, the same merge); on a CUDA GPU these tests run the compiled Triton kernel. float32
data with a large mean and far-off shifts is compared with float64 (numpy and torch); everything
else is compared with the XLA two-pass path the kernel replaces, which the rest of the suite pins
to torch.
"""

from __future__ import annotations

import re
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import OneRead, Strategy
from jaxbn.functional import gpu_moments, reductions

ON_GPU = jax.default_backend() == "gpu"
XLA = jaxbn.default_strategy(jax.default_backend())
"""The statistics as this backend computes them by default: the XLA path."""
KERNEL = XLA.replace(one_read=OneRead.CUDA if ON_GPU else OneRead.INTERPRETED)
"""The same with the kernel on (interpreted off-GPU)."""


def hard_data(shape: tuple[int, ...], case: str, seed: int = 0) -> np.ndarray:
    """float32 data, channels last, with mean 1e4 and unit spread; ``case`` puts outliers where
    a shift would be read (the first element of each channel, or every tile's first row)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + 1e4 + rng.uniform(-50, 50, shape[-1])
    x = x.reshape(-1, shape[-1])
    if case == "first element +30σ":
        x[0] += 30
    elif case == "every 64th row +30σ":
        x[::64] += 30
    elif case == "half the rows +100σ":
        x[: len(x) // 2] += 100
    return x.reshape(shape).astype(np.float32)


def kernel_moments(x: jax.Array) -> reductions.Moments:
    return jax.jit(lambda x: reductions.batch_moments(x, x.ndim - 1, strategy=KERNEL))(x)


def xla_moments(x: jax.Array) -> reductions.Moments:
    return jax.jit(lambda x: reductions.batch_moments(x, x.ndim - 1, strategy=XLA))(x)


# --- where the kernel applies -----------------------------------------------------------------


@pytest.mark.parametrize("rows,channels", [(16, 8), (512, 64), (2048 * 128, 64), (6272, 512),
                                           (256, 1024), (48, 24), (100 * 64, 96)])
def test_tiling_covers_every_row_and_channel(rows, channels):
    tile_rows, tiles, block = gpu_moments.tiling(rows, channels)
    assert tile_rows >= 16 and tile_rows & (tile_rows - 1) == 0 and block & (block - 1) == 0
    assert tile_rows * block <= 4096
    assert rows % (tile_rows * tiles) == 0 and channels % block == 0


@pytest.mark.parametrize("rows,channels", [(8, 64), (100, 64), (4096, 3), (4096, 1000 + 4), (0, 64)])
def test_tiling_refuses_what_it_cannot_tile(rows, channels):
    assert gpu_moments.tiling(rows, channels) is None


def test_the_kernel_is_opt_in():
    """No backend's default strategy turns it on; flags name no strategy unless asked."""
    for backend in ("cpu", "gpu", "cuda", "rocm", "tpu"):
        assert jaxbn.default_strategy(backend).one_read is OneRead.OFF
    assert jaxbn.BatchNormFlags().strategy is None and Strategy().one_read is OneRead.OFF


def test_applies_only_to_unmasked_unsharded_channels_last_16_and_32_bit_floats():
    shape = (8, 4, 4, 64)
    assert gpu_moments.applies(shape, 3, jnp.float32, False, False)
    assert gpu_moments.applies(shape, 3, jnp.bfloat16, False, False)
    assert gpu_moments.applies((64, 64), 1, jnp.float16, False, False)
    assert not gpu_moments.applies(shape, 1, jnp.float32, False, False)  # NCHW
    assert not gpu_moments.applies(shape, 3, jnp.float64, False, False)
    assert not gpu_moments.applies(shape, 3, jnp.float32, True, False)  # mask
    assert not gpu_moments.applies(shape, 3, jnp.float32, False, True)  # explicit sharding
    sums = reductions.ChannelSums(reductions.Layout(shape, 3))
    for mode in OneRead:  # where it applies, the strategy decides
        assert reductions.one_read_mode(sums, jnp.float32, Strategy(one_read=mode)) is mode


@pytest.mark.parametrize("capabilities,usable", [(None, True), (["9.0"], True), (["8.0", "8.6"], True),
                                                 (["9.0", "7.5"], False), (["gfx90a"], False)])
def test_triton_usable_needs_compute_capability_8(capabilities, usable, monkeypatch):
    """Triton kernels do not compile below compute capability 8.0 (a T4, a V100): any such GPU
    in the process turns the kernel off; no CUDA backend at all leaves it on (lowering only)."""

    def devices(backend=None):
        if capabilities is None:
            raise RuntimeError("Unknown backend cuda")
        return [types.SimpleNamespace(compute_capability=c) for c in capabilities]

    monkeypatch.setattr(jax, "devices", devices)
    assert gpu_moments.triton_usable.__wrapped__() is usable


def test_the_deprecation_filter_silences_only_pallas_triton_s_message():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpu_moments._filter_triton_deprecation.__wrapped__()
        warnings.warn("The Pallas Triton backend is deprecated and will be removed in a future "
                      "JAX version. To keep using Pallas on GPU, ...", DeprecationWarning)
        warnings.warn("The Pallas Triton backend is deprecated and will be removed in a future "
                      "JAX version", UserWarning)
        warnings.warn("something else is deprecated", DeprecationWarning)
    assert [(w.category, str(w.message)[:20]) for w in caught] == [
        (UserWarning, "The Pallas Triton ba"), (DeprecationWarning, "something else is de")]


@pytest.mark.parametrize("shape", [(32, 16, 16, 64), (16, 7, 7, 64), (256, 1024)])
def test_cuda_lowering_is_one_triton_kernel_and_cpu_programs_are_unchanged(shape):
    """Lowered for CUDA (no GPU needed), the statistics are one Triton call; compiled for this
    machine's backend without a GPU, the program is exactly the one without the kernel."""
    x = jnp.ones(shape, jnp.float32)
    c = shape[-1]
    on, off = XLA.replace(one_read=OneRead.CUDA), XLA

    def layer(x, strategy):
        flags = jaxbn.BatchNormFlags(axis=-1, strategy=strategy)
        return jaxbn.batch_norm(x, jaxbn.init_state(c), jaxbn.init_params(c), flags)

    jitted = jax.jit(layer, static_argnums=1)  # one function for both: a strategy is static

    def lowered(strategy, **kwargs):
        return jitted.trace(x, strategy).lower(**kwargs)

    cuda = lowered(on, lowering_platforms=("cuda",)).as_text()
    assert cuda.count("xla.gpu.triton") == 1 and "jaxbn_channel_moments" in cuda
    assert "triton" not in lowered(off, lowering_platforms=("cuda",)).as_text()
    if not ON_GPU:
        compiled_on = program(lowered(on).compile().as_text())
        compiled_off = program(lowered(off).compile().as_text())
        assert "reduce" in compiled_on and compiled_on == compiled_off


def program(hlo: str) -> str:
    """Optimized HLO without source locations (op names, stack frames): the program itself."""
    lines = [line for line in hlo.splitlines() if not re.match(r"^\s*\d+ ", line)]
    return re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))


def test_jax_export_needs_the_kernel_off():
    """``jax.export`` refuses the kernel's Triton custom call (no compatibility guarantee) and,
    for ("cpu", "cuda"), lowers the CUDA branch for the CPU too, where Pallas refuses a compiled
    kernel: why the kernel is opt-in. With it off (the default) both exports work."""
    from jax import export

    x = jnp.asarray(np.random.default_rng(7).standard_normal((16, 8, 8, 64)), jnp.float32)
    flags = jaxbn.BatchNormFlags(axis=-1)

    def exported(strategy, platforms):
        def layer(x):
            return jaxbn.batch_norm(x, jaxbn.init_state(64), None, flags.replace(strategy=strategy))

        return export.export(jax.jit(layer), platforms=platforms)(x)

    on = XLA.replace(one_read=OneRead.CUDA)
    with pytest.raises(ValueError, match="compatibility guarantees"):
        exported(on, ("cuda",))
    with pytest.raises(ValueError, match="interpret"):
        exported(on, ("cpu", "cuda"))
    assert "triton" not in exported(None, ("cuda",)).mlir_module()
    both_platforms = exported(None, ("cpu", "cuda"))
    if not ON_GPU:
        y, state = both_platforms.call(x)
        y0, state0 = jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(64), None, flags))(x)
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(state.running_var, state0.running_var)


# --- accuracy -----------------------------------------------------------------------------------


CASES = ["plain", "first element +30σ", "every 64th row +30σ", "half the rows +100σ"]


@pytest.mark.parametrize("programs", [1024, 2], ids=["default tiling", "8+ tiles per program"])
@pytest.mark.parametrize("shape", [(16, 16, 16, 64), (512, 128), (8, 8, 8, 256)])
@pytest.mark.parametrize("case", CASES)
def test_moments_of_large_mean_data_are_two_pass_accurate(shape, case, programs, monkeypatch):
    """Mean within 3e-6 of the spread and m2 within 1e-6 relative of float64, as the XLA
    two-pass path (which meets the same bounds) -- a one-pass sum of squares misses both by
    orders of magnitude on this data. With few programs, each merges many tiles itself."""
    monkeypatch.setattr(gpu_moments, "_TARGET_PROGRAMS", programs)
    x = hard_data(shape, case)
    assert gpu_moments.applies(shape, len(shape) - 1, x.dtype, False, False)
    tile_rows, tiles, _ = gpu_moments.tiling(x.size // shape[-1], shape[-1])
    assert tiles >= (8 if programs == 2 else 1)
    x64 = x.astype(np.float64).reshape(-1, shape[-1])
    mean64, m2_64 = x64.mean(0), ((x64 - x64.mean(0)) ** 2).sum(0)
    spread = np.sqrt(m2_64 / len(x64))
    for m in (kernel_moments(jnp.asarray(x)), xla_moments(jnp.asarray(x))):
        mean = np.asarray(m.mean, np.float64) + np.asarray(m.mean_lo, np.float64)
        assert np.max(np.abs(mean - mean64) / spread) < 3e-6
        assert np.max(np.abs(np.asarray(m.m2, np.float64) / m2_64 - 1)) < 1e-6
        assert m.count == len(x64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_batch_norm_2d_matches_float64_torch(dtype):
    """The whole layer (train mode, buffers updated) against torch in float64 on the same
    (rounded) input: as close as float32 arithmetic allows."""
    x = jnp.asarray(hard_data((16, 8, 8, 64), "first element +30σ")).astype(dtype)
    if dtype == jnp.float16:  # float16 cannot hold 1e4 with unit spread: centre the data
        x = jnp.asarray(hard_data((16, 8, 8, 64), "first element +30σ") - 1e4).astype(dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    bn = torch.nn.BatchNorm2d(64, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        expected = bn(torch.from_numpy(x64.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    params = jaxbn.BatchNormParams(jnp.asarray(bn.weight.detach().numpy(), jnp.float32),
                                   jnp.asarray(bn.bias.detach().numpy(), jnp.float32))
    flags = jaxbn.BatchNormFlags(momentum=0.3, axis=-1, strategy=KERNEL)
    y, state = jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(64), params, flags))(x)
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}[dtype]  # y's rounding
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(state.running_mean, bn.running_mean.numpy(), rtol=3e-7, atol=2e-6)
    np.testing.assert_allclose(state.running_var, bn.running_var.numpy(), rtol=1e-5)


# --- the same function as the XLA path: values, derivatives, transforms -----------------------


def layer_fn(flags, channels=64):
    state, params = jaxbn.init_state(channels), jaxbn.init_params(channels)
    params = params._replace(weight=params.weight * 1.5)
    return lambda x: jaxbn.batch_norm(x, state, params, flags)


def both(f, *args):
    """``f(strategy, *args)`` jitted with :data:`KERNEL` and with :data:`XLA`."""
    return tuple(jax.jit(lambda *a, s=strategy: f(s, *a))(*args) for strategy in (KERNEL, XLA))


def test_train_step_values_and_gradients_equal_the_xla_path():
    x = jnp.asarray(hard_data((16, 8, 8, 64), "plain", seed=1)) - 1e4
    dy = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)

    def value_and_grad(strategy, x):
        f = layer_fn(jaxbn.BatchNormFlags(axis=-1, strategy=strategy))
        (y, state), pullback = jax.vjp(f, x)
        return y, state, pullback((dy, jax.tree.map(jnp.zeros_like, state)))

    on, off = both(value_and_grad, x)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_second_derivatives_equal_the_xla_path():
    """The kernel has no derivative of its own: higher derivatives go through the XLA path's."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 4, 4, 16)) * 2 + 3, jnp.float32)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
    probe = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

    def hvp(strategy, x):
        f = layer_fn(jaxbn.BatchNormFlags(axis=-1, strategy=strategy), channels=16)
        loss = lambda x: jnp.sum(jnp.sin(f(x)[0]) * w)  # noqa: E731
        return jax.jvp(jax.grad(loss), (x,), (probe,))[1]

    on, off = both(hvp, x)
    assert np.abs(np.asarray(off)).max() > 1e-2  # a real second derivative
    np.testing.assert_allclose(on, off, rtol=1e-4, atol=1e-4)


def test_vmap_with_axis_name_merges_members_like_the_concatenated_batch():
    """Members of a vmap with ``axis_name`` share statistics: Chan's merge across them equals the
    moments of the concatenated batch (float64 numpy)."""
    x = hard_data((4, 8, 4, 4, 32), "first element +30σ", seed=6)

    def members(strategy, x):
        flags = jaxbn.BatchNormFlags(axis=-1, axis_name="members", strategy=strategy)
        return jax.vmap(_member_fn(flags), axis_name="members")(x)

    on, off = both(members, jnp.asarray(x))
    x64 = x.astype(np.float64).reshape(-1, 32)
    for (y, state) in (on, off):
        np.testing.assert_allclose(state.running_mean[0], 0.1 * x64.mean(0), rtol=1e-7)
        np.testing.assert_allclose(state.running_var[0], 0.9 + 0.1 * x64.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(on[0], off[0], atol=1e-5)


def _member_fn(flags):
    return lambda x: jaxbn.batch_norm(x, jaxbn.init_state(32), jaxbn.init_params(32), flags)
