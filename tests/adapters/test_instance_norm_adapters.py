"""``jaxbn.linen.InstanceNorm`` / ``jaxbn.nnx.InstanceNorm`` against torch.nn.InstanceNorm{1,2,3}d.

Every (training, buffers, tracking, momentum, affine) row through each adapter, reached the way its
users reach it (linen: call-time overrides; NNX: attributes assigned after construction); a live
torch module and each adapter stepped through a sequence of attribute flips for 1d/2d/3d in both
layouts; torch's defaults; linen's mode and ``mutable`` rules (instance norm writes its buffers
in eval too); lazy ``num_features``; a torch ``state_dict`` ported into a linen model. Torch is the
oracle for every expected value (float64).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn.linen
import jaxbn.nnx
import jaxbn.porting
from helpers import REPO_ROOT
from jaxbn import BatchNormFlags, BatchNormParams, BatchNormState
from jaxbn.functional.torch_rules import INSTANCE_NORM
from jaxbn.testing import oracle as torch_oracle

C = 3
TOL = 1e-10
SHAPES = {3: (4, 7, C), 4: (3, 4, 5, C), 5: (2, 3, 2, 4, C)}  # channels-last, N first


def data(ndim: int, axis: int, seed: int) -> np.ndarray:
    """Batched float64 input of rank ``ndim`` with the C features on ``axis``."""
    shape = list(SHAPES[ndim])
    shape[-1], shape[axis] = shape[axis], shape[-1]
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * 2.0 + rng.uniform(-3, 3, size=shape)


def nonfresh_state(rng: np.random.Generator) -> BatchNormState:
    return BatchNormState(rng.normal(size=C), rng.uniform(0.5, 2.0, size=C), np.asarray(7, np.int64))


def random_params(rng: np.random.Generator) -> BatchNormParams:
    return BatchNormParams(rng.uniform(0.5, 1.5, size=C), rng.normal(size=C))


def assert_state_close(actual: BatchNormState | None, expected: BatchNormState | None) -> float:
    assert (actual is None) == (expected is None)
    if expected is None:
        return 0.0
    for name, a, e in zip(BatchNormState._fields, actual, expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=TOL, err_msg=name)
    assert int(actual.num_batches_tracked) == int(expected.num_batches_tracked)
    return float(max(np.max(np.abs(np.asarray(a) - e)) for a, e in zip(actual[:2], expected[:2])))


class LinenLayer:
    """A linen InstanceNorm built like the torch module; ``flags`` become call-time overrides."""

    def __init__(self, state, params, flags: BatchNormFlags):
        self.module = jaxbn.linen.InstanceNorm(
            eps=flags.eps, momentum=flags.momentum, affine=params is not None,
            track_running_stats=state is not None, axis=flags.axis, param_dtype=jnp.float64,
        )
        self.variables = {}
        if params is not None:
            self.variables["params"] = jax.tree.map(jnp.asarray, params._asdict())
        if state is not None:
            self.variables["batch_stats"] = jax.tree.map(jnp.asarray, state._asdict())

    def __call__(self, x, flags: BatchNormFlags):
        y, updates = self.module.apply(
            self.variables, jnp.asarray(x), train=flags.training,
            track_running_stats=flags.track_running_stats, momentum=flags.momentum,
            eps=flags.eps, mutable=["batch_stats"],
        )
        self.variables = {**self.variables, **updates}
        return y

    def state(self) -> BatchNormState | None:
        stats = self.variables.get("batch_stats")
        return None if stats is None else BatchNormState(**stats)


class NNXLayer:
    """An NNX InstanceNorm built like the torch module; ``flags`` are assigned as attributes."""

    def __init__(self, state, params, flags: BatchNormFlags):
        self.module = jaxbn.nnx.InstanceNorm(
            C, affine=params is not None, track_running_stats=state is not None,
            axis=flags.axis, param_dtype=jnp.float64,
        )
        loaded = {**(state._asdict() if state is not None else {}),
                  **(params._asdict() if params is not None else {})}
        for name, value in loaded.items():
            getattr(self.module, name)[...] = jnp.asarray(value)

    def __call__(self, x, flags: BatchNormFlags):
        m = self.module
        m.track_running_stats, m.momentum, m.eps = flags.track_running_stats, flags.momentum, flags.eps
        m.train() if flags.training else m.eval()
        return m(jnp.asarray(x))

    def state(self) -> BatchNormState | None:
        if self.module.running_mean is None:
            return None
        return BatchNormState(*(getattr(self.module, n)[...] for n in BatchNormState._fields))


LAYERS = {"linen": LinenLayer, "nnx": NNXLayer}
ROWS = list(itertools.product([True, False], [True, False], [True, False]))


def torch_step(module: torch.nn.Module, x: np.ndarray, flags: BatchNormFlags) -> np.ndarray:
    torch_oracle.apply_flags(module, flags)
    with torch.no_grad():
        return torch_oracle.to_numpy(torch_oracle.forward(module, x, flags.axis))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize(
    "training,buffers,tracking", ROWS, ids=[f"train{t}-buffers{b}-track{k}" for t, b, k in ROWS]
)
@pytest.mark.parametrize("adapter", sorted(LAYERS))
def test_every_row_matches_torch_instance_norm(adapter, training, buffers, tracking, momentum, affine):
    rng = np.random.default_rng(0)
    x = data(4, -1, seed=1)
    state = nonfresh_state(rng) if buffers else None
    params = random_params(rng) if affine else None
    flags = BatchNormFlags(training, tracking, momentum, eps=1e-3, axis=-1)
    layer = LAYERS[adapter](state, params, flags)
    if buffers is False and tracking and not training:
        # torch: "Expected running_mean and running_var to be defined when use_input_stats is false"
        with pytest.raises(ValueError, match="use_input_stats is false"):
            layer(x, flags)
        with pytest.raises(RuntimeError, match="use_input_stats is false"):
            torch_oracle.instance_norm(x, state, params, flags)
        return

    y = layer(x, flags)
    y_torch, state_torch = torch_oracle.instance_norm(x, state, params, flags)

    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)
    assert_state_close(layer.state(), state_torch)


# torch's attribute flips, one per call: eval with buffers, then eval with tracking switched
# off (instance statistics *and a buffer update in eval*), momentum=None (no update at all),
# training, training untracked, and back to eval with tracking.
SEQUENCE = [
    BatchNormFlags(training=True, track_running_stats=True, momentum=0.1),
    BatchNormFlags(training=False, track_running_stats=True, momentum=0.1),
    BatchNormFlags(training=False, track_running_stats=False, momentum=0.3),
    BatchNormFlags(training=True, track_running_stats=True, momentum=None),
    BatchNormFlags(training=True, track_running_stats=False, momentum=0.5, eps=1e-2),
    BatchNormFlags(training=False, track_running_stats=True, momentum=0.1),
]


@pytest.mark.parametrize("axis", [1, -1], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("ndim", [3, 4, 5], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("adapter", sorted(LAYERS))
def test_a_sequence_of_attribute_flips_tracks_a_live_torch_module(adapter, ndim, axis):
    rng = np.random.default_rng(ndim)
    state, params = nonfresh_state(rng), random_params(rng)
    first = dict(vars(SEQUENCE[0]), axis=axis)
    torch_module = torch_oracle.build_module(
        C, ndim, state, params, BatchNormFlags(**first), torch.float64, family=INSTANCE_NORM)
    layer = LAYERS[adapter](state, params, BatchNormFlags(**first))
    assert type(torch_module).__name__ == f"InstanceNorm{ndim - 2}d"
    previous = None
    for step, flags in enumerate(SEQUENCE):
        flags = BatchNormFlags(**dict(vars(flags), axis=axis))
        x = data(ndim, axis, seed=10 * ndim + step)
        y = layer(x, flags)
        y_torch = torch_step(torch_module, x, flags)
        np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL, err_msg=f"step {step}")
        assert_state_close(layer.state(), torch_oracle.module_state(torch_module))
        current = np.asarray(layer.state().running_mean)
        # The sequence is only a test if the buffers really move where torch moves them. (Where
        # they do not, they may still change by an ulp: torch, like jaxbn, averages N copies.)
        moved = previous is not None and not np.allclose(current, previous, rtol=1e-14, atol=0)
        assert moved == (step in (2, 4)) or step == 0, f"step {step}: buffers moved={moved}"
        previous = current


@pytest.mark.parametrize("adapter", sorted(LAYERS))
def test_defaults_are_torchs_no_affine_no_buffers(adapter):
    torch_module = torch.nn.InstanceNorm2d(C).double()
    x = data(4, -1, seed=3)
    if adapter == "linen":
        module = jaxbn.linen.InstanceNorm(param_dtype=jnp.float64)
        variables = module.init(jax.random.key(0), jnp.asarray(x))  # no mode needed
        assert variables == {}
        y = module.apply(variables, jnp.asarray(x))
        assert (module.affine, module.track_running_stats) == (False, False)
    else:
        module = jaxbn.nnx.InstanceNorm(C, param_dtype=jnp.float64)
        assert module.weight is None and module.running_mean is None
        assert nnx.state(module) == nnx.State({})
        y = module(jnp.asarray(x))
    assert (module.eps, module.momentum) == (torch_module.eps, torch_module.momentum)
    y_torch = torch_oracle.forward(torch_module, x, axis=-1).numpy()
    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)


def test_linen_needs_a_mode_only_when_the_call_tracks():
    x = jnp.asarray(data(4, -1, seed=4))
    untracked = jaxbn.linen.InstanceNorm(affine=True, param_dtype=jnp.float64)
    variables = untracked.init(jax.random.key(0), x)
    untracked.apply(variables, x)
    with pytest.raises(ValueError, match="InstanceNorm needs to know whether it is training"):
        untracked.apply(variables, x, track_running_stats=True)
    tracked = jaxbn.linen.InstanceNorm(track_running_stats=True, param_dtype=jnp.float64)
    with pytest.raises(ValueError, match="train=True/False"):
        tracked.init(jax.random.key(0), x)
    variables = tracked.init(jax.random.key(0), x, train=False)
    # ... and flipping tracking off at call time makes the mode irrelevant again, as in torch.
    tracked.apply(variables, x, track_running_stats=False, mutable=["batch_stats"])


def test_linen_eval_with_tracking_flipped_off_updates_buffers_and_needs_mutable():
    x = jnp.asarray(data(4, -1, seed=5))
    module = jaxbn.linen.InstanceNorm(track_running_stats=True, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x, train=False)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(variables["batch_stats"]["running_mean"], np.zeros(C))  # init: no update
    module.apply(variables, x, train=False)  # eval with tracking: running stats, no write
    with pytest.raises(ValueError, match=r"even in eval.*mutable=\['batch_stats'\]"):
        module.apply(variables, x, train=False, track_running_stats=False)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        module.apply(variables, x, train=True)

    _, updates = module.apply(variables, x, train=False, track_running_stats=False,
                              mutable=["batch_stats"])
    torch_module = torch.nn.InstanceNorm2d(C, track_running_stats=True).double().eval()
    torch_module.track_running_stats = False
    torch_oracle.forward(torch_module, np.asarray(x), axis=-1)
    assert_state_close(BatchNormState(**updates["batch_stats"]), torch_oracle.module_state(torch_module))
    assert not np.array_equal(updates["batch_stats"]["running_mean"], np.zeros(C))


@pytest.mark.parametrize("axis", [-1, 1], ids=["channels-last", "nchw"])
def test_linen_infers_num_features_like_lazy_instance_norm(axis):
    x = data(3, axis, seed=6)
    module = jaxbn.linen.InstanceNorm(affine=True, track_running_stats=True, axis=axis,
                                      param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), jnp.asarray(x), train=True)
    y, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    lazy = torch.nn.LazyInstanceNorm1d(affine=True, track_running_stats=True).double()
    y_torch = torch_oracle.forward(lazy, x, axis=axis).detach().numpy()
    assert lazy.num_features == C == variables["params"]["weight"].shape[0]
    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)
    assert_state_close(BatchNormState(**updates["batch_stats"]), torch_oracle.module_state(lazy))


def test_nnx_under_jit_follows_attribute_flips_and_view():
    rng = np.random.default_rng(7)
    state, params = nonfresh_state(rng), random_params(rng)
    flags = BatchNormFlags(training=True, track_running_stats=True, momentum=0.1, axis=-1)
    layer = NNXLayer(state, params, flags)
    torch_module = torch_oracle.build_module(C, 4, state, params, flags, torch.float64,
                                             family=INSTANCE_NORM)

    @nnx.jit
    def call(module, x):
        return module(x)

    for step, training, tracking in [(0, True, True), (1, False, True), (2, False, False)]:
        flags = BatchNormFlags(training=training, track_running_stats=tracking, momentum=0.1, axis=-1)
        layer.module.track_running_stats = tracking
        model = nnx.view(layer.module, use_running_average=not training)
        x = data(4, -1, seed=20 + step)
        y = call(model, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(y), torch_step(torch_module, x, flags), rtol=0, atol=TOL)
        assert_state_close(layer.state(), torch_oracle.module_state(torch_module))


def test_adapters_reject_what_instance_norm_does_not_have():
    x = jnp.asarray(data(4, -1, seed=8))
    with pytest.raises(TypeError, match="axis_name"):
        jaxbn.linen.InstanceNorm(axis_name="batch")
    with pytest.raises(TypeError, match="axis_name"):
        jaxbn.nnx.InstanceNorm(C, axis_name="batch")
    with pytest.raises(TypeError, match="mask"):
        jaxbn.nnx.InstanceNorm(C)(x, mask=jnp.ones(x.shape[0], bool))
    with pytest.raises(ValueError, match="expected at least 3D input"):
        jaxbn.nnx.InstanceNorm(C)(x[0, 0])  # torch's unbatched (C, L) needs x[None]


def test_a_torch_state_dict_ports_into_a_linen_model_with_instance_norm():
    import flax.linen as nn

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, C, 3, padding=1)
            self.norm = torch.nn.InstanceNorm2d(C, affine=True, track_running_stats=True)

        def forward(self, x):
            return self.norm(self.conv(x))

    class FlaxNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(C, (3, 3), padding=1, param_dtype=jnp.float64, name="conv")(x)
            return jaxbn.linen.InstanceNorm(affine=True, track_running_stats=True,
                                            param_dtype=jnp.float64, name="norm")(x, train)

    torch.manual_seed(0)
    net = TorchNet().double().train()
    for _ in range(3):
        net(torch.randn(4, 2, 6, 6, dtype=torch.float64))
    x = np.random.default_rng(9).normal(size=(4, 2, 6, 6))
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    target = jaxbn.porting.target_from_module(FlaxNet(), x_nhwc, train=False)
    variables, report = jaxbn.porting.torch_to_flax(net.state_dict(), target)
    assert report.ok and not report.unexpected_keys and not report.missing_keys

    for training in (False, True):  # eval: running stats; train: instance stats + update
        net.train(training)
        with torch.no_grad():
            y_torch = net(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        y, updates = FlaxNet().apply(variables, x_nhwc, train=training, mutable=["batch_stats"])
        np.testing.assert_allclose(np.asarray(y), y_torch, rtol=0, atol=TOL)
        variables = {**variables, **updates}
        assert_state_close(BatchNormState(**variables["batch_stats"]["norm"]),
                           torch_oracle.module_state(net.norm))


def test_the_adapters_doc_instance_norm_example_runs(capsys):
    import re

    doc = (REPO_ROOT / "docs" / "adapters.md").read_text()
    section = doc.split("## InstanceNorm1d/2d/3d", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/adapters.md", "exec"), {})
    assert "linen and NNX agree with torch" in capsys.readouterr().out
