"""benchmarks/step.py compares like with like: one ResNet-18 with each norm, and torch's."""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO_ROOT as ROOT


def load_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("step_benchmark", ROOT / "benchmarks" / "step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules are dataclasses: their module must be known
    spec.loader.exec_module(module)
    return module


step = load_step()


def param_count(norm: str) -> int:
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: step.resnet18(norm, jnp.float32).init(
        jax.random.key(0), x, train=False), x)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def test_every_norm_builds_torchs_resnet18():
    torch_model = step.torch_resnet18()
    torch_params = sum(p.numel() for p in torch_model.parameters())
    torch_norm_params = sum(
        p.numel() for m in torch_model.modules() if m.__class__.__name__ == "BatchNorm2d"
        for p in m.parameters()
    )
    normed = ("jaxbn", *step.VARIANTS, step.CONTROL, "flax", "flax accurate")
    assert {norm: param_count(norm) for norm in normed} == dict.fromkeys(normed, torch_params)
    assert param_count("no norm") == torch_params - torch_norm_params


def test_the_one_read_contender_traces_with_the_gpu_kernel():
    """On a GPU, "jaxbn one-read" is the library with its opt-in kernel on (lowered for CUDA
    here: one Triton call per norm in "jaxbn one-read", none in "jaxbn", the default)."""
    x = jnp.zeros((16, 64, 64, 3), jnp.float32)
    calls = {}
    for norm in ("jaxbn", "jaxbn one-read"):
        model = step.resnet18(norm, jnp.float32)
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
        lowered = jax.jit(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
        ).trace(variables, x).lower(lowering_platforms=("cuda",))
        calls[norm] = lowered.as_text().count("xla.gpu.triton")
    assert calls == {"jaxbn": 0, "jaxbn one-read": 20}


def test_variant_columns_line_up():
    times = {"jaxbn": 100.0, "jaxbn one-read": 95.0, "flax": 110.0, "flax accurate": 112.0,
             "no norm": 90.0}
    compile_s = {"jaxbn": 3.0, "flax": 3.0}
    table = step.render([("float32", 128, 128, times, compile_s)], "cpu", 5)
    header, rule, row = table.strip().splitlines()[-3:]
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" jaxbn one-read "].strip() == "95.0"
    assert cells[" jaxbn one-read/flax "].strip() == "0.86"
    without = {k: v for k, v in times.items() if k != "jaxbn one-read"}  # not run: no columns
    assert "one-read" not in step.render([("float32", 128, 128, without, compile_s)], "cpu", 5)
    assert len(header.split("|")) == len(rule.split("|")) == len(row.split("|"))


def test_the_control_column_is_the_second_jaxbn_copy_over_the_first():
    times = {"jaxbn": 100.0, "flax": 110.0, "flax accurate": 112.0, "no norm": 90.0}
    compile_s = {"jaxbn": 3.0, "flax": 3.0}
    plain = step.render([("float32", 16, 96, times, compile_s)], "cpu", 5)
    assert step.CONTROL not in plain
    table = step.render([("float32", 16, 96, times | {step.CONTROL: 103.0}, compile_s)], "cpu", 5)
    header, rule, row = table.strip().splitlines()[-3:]
    assert header.rstrip(" |").endswith(f"{step.CONTROL} / jaxbn")
    assert row.rstrip(" |").endswith("1.03")
    assert len(header.split("|")) == len(rule.split("|")) == len(row.split("|"))


def test_unknown_norm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="no norm"):
        step.make_norm("layernorm", jnp.float32)


@pytest.mark.slow
def test_jaxbn_and_flax_networks_compute_the_same_training_forward():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    outputs = []
    for norm in ("jaxbn", "flax"):
        model = step.resnet18(norm, jnp.float32)
        variables = model.init(jax.random.key(0), x, train=False)  # same conv/dense init per path
        logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x)
        outputs.append(np.asarray(logits))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)
