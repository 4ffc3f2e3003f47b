"""jaxbn.testing.audit: a hand-written Flax twin of a torch model is checked for the norm settings a
state_dict does not carry (eps, momentum, the Flax class) before any number is compared."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn
from jaxbn import translate
from jaxbn.testing import audit, check_equivalence

F64 = torch.float64


def test_audit_names_every_core_parameter_mismatch_before_any_numbers():
    import flax.linen as nn

    import jaxbn.linen as jl

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.01)    # MobileNetV3's
            self.head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, momentum=None))

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    class Twin(nn.Module):  # written with torch's defaults
        flax_head: bool = True

        @nn.compact
        def __call__(self, x, train=False):
            x = jl.BatchNorm(axis=1, name="bn", param_dtype=jnp.float64)(
                translate.layers.Conv(3, 4, (3, 3), padding=1, name="conv", param_dtype=jnp.float64)(x), train=train)
            x = nn.Dense(3, name="head_0", param_dtype=jnp.float64)(x.mean((2, 3)))
            if self.flax_head:
                return nn.BatchNorm(momentum=0.9, name="head_1", param_dtype=jnp.float64)(x, use_running_average=not train)
            return jl.BatchNorm(name="head_1", param_dtype=jnp.float64)(x, train=train)

    net = Torch().double()
    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5))
    module = Twin()
    variables = module.init(jax.random.PRNGKey(0), x)
    mismatches = audit.norm_mismatches(net, module, variables, x, train=False)
    assert mismatches == [
        "bn: eps: torch 0.001, Flax 1e-05",
        "bn: momentum: torch 0.01, Flax 0.1",
        "head.1: momentum: torch None, Flax 0.09999999999999998 (flax.linen.BatchNorm)",
    ]
    ported, ported_variables = jaxbn.from_torch(net, torch.zeros(2, 3, 5, 5, dtype=F64))
    assert audit.norm_mismatches(net, ported, ported_variables, x, train=False) == []

    report = check_equivalence(net, Twin(flax_head=False), None, [x], steps=1, modes=("eval",))
    assert not report.ok and report.settings == mismatches[:2] + ["head.1: momentum: torch None, Flax 0.1"]
    lines = str(report).splitlines()
    assert lines[1:4] == [f"norm settings differ: {m}" for m in report.settings]
    assert "eval  step 1" in lines[4]
