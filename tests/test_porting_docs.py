"""docs/porting.md: every bash block runs as written, in order, in an empty directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "porting.md"


@pytest.mark.slow
def test_porting_doc_commands_run_as_written(tmp_path):
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 4
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    outputs = []
    for block in blocks:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, block + out.stdout + out.stderr
        outputs.append(out.stdout)
    assert "params/conv/kernel" in outputs[1] and "batch_stats/head_1/running_var" in outputs[1]
    assert "round trip bit-exact: 13 tensors" in outputs[2]
    assert "torch vs Flax equivalence (atol 1e-09): OK" in outputs[3]
    assert "<All keys matched successfully>" in outputs[3]
