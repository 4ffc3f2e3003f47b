"""`python -m jaxbn`: the live behaviour table, and that it can report a disagreement."""

import subprocess
import sys

import jax.numpy as jnp

from jaxbn import __main__ as cli
from jaxbn import functional as core
from jaxbn.testing import behaviour


def test_main_job_prints_sixteen_agreeing_rows():
    out = subprocess.run([sys.executable, "-m", "jaxbn"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| True") or line.startswith("| False")]
    assert len(rows) == 16
    assert all("| yes (" in row for row in rows)
    assert "16 of 16 rows agree" in out.stdout


def test_table_infers_torch_semantics_without_torch():
    rows = {(r.training, r.buffers, r.track_running_stats, r.momentum): r for r in behaviour.behaviour_table(with_torch=False)}
    assert all(r.torch_diff is None for r in rows.values())
    assert rows[(True, True, True, 0.1)].factor == "0.1 (unbiased var)"
    assert rows[(True, True, True, None)].factor == "1/4 = 0.25 (unbiased var)"
    assert rows[(True, True, False, 0.1)].running_stats == "unchanged"
    assert rows[(False, False, True, 0.1)].normalized_with == "batch stats (biased var)"
    assert rows[(False, True, False, None)].normalized_with == "running stats"


def _normalizes_eval_without_buffers_with_unbiased_var(x, state, params, flags):
    """The article's (wrong) claim: eval without buffers normalizes with the unbiased variance."""
    if state is None and not flags.training:
        axes = (0, 2, 3)
        batch = core.BatchNormState(
            running_mean=jnp.mean(x, axis=axes),
            running_var=jnp.var(x, axis=axes, ddof=1),
            num_batches_tracked=jnp.zeros((), jnp.int64),
        )
        y, _ = core.batch_norm(x, batch, params, flags)
        return y, None
    return core.batch_norm(x, state, params, flags)


def test_exit_code_is_nonzero_when_a_row_disagrees_with_torch(monkeypatch, capsys):
    monkeypatch.setattr(behaviour, "batch_norm", _normalizes_eval_without_buffers_with_unbiased_var)
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "| NO (" in out
    assert "12 of 16 rows agree" in out


def test_no_torch_says_skipped_and_table_is_the_default_subcommand(capsys):
    assert cli.main(["--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "comparison with torch skipped (--no-torch)" in out and "not installed" not in out
    assert "| True" in out
    assert cli.main(["table", "--no-torch"]) == 0
    assert "comparison with torch skipped (--no-torch)" in capsys.readouterr().out


def test_help_names_the_program_it_was_run_as(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/jaxbn", "--help"])
    try:
        cli.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.startswith("usage: jaxbn ")
    out = subprocess.run([sys.executable, "-m", "jaxbn", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m jaxbn "), out.stdout + out.stderr
