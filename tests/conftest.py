"""Test-session setup: float64 on (torch is compared at <= 1e-10), counters int64 like torch.

Float32/bf16 tests ask for their dtypes explicitly. ``JAXBN_ONE_READ=interpret`` runs the GPU
statistics kernel, interpreted, wherever it would apply (see jaxbn.functional.gpu_moments).
"""

import jax

jax.config.update("jax_enable_x64", True)
