"""Third-party model zoos through ``jaxbn.from_torch``: timm and segmentation_models_pytorch, as a
new user brings them (random init, float64).

Per model: 1-d parameters perturbed (BatchNorm affine non-trivial) and two train forwards (non-
trivial buffers), then eval within 1e-9 of torch, two SGD steps (on the mean square of the
output, so every model trains the same way) within 100x torch's own sensitivity (the same steps
with every weight perturbed by 1e-15 relative), BatchNorm counters equal, and the strict round trip
back to torch bit-exact. The default run keeps three small models (timm's ``BatchNormAct2d``, a
U-Net passing lists between blocks, torchvision's LR-ASPP returning a dict); the rest are marked ``zoo`` and run with ``pytest -m zoo``
(minutes each: too long for the default run).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import (assert_round_trip_exact, import_torchvision, jax_sgd_steps, perturbed, rel_diff,
                     torch_sgd_steps, warmed)
from jaxbn import porting

F64 = torch.float64

TIMM = ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100", "regnetx_002", "regnety_002",
        "densenet121", "cspresnet50", "res2net50_14w_8s", "ecaresnet26t", "resnest14d", "hrnet_w18_small",
        "vgg11_bn", "mobilevit_xxs", "convnext_atto", "resnetv2_50x1_bit"]
SEGMENTATION = ["smp_unet_resnet18", "torchvision_lraspp_mobilenet_v3_large", "torchvision_fcn_resnet50"]
FAST = {"regnetx_002", "smp_unet_resnet18", "torchvision_lraspp_mobilenet_v3_large"}


def zoo_model(name: str) -> torch.nn.Module:
    import_torchvision()  # timm and smp import torchvision
    torch.manual_seed(0)
    if name == "smp_unet_resnet18":
        import segmentation_models_pytorch as smp

        model = smp.Unet("resnet18", encoder_weights=None, classes=3)
    elif name.startswith("torchvision_"):  # returns a dict ({'out': ..., 'aux': ...})
        build = getattr(import_torchvision().models.segmentation, name.removeprefix("torchvision_"))
        extra = {} if "lraspp" in name else {"aux_loss": True}
        model = build(weights=None, weights_backbone=None, num_classes=3, **extra)
        for module in model.modules():  # FCN's head: random masks cannot be compared step by step
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
    return warmed(model.train(), (4, 3, 64, 64), scale=0.1)


def square(out, y):
    """The mean square of the output (of each entry of a dict output, summed)."""
    return sum((v ** 2).mean() for v in out.values()) if isinstance(out, dict) else (out ** 2).mean()


def jax_square(out, y):
    return sum(jnp.mean(v ** 2) for v in out.values()) if isinstance(out, dict) else jnp.mean(out ** 2)


def max_diff(a, b):
    if isinstance(b, dict):
        assert a.keys() == b.keys()
        return max(max_diff(a[k], b[k]) for k in b)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def max_rel(a, b):
    return max(max_rel(a[k], b[k]) for k in b) if isinstance(b, dict) else rel_diff(a, b)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.zoo)
                                  for n in [*TIMM, *SEGMENTATION]])
def test_zoo_model_matches_torch(name):
    model = zoo_model(name)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 64, 64, generator=g, dtype=F64) for _ in range(2)]
    ys = [None, None]
    ported = jaxbn.from_torch(model, xs[0])

    evaluated = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = evaluated(xs[0])
    expected = {k: v.numpy() for k, v in expected.items()} if isinstance(expected, dict) else expected.numpy()
    actual = jax.jit(lambda v, x: ported.module.apply(v, x, train=False))(ported.variables, jnp.asarray(xs[0].numpy()))
    assert max_diff(actual, expected) <= 1e-9

    lr = 0.05
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr, loss=square)
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, lr, loss=square)
    j_out, j_vars = jax_sgd_steps(ported.module, ported.variables, xs, ys, lr, loss=jax_square)
    j_state, _ = porting.flax_to_torch(j_vars, model)
    sensitivity = max(max(max_rel(p, t) for p, t in zip(p_out, t_out)),
                      max(rel_diff(p_state[k], t_state[k]) for k in t_state))
    assert max(max_rel(j, t) for j, t in zip(j_out, t_out)) <= 100 * sensitivity
    worst = max(t_state, key=lambda k: rel_diff(j_state[k], t_state[k]))
    assert rel_diff(j_state[worst], t_state[worst]) <= 100 * sensitivity, (worst, sensitivity)
    for k in t_state:
        if k.endswith("num_batches_tracked"):
            assert np.array_equal(j_state[k], t_state[k]), k

    assert_round_trip_exact(model, ported.variables)
