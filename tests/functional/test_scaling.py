"""Scaling out, in subprocesses: 8 host devices (tests/functional/multidevice_sync.py) and 2 processes.

The device count and the distributed runtime are fixed when JAX starts, so neither can run in
this test process (which has one CPU device and x64 on); each runs in fresh interpreters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.testing import oracle as torch_oracle

TESTS = Path(__file__).resolve().parent
JAXBN_ROOT = str(Path(jaxbn.__file__).resolve().parent.parent)
TOL = dict(rtol=1e-10, atol=1e-10)


def subprocess_env(device_count: int) -> dict[str, str]:
    """This environment with ``device_count`` host devices and this jaxbn first on the path."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={device_count}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in [JAXBN_ROOT, env.get("PYTHONPATH")] if p)
    return env


@pytest.mark.slow
def test_eight_devices_in_a_subprocess():
    """Runs tests/functional/multidevice_sync.py (shard_map/vmap/pmap/jit sharding vs torch) on 8 devices."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
               str(TESTS / "multidevice_sync.py")]
    proc = subprocess.run(command, env=subprocess_env(8), cwd=JAXBN_ROOT, capture_output=True,
                          text=True, timeout=420)
    report = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1], report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(num_processes, devices_per_process, inputs, out_dir, timeout, start=None):
    """Start the workers (process ids ``start``, default all), wait at most ``timeout`` seconds
    in all, kill whatever is left. Returns their return codes and the tails of their logs."""
    port = free_port()
    procs, logs, timed_out = {}, [], False
    try:
        for pid in range(num_processes) if start is None else start:
            log = open(out_dir / f"worker{pid}.log", "w")
            logs.append(log)
            procs[pid] = subprocess.Popen(
                [sys.executable, str(TESTS / "multiprocess_worker.py"), str(pid),
                 str(num_processes), str(port), str(inputs), str(out_dir / f"out{pid}.npz")],
                env=subprocess_env(devices_per_process), cwd=JAXBN_ROOT, stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in logs:
            log.close()
    tails = f"timed out after {timeout} s\n" if timed_out else ""
    for pid, proc in procs.items():
        tails += f"--- worker {pid} (rc={proc.returncode}) ---\n"
        tails += (out_dir / f"worker{pid}.log").read_text()[-4000:] + "\n"
    return [proc.returncode for proc in procs.values()], tails


@pytest.mark.slow
def test_two_processes_sync_batch_norm(tmp_path):
    """2 processes x 4 host devices, jax.distributed on 127.0.0.1 with gloo CPU collectives:
    sync batch norm over all 8 devices (uneven shards 5,3,0,2 | 4,1,6,3 with a mask) equals
    torch BatchNorm on the concatenated batch -- outputs, running stats, counter, gradients --
    via shard_map with axis_name and via plain jit on the batch-sharded global array."""
    counts, rows, c = (5, 3, 0, 2, 4, 1, 6, 3), 6, 3
    rng = np.random.RandomState(0)
    x = rng.randn(8 * rows, c, 3, 2) * 2.0 + 3.0
    mask = np.zeros(8 * rows, dtype=bool)
    for device, count in enumerate(counts):
        mask[device * rows : device * rows + count] = True
    x[~mask] = 0.0
    cot = rng.randn(*x.shape)
    state = jaxbn.BatchNormState(rng.randn(c), rng.rand(c) + 0.5, np.asarray(5, np.int64))
    params = jaxbn.BatchNormParams(rng.rand(c) + 0.5, rng.randn(c))
    flags = jaxbn.BatchNormFlags(momentum=0.3)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=x, mask=mask, cot=cot, momentum=flags.momentum,
             **state._asdict(), **params._asdict())

    returncodes, tails = run_workers(2, 4, inputs, tmp_path, timeout=240)
    assert returncodes == [0, 0], tails

    module = torch_oracle.build_module(c, 4, state, params, flags, torch.float64)
    y_ref, dx_ref, dp_ref = torch_oracle.vjp(module, x, cot, mask=mask)
    state_ref = torch_oracle.module_state(module)
    expected = {"y": y_ref, "dx": dx_ref, "dweight": dp_ref.weight, "dbias": dp_ref.bias,
                **state_ref._asdict()}
    for pid in range(2):
        out = np.load(tmp_path / f"out{pid}.npz")
        assert (int(out["process_count"]), int(out["device_count"]),
                int(out["local_device_count"])) == (2, 8, 4)
        for mode in ("shard_map", "jit"):
            for key, ref in expected.items():
                got = out[f"{mode}/{key}"]
                print(f"process {pid} {mode} {key}: max |diff| = {np.abs(got - ref).max():.3e}")
                np.testing.assert_allclose(got, ref, **TOL, err_msg=f"process {pid} {mode} {key}")
    assert int(state_ref.num_batches_tracked) == 6


def test_failing_workers_are_reported(tmp_path):
    """Workers that fail (no inputs) exit non-zero and their logs say why."""
    returncodes, tails = run_workers(2, 1, tmp_path / "missing.npz", tmp_path, timeout=90)
    assert all(rc not in (0, None) for rc in returncodes) and len(returncodes) == 2, tails
    assert "missing.npz" in tails


def test_a_hanging_worker_is_killed_in_bounded_time(tmp_path):
    """Only process 1 of 2 starts, so it can never finish (it would wait up to 60 s for its peer
    in jax.distributed.initialize): it is killed at the deadline instead of hanging the suite."""
    start = time.monotonic()
    returncodes, tails = run_workers(2, 1, tmp_path / "unused.npz", tmp_path, timeout=4, start=[1])
    assert returncodes == [-9], tails
    assert tails.startswith("timed out after 4 s")
    assert time.monotonic() - start < 40
