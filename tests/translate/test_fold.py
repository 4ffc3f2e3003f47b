"""``jaxbn.fold_batch_norm`` (``jaxbn/translate/fold.py``) and ``port --fold-bn``: eval-mode
BatchNorm folded into the convolution or linear layer before it, exact to rounding against the
unfolded eval model (float64), everything else kept and reported with its reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import REPO_ROOT, import_torchvision, warmed
from jaxbn.translate import emit_source

F64 = torch.float64


def fold_and_compare(model, x, *, channels_last=False):
    """The port and its folded twin in eval on ``x``: ``(folded, report, max |difference|)``."""
    ported = jaxbn.from_torch(model, x, channels_last=channels_last)
    xj = jnp.asarray(x.numpy())
    xj = jnp.moveaxis(xj, 1, -1) if channels_last else xj
    folded, report = jaxbn.fold_batch_norm(ported, xj)
    # mutable: a norm whose mode is fixed to training (kept, not folded) updates its statistics
    y = jax.jit(lambda v, x: ported.module.apply(v, x, mutable=["batch_stats"])[0])(ported.variables, xj)
    y_folded = jax.jit(lambda v, x: folded.module.apply(v, x, mutable=["batch_stats"])[0])(folded.variables, xj)
    return folded, report, float(np.max(np.abs(np.asarray(y_folded) - np.asarray(y))))


@pytest.mark.parametrize("name,channels_last", [
    ("mobilenet_v3_large", False), ("mobilenet_v3_large", True),
    pytest.param("resnet50", False, marks=pytest.mark.slow)])
def test_torchvision_models_fold_every_norm_exactly(name, channels_last):
    model = warmed(getattr(import_torchvision().models, name)(num_classes=10).train(), (4, 3, 64, 64)).eval()
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    folded, report, difference = fold_and_compare(model, torch.randn(4, 3, 64, 64, dtype=F64),
                                                  channels_last=channels_last)
    assert difference <= 1e-12
    assert sorted(n for n, _ in report.folded) == sorted(norms) and not report.kept
    assert "batch_stats" not in folded.variables  # every norm's running statistics went in


class Mixed(torch.nn.Module):
    """One foldable pair of each kind and one norm of each kind that must stay."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)                          # folds (conv without bias)
        self.conv2 = torch.nn.Conv2d(4, 4, 1)
        self.bn_after_relu = torch.nn.BatchNorm2d(4)              # after an activation
        self.bn_after_cat = torch.nn.BatchNorm2d(8)               # after a concatenation
        self.conv3 = torch.nn.Conv2d(8, 8, 1)
        self.bn_shared_input = torch.nn.BatchNorm2d(8)            # conv3's output read twice
        self.conv4 = torch.nn.Conv2d(8, 8, 1)
        self.bn_batch_stats = torch.nn.BatchNorm2d(8, track_running_stats=False)
        self.conv5 = torch.nn.Conv2d(8, 8, 1)
        self.bn_frozen_training = torch.nn.BatchNorm2d(8)         # kept training by its mode
        self.fc = torch.nn.Linear(8, 6)
        self.bn1d = torch.nn.BatchNorm1d(6)                       # folds into fc (a matrix)

    def forward(self, x):
        x = self.bn(self.conv(x))
        y = self.bn_after_relu(torch.relu(self.conv2(x)))
        z = self.bn_after_cat(torch.cat([x, y], 1))
        w = self.conv3(z)
        z = self.bn_shared_input(w) + w
        z = self.bn_batch_stats(self.conv4(z))
        z = self.bn_frozen_training(self.conv5(z))
        return self.bn1d(self.fc(z.mean((2, 3))))


def test_what_cannot_fold_is_kept_with_its_reason_and_the_model_stays_exact():
    model = warmed(Mixed().train(), (4, 3, 8, 8)).eval()
    model.bn_frozen_training.train()
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    folded, report, difference = fold_and_compare(model, x)
    assert difference <= 1e-12
    assert dict(report.folded) == {"bn": "conv", "bn1d": "fc"}
    kept = dict(report.kept)
    assert set(kept) == {"bn_after_relu", "bn_after_cat", "bn_shared_input", "bn_batch_stats",
                         "bn_frozen_training"}
    assert "not a convolution" in kept["bn_after_relu"] and "also read" in kept["bn_shared_input"]
    assert "batch statistics" in kept["bn_batch_stats"] and "training" in kept["bn_frozen_training"]
    assert set(folded.variables["params"]["conv"]) == {"kernel", "bias"}
    assert "bn" not in folded.variables["params"] and "bn" not in folded.variables.get("batch_stats", {})
    # the emitted file of the folded model is the same model
    namespace: dict = {}
    exec(compile(emit_source(folded.module.block), "<folded>", "exec"), namespace)
    xj = jnp.asarray(x.numpy())
    np.testing.assert_allclose(namespace["Model"]().apply(folded.variables, xj, mutable=["batch_stats"])[0],
                               folded.module.apply(folded.variables, xj, mutable=["batch_stats"])[0],
                               rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="inference only"):
        folded.module.apply(folded.variables, xj, train=True)


def test_a_norm_after_a_linear_layer_folds_only_where_the_rank_is_known():
    model = warmed(Mixed().train(), (4, 3, 8, 8)).eval()
    ported = jaxbn.from_torch(model, torch.randn(4, 3, 8, 8, dtype=F64))
    _, report = jaxbn.fold_batch_norm(ported)  # no example: ranks unknown
    assert "bn1d" in dict(report.kept) and "example" in dict(report.kept)["bn1d"]


def test_port_fold_bn_writes_an_inference_model(tmp_path):
    (tmp_path / "foldnet.py").write_text(textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                      torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4))
            net.train()(torch.randn(8, 3, 9, 9))
            return net.eval()
    """))
    result = subprocess.run(
        [sys.executable, "-m", "jaxbn", "port", "foldnet:build", "--input-shape", "2,3,9,9",
         "--emit", "folded.py", "--out", "folded.npz", "--fold-bn"],
        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "folded 2 norm(s), kept 0" in result.stdout
    code = textwrap.dedent("""
        import numpy as np, torch, jax.numpy as jnp
        import foldnet, folded
        x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
        variables = dict(np.load("folded.npz"))
        from jaxbn.porting.paths import tree_from_names
        y = folded.Model().apply(tree_from_names(variables), jnp.asarray(x))
        with torch.no_grad():
            expected = foldnet.build()(torch.from_numpy(x)).numpy()
        print(float(np.max(np.abs(np.asarray(y) - expected))))
    """)
    check = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env={"PYTHONPATH": f"{REPO_ROOT}:{tmp_path}", "PATH": ""})
    assert check.returncode == 0, check.stderr
    assert float(check.stdout) <= 1e-5  # float32
