"""examples/port_resnet.py runs as documented and its ports match torch (float64 <= 1e-9)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_port_resnet_example(tmp_path):
    out = subprocess.run([sys.executable, "examples/port_resnet.py", "--outdir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.count(": PASS") == 2 and "FAIL" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "resnet_float32.pt", "resnet_float32.safetensors", "resnet_float64.pt", "resnet_float64.safetensors"]
    line = next(l for l in text.splitlines() if l.startswith("float64: eval logits"))
    diffs = [float(d) for d in re.findall(r"(\d\.\d+e[-+]\d+)", line)]
    assert len(diffs) == 3 and max(diffs) <= 1e-9, line
    assert "122 tensors ported" in text
