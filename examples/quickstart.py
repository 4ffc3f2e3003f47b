"""jaxbn in one page: a torch user's BatchNorm2d session, replayed as pure JAX calls.

Run: python examples/quickstart.py
Each step changes the module the way a torch user would (train/eval, momentum=None,
track_running_stats flipped after construction) and, when torch is installed, runs the real
torch module alongside and prints the largest difference.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

jax.config.update("jax_enable_x64", True)


def session():
    """(description, flags) for each call, as attribute changes on one module."""
    flags = jaxbn.BatchNormFlags()  # nn.BatchNorm2d(8): training, momentum=0.1, eps=1e-5
    yield "bn(x) in train mode", flags
    flags = flags.replace(momentum=None)
    yield "bn.momentum = None (cumulative average)", flags
    yield "again: factor is 1/num_batches_tracked", flags
    flags = flags.replace(track_running_stats=False)
    yield "bn.track_running_stats = False: batch stats, buffers frozen", flags
    flags = flags.replace(training=False)
    yield "bn.eval(): running stats, whatever track_running_stats says", flags
    flags = flags.replace(training=True, track_running_stats=True, eps=1e-3)
    yield "bn.train(); bn.track_running_stats = True; bn.eps = 1e-3", flags


def main() -> float:
    try:
        import torch

        from jaxbn.testing import oracle as torch_oracle
    except ImportError:
        torch_oracle = None
    rng = np.random.default_rng(0)
    state, params = jaxbn.init_state(8, jnp.float64), jaxbn.init_params(8, jnp.float64)
    step = jax.jit(jaxbn.batch_norm)  # flags are static: one trace per flag setting
    module = None  # the torch twin, built on the first call with the same construction arguments
    worst = 0.0
    for description, flags in session():
        x = rng.normal(2.0, 3.0, size=(16, 8, 5, 5))
        y, state = step(jnp.asarray(x), state, params, flags)
        line = f"{description:64s} running_mean[0]={float(state.running_mean[0]):+.5f} count={int(state.num_batches_tracked)}"
        if torch_oracle is not None:
            if module is None:
                module = torch_oracle.build_module(8, 4, jaxbn.init_state(8, jnp.float64), params, flags, torch.float64)
            torch_oracle.apply_flags(module, flags)
            y_torch = torch_oracle.to_numpy(torch_oracle.forward(module, x))
            ref = torch_oracle.module_state(module)
            diff = max(np.max(np.abs(np.asarray(y) - y_torch)), *(np.max(np.abs(np.asarray(a) - b)) for a, b in zip(state, ref)))
            worst = max(worst, float(diff))
            line += f"  |jaxbn - torch| = {diff:.1e}"
        print(line)
    if torch_oracle is not None:
        print(f"largest difference from torch over the session: {worst:.1e}")
    return worst


if __name__ == "__main__":
    main()
