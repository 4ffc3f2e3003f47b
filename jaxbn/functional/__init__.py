"""Pure JAX: torch's norm layers as functions of ``(x, state, params, flags)``.

Nothing here imports flax, torch or touches files. Modules, bottom up:

* :mod:`.types` -- flags, state, params and their initial values, under torch's names;
* :mod:`.torch_rules` -- every decision torch makes (which statistics, whether buffers move,
  with what weight), one function per family;
* :mod:`.reductions` -- per-channel sums (masks, devices), the accurate moments;
* :mod:`.strategy` -- the speed choices (running-mean shift, backward wait, one-read kernel) as
  one static value, and each backend's default;
* :mod:`.gpu_moments` -- the same moments in one read of the input on CUDA GPUs (Pallas, opt-in);
* :mod:`.kernel` -- the differentiable normalization (``custom_jvp``, torch's backward);
* :mod:`.validation` -- trace-time checks with torch's wording;
* :mod:`.batch`, :mod:`.instance` -- the public pure functions (batch norm, instance norm).
"""

from .batch import batch_norm
from .instance import instance_norm
from .reductions import Moments, batch_moments
from .strategy import OneRead, Strategy, default_strategy
from .types import (
    BatchNormFlags,
    BatchNormParams,
    BatchNormState,
    InstanceNormFlags,
    counter_dtype,
    init_params,
    init_state,
)

__all__ = [
    "BatchNormFlags",
    "BatchNormParams",
    "BatchNormState",
    "InstanceNormFlags",
    "Moments",
    "OneRead",
    "Strategy",
    "batch_moments",
    "batch_norm",
    "counter_dtype",
    "default_strategy",
    "init_params",
    "init_state",
    "instance_norm",
]
