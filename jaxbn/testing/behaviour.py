"""The behaviour table of torch's BatchNorm, observed live by running jaxbn (and torch).

For every combination of ``training`` x buffers at construction x current
``track_running_stats`` x ``momentum`` (float / None), :func:`behaviour_table` runs
:func:`jaxbn.batch_norm` on one built-in example whose running statistics differ from its batch
statistics, and *infers* from the result what happened: which statistics normalized the input,
whether the buffers and the counter changed, and the update factor. Nothing is read from the
implementation's branches. When torch is importable the same inputs go through
``torch.nn.BatchNorm2d`` with the same attribute changes and the largest difference is reported.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..functional import BatchNormFlags, BatchNormParams, BatchNormState, batch_norm

MOMENTUM = 0.1
EPS = 1e-5
AGREEMENT_TOLERANCE = 1e-10


class Example(NamedTuple):
    """A float64 NCHW batch and buffers whose statistics are far from the batch's own."""

    x: np.ndarray
    state: BatchNormState
    params: BatchNormParams


class Row(NamedTuple):
    """One observed combination; ``torch_diff`` is None when torch was not run."""

    training: bool
    buffers: bool
    track_running_stats: bool
    momentum: float | None
    normalized_with: str
    running_stats: str
    counter: str
    factor: str
    torch_diff: float | None

    @property
    def agrees(self) -> bool:
        return self.torch_diff is None or self.torch_diff <= AGREEMENT_TOLERANCE


def example() -> Example:
    """The built-in example: N=6, C=3, 4x4 spatial; counter at 3 so ``momentum=None`` gives 1/4."""
    rng = np.random.default_rng(2022)
    x = rng.normal(loc=1.5, scale=2.0, size=(6, 3, 4, 4))
    state = BatchNormState(
        running_mean=np.array([-1.0, 0.5, 2.0]),
        running_var=np.array([0.5, 2.0, 4.0]),
        num_batches_tracked=np.array(3, dtype=np.int64),
    )
    params = BatchNormParams(weight=np.array([1.0, 2.0, 0.5]), bias=np.array([0.0, -1.0, 0.25]))
    return Example(x, state, params)


def _normalized(x: np.ndarray, mean: np.ndarray, var: np.ndarray, params: BatchNormParams) -> np.ndarray:
    c = (1, -1, 1, 1)
    return (x - mean.reshape(c)) / np.sqrt(var.reshape(c) + EPS) * params.weight.reshape(c) + params.bias.reshape(c)


def _closest(y: np.ndarray, candidates: dict[str, np.ndarray]) -> str:
    """The candidate ``y`` equals (to 1e-9), or ``'unexplained'``."""
    for name, candidate in candidates.items():
        if np.max(np.abs(y - candidate)) < 1e-9:
            return name
    return "unexplained"


def _observe_factor(old: BatchNormState, new: BatchNormState, batch_mean: np.ndarray, batch_var_unbiased: np.ndarray) -> str:
    """Solve ``new = f * batch + (1 - f) * old`` for ``f`` from the mean and check the variance."""
    f_mean = (new.running_mean - old.running_mean) / (batch_mean - old.running_mean)
    f_var = (new.running_var - old.running_var) / (batch_var_unbiased - old.running_var)
    f = float(np.mean(f_mean))
    consistent = np.allclose(f_mean, f) and np.allclose(f_var, f)
    count = int(new.num_batches_tracked)
    value = f"1/{count} = {f:.4g}" if np.isclose(f, 1 / count) else f"{f:.4g}"
    return f"{value} (unbiased var)" if consistent else f"{value} (var inconsistent!)"


def observe(ex: Example, flags: BatchNormFlags, buffers: bool) -> tuple[str, str, str, str, np.ndarray, BatchNormState | None]:
    """Run jaxbn once and describe what it did, from its outputs alone."""
    state = jax.tree.map(jnp.asarray, ex.state) if buffers else None
    params = jax.tree.map(jnp.asarray, ex.params)
    y, new_state = batch_norm(jnp.asarray(ex.x), state, params, flags)
    y = np.asarray(y)

    axes = (0, 2, 3)
    batch_mean = ex.x.mean(axis=axes)
    batch_var = ex.x.var(axis=axes)
    batch_var_unbiased = ex.x.var(axis=axes, ddof=1)
    normalized_with = _closest(
        y,
        {
            "batch stats (biased var)": _normalized(ex.x, batch_mean, batch_var, ex.params),
            "batch stats (unbiased var)": _normalized(ex.x, batch_mean, batch_var_unbiased, ex.params),
            "running stats": _normalized(ex.x, ex.state.running_mean, ex.state.running_var, ex.params),
        },
    )
    if new_state is None:
        return normalized_with, "none exist", "none", "-", y, None
    new = BatchNormState(*(np.asarray(a) for a in new_state))
    changed = not (np.array_equal(new.running_mean, ex.state.running_mean) and np.array_equal(new.running_var, ex.state.running_var))
    delta = int(new.num_batches_tracked) - int(ex.state.num_batches_tracked)
    counter = f"{int(ex.state.num_batches_tracked)} -> {int(new.num_batches_tracked)}" if delta else "unchanged"
    factor = _observe_factor(ex.state, new, batch_mean, batch_var_unbiased) if changed else "-"
    return normalized_with, "updated" if changed else "unchanged", counter, factor, y, new


def torch_difference(ex: Example, flags: BatchNormFlags, buffers: bool, y: np.ndarray, new: BatchNormState | None) -> float:
    """Largest |jaxbn - torch| over the output and every buffer, torch given the same history."""
    from . import oracle as torch_oracle

    y_torch, state_torch = torch_oracle.batch_norm(ex.x, ex.state if buffers else None, ex.params, flags)
    diffs = [np.max(np.abs(y - y_torch))]
    if (new is None) != (state_torch is None):
        return float("inf")
    if new is not None:
        diffs += [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) for a, b in zip(new, state_torch)]
    return float(max(diffs))


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def behaviour_table(with_torch: bool | None = None) -> list[Row]:
    """Observe all 16 combinations; compare with torch when it is installed (or when asked)."""
    if with_torch is None:
        with_torch = torch_available()
    ex = example()
    rows = []
    for training, buffers, track, momentum in itertools.product((True, False), (True, False), (True, False), (MOMENTUM, None)):
        flags = BatchNormFlags(training=training, track_running_stats=track, momentum=momentum, eps=EPS, axis=1)
        normalized_with, running, counter, factor, y, new = observe(ex, flags, buffers)
        diff = torch_difference(ex, flags, buffers, y, new) if with_torch else None
        rows.append(Row(training, buffers, track, momentum, normalized_with, running, counter, factor, diff))
    return rows


HEADER = (
    "training",
    "buffers at init",
    "track_running_stats now",
    "momentum",
    "normalized with",
    "running stats",
    "num_batches_tracked",
    "factor",
)


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows (with an 'agrees with torch' column when torch was run)."""
    with_torch = any(r.torch_diff is not None for r in rows)
    header = HEADER + (("agrees with torch (max abs diff)",) if with_torch else ())
    lines = []
    for r in rows:
        cells = [
            str(r.training),
            "yes" if r.buffers else "no",
            str(r.track_running_stats),
            "None" if r.momentum is None else f"{r.momentum:g}",
            r.normalized_with,
            r.running_stats,
            r.counter,
            r.factor,
        ]
        if with_torch:
            cells.append(f"{'yes' if r.agrees else 'NO'} ({r.torch_diff:.1e})")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(c) for c in lines]
    return "\n".join(out)
