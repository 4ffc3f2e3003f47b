"""Ops CNNs and their hybrids use (issue 23), ported end to end with :func:`jaxbn.from_torch`:
eval and three SGD steps in float64 against torch (the training tolerance: torch's own
sensitivity to a 1e-15 relative change of the weights, as in ``test_from_torch.py``)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import porting, translate
from helpers import jax_sgd_steps, perturbed, rel_diff, torch_sgd_steps

F64 = torch.float64


def assert_matches_torch(model: torch.nn.Module, x: torch.Tensor, eval_tol: float = 1e-12) -> None:
    """Eval within ``eval_tol`` (the emitted source too); three training steps within 100x
    torch's own sensitivity."""
    model = model.double()
    module, variables = jaxbn.from_torch(model, x)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x).numpy()
    y = module.apply(variables, jnp.asarray(x.numpy()), train=False)
    assert np.asarray(y).shape == expected.shape
    assert rel_diff(y, expected) <= eval_tol, rel_diff(y, expected)
    source = translate.emit_source(module.block)  # the file `python -m jaxbn port --emit` writes
    namespace: dict = {}
    exec(compile(source, "<emitted>", "exec"), namespace)  # noqa: S102
    emitted = namespace["Model"]().apply(variables, jnp.asarray(x.numpy()), train=False)
    np.testing.assert_array_equal(emitted, y)
    xs = [x, x * 0.5 + 0.1, x.flip(0)]
    ys = [None] * len(xs)
    t_out, t_state = torch_sgd_steps(model, xs, ys, 0.1, loss=lambda out, _: (out ** 2).mean())
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, 0.1, loss=lambda out, _: (out ** 2).mean())
    j_out, j_vars = jax_sgd_steps(module, variables, xs, ys, 0.1, loss=lambda out, _: jnp.mean(out ** 2))
    sens = max(1e-15, max(rel_diff(p, t) for p, t in zip(p_out, t_out)))
    assert max(rel_diff(j, t) for j, t in zip(j_out, t_out)) <= 100 * sens
    if t_state:
        j_state, _ = porting.flax_to_torch(j_vars, model)
        sens = max(1e-15, max(rel_diff(p_state[k], t_state[k]) for k in t_state))
        worst = max(t_state, key=lambda k: rel_diff(j_state[k], t_state[k]))
        assert rel_diff(j_state[worst], t_state[worst]) <= 100 * sens, worst


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class SplitExpand(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.bn(self.conv(x))
        a, b, c = torch.split(y, [1, 3, 2], dim=1)
        d, e = y.split(4, 1)
        gate = a.mean((2, 3), keepdim=True).expand(-1, 3, -1, -1)
        return torch.cat([b * gate, c.expand_as(e) + e, d.expand(2, -1, -1, -1, -1)[1]], 1)


class Attention(torch.nn.Module):
    """A CNN-attention hybrid: tokens from a conv, softmax(q k^T) v with @, bmm and einsum."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        t = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
        o = torch.bmm(a, v) + torch.einsum("bij,bjd->bid", a, v) + torch.matmul(a, v)
        return o.mean(1)


@pytest.mark.parametrize("model, shape", [(SplitExpand, (3, 4, 5, 5)), (Attention, (3, 3, 8, 8))],
                         ids=["split_expand", "attention"])
def test_ops_in_a_model_match_torch(model, shape):
    torch.manual_seed(0)
    assert_matches_torch(model(), _x(*shape))


class UNetish(torch.nn.Module):
    """An encoder-decoder: upsampling layers and F.interpolate back to a skip's size."""

    def __init__(self, up: torch.nn.Module, mode: str, align_corners):
        super().__init__()
        self.down = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.up = up
        self.skip = torch.nn.Conv2d(3, 4, 1)
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x):
        s = self.skip(x)
        y = self.up(torch.relu(self.bn(self.down(x))))
        y = torch.nn.functional.interpolate(y, size=s.shape[2:], mode=self.mode,
                                            align_corners=self.align_corners)
        return y + s


UPSAMPLERS = {
    "nearest_scale": (lambda: torch.nn.Upsample(scale_factor=1.5), "nearest", None),
    "nearest_size": (lambda: torch.nn.Upsample(size=(7, 5)), "nearest", None),
    "nearest2d": (lambda: torch.nn.UpsamplingNearest2d(scale_factor=2), "nearest", None),
    "bilinear2d": (lambda: torch.nn.UpsamplingBilinear2d(size=(6, 9)), "bilinear", True),
    "bilinear": (lambda: torch.nn.Upsample(scale_factor=1.7, mode="bilinear"), "bilinear", False),
    "bilinear_recompute": (lambda: torch.nn.Upsample(scale_factor=1.7, mode="bilinear",
                                                     recompute_scale_factor=True), "bilinear", None),
}


