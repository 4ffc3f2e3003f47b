"""The differentiable fast path (jaxbn.functional.kernel.normalize): memory, accuracy and every derivative.

torch is the oracle for plain batch norm (forward, reverse, forward-mode and second derivatives,
float64 <= 1e-10). Where torch has no counterpart -- row masks and cross-device statistics -- the
oracle is plain JAX autodiff of the straightforward formula (``reference_batch_norm`` below),
which the fast path's custom JVP must reproduce exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from jax.ad_checkpoint import print_saved_residuals

import jaxbn

TOL = dict(rtol=1e-10, atol=1e-10)
LAYOUTS = [((6, 3, 4, 5), 1), ((6, 4, 5, 3), -1), ((10, 4), 1), ((5, 3, 7), 1), ((3, 2, 3, 4, 5), 1),
           ((3, 3, 4, 5, 2), -1)]
MODES = [  # (training, buffers): batch stats with/without buffers, running stats, eval without buffers
    (True, True), (True, False), (False, True), (False, False)]


def random_problem(shape, axis, seed=0, dtype=np.float64):
    """x (mean 3, sd 2), cotangent, state, params, all float64 unless ``dtype`` says otherwise."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    ct = rng.standard_normal(shape).astype(dtype)
    state = jaxbn.BatchNormState(
        jnp.asarray(rng.standard_normal(c)), jnp.asarray(rng.uniform(0.5, 1.5, c)), jnp.asarray(4))
    params = jaxbn.BatchNormParams(
        jnp.asarray(rng.uniform(0.5, 1.5, c)), jnp.asarray(rng.standard_normal(c)))
    return x, ct, state, params


def torch_batch_norm(x, weight, bias, state, training, axis, eps=1e-5):
    """torch's functional batch norm on tensors with features on ``axis`` (the torch module's
    math; buffers are cloned so torch's in-place update cannot touch the caller's)."""
    rm = rv = None
    if state is not None:
        rm = torch.tensor(np.asarray(state.running_mean))
        rv = torch.tensor(np.asarray(state.running_var))
    use_batch = training or state is None
    y = F.batch_norm(torch.movedim(x, axis, 1), rm, rv, weight, bias, training=use_batch, eps=eps)
    return torch.movedim(y, 1, axis)


def as_torch(a, grad=False):
    return torch.tensor(np.array(a), requires_grad=grad)


def jax_layer(state, flags, mask=None):
    """``(x, params) -> y`` with the given state and flags."""
    return lambda x, params: jaxbn.batch_norm(x, state, params, flags, mask=mask)[0]


# --------------------------------------------------------------------------------------------
# reverse mode against torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training,buffers", MODES)
def test_gradients_match_torch(shape, axis, training, buffers):
    x, ct, state, params = random_problem(shape, axis)
    state = state if buffers else None
    flags = jaxbn.BatchNormFlags(training=training, axis=axis)
    y, vjp = jax.vjp(jax.jit(jax_layer(state, flags)), jnp.asarray(x), params)
    dx, dparams = vjp(jnp.asarray(ct))

    xt, w, b = as_torch(x, True), as_torch(params.weight, True), as_torch(params.bias, True)
    y_ref = torch_batch_norm(xt, w, b, state, training, axis)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (xt, w, b), as_torch(ct))
    np.testing.assert_allclose(np.asarray(y), y_ref.detach().numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(dx), dx_ref.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(dparams.weight), dw_ref.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(dparams.bias), db_ref.numpy(), **TOL)


