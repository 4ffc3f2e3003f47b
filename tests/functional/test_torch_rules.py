"""torch's decisions (``jaxbn.functional.torch_rules``): each family's ``Plan`` says what torch did.

For BatchNorm and InstanceNorm, every row of (training, track_running_stats at construction,
track_running_stats now, momentum 0.1 / None): the real torch module
(:func:`jaxbn.testing.oracle.build_module`) runs once and is watched -- which statistics its
output was normalized with, whether its running statistics were written (values or version
counter: InstanceNorm with ``momentum=None`` writes them with weight 0), whether
``num_batches_tracked`` moved, and with what weight the statistics moved -- and the plan must say
exactly that. A row whose plan needs running statistics the module does not have is torch's
error.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from helpers import random_input, random_state
from jaxbn import BatchNormFlags
from jaxbn.functional.torch_rules import BATCH_NORM, CUMULATIVE, INSTANCE_NORM
from jaxbn.testing import oracle as torch_oracle

C = 3
ROWS = list(itertools.product((True, False), (True, False), (True, False), (0.1, None)))
"""(training, buffers at construction, track_running_stats now, momentum): every combination."""


@dataclasses.dataclass(frozen=True)
class Observed:
    """What one call of the torch module did."""

    uses_input_stats: bool
    writes_buffers: bool
    counts: bool


def normalized_by(family, x, stats, eps):
    """torch's normalization of ``x`` by its own batch/instance statistics (``stats=None``) or by
    the given running ``(mean, var)``."""
    if stats is not None:
        mean, var = stats
        return torch.nn.functional.batch_norm(x, mean.clone(), var.clone(), training=False, eps=eps)
    if family is BATCH_NORM:
        return torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)
    return torch.nn.functional.instance_norm(x, use_input_stats=True, eps=eps)


def snapshot(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each buffer's value and version counter (torch bumps it on every in-place write)."""
    return {name: (b.clone(), b._version) for name, b in module.named_buffers()}


def written(module: torch.nn.Module, before: dict, name: str) -> bool:
    """Buffer ``name`` was written since ``before``: its value or its version counter changed."""
    value, version = before[name]
    buffer = getattr(module, name)
    return buffer._version != version or not torch.equal(buffer, value)


def run_torch(family, has_buffers: bool, flags: BatchNormFlags, seed: int):
    """One call of the torch module: ``(module, snapshot before, x, y)``; ``y`` is ``None`` when
    torch refused the call."""
    rng = np.random.default_rng(seed)
    x = torch_oracle.to_torch(random_input(rng, (4, C, 5)))
    state = random_state(rng, C) if has_buffers else None
    module = torch_oracle.build_module(C, x.dim(), state, None, flags, torch.float64, family)
    before = snapshot(module)
    try:
        with torch.no_grad():
            y = module(x)
    except RuntimeError as error:
        if "use_input_stats is false" not in str(error):
            raise
        y = None  # torch's "Expected running_mean and running_var to be defined ..."
    return module, before, x, y


def observe(family, module, before, x, y, eps: float) -> Observed:
    """Which statistics normalized ``y`` (exactly one of the two must), which buffers moved."""
    by_input = normalized_by(family, x, None, eps)
    uses_input_stats = bool(torch.allclose(y, by_input, rtol=0, atol=1e-12))
    if not uses_input_stats:
        by_running = normalized_by(family, x, (before["running_mean"][0], before["running_var"][0]), eps)
        assert torch.allclose(y, by_running, rtol=0, atol=1e-12), "y is neither normalization"
        assert not torch.allclose(by_input, by_running, rtol=0, atol=1e-3), "the two look alike"
    if module.running_mean is None:
        return Observed(uses_input_stats, writes_buffers=False, counts=False)
    statistics = {written(module, before, n) for n in ("running_mean", "running_var")}
    assert len(statistics) == 1, "torch wrote one running statistic without the other"
    counts = written(module, before, "num_batches_tracked")
    return Observed(uses_input_stats, writes_buffers=statistics.pop() or counts, counts=counts)


@pytest.mark.parametrize("family", [BATCH_NORM, INSTANCE_NORM], ids=lambda f: f.name)
@pytest.mark.parametrize("training,has_buffers,tracking,momentum", ROWS)
def test_the_plan_says_what_the_torch_module_did(family, training, has_buffers, tracking, momentum):
    flags = BatchNormFlags(training=training, track_running_stats=tracking, momentum=momentum)
    plan = family.plan(flags, has_buffers)
    module, before, x, y = run_torch(family, has_buffers, flags, seed=7)
    assert (y is None) == (not plan.uses_input_stats and not has_buffers), (
        "torch refuses exactly the calls whose plan needs running statistics the module lacks")
    if y is None:
        return
    observed = observe(family, module, before, x, y, flags.eps)
    assert observed == Observed(plan.uses_input_stats, plan.writes_buffers, plan.counts)
    if plan.writes_buffers:
        # the plan's weight, given to torch as a plain momentum, writes the very same statistics
        count = int(module.num_batches_tracked)  # after this call's increment
        weight = 1.0 / count if plan.momentum is CUMULATIVE else plan.momentum
        twin, _, _, _ = run_torch(family, has_buffers, flags.replace(momentum=weight), seed=7)
        for name in ("running_mean", "running_var"):
            assert torch.equal(getattr(twin, name), getattr(module, name)), name