@pytest.mark.parametrize("name", sorted(UPSAMPLERS))
def test_upsampling_layers_match_torch(name):
    up, mode, corners = UPSAMPLERS[name]
    torch.manual_seed(1)
    assert_matches_torch(UNetish(up(), mode, corners), _x(3, 3, 9, 10))


def test_unsupported_interpolation_mode_is_refused():
    model = UNetish(torch.nn.Upsample(scale_factor=2, mode="bicubic"), "nearest", None).double()
    with pytest.raises(porting.UnsupportedError, match="bicubic"):
        jaxbn.from_torch(model, _x(2, 3, 8, 8))


class PReLUNet(torch.nn.Module):
    def __init__(self, num_parameters):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.act = torch.nn.PReLU(num_parameters, init=0.1)
        self.drop = torch.nn.Dropout2d(0.3)

    def forward(self, x):
        return self.drop(self.act(self.bn(self.conv(x))))


@pytest.mark.parametrize("num_parameters", [1, 4])
def test_prelu_weight_is_trained_under_torch_name(num_parameters):
    torch.manual_seed(2)
    model = PReLUNet(num_parameters).double()
    model.drop.p = 0.0  # training steps compared with torch: no random mask
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(-0.5, 0.5, num_parameters))
    assert_matches_torch(model, _x(3, 3, 6, 6))
    module, variables = jaxbn.from_torch(model, _x(3, 3, 6, 6))
    assert variables["params"]["act"]["weight"].shape == (num_parameters,)
    state, _ = porting.flax_to_torch(variables, model, as_torch=True)
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("layer", [torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d])
def test_channel_dropout_drops_whole_channels_in_training(layer):
    spatial = int(layer.__name__[-2])
    model = torch.nn.Sequential(layer(0.5)).double()
    x = _x(16, 8, *(3,) * spatial) + 5.0
    module, variables = jaxbn.from_torch(model, x)
    xj = jnp.asarray(x.numpy())
    np.testing.assert_array_equal(module.apply(variables, xj, train=False), xj)
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, xj, train=True)
    y = np.asarray(module.apply(variables, xj, train=True, rngs={"dropout": jax.random.PRNGKey(0)}))
    per_channel = y.reshape(16, 8, -1)
    dropped = np.all(per_channel == 0, axis=2)
    kept = np.all(per_channel != 0, axis=2)
    assert np.all(dropped | kept)  # whole channels only
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(per_channel[kept], 2 * x.numpy().reshape(16, 8, -1)[kept], rtol=1e-15)


def test_channel_dropout_without_batch_axis_is_refused():
    model = torch.nn.Sequential(torch.nn.Dropout2d(0.5)).double()
    with pytest.raises(porting.UnsupportedError, match="Dropout2d on a 3-d input"):
        jaxbn.from_torch(model, _x(8, 3, 3))


class Norms(torch.nn.Module):
    """A ConvNeXt-like block: GroupNorm after a conv, LayerNorm over channels-last tokens."""

    def __init__(self, group_kwargs, layer_kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.gn = torch.nn.GroupNorm(num_channels=6, **group_kwargs)
        self.ln = torch.nn.LayerNorm(**layer_kwargs)
        self.bn = torch.nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.gn(self.conv(x))
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.bn(y)


NORMS = {
    "defaults": (dict(num_groups=3), dict(normalized_shape=6)),
    "eps_no_affine": (dict(num_groups=2, eps=0.3, affine=False),
                      dict(normalized_shape=(6,), eps=0.2, elementwise_affine=False)),
    "no_bias_2d_shape": (dict(num_groups=6), dict(normalized_shape=(5, 6), bias=False)),
    "one_group": (dict(num_groups=1, eps=1e-3), dict(normalized_shape=[6], eps=1e-6)),
}


def _randomize_affine(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("gn.", "ln.")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 1)
    return model


@pytest.mark.parametrize("name", sorted(NORMS))
def test_layer_and_group_norm_match_torch(name):
    torch.manual_seed(3)
    model = _randomize_affine(Norms(*NORMS[name]).double())
    assert_matches_torch(model, _x(3, 3, 4, 5) * 3 + 1)
    module, variables = jaxbn.from_torch(model, _x(3, 3, 4, 5))
    state, _ = porting.flax_to_torch(variables, model, as_torch=True)
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_layer_and_group_norm_in_float32(name):
    torch.manual_seed(3)
    model = _randomize_affine(Norms(*NORMS[name]).double()).float().eval()
    x = (_x(3, 3, 4, 5) * 3 + 1).float()
    module, variables = jaxbn.from_torch(model, x)
    y = np.asarray(module.apply(variables, jnp.asarray(x.numpy()), train=False))
    assert y.dtype == np.float32
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5)


