"""Hypothesis: random shapes, feature axes, flags and step sequences against torch in float64.

Shapes include size-1 and size-0 axes, so the example space covers the one-value-per-channel
error (both must raise the same ValueError) and the empty-batch quirk.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxbn
from helpers import LayerPair, random_input, random_params, random_state
from jaxbn import BatchNormFlags
from jaxbn.testing import oracle as torch_oracle

flag_values = st.fixed_dictionaries({
    "training": st.booleans(),
    "track_running_stats": st.booleans(),
    "momentum": st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    "eps": st.one_of(st.just(1e-5), st.floats(1e-6, 1.0)),
})


@st.composite
def layers(draw):
    """A layer (rank, axis, C, buffers, affine) and a few steps of (batch shape, flags)."""
    rank = draw(st.integers(2, 5))
    axis = draw(st.integers(-rank, rank - 1))
    num_features = draw(st.integers(1, 4))
    other_dims = st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        dims = draw(other_dims)
        if draw(st.integers(0, 7)) == 0:  # now and then an empty batch (N = 0 or a spatial 0)
            dims[draw(st.integers(0, rank - 2))] = 0
        dims.insert(axis % rank, num_features)
        steps.append((tuple(dims), BatchNormFlags(axis=axis, **draw(flag_values))))
    return {
        "rank": rank, "num_features": num_features, "steps": steps,
        "buffers": draw(st.booleans()), "affine": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_matches_torch_on_random_layers(layer):
    rng = np.random.default_rng(layer["seed"])
    num_features = layer["num_features"]
    state = random_state(rng, num_features) if layer["buffers"] else None
    params = random_params(rng, num_features) if layer["affine"] else None
    first_flags = layer["steps"][0][1]
    pair = LayerPair.build(num_features, layer["rank"], state, params, first_flags)
    for step, (shape, flags) in enumerate(layer["steps"]):
        x = random_input(rng, shape)
        event("empty batch" if x.size == 0 else f"rank {len(shape)}")
        if np.prod(shape) // num_features == 1 and (flags.training or state is None):
            # one value per channel with batch statistics: both refuse, with the same message
            event("one value per channel")
            with pytest.raises(ValueError, match="Expected more than 1 value per channel") as ours:
                jaxbn.batch_norm(jnp.asarray(x), pair.state, params, flags)
            torch_oracle.apply_flags(pair.module, flags)
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                torch_oracle.forward(pair.module, x, flags.axis)
            assert str(shape) in str(ours.value)
            return
        pair.step_and_compare(x, flags, what=f"step {step} shape {shape} {flags}")
