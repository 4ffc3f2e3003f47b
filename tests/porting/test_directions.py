"""torch state_dict <-> Flax variables (``jaxbn.porting.torch_to_flax`` / ``flax_to_torch``): a
BN-bearing model both ways, names (user rules, Flax's automatic names), strictness and bad input,
and the JAX-side variable files. torch is the oracle. Layouts alone: tests/porting/test_layouts.py."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn.linen as jl
import jaxbn.nnx as jnnx
from helpers import randomized
from jaxbn import porting
from jaxbn.porting import PortingError
from jaxbn.testing.oracle import to_numpy

F64 = jnp.float64


# ------------------------------------------------------------------ a BN-bearing model

class TorchNet(torch.nn.Module):
    def __init__(self, bn_stats: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4, track_running_stats=bn_stats)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5, momentum=None))

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        return self.head(x)


class FlaxNet(nn.Module):
    bn_stats: bool = True
    dtype: jnp.dtype = F64

    def setup(self):
        self.conv = nn.Conv(4, (3, 3), padding=1, use_bias=False, param_dtype=self.dtype)
        self.bn = jl.BatchNorm(track_running_stats=self.bn_stats, param_dtype=self.dtype)
        self.head = [nn.Dense(5, param_dtype=self.dtype), jl.BatchNorm(momentum=None, param_dtype=self.dtype)]

    def __call__(self, x, train=False):
        x = self.bn(self.conv(x), train=train).mean((1, 2))
        return self.head[1](self.head[0](x), train=train)


def _flax_target(bn_stats=True, dtype=F64):
    return porting.target_from_module(FlaxNet(bn_stats, dtype), jnp.zeros((2, 5, 5, 3), dtype))


def test_ported_bn_model_matches_torch_in_eval_and_round_trips_bit_exact():
    tnet = randomized(TorchNet().double())
    tnet.eval()
    variables, report = porting.torch_to_flax(tnet.state_dict(), _flax_target())
    assert report.ok and len(report.matched) == 13
    x = np.random.default_rng(2).normal(size=(3, 3, 5, 5))
    y = FlaxNet().apply(variables, np.moveaxis(x, 1, -1), train=False)
    np.testing.assert_allclose(y, to_numpy(tnet(torch.from_numpy(x))), rtol=0, atol=1e-12)
    assert variables["batch_stats"]["head_1"]["num_batches_tracked"].dtype == jnp.int64

    back, _ = porting.flax_to_torch(variables, tnet, as_torch=True)
    fresh = TorchNet().double()
    assert not fresh.load_state_dict(back, strict=True).missing_keys
    for k, t in tnet.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], t), k
        assert fresh.state_dict()[k].dtype == t.dtype


def test_round_trip_bf16_and_float32_bit_exact():
    for dtype, jdtype in [(torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16)]:
        tnet = randomized(TorchNet().to(dtype))
        variables, _ = porting.torch_to_flax(tnet.state_dict(), _flax_target(dtype=jdtype))
        back, _ = porting.flax_to_torch(variables, tnet.state_dict(), as_torch=True)
        for k, t in tnet.state_dict().items():
            assert back[k].dtype == t.dtype and torch.equal(back[k], t), (dtype, k)


def test_nnx_state_target():
    class NnxNet(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 4, (3, 3), padding=1, use_bias=False, param_dtype=F64, rngs=nnx.Rngs(0))
            self.bn = jnnx.BatchNorm(4, param_dtype=F64)
            self.head = nnx.List([nnx.Linear(4, 5, param_dtype=F64, rngs=nnx.Rngs(0)),
                                  jnnx.BatchNorm(5, momentum=None, param_dtype=F64)])

    tnet = randomized(TorchNet().double())
    model = NnxNet()
    state = nnx.state(model)
    pure, report = porting.torch_to_flax(tnet.state_dict(), state)
    assert report.ok
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    np.testing.assert_array_equal(model.head[1].running_var[...], to_numpy(tnet.head[1].running_var))
    np.testing.assert_array_equal(model.conv.kernel[...], np.transpose(to_numpy(tnet.conv.weight), (2, 3, 1, 0)))
    back, _ = porting.flax_to_torch(nnx.state(model), tnet)
    assert all(np.array_equal(back[k], to_numpy(v)) for k, v in tnet.state_dict().items())


# ------------------------------------------------------------------ strictness and bad input

def test_one_error_lists_missing_unexpected_and_shape_mismatch_together():
    sd = randomized(TorchNet().double()).state_dict()
    del sd["head.0.bias"]
    sd["extra.weight"] = torch.zeros(2, dtype=torch.float64)
    sd["bn.running_mean"] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(PortingError) as err:
        porting.torch_to_flax(sd, _flax_target())
    msg = str(err.value)
    assert 'Missing key(s): "params/head_0/bias"' in msg
    assert 'Unexpected key(s): "extra.weight"' in msg
    assert "size mismatch for bn.running_mean" in msg and "(7,)" in msg and "(4,)" in msg

    concrete = FlaxNet().init(jax.random.PRNGKey(0), jnp.zeros((2, 5, 5, 3), F64))
    variables, report = porting.torch_to_flax(sd, concrete, strict=False)
    assert report.missing_keys == ["params/head_0/bias"]
    assert report.unexpected_keys == ["extra.weight"] and len(report.shape_mismatches) == 1
    np.testing.assert_array_equal(variables["params"]["head_0"]["bias"], concrete["params"]["head_0"]["bias"])
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["running_mean"], np.zeros(4))
    np.testing.assert_array_equal(variables["params"]["bn"]["weight"], to_numpy(sd["bn.weight"]))


def test_missing_running_var_is_reported_like_torch():
    tnet = TorchNet().double()
    sd = tnet.state_dict()
    del sd["bn.running_var"]
    with pytest.raises(RuntimeError, match='Missing key.*"bn.running_var"'):
        TorchNet().double().load_state_dict(sd)
    with pytest.raises(PortingError, match='Missing key.*"batch_stats/bn/running_var"'):
        porting.torch_to_flax(sd, _flax_target())


def test_version1_checkpoint_without_counter_loads_zero_like_torch():
    tnet = randomized(TorchNet().double())
    sd = {k: v for k, v in tnet.state_dict().items() if "num_batches_tracked" not in k}
    fresh = TorchNet().double()
    fresh.load_state_dict(sd, strict=True)  # torch accepts: version-1 BatchNorm
    variables, report = porting.torch_to_flax(sd, _flax_target())
    assert report.ok and sorted(report.filled) == ["batch_stats/bn/num_batches_tracked",
                                                   "batch_stats/head_1/num_batches_tracked"]
    for name, flax_name in [("bn", "bn"), ("head.1", "head_1")]:
        counter = variables["batch_stats"][flax_name]["num_batches_tracked"]
        assert int(counter) == int(fresh.get_submodule(name).num_batches_tracked) == 0
        assert counter.dtype == jnp.int64
    flax_vars, rep = porting.torch_to_flax(sd, porting.structural_flax_target(sd))
    assert rep.ok and int(flax_vars["batch_stats"]["bn"]["num_batches_tracked"]) == 0


def test_bn_without_running_stats_receiving_them_is_an_error_with_a_hint():
    sd = TorchNet(bn_stats=True).double().state_dict()
    with pytest.raises(RuntimeError, match="Unexpected key.*bn.running_mean"):
        TorchNet(bn_stats=False).double().load_state_dict(sd)
    with pytest.raises(PortingError) as err:
        porting.torch_to_flax(sd, _flax_target(bn_stats=False))
    msg = str(err.value)
    assert '"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"' in msg
    assert "bn has no running statistics in the target" in msg and "track_running_stats=False" in msg


def test_dtype_mismatch_is_an_error_unless_cast():
    sd = randomized(TorchNet().double()).state_dict()
    float32_model = TorchNet()
    float32_model.load_state_dict(sd, strict=True)  # torch: float64 -> float32 silently
    assert float32_model.bn.weight.dtype == torch.float32
    with pytest.raises(PortingError, match="dtype mismatch for conv.weight.*float64.*float32.*cast=True"):
        porting.torch_to_flax(sd, _flax_target(dtype=jnp.float32))
    variables, _ = porting.torch_to_flax(sd, _flax_target(dtype=jnp.float32), cast=True)
    assert variables["params"]["bn"]["weight"].dtype == jnp.float32
    float64_model = TorchNet().double()
    with pytest.raises(PortingError, match="dtype mismatch for params/bn/weight.*float32.*float64"):
        porting.flax_to_torch(variables, float64_model)
    back, _ = porting.flax_to_torch(variables, float64_model, cast=True, as_torch=True)
    float64_model.load_state_dict(back, strict=True)
    sd["bn.num_batches_tracked"] = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(PortingError, match="bn.num_batches_tracked: copying a param with dtype float64"):
        porting.torch_to_flax(sd, _flax_target())


def test_int64_counter_into_int32_target_checks_range():
    target = {"batch_stats": {"bn": {"num_batches_tracked": jax.ShapeDtypeStruct((), jnp.int32)}}}
    ok, _ = porting.torch_to_flax({"bn.num_batches_tracked": torch.tensor(2**31 - 1)}, target)
    assert int(ok["batch_stats"]["bn"]["num_batches_tracked"]) == 2**31 - 1
    with pytest.raises(PortingError, match="does not fit the target's int32.*jax_enable_x64"):
        porting.torch_to_flax({"bn.num_batches_tracked": torch.tensor(2**31)}, target)


def test_user_rules_regex_list_and_callable():
    sd = randomized(TorchNet().double()).state_dict()
    renamed = {k.replace("head.", "classifier.").replace("bn.", "norm."): v for k, v in sd.items()}
    with pytest.raises(PortingError):
        porting.torch_to_flax(renamed, _flax_target())
    rules = [(r"^classifier\.", "head."), (r"^norm\.", "bn.")]
    a, _ = porting.torch_to_flax(renamed, _flax_target(), rules=rules)
    b, _ = porting.torch_to_flax(sd, _flax_target())
    jax.tree.map(np.testing.assert_array_equal, a, b)
    renamed["aux.weight"] = torch.zeros(1)

    def rule(key):
        if key.startswith("aux."):
            return None
        return re.sub(r"^classifier\.", "head.", re.sub(r"^norm\.", "bn.", key))

    c, report = porting.torch_to_flax(renamed, _flax_target(), rules=rule)
    assert report.ignored == ["aux.weight"]
    jax.tree.map(np.testing.assert_array_equal, c, b)
    back, _ = porting.flax_to_torch(c, renamed, rules=rule, strict=False)
    assert back["classifier.1.running_var"].shape == (5,) and "aux.weight" not in back


def test_structural_targets_invert_each_other():
    sd = randomized(TorchNet().double()).state_dict()
    variables, report = porting.torch_to_flax(sd, porting.structural_flax_target(sd))
    assert report.ok
    assert variables["params"]["head_0"]["kernel"].shape == (4, 5)
    back, _ = porting.flax_to_torch(variables, porting.structural_torch_target(variables))
    assert list(back) != [] and set(back) == set(sd)
    assert all(np.array_equal(back[k], to_numpy(v)) for k, v in sd.items())


# ------------------------------------------------------------------ JAX-side files

@pytest.mark.parametrize("ext", [".msgpack", ".safetensors"])
def test_save_and_load_variables_checked_against_target(tmp_path, ext):
    variables, _ = porting.torch_to_flax(randomized(TorchNet().double()).state_dict(), _flax_target())
    path = tmp_path / f"vars{ext}"
    porting.save_variables(variables, str(path))
    loaded, report = porting.load_variables(str(path), _flax_target())
    assert report.ok
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)

    bigger = porting.target_from_module(FlaxNet(bn_stats=False), jnp.zeros((2, 5, 5, 3), F64))
    bigger["params"]["head_0"]["kernel"] = jax.ShapeDtypeStruct((4, 6), F64)
    bigger["params"]["bn"]["weight"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    bigger["params"]["new"] = {"bias": jax.ShapeDtypeStruct((1,), F64)}
    with pytest.raises(PortingError) as err:
        porting.load_variables(str(path), bigger)
    msg = str(err.value)
    assert 'Missing key(s): "params/new/bias"' in msg
    assert '"batch_stats/bn/running_mean"' in msg.split("Unexpected")[1]
    assert "size mismatch for params/head_0/kernel" in msg
    assert "dtype mismatch for params/bn/weight" in msg


def test_without_x64_counters_become_int32_and_float64_is_never_silently_narrowed():
    sd32 = randomized(TorchNet()).state_dict()
    sd64 = randomized(TorchNet().double()).state_dict()
    with jax.enable_x64(False):
        variables, _ = porting.torch_to_flax(sd32, porting.structural_flax_target(sd32))
        counter = variables["batch_stats"]["bn"]["num_batches_tracked"]
        assert counter.dtype == jnp.int32 and int(counter) == 17
        sd32["bn.num_batches_tracked"] = torch.tensor(2**31)
        with pytest.raises(PortingError, match="does not fit the target's int32"):
            porting.torch_to_flax(sd32, porting.structural_flax_target(sd32))
        with pytest.raises((PortingError, TypeError), match="float64"):
            porting.torch_to_flax(sd64, porting.structural_flax_target(sd64))


# ------------------------------------------------------------------ Flax's automatic names


class CompactNet(nn.Module):
    """Compact submodules: Flax names them Conv_0, BatchNorm_0, Dense_0."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), padding=1, use_bias=False, param_dtype=F64)(x)
        x = jl.BatchNorm(param_dtype=F64)(x, train=train).mean((1, 2))
        return nn.Dense(5, param_dtype=F64)(x)


