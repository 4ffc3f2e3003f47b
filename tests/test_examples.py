"""The digits examples run as the README says and learn: eval accuracy far above chance (0.1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # the scripts default to 15; 3 already reaches ~0.95 on held-out digits
MIN_ACCURACY = 0.85


@pytest.mark.slow  # a fresh interpreter each (jax + sklearn import): ~7 s apiece
@pytest.mark.parametrize("script", ["train_digits_linen.py", "train_digits_nnx.py"])
def test_example_trains_to_high_eval_accuracy(script):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's jaxbn, as when run from the root
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--epochs", str(EPOCHS)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    accuracies = [float(a) for a in re.findall(r"eval accuracy[^0-9]*([0-9.]+)", result.stdout)]
    assert len(accuracies) >= EPOCHS, result.stdout
    assert accuracies[-1] >= MIN_ACCURACY, result.stdout
