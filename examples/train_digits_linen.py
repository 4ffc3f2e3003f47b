"""Train a small CNN with ``jaxbn.linen.BatchNorm`` on scikit-learn's digits (Flax linen, optax).

    python examples/train_digits_linen.py [--epochs N]

The train step is one ``jax.jit``-compiled function returning updated params, batch_stats and
optimizer state; ``batch_stats`` (running_mean, running_var, num_batches_tracked, torch's names)
is updated through ``model.apply(..., train=True, mutable=['batch_stats'])``, and the reported
accuracy is in eval mode, with the running statistics.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from digits_cnn import LinenCNN, load_digits, linen_setup, train


def main(epochs: int = 15, log=print) -> float:
    """Train and return the final eval accuracy."""
    data = load_digits()
    forwards, params, batch_stats = linen_setup(LinenCNN(), jnp.asarray(data.x_train[:2]))
    _, _, acc = train(forwards, params, batch_stats, data, epochs=epochs, log=log)
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    main(parser.parse_args().epochs)