def test_eval_gradient_is_the_direct_path_only():
    """Eval with running stats: dx = dy * invstd * weight, no gradient into the buffers."""
    x, ct, state, params = random_problem((6, 3, 4), 1)
    flags = jaxbn.BatchNormFlags(training=False)

    def loss(x, running_mean, running_var):
        s = state._replace(running_mean=running_mean, running_var=running_var)
        return jnp.sum(jaxbn.batch_norm(x, s, params, flags)[0] * ct)

    dx, drm, drv = jax.grad(loss, argnums=(0, 1, 2))(
        jnp.asarray(x), state.running_mean, state.running_var)
    invstd = 1 / np.sqrt(np.asarray(state.running_var) + flags.eps)
    np.testing.assert_allclose(
        np.asarray(dx), ct * (invstd * np.asarray(params.weight))[None, :, None], **TOL)
    assert not np.any(np.asarray(drm)) and not np.any(np.asarray(drv))


# --------------------------------------------------------------------------------------------
# forward mode, second derivatives, vmap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("training,buffers", MODES)
def test_forward_mode_matches_torch(shape, axis, training, buffers):
    x, _, state, params = random_problem(shape, axis)
    state = state if buffers else None
    rng = np.random.default_rng(7)
    tx = rng.standard_normal(shape)
    tw, tb = rng.standard_normal((2, shape[axis]))
    flags = jaxbn.BatchNormFlags(training=training, axis=axis)
    y, y_dot = jax.jvp(jax_layer(state, flags), (jnp.asarray(x), params),
                       (jnp.asarray(tx), jaxbn.BatchNormParams(jnp.asarray(tw), jnp.asarray(tb))))
    with fwAD.dual_level():
        dual = torch_batch_norm(
            fwAD.make_dual(as_torch(x), as_torch(tx)),
            fwAD.make_dual(as_torch(params.weight), as_torch(tw)),
            fwAD.make_dual(as_torch(params.bias), as_torch(tb)), state, training, axis)
        y_ref, y_dot_ref = (t.numpy() for t in fwAD.unpack_dual(dual))
    np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
    np.testing.assert_allclose(np.asarray(y_dot), y_dot_ref, **TOL)


@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((4, 3, 2, 3), -1)])
@pytest.mark.parametrize("training,buffers", MODES)
def test_second_derivatives_match_torch(shape, axis, training, buffers):
    """Reverse-over-reverse: the gradient of <dx(x, w), v> w.r.t. x and w (torch double backward)."""
    x, ct, state, params = random_problem(shape, axis)
    state = state if buffers else None
    v = np.random.default_rng(3).standard_normal(shape)
    flags = jaxbn.BatchNormFlags(training=training, axis=axis)
    layer = jax_layer(state, flags)

    def dx_dot_v(x, weight):
        p = jaxbn.BatchNormParams(weight, params.bias)
        dx = jax.grad(lambda x: jnp.sum(layer(x, p) * ct))(x)
        return jnp.sum(dx * v)

    ddx, ddw = jax.grad(dx_dot_v, argnums=(0, 1))(jnp.asarray(x), params.weight)

    xt, w = as_torch(x, True), as_torch(params.weight, True)
    y = torch_batch_norm(xt, w, as_torch(params.bias), state, training, axis)
    (dx,) = torch.autograd.grad((y * as_torch(ct)).sum(), xt, create_graph=True)
    ddx_ref, ddw_ref = torch.autograd.grad((dx * as_torch(v)).sum(), (xt, w), allow_unused=True)
    ddx_ref = torch.zeros_like(xt) if ddx_ref is None else ddx_ref  # eval: dx is linear in nothing
    np.testing.assert_allclose(np.asarray(ddx), ddx_ref.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(ddw), ddw_ref.numpy(), **TOL)


def test_hessian_forward_over_reverse_equals_reverse_over_reverse():
    x, ct, state, params = random_problem((4, 2, 3), 1)
    flags = jaxbn.BatchNormFlags()

    def loss(weight):
        y, _ = jaxbn.batch_norm(jnp.asarray(x), state, params._replace(weight=weight), flags)
        return jnp.sum(jnp.sin(y) * ct)

    np.testing.assert_allclose(
        np.asarray(jax.hessian(loss)(params.weight)),
        np.asarray(jax.jacrev(jax.jacrev(loss))(params.weight)), **TOL)


