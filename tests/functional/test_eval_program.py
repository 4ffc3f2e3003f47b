"""Eval mode is never slower than flax because it is flax's program (issue 13's eval target).

Running statistics make batch norm one per-channel ``rsqrt`` and one elementwise pass; jaxbn must
not add work to it. On the CPU the optimized programs are compared instruction by instruction
(shapes and opcodes, names and metadata dropped); for a CUDA GPU, which this machine does not
have, the programs lowered for ``cuda`` are compared by their arithmetic.
"""

from __future__ import annotations

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from helpers import random_input, random_params, random_state

SHAPES = [((8, 6, 6, 16), -1), ((8, 16, 6, 6), 1), ((32, 16), 1), ((4, 3, 5, 6, 8), -1)]
ARITHMETIC = ("add", "subtract", "multiply", "divide", "rsqrt", "sqrt", "power", "reduce")


def eval_steps(shape, axis):
    """``(jaxbn_step, flax_step, args)``: one eval-mode batch norm each, torch's defaults, on the
    same arrays ``(x, weight, bias, running_mean, running_var)``."""
    rng = np.random.default_rng(0)
    c = shape[axis]
    x = jnp.asarray(random_input(rng, shape, np.float32))
    w, b = random_params(rng, c, jnp.float32)
    rm, rv, _ = random_state(rng, c, jnp.float32)
    flags = jaxbn.BatchNormFlags(training=False, axis=axis)

    def jaxbn_step(x, w, b, rm, rv):
        state = jaxbn.BatchNormState(rm, rv, jnp.zeros((), jnp.int32))
        return jaxbn.batch_norm(x, state, jaxbn.BatchNormParams(w, b), flags)[0]

    module = nn.BatchNorm(use_running_average=True, axis=axis, momentum=0.9, epsilon=1e-5)

    def flax_step(x, w, b, rm, rv):
        return module.apply({"params": {"scale": w, "bias": b},
                             "batch_stats": {"mean": rm, "var": rv}}, x)

    return jaxbn_step, flax_step, (x, w, b, rm, rv)


def instructions(hlo: str) -> collections.Counter:
    """``(shape, opcode)`` of every instruction of an optimized HLO module."""
    return collections.Counter(re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = (\S+) ([\w-]+)\(", hlo, re.M))


def arithmetic(stablehlo: str) -> collections.Counter:
    """How many of each arithmetic op a lowered StableHLO module's ``main`` holds."""
    ops = re.findall(r"stablehlo\.(\w+)", stablehlo[stablehlo.index("func.func public @main"):])
    return collections.Counter(op for op in ops if op in ARITHMETIC)


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_eval_compiles_to_flax_program_on_cpu(shape, axis):
    jaxbn_step, flax_step, args = eval_steps(shape, axis)
    ours = instructions(jax.jit(jaxbn_step).lower(*args).compile().as_text())
    theirs = instructions(jax.jit(flax_step).lower(*args).compile().as_text())
    assert sum(n for (_, op), n in ours.items() if op == "fusion") == 2  # rsqrt, then one pass
    assert ours == theirs, (ours - theirs, theirs - ours)
    # The same program on the same arrays: the same bits (and no swapped weight and bias).
    np.testing.assert_array_equal(jax.jit(jaxbn_step)(*args), jax.jit(flax_step)(*args))


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_eval_lowers_to_flax_arithmetic_for_cuda(shape, axis):
    jaxbn_step, flax_step, args = eval_steps(shape, axis)

    def lowered(step):
        return jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    ours, theirs = arithmetic(lowered(jaxbn_step)), arithmetic(lowered(flax_step))
    assert ours["rsqrt"] == 1 and "reduce" not in ours  # no statistics are computed
    assert ours == theirs, (ours, theirs)
