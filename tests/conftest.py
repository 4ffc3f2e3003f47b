"""Test-session setup: float64 on (torch is compared at <= 1e-10), counters int64 like torch.

Float32/bf16 tests ask for their dtypes explicitly. Speed choices are never switched for the whole
session: a test that needs one passes a ``jaxbn.Strategy`` in its flags (the GPU statistics
kernel, interpreted off-GPU: tests/functional/test_gpu_moments.py).
"""

import jax

jax.config.update("jax_enable_x64", True)
