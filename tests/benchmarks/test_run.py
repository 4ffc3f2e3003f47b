"""benchmarks/run.py writes results only when asked: the results files are tracked."""

import importlib.util
import sys

from helpers import REPO_ROOT as ROOT


def _run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_results_are_written_only_when_asked(tmp_path):
    run = _run_module()

    def where(*argv):
        args = run.parse_args(list(argv))
        return run.results_path(args.write, args.gpu)

    assert where() is None
    assert where("--quick") is None
    assert where("--gpu") is None
    assert where("--write") == ROOT / "benchmarks" / "results_cpu.md"
    assert where("--gpu", "--write") == ROOT / "benchmarks" / "results_gpu.md"
    assert where("--write", str(tmp_path / "t.md")) == tmp_path / "t.md"


def test_every_contender_gets_the_same_calls_per_sample():
    """run.Timer calls every function the same number of times per sample: with asynchronous
    dispatch the cost per call of a fast program depends on that count."""
    run = _run_module()
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        deadline = run.time.perf_counter() + 1e-3
        while run.time.perf_counter() < deadline:
            pass

    timer = run.Timer({"fast": fast, "slow": slow}, {"fast": lambda _: None, "slow": lambda _: None})
    assert timer.inner["fast"] == timer.inner["slow"] > 1  # sized by the fast one
    before = dict(calls)
    timer.sample(2)
    assert calls["fast"] - before["fast"] == calls["slow"] - before["slow"] == 2 * timer.inner["slow"]
