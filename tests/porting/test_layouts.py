"""torch's tensor layouts as Flax's (``jaxbn.porting.layouts``): a ported conv or linear layer gives
torch's outputs, and why a port writes torch's padding out instead of Flax's ``'SAME'``."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import randomized
from jaxbn import porting
from jaxbn.testing.oracle import to_numpy

F64 = jnp.float64


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_kernel_layout_gives_torch_outputs(nd):
    conv = getattr(torch.nn, f"Conv{nd}d")(3, 4, kernel_size=3, stride=2, padding=1, groups=1).double()
    randomized(conv)
    x = np.random.default_rng(0).normal(size=(2, 3) + (7,) * nd)
    ref = to_numpy(conv(torch.from_numpy(x)))
    flax_conv = nn.Conv(4, (3,) * nd, strides=2, padding=[(1, 1)] * nd, param_dtype=F64)
    target = porting.target_from_module(flax_conv, jnp.zeros((2,) + (7,) * nd + (3,), F64))
    variables, report = porting.torch_to_flax(conv.state_dict(), target)
    assert report.matched[0].transform == f"conv{nd}d"
    y = flax_conv.apply(variables, np.moveaxis(x, 1, -1))
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), ref, rtol=0, atol=1e-12)

def test_linear_layout_gives_torch_outputs():
    lin = randomized(torch.nn.Linear(5, 3).double())
    x = np.random.default_rng(1).normal(size=(4, 5))
    dense = nn.Dense(3, param_dtype=F64)
    variables, _ = porting.torch_to_flax(lin.state_dict(), porting.target_from_module(dense, jnp.zeros((1, 5), F64)))
    np.testing.assert_allclose(dense.apply(variables, x), to_numpy(lin(torch.from_numpy(x))), rtol=0, atol=1e-12)

def test_torch_padding_is_not_flax_same_for_strided_convs():
    """Why ports use explicit padding: torch pads k//2 on both sides, 'SAME' pads more at the end."""
    conv = randomized(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1).double())
    x = np.random.default_rng(3).normal(size=(1, 2, 8, 8))
    ref = to_numpy(conv(torch.from_numpy(x)))
    diffs = {}
    for padding in ("SAME", ((1, 1), (1, 1))):
        flax_conv = nn.Conv(3, (3, 3), strides=2, padding=padding, param_dtype=F64)
        variables, _ = porting.torch_to_flax(conv.state_dict(), porting.target_from_module(flax_conv, jnp.zeros((1, 8, 8, 2), F64)))
        y = np.moveaxis(np.asarray(flax_conv.apply(variables, np.moveaxis(x, 1, -1))), -1, 1)
        diffs[str(padding)] = np.abs(y - ref).max()
    assert diffs["SAME"] > 1e-3 and diffs[str(((1, 1), (1, 1)))] < 1e-12