class TorchCompactNet(torch.nn.Module):
    """The torch model whose attributes carry Flax's automatic names."""

    def __init__(self):
        super().__init__()
        self.add_module("Conv_0", torch.nn.Conv2d(3, 4, 3, padding=1, bias=False))
        self.add_module("BatchNorm_0", torch.nn.BatchNorm2d(4))
        self.add_module("Dense_0", torch.nn.Linear(4, 5))

    def forward(self, x):
        x = self.BatchNorm_0(self.Conv_0(x)).mean((2, 3))
        return self.Dense_0(x)


def test_flax_automatic_names_stay_one_name_both_ways():
    target = porting.target_from_module(CompactNet(), jnp.zeros((2, 5, 5, 3), F64))
    variables = jax.tree.map(lambda s: np.random.default_rng(0).uniform(0.5, 1.5, s.shape).astype(s.dtype)
                             if jnp.issubdtype(s.dtype, jnp.floating) else np.full(s.shape, 3, s.dtype), target)
    keys = porting.structural_torch_target(variables)
    assert {"Conv_0.weight", "BatchNorm_0.weight", "BatchNorm_0.running_var", "Dense_0.weight"} <= set(keys)
    assert not any(k.startswith(("Conv.", "BatchNorm.", "Dense.")) for k in keys)

    tnet = TorchCompactNet().double().eval()
    state, _ = porting.flax_to_torch(variables, porting.structural_torch_target(variables), as_torch=True)
    tnet.load_state_dict(state, strict=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 5))
    np.testing.assert_allclose(CompactNet().apply(variables, np.moveaxis(x, 1, -1)),
                               to_numpy(tnet(torch.from_numpy(x))), rtol=0, atol=1e-12)

    sd = tnet.state_dict()
    assert "Conv_0" in porting.structural_flax_target(sd)["params"]
    back, report = porting.torch_to_flax(sd, target)
    assert report.ok
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    assert porting.canonical_name("layer1_0.bn1") == "layer1.0.bn1" == porting.canonical_name(("layer1", 0, "bn1"))
    assert porting.canonical_name("Conv.0") == "Conv_0" == porting.canonical_name(("Conv", 0))


def test_load_variables_matches_names_like_torch_to_flax(tmp_path):
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.downsample = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, bias=False), torch.nn.BatchNorm2d(3))
    model = torch.nn.Module()
    model.layer1 = torch.nn.Sequential(block)
    sd = model.double().state_dict()
    variables, _ = porting.torch_to_flax(sd, porting.structural_flax_target(sd))
    porting.save_variables(variables, str(tmp_path / "v.safetensors"))  # layer1_0/downsample_0, as the CLI writes
    nested = {c: {"layer1_0": {"downsample": {k.removeprefix("downsample_"): leaves
                                              for k, leaves in variables[c]["layer1_0"].items()}}}
              for c in variables}  # layer1_0/downsample/0 (an NNX-style list)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nested)
    loaded, report = porting.load_variables(str(tmp_path / "v.safetensors"), target)
    assert report.ok and len(report.matched) == 6
    jax.tree.map(np.testing.assert_array_equal, loaded, nested)
