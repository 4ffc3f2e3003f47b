"""benchmarks/profile_step.py reads the device's events from a profiler trace and sums them right."""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO_ROOT as ROOT


def load_profile_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its NamedTuples look their module up
    spec.loader.exec_module(module)
    return module


profile = load_profile_step()


def covered_length(intervals, resolution=1.0):
    """Brute force: the grid cells of width ``resolution`` that some interval covers."""
    cells = set()
    for start, duration in intervals:
        cells.update(range(int(start / resolution), int((start + duration) / resolution)))
    return len(cells) * resolution


@pytest.mark.parametrize("seed", range(5))
def test_busy_time_is_the_length_of_the_union(seed):
    rng = np.random.default_rng(seed)
    # integer starts and durations, so a grid of unit cells measures the union exactly
    intervals = [(float(s), float(d)) for s, d in zip(rng.integers(0, 200, 40), rng.integers(0, 30, 40))]
    assert profile.busy_time(intervals) == covered_length(intervals)


def trace_json(processes, lines, events):
    """A trace shaped like the JSON that jax.profiler.trace writes."""
    meta = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
            for pid, name in processes.items()]
    meta += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
             for (pid, tid), name in lines.items()]
    return {"traceEvents": meta + [{"ph": "X", **e} for e in events]}


def test_gpu_events_are_the_stream_lines_only():
    kernel = {"pid": 2, "tid": 1, "ts": 10.0, "dur": 4.0, "name": "loop_add_fusion",
              "args": {"hlo_op": "add_fusion.1"}}
    copy = {"pid": 2, "tid": 3, "ts": 20.0, "dur": 2.0, "name": "MemcpyD2D", "args": {}}
    derived = {**kernel, "tid": 2, "name": "add_fusion.1"}  # the "XLA Ops" line repeats it
    host = {"pid": 1, "tid": 9, "ts": 5.0, "dur": 30.0, "name": "add_fusion.1",
            "args": {"hlo_op": "add_fusion.1"}}
    trace = trace_json({1: "/host:CPU", 2: "/device:GPU:0"},
                       {(2, 1): "Stream #13(Compute)", (2, 2): "XLA Ops",
                        (2, 3): "Stream #14(MemcpyD2D)", (1, 9): "python"},
                       [kernel, derived, copy, host])
    events = profile.device_events(trace)
    assert [(e.line, e.name, e.start, e.duration) for e in events] == [
        ("Stream #13(Compute)", "loop_add_fusion", 10.0, 4.0),
        ("Stream #14(MemcpyD2D)", "MemcpyD2D", 20.0, 2.0)]


def test_a_real_cpu_trace_gives_the_programs_thunks(tmp_path):
    """Without a GPU, the host's thunks of the traced program stand in for kernels."""
    x = jnp.arange(4096.0).reshape(64, 64)
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + x.sum(0))
    compiled_ops = f.lower(x).compile().as_text()
    trace = profile.trace_steps(lambda: f(x), 3, tmp_path)
    events = profile.device_events(trace)
    assert events
    assert all(e.op and e.op in compiled_ops for e in events)
    summary = profile.summarize(events, 3)
    assert summary.kernels == len(events) / 3
    assert 0 < summary.busy <= summary.span


def test_summary_bins_partition_the_events():
    rng = np.random.default_rng(0)
    durations = rng.choice([1.0, 4.9, 5.0, 19.0, 20.0, 99.0, 100.0, 500.0], 60)
    starts = np.cumsum(rng.uniform(0, 50, 60))
    events = [profile.Event("s", "k", "op", float(s), float(d)) for s, d in zip(starts, durations)]
    summary = profile.summarize(events, 2)
    expected_counts = [np.sum(durations < 5), np.sum((durations >= 5) & (durations < 20)),
                       np.sum((durations >= 20) & (durations < 100)), np.sum(durations >= 100)]
    assert summary.bin_kernels == tuple(c / 2 for c in expected_counts)
    assert sum(summary.bin_busy) >= summary.busy - 1e-12  # overlaps across bins count in each
    assert summary.span == pytest.approx((max(starts + durations) - min(starts)) / 2e3)
    with pytest.raises(ValueError, match="no device events"):
        profile.summarize([], 2)


def test_per_norm_rows_divide_the_difference_to_no_norm():
    bare = profile.Summary(100, 5.0, 6.0, (50, 30, 15, 5), (0.1, 0.4, 1.0, 3.5))
    normed = profile.Summary(300, 7.0, 9.0, (150, 80, 60, 10), (0.4, 1.0, 2.0, 3.6))
    table = profile.render([("float32", "no norm", bare), ("float32", "jaxbn", normed)], 20, 10, "cpu")
    per_norm = table.split("What one norm adds")[1]
    row = next(line for line in per_norm.splitlines() if "| jaxbn |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert [float(c) for c in cells[2:]] == pytest.approx([
        (300 - 100) / 20, (7.0 - 5.0) * 1e3 / 20, ((9.0 - 7.0) - (6.0 - 5.0)) * 1e3 / 20,
        (150 - 50) / 20, (80 - 30) / 20, (60 - 15) / 20, (10 - 5) / 20], abs=0.05)


def test_norm_count_is_torchs():
    import torch

    model = profile.step.torch_resnet18()
    assert profile.norm_count() == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
