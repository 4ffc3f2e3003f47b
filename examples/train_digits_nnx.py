"""Train a small CNN with ``jaxbn.nnx.BatchNorm`` on scikit-learn's digits (Flax NNX, optax).

    python examples/train_digits_nnx.py [--epochs N]

The NNX model is split into (graphdef, params, batch_stats) once per mode: ``model.train()`` /
``model.eval()`` set ``use_running_average`` on every BatchNorm, and the mode travels in the
graphdef. The train step is one ``jax.jit``-compiled function returning updated params,
batch_stats (``nnx.BatchStat``: running_mean, running_var, num_batches_tracked) and optimizer
state; at the end the trained state is put back into the model with ``nnx.update``.
"""

from __future__ import annotations

import argparse

from flax import nnx

from digits_cnn import NnxCNN, load_digits, nnx_setup, train


def main(epochs: int = 15, log=print) -> float:
    """Train and return the final eval accuracy (recomputed on the updated NNX model)."""
    data = load_digits()
    model = NnxCNN(rngs=nnx.Rngs(0))
    forwards, params, batch_stats = nnx_setup(model)
    params, batch_stats, _ = train(forwards, params, batch_stats, data, epochs=epochs, log=log)
    nnx.update(model, params, batch_stats)
    model.eval()
    acc = float((model(data.x_test).argmax(-1) == data.y_test).mean())
    log(f"eval accuracy of the updated nnx model: {acc:.4f}")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    main(parser.parse_args().epochs)
