"""docs/porting.md: every bash block runs as written, in order, in an empty directory; so do the
one-call port's Python examples (NNX, then linen)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

DOC = REPO_ROOT / "docs" / "porting.md"
ROOT = str(REPO_ROOT)


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


def one_call_examples() -> list[str]:
    section = DOC.read_text().split("## The one-call port", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_one_call_port_shows_nnx_first():
    examples = one_call_examples()
    assert len(examples) == 2
    assert 'api="nnx"' in examples[0] and "porting.save_variables" in examples[0]
    assert "api=" not in examples[1]


@pytest.mark.parametrize("index", [0, 1])
def test_porting_doc_one_call_example_runs(tmp_path, index):
    run = subprocess.run([sys.executable, "-c", one_call_examples()[index]], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "<All keys matched successfully>"