TRANSPOSED = {
    "1d": (1, dict(in_channels=4, out_channels=3, kernel_size=3, stride=2)),
    "2d_default": (2, dict(in_channels=4, out_channels=6, kernel_size=2, stride=2)),
    "2d_all": (2, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 3),
                       padding=(1, 0), output_padding=(1, 2), groups=2, dilation=(1, 2))),
    "2d_big_padding": (2, dict(in_channels=4, out_channels=2, kernel_size=3, stride=1,
                               padding=3, bias=False)),
    "2d_depthwise": (2, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1,
                             output_padding=1, groups=4)),
    "3d": (3, dict(in_channels=4, out_channels=2, kernel_size=(2, 3, 2), stride=(1, 2, 2),
                   padding=(0, 1, 1), output_padding=(0, 1, 0), dilation=(2, 1, 1))),
}


class Decoder(torch.nn.Module):
    def __init__(self, spatial, kwargs):
        super().__init__()
        conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[spatial - 1]
        bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[spatial - 1]
        up = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)[spatial - 1]
        self.conv = conv(3, 4, 1)
        self.up = up(**kwargs)
        self.bn = bn(kwargs["out_channels"])

    def forward(self, x):
        return self.bn(self.up(torch.relu(self.conv(x))))


@pytest.mark.parametrize("name", sorted(TRANSPOSED))
def test_conv_transpose_matches_torch_and_round_trips(name):
    spatial, kwargs = TRANSPOSED[name]
    torch.manual_seed(4)
    model = Decoder(spatial, kwargs).double()
    x = _x(2, 3, *(5, 6, 4)[:spatial])
    assert_matches_torch(model, x)
    module, variables = jaxbn.from_torch(model, x)
    state, _ = porting.flax_to_torch(variables, model, as_torch=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(state, strict=True)


class Padded(torch.nn.Module):
    """Padding layers and F.pad (negative pads too) between convs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.pads = torch.nn.Sequential(
            torch.nn.ReflectionPad2d((1, 2, 0, 1)), torch.nn.ReplicationPad2d(1),
            torch.nn.ZeroPad2d((0, 1, 2, 0)), torch.nn.ConstantPad2d(1, 0.5),
            torch.nn.CircularPad2d((1, 0, 0, 2)))
        self.conv1d = torch.nn.Conv1d(4, 2, 2)
        self.pad1d = torch.nn.ReflectionPad1d(2)

    def forward(self, x):
        y = self.pads(self.bn(self.conv(x)))
        y = torch.nn.functional.pad(y, (-1, 2, 1, -2), mode="replicate")
        y = torch.nn.functional.pad(y, (1, -1, 0, 1), value=-0.25)
        z = torch.nn.functional.pad(y, (2, 1, 1, 2), mode="reflect")
        return self.pad1d(self.conv1d(z.flatten(2)))


def test_padding_layers_and_pad_match_torch():
    torch.manual_seed(6)
    assert_matches_torch(Padded(), _x(2, 3, 7, 6))


class SizedDecoder(torch.nn.Module):
    """``ConvTranspose2d(x, output_size=skip.size())``: the output padding chosen per call."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(3, 4, 3, stride=3, padding=1)
        self.up = torch.nn.ConvTranspose2d(4, 3, 3, stride=3, padding=1, output_padding=1)

    def forward(self, x):
        return self.up(self.down(x), output_size=x.size()) + x


@pytest.mark.parametrize("shape", [(2, 3, 9, 10), (2, 3, 8, 7)])
def test_conv_transpose_output_size_matches_torch(shape):
    torch.manual_seed(7)
    assert_matches_torch(SizedDecoder(), _x(*shape))


@pytest.mark.parametrize("mode, corners", [("nearest", None), ("bilinear", False), ("bilinear", True)])
@pytest.mark.parametrize("scale", [1.7, 0.45, 3])
def test_interpolate_in_float32(mode, corners, scale):
    """float32 indices and weights, computed in float32 as torch does (nearest: the same
    elements exactly; linear: within a few ulp -- torch's CPU kernel picks a separable pass with
    renormalized weights or a direct one by size and thread count)."""
    x = _x(2, 3, 7, 9).float()
    expected = torch.nn.functional.interpolate(x, scale_factor=scale, mode=mode, align_corners=corners)
    y = translate.torch_ops.interpolate(jnp.asarray(x.numpy()), scale_factor=scale, mode=mode,
                                        align_corners=corners)
    assert y.dtype == jnp.float32
    if mode == "nearest":
        np.testing.assert_array_equal(np.asarray(y), expected.numpy())
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), rtol=0, atol=4e-6)


def test_hardsigmoid_gradient_is_torch_s_bit_for_bit():
    """torch's CPU hardsigmoid backward multiplies by float32(1/6) in float64 too (pinned in
    docs/semantics.md): the port's gradient is torch's, at the flat parts' edges included."""
    from jaxbn.translate import torch_ops

    x = np.array([-4.0, -3.0, -2.5, -1e-3, 0.0, 1.0, 2.999, 3.0, 5.0])
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.hardsigmoid(t).sum().backward()
    grad = jax.grad(lambda v: torch_ops.hardsigmoid(v).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), t.grad.numpy())