@pytest.mark.parametrize("training,buffers", MODES)
def test_vmap_is_a_batch_of_independent_batch_norms(training, buffers):
    xs, cts = (np.stack(a) for a in zip(*(random_problem((5, 3, 4), 1, seed=s)[:2] for s in range(3))))
    _, _, state, params = random_problem((5, 3, 4), 1)
    state = state if buffers else None
    flags = jaxbn.BatchNormFlags(training=training)

    def value_and_grads(x, ct):
        def loss(x, params):
            y, new_state = jaxbn.batch_norm(x, state, params, flags)
            return jnp.sum(y * ct), (y, new_state)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

    batched = jax.jit(jax.vmap(value_and_grads))(jnp.asarray(xs), jnp.asarray(cts))
    for i in range(3):
        single = value_and_grads(jnp.asarray(xs[i]), jnp.asarray(cts[i]))
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(got)[i], np.asarray(want), **TOL)


# --------------------------------------------------------------------------------------------
# memory: no full-size residual but the input
# --------------------------------------------------------------------------------------------


def saved_residual_lines(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    return out.getvalue().strip().splitlines()


@pytest.mark.parametrize("shape,axis", [((8, 6, 5, 4), -1), ((8, 4, 6, 5), 1), ((16, 12), 1)])
@pytest.mark.parametrize("training,buffers", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_only_the_input_is_a_full_size_residual(shape, axis, training, buffers, masked):
    x, _, state, params = random_problem(shape, axis, dtype=np.float32)
    state = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, state)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    state = state if buffers else None
    mask = jnp.asarray(np.arange(shape[0]) % 3 != 1) if masked else None
    layer = jax_layer(state, jaxbn.BatchNormFlags(training=training, axis=axis), mask)
    lines = saved_residual_lines(layer, jnp.asarray(x), params)
    full = f"f32[{','.join(map(str, shape))}]"
    big = [line for line in lines if line.startswith(full)]
    assert len(big) == 1 and "from the argument x" in big[0], lines
    # Everything else is per channel, per row (the mask) or a scalar.
    small = rf"\w+\[({shape[axis]}|{shape[0]})?\] "
    assert all(line.startswith(full) or re.match(small, line) for line in lines), lines

    # Same answer from the closure jax.vjp returns: its leaves are the residuals, and the one
    # full-size leaf is the caller's own x (eagerly too: no copy of it is kept).
    xj = jnp.asarray(x)
    _, vjp = jax.vjp(layer, xj, params)
    sizes = [leaf.size for leaf in jax.tree.leaves(vjp)]
    assert sizes.count(x.size) == 1 and max(s for s in sizes if s != x.size) <= max(shape[:2])
    (kept,) = [leaf for leaf in jax.tree.leaves(vjp) if leaf.size == x.size]
    assert kept.unsafe_buffer_pointer() == xj.unsafe_buffer_pointer()


@pytest.mark.parametrize("shape,axis,blocks", [
    ((256, 1024), 1, (256, 1024)),  # BatchNorm1d: no unit axis between rows and channels
    ((16, 128, 12, 12), 1, (16, 128, 144)),  # NCHW
    ((16, 12, 12, 128), 3, (16, 144, 128)),  # NHWC: no unit axis after the channels
    ((4, 1, 3, 5), 3, (4, 3, 5)),  # every unit axis but the leading ones goes
    ((4, 0, 3), 2, (4, 0, 3)),  # an empty axis stays
    ((5, 6), 0, (1, 5, 6)),
])
def test_reduction_views_keep_no_inner_unit_axis(shape, axis, blocks):
    """A unit axis after the channels slows XLA:CPU's reductions ~6x, one between rows and
    channels slows them too: the views drop both."""
    from jaxbn.functional.reductions import Layout

    layout = Layout(shape, axis)
    assert layout.blocks == blocks
    site_shape = layout.site_shape(2)
    assert site_shape == (1, 1) + blocks and site_shape[layout.channel_axis(2)] == shape[axis]


def backward_reductions_wait(shape, axis, dtype, strategy):
    """For one layer's ``vjp`` (training, buffers, ``strategy``), whether each reduction over
    both ``dy`` and ``x`` depends on the forward's ``invstd`` (found among the residuals by its
    value)."""
    from jax.extend import core as jcore

    rng = np.random.default_rng(0)
    c = shape[axis]
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    state = jaxbn.init_state(c, dtype)._replace(num_batches_tracked=jnp.asarray(1, jnp.int32))
    flags = jaxbn.BatchNormFlags(training=True, axis=axis, strategy=strategy)
    params = jaxbn.init_params(c, dtype)
    _, vjp, _ = jax.vjp(lambda x: jaxbn.batch_norm(x, state, params, flags), x, has_aux=True)
    closed = jax.make_jaxpr(vjp)(x)
    batch = np.asarray(x, np.float64)
    invstd = 1 / np.sqrt(batch.var(axis=tuple(a for a in range(x.ndim) if a != axis)) + 1e-5)
    sources = {v: {"dy"} for v in closed.jaxpr.invars}
    for v, value in zip(closed.jaxpr.constvars, map(np.asarray, closed.consts)):
        if value.shape == x.shape and np.array_equal(value, np.asarray(x)):
            sources[v] = {"x"}
        elif value.shape == (c,) and np.allclose(value, invstd, rtol=1e-4):
            sources[v] = {"invstd"}
    waits = []

    def walk(jaxpr, sources):  # what each variable is computed from, through nested jaxprs
        for eqn in jaxpr.eqns:
            ins = [set() if isinstance(v, jcore.Literal) else sources.get(v, set())
                   for v in eqn.invars]
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if inner is not None:
                inner = getattr(inner, "jaxpr", inner)
                inner_sources = dict(zip(inner.invars, ins))
                walk(inner, inner_sources)
                outs = [set() if isinstance(v, jcore.Literal) else inner_sources.get(v, set())
                        for v in inner.outvars]
            else:
                outs = [set().union(*ins)] * len(eqn.outvars)
                if eqn.primitive.name == "reduce_sum" and {"x", "dy"} <= outs[0]:
                    waits.append("invstd" in outs[0])
            sources.update(zip(eqn.outvars, outs))

    walk(closed.jaxpr, sources)
    return waits


@pytest.mark.parametrize("shape,axis,dtype,waits", [
    ((256, 1024), 1, jnp.float32, False),  # BatchNorm1d, 1 MiB
    ((256, 1024), 1, jnp.bfloat16, False),
    ((16, 12, 12, 128), 3, jnp.float32, False),  # 1.1 MiB
    ((512, 1024), 1, jnp.float32, False),  # 2 MiB: the threshold itself
    ((513, 1024), 1, jnp.float32, True),
    ((32, 7, 7, 512), 3, jnp.float32, True),  # 3.1 MiB
    ((1024, 1024), 1, jnp.bfloat16, False),  # 2 MiB of bfloat16
])
def test_backward_reduction_waits_for_invstd_only_for_large_inputs(shape, axis, dtype, waits):
    """With the CPU's default strategy the backward's reduction waits for the forward's
    ``invstd`` above 2 MiB per input, where starting early oversubscribes XLA:CPU's cores, and
    starts as soon as the mean is known below it, where that is faster
    (``kernel.backward_waits``)."""
    cpu = jaxbn.default_strategy("cpu")
    assert backward_reductions_wait(shape, axis, dtype, cpu) == [waits]


@pytest.mark.parametrize("shape", [(513, 1024), (32, 7, 7, 512)])
def test_backward_reduction_never_waits_with_the_gpu_default_strategy(shape):
    """XLA:GPU runs the kernels in order on one stream: the wait would be one more kernel per norm
    and order nothing."""
    gpu = jaxbn.default_strategy("gpu")
    assert backward_reductions_wait(shape, len(shape) - 1, jnp.float32, gpu) == [False]


def layer_vjp_program(x, ct, strategy):
    """One training layer's ``vjp`` (buffers, seen a batch) as ``(values, StableHLO for cuda)``."""
    c = x.shape[-1]
    state = jaxbn.init_state(c)._replace(num_batches_tracked=jnp.asarray(1, jnp.int32))
    params = jaxbn.init_params(c)
    flags = jaxbn.BatchNormFlags(training=True, axis=-1, strategy=strategy)

    def step(x, params):
        (y, _), vjp = jax.vjp(lambda x, p: jaxbn.batch_norm(x, state, p, flags), x, params)
        return y, vjp((ct, jax.tree.map(jnp.zeros_like, state)))

    program = jax.jit(step)  # one trace, lowered for cuda and run here
    text = program.trace(x, params).lower(lowering_platforms=("cuda",)).as_text()
    return program(x, params), text


def test_the_cse_barrier_stays_whatever_the_strategy():
    """The backward pass recomputes the tangent map behind ``jax.checkpoint``'s optimization
    barrier with the CPU's and the GPU's default strategy alike (no switch turns it off); the
    two strategies' values agree to rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 5, 5, 16)) * 3 + 7, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    values, text = layer_vjp_program(x, ct, jaxbn.default_strategy("gpu"))
    reference, cpu_text = layer_vjp_program(x, ct, jaxbn.default_strategy("cpu"))
    assert "optimization_barrier" in text and "optimization_barrier" in cpu_text
    for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(reference)):  # float32 sums of 400,
        b = np.asarray(b)  # fused (so rounded) differently: a few ulp of the largest value
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=2e-6 * np.abs(b).max())


def test_half_precision_residuals_and_dtypes():
    x, ct, state, params = random_problem((8, 4, 6, 5), 1, dtype=np.float32)
    state = jaxbn.init_state(4)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    for dtype in (jnp.bfloat16, jnp.float16):
        xh = jnp.asarray(x, dtype)
        layer = jax_layer(state, jaxbn.BatchNormFlags())
        lines = saved_residual_lines(layer, xh, params)
        assert [line for line in lines if "[8,4,6,5]" in line] == [
            line for line in lines if "from the argument x" in line], lines
        y, vjp = jax.vjp(layer, xh, params)
        dx, dparams = vjp(jnp.asarray(ct, dtype))
        assert y.dtype == dtype and dx.dtype == dtype and dparams.weight.dtype == jnp.float32

        # Close to the float32 computation on the same (rounded) input.
        y32, vjp32 = jax.vjp(layer, xh.astype(jnp.float32), params)
        dx32, dp32 = vjp32(jnp.asarray(ct, dtype).astype(jnp.float32))
        tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=tol * 4)
        np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx32), atol=tol * 4)
        np.testing.assert_allclose(np.asarray(dparams.weight), np.asarray(dp32.weight), rtol=1e-5,
                                   atol=1e-3)


# --------------------------------------------------------------------------------------------
# accuracy in float32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -1])
def test_large_mean_float32_normalizes_within_1e_3_of_float64_torch(axis):
    """Data with mean 1e4 and unit variance, 1.6M elements: E[x^2]-E[x]^2 would lose every digit,
    a plain float32 mean already errs by ~1.6e-3; the shifted two-pass statistics do not."""
    shape = (32, 28, 28, 64) if axis == -1 else (32, 64, 28, 28)
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    ct = rng.standard_normal(shape).astype(np.float32)
    state, params = jaxbn.init_state(64), jaxbn.init_params(64)
    flags = jaxbn.BatchNormFlags(axis=axis)

    def layer(x, params):
        return jaxbn.batch_norm(x, state, params, flags)

    (y, new_state), vjp = jax.vjp(jax.jit(layer), jnp.asarray(x), params)
    dx, dparams = vjp((jnp.asarray(ct), jax.tree.map(jnp.zeros_like, new_state)))

    xt = as_torch(x.astype(np.float64), True)
    w, b = (as_torch(np.asarray(a, np.float64), True) for a in params)
    y_ref = torch_batch_norm(xt, w, b, None, True, axis)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (xt, w, b), as_torch(ct.astype(np.float64)))
    assert np.abs(np.asarray(y, np.float64) - y_ref.detach().numpy()).max() <= 1e-3
    np.testing.assert_allclose(np.asarray(dx), dx_ref.numpy(), atol=1e-3 * np.abs(dx_ref.numpy()).max())
    np.testing.assert_allclose(np.asarray(dparams.weight), dw_ref.numpy(), rtol=1e-3, atol=1.0)
    np.testing.assert_allclose(np.asarray(dparams.bias), db_ref.numpy(), rtol=1e-3, atol=1.0)
    mean_ref = x.astype(np.float64).mean(axis=tuple(a for a in range(4) if a != axis % 4))
    np.testing.assert_allclose(np.asarray(new_state.running_mean), 0.1 * mean_ref, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# mask and axis_name: the fast path equals autodiff of the straightforward formula
# --------------------------------------------------------------------------------------------


def reference_batch_norm(x, weight, bias, axis, eps=1e-5, mask=None, axis_name=None):
    """Plain-jnp batch norm with batch statistics over the valid rows of every device."""
    feature_axis = axis % x.ndim
    axes = tuple(a for a in range(x.ndim) if a != feature_axis)
    shape = [1] * x.ndim
    shape[feature_axis] = -1
    keep = jnp.ones(x.shape[0], bool) if mask is None else mask
    keep = jnp.broadcast_to(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    total = lambda v: v if axis_name is None else jax.lax.psum(v, axis_name)  # noqa: E731
    count = total(jnp.sum(keep.astype(x.dtype), axes))
    mean = total(jnp.sum(jnp.where(keep, x, 0), axes)) / count
    centered = x - mean.reshape(shape)
    var = total(jnp.sum(jnp.where(keep, centered**2, 0), axes)) / count
    return centered / jnp.sqrt(var.reshape(shape) + eps) * weight.reshape(shape) + bias.reshape(shape)


def padded_problem(shape, axis, valid, seed=0):
    """``random_problem`` plus a row mask with ``valid`` scattered valid rows (finite padding
    with its own spread, so padded outputs and their gradients are informative)."""
    x, ct, state, params = random_problem(shape, axis, seed)
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros(shape[0], bool)
    mask[rng.permutation(shape[0])[:valid]] = True
    x[~mask] = rng.standard_normal(x[~mask].shape) * 10 - 5
    return x, ct, state, params, mask


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_masked_gradients_and_tangents_match_autodiff_reference(shape, axis):
    x, ct, _, params, mask = padded_problem(shape, axis, valid=shape[0] - 2)
    flags = jaxbn.BatchNormFlags(axis=axis)
    ours = jax_layer(None, flags, jnp.asarray(mask))
    ref = lambda x, p: reference_batch_norm(x, p.weight, p.bias, axis, mask=jnp.asarray(mask))  # noqa: E731
    args = (jnp.asarray(x), params)
    tangents = (jnp.asarray(np.random.default_rng(5).standard_normal(shape)),
                jax.tree.map(jnp.ones_like, params))
    y, vjp = jax.vjp(jax.jit(ours), *args)
    y_ref, vjp_ref = jax.vjp(ref, *args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    for got, want in zip(jax.tree.leaves(vjp(jnp.asarray(ct))),
                         jax.tree.leaves(vjp_ref(jnp.asarray(ct)))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    np.testing.assert_allclose(np.asarray(jax.jvp(ours, args, tangents)[1]),
                               np.asarray(jax.jvp(ref, args, tangents)[1]), **TOL)

    # The padded rows' gradient is the direct path only: dy * invstd * weight.
    dx = np.asarray(jax.grad(lambda x: jnp.sum(ours(x, params) * ct))(jnp.asarray(x)))
    valid = np.moveaxis(x, axis, -1)[mask].reshape(-1, shape[axis])
    invstd = 1 / np.sqrt(valid.var(0) + flags.eps)
    direct = np.moveaxis(np.moveaxis(ct, axis, -1) * invstd * np.asarray(params.weight), -1, axis)
    np.testing.assert_allclose(dx[~mask], direct[~mask], **TOL)


def test_nan_padding_stays_out_of_statistics_and_valid_rows():
    x, _, state, params, mask = padded_problem((7, 3, 4), 1, valid=4)
    x[~mask] = np.nan
    y, new_state = jax.jit(jaxbn.batch_norm)(jnp.asarray(x), state, params, jaxbn.BatchNormFlags(),
                                             mask=jnp.asarray(mask))
    y_ref = reference_batch_norm(jnp.asarray(x[mask]), params.weight, params.bias, 1)
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_ref), **TOL)
    assert np.all(np.isfinite(np.asarray(new_state.running_mean)))
    assert np.all(np.isfinite(np.asarray(new_state.running_var)))


def device_batches(per_device_valid, rows=5, feature_shape=(3, 4), axis=1, seed=0):
    """Stacked per-device batches ``(D, rows, ...)`` with uneven valid rows per device."""
    d = len(per_device_valid)
    x, ct, state, params, _ = padded_problem((d * rows, *feature_shape), axis, valid=d * rows, seed=seed)
    mask = np.zeros((d, rows), bool)
    for i, v in enumerate(per_device_valid):
        mask[i, :v] = True
    x = x.reshape(d, rows, *feature_shape)
    x[~mask] = np.random.default_rng(seed + 2).standard_normal(x[~mask].shape) * 10
    return x, ct.reshape(x.shape), state, params, mask


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_gradients_match_autodiff_reference_and_global_batch(axis, masked):
    """Statistics across ``vmap(axis_name=...)`` 'devices' with uneven valid rows (5, 0, 2, 4):
    outputs, gradients and tangents equal autodiff of the psum formula, and the valid rows'
    outputs and gradients equal plain (torch) batch norm on the concatenated valid rows."""
    valid = (5, 0, 2, 4) if masked else (5, 5, 5, 5)
    x, ct, state, params, mask = device_batches(valid, axis=axis)
    flags = jaxbn.BatchNormFlags(axis=axis, axis_name="d")

    def value_and_grads(layer, ct):
        def loss(x, params):
            y = jax.vmap(lambda x, m: layer(x, params, m), axis_name="d")(x, jnp.asarray(mask))
            return jnp.sum(y * ct), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(jnp.asarray(x), params)

    def ours(x, params, m):
        return jaxbn.batch_norm(x, state, params, flags, mask=m if masked else None)[0]

    def ref(x, params, m):
        return reference_batch_norm(x, params.weight, params.bias, axis, mask=m if masked else None,
                                    axis_name="d")

    (_, y), grads = value_and_grads(ours, ct)
    (_, y_ref), grads_ref = value_and_grads(ref, ct)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)

    # torch on the concatenated valid rows, for a loss over the valid rows only.
    ct_valid = np.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), ct, 0)
    _, (dx, dp) = value_and_grads(ours, ct_valid)
    xt = as_torch(x[mask], True)
    w, b = as_torch(params.weight, True), as_torch(params.bias, True)
    y_t = torch_batch_norm(xt, w, b, None, True, axis)
    dx_t, dw_t, db_t = torch.autograd.grad(y_t, (xt, w, b), as_torch(ct[mask]))
    np.testing.assert_allclose(np.asarray(y)[mask], y_t.detach().numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(dx)[mask], dx_t.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(dp.weight), dw_t.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(dp.bias), db_t.numpy(), **TOL)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    import jaxbn
    from tests.functional.test_kernel import device_batches, reference_batch_norm
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("d",))
    worst = 0.0
    for axis in (1, -1):
        x, ct, state, params, mask = device_batches((3, 0, 5, 1, 5, 2, 4, 5), axis=axis)
        x, ct, mask = (a.reshape((-1,) + a.shape[2:]) for a in (x, ct, mask))
        rows = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("d")))
        flags = jaxbn.BatchNormFlags(axis=axis, axis_name="d")
        for check_vma in (True, False):
            results = []
            for name in ("ours", "ref"):
                def local(x, m, params, name=name):
                    if name == "ours":
                        y, new = jaxbn.batch_norm(x, state, params, flags, mask=m)
                        return y, new.running_mean, new.running_var
                    y = reference_batch_norm(x, params.weight, params.bias, axis, mask=m,
                                             axis_name="d")
                    return y, state.running_mean, state.running_var
                sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P()),
                                        out_specs=(P("d"), P(), P()), check_vma=check_vma)
                def loss(x, m, ct, params):
                    y, rm, rv = sharded(x, m, params)
                    return jnp.sum(y * ct), (y, rm, rv)
                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 3), has_aux=True))
                (_, (y, rm, rv)), (dx, dp) = step(rows(x), rows(mask), rows(ct), params)
                results.append((y, dx, dp.weight, dp.bias))
                if name == "ours":
                    buffers = (rm, rv)
            for got, want in zip(*results):
                worst = max(worst, float(np.max(np.abs(np.asarray(got) - np.asarray(want)))))
            # buffers: the global valid rows' statistics, torch's update
            valid = np.moveaxis(x[mask], axis, -1).reshape(-1, x.shape[axis])
            n = valid.shape[0]
            want_rm = 0.9 * np.asarray(state.running_mean) + 0.1 * valid.mean(0)
            want_rv = 0.9 * np.asarray(state.running_var) + 0.1 * valid.var(0) * n / (n - 1)
            worst = max(worst, float(np.max(np.abs(np.asarray(buffers[0]) - want_rm))),
                        float(np.max(np.abs(np.asarray(buffers[1]) - want_rv))))
    # Plain jit on a batch-sharded (explicitly typed) input: no axis_name, XLA partitions the
    # reductions; the views/broadcasts must not make it gather the batch.
    for masked in (False, True):
        x, ct, state, params, mask = device_batches((3, 0, 5, 1, 5, 2, 4, 5), axis=1)
        x, ct, mask = (a.reshape((-1,) + a.shape[2:]) for a in (x, ct, mask))
        m = rows(mask) if masked else None
        def ours(x, p):
            return jaxbn.batch_norm(x, state, p, jaxbn.BatchNormFlags(), mask=m)[0]
        def ref(x, p):
            return reference_batch_norm(x, p.weight, p.bias, 1, mask=m)
        results = []
        for layer in (ours, ref):
            step = jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(layer(x, p) * ct), argnums=(0, 1)))
            (_, (dx, dp)) = step(rows(x), params)
            results.append((dx, dp.weight, dp.bias, layer(rows(x), params)))
            if layer is ours:
                hlo = step.lower(rows(x), params).compile().as_text()
                assert "all-reduce(" in hlo and "all-gather(" not in hlo and "all-to-all(" not in hlo
        for got, want in zip(*results):
            worst = max(worst, float(np.max(np.abs(np.asarray(got) - np.asarray(want)))))
    print("WORST", worst)
    """
)


def test_shard_map_over_8_host_devices_matches_autodiff_reference():
    """8 CPU devices, uneven valid rows (3,0,5,1,5,2,4,5). shard_map with ``axis_name``,
    check_vma on and off: outputs and gradients equal autodiff of the psum formula; buffers are
    the global update. Plain jit on a batch-sharded input: gradients equal autodiff of the
    formula and the compiled step all-reduces per-channel vectors, never gathers the batch."""
    root = str(Path(__file__).resolve().parents[2])  # the repository: tests.functional imports
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(re.search(r"WORST (\S+)", proc.stdout).group(1))
    assert worst <= 1e-10, worst
