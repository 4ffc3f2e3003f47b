"""Orbax checkpoint directories in `convert`, `port` and checkpoint_io: torch and Orbax decide.

Torch's ``load_state_dict(strict=True)`` and ``torch.equal`` judge every round trip; Orbax's own
``StandardCheckpointer`` writes the checkpoints a Flax training loop would and restores ours.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import checkpoint_io as cio
from jaxbn import porting
from jaxbn.checkpoint_io import CheckpointError
from jaxbn.porting import formats
from test_convert_cli import _one_line_error, _run

ocp = pytest.importorskip("orbax.checkpoint")
ROOT = Path(jaxbn.__file__).parents[1]


def _model(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16, 2)).to(dtype)
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(2**40 + 3)  # wrong as int32
    return net


def _assert_loads_bit_exact(net: torch.nn.Module, state: dict) -> None:
    fresh = _model(next(net.parameters()).dtype)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            t.zero_()
    fresh.load_state_dict(state, strict=True)
    for k, t in net.state_dict().items():
        got = fresh.state_dict()[k]
        assert got.dtype == t.dtype and torch.equal(got, t), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One good Orbax checkpoint (ours) to copy from, and its arrays."""
    root = tmp_path_factory.mktemp("orbax")
    arrays = {
        "params/conv/kernel": np.random.default_rng(0).standard_normal((3, 3, 2, 4)),
        "params/half/scale": np.arange(5, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "params/dense/kernel": np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32),
        "batch_stats/bn/num_batches_tracked": np.array(2**40, np.int64),  # 0-d, int64
    }
    cio.write_checkpoint(arrays, root / "good")
    return root / "good", arrays


# ---------------------------------------------------------------- round trips, torch as oracle


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_convert_torch_to_orbax_and_back_is_bit_exact(tmp_path, capsys, dtype):
    net = _model(dtype)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    code, out, err = _run(["convert", tmp_path / "model.pt", tmp_path / "ckpt"], capsys)
    assert code == 0 and err == "", err
    assert "9 tensors mapped; OK" in out and "params/0/kernel" in out
    assert cio.detect_format(tmp_path / "ckpt") == "orbax"
    flat = cio.read_checkpoint(tmp_path / "ckpt")
    assert flat["batch_stats/1/num_batches_tracked"].dtype == np.int64
    assert int(flat["batch_stats/1/num_batches_tracked"]) == 2**40 + 3

    restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt")  # plain Orbax, no target
    assert set(restored) == {"params", "batch_stats"}
    assert porting.flatten_tree(restored).keys() == {tuple(k.split("/")) for k in flat}
    for k, v in flat.items():
        np.testing.assert_array_equal(porting.flatten_tree(restored)[tuple(k.split("/"))], v, err_msg=k)

    code, _, err = _run(["convert", tmp_path / "ckpt", tmp_path / "back.pt", "--to-torch"], capsys)
    assert code == 0, err
    _assert_loads_bit_exact(net, torch.load(tmp_path / "back.pt", weights_only=True))
    back, _ = porting.flax_to_torch(restored, porting.structural_torch_target(restored))
    _assert_loads_bit_exact(net, {k: cio.numpy_to_tensor(v) for k, v in back.items()})
    assert sorted(os.listdir(tmp_path)) == ["back.pt", "ckpt", "model.pt"]


def test_a_flax_training_loop_checkpoint_is_read_by_convert(tmp_path, capsys):
    """Variables as JAX arrays, saved the way Flax's documentation saves them."""
    net = _model()
    state = net.state_dict()
    variables, _ = porting.torch_to_flax(state, porting.structural_flax_target(state))  # JAX arrays
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "flax_ckpt", variables)
    checkpointer.wait_until_finished()
    code, _, err = _run(["convert", tmp_path / "flax_ckpt", tmp_path / "back.pt", "--to-torch", "--quiet"], capsys)
    assert code == 0, err
    _assert_loads_bit_exact(net, torch.load(tmp_path / "back.pt", weights_only=True))


def test_bf16_int64_and_0d_round_trip_and_orbax_restores_ours(saved):
    path, arrays = saved
    flat = cio.read_checkpoint(path)
    restored = porting.flatten_tree(ocp.StandardCheckpointer().restore(path))
    assert flat.keys() == arrays.keys()
    for k, a in arrays.items():
        for got in (flat[k], restored[tuple(k.split("/"))]):
            assert isinstance(got, np.ndarray) and got.dtype == a.dtype and got.shape == a.shape, k
            assert got.tobytes() == a.tobytes(), k


def test_reading_keeps_int64_and_float64_without_x64_and_orbax_stays_optional(tmp_path, saved):
    """jax_enable_x64 off: plain Orbax restores int32/float32; checkpoint_io keeps the stored dtypes.
    Without orbax installed, Orbax directories are refused naming the extra; nothing else imports it."""
    import jax.numpy as jnp

    path = tmp_path / "jax_ckpt"  # JAX arrays, saved with x64 on (as tests/conftest.py sets)
    checkpointer = ocp.StandardCheckpointer()
    nested = porting.unflatten_tree({tuple(k.split("/")): jnp.asarray(a) for k, a in saved[1].items()})
    checkpointer.save(path, nested)
    checkpointer.wait_until_finished()
    cio.write_checkpoint({"w": np.ones(2)}, tmp_path / "m.msgpack")
    script = f"""
import sys
sys.modules['orbax'] = None  # not installed
import numpy as np, jax
import jaxbn
from jaxbn import checkpoint_io as cio
assert not jax.config.jax_enable_x64
assert cio.read_checkpoint({str(tmp_path / 'm.msgpack')!r})['w'].sum() == 2
for call in (lambda: cio.read_checkpoint({str(path)!r}),
             lambda: cio.write_checkpoint({{'params/w': np.ones(2)}}, {str(tmp_path / 'new')!r})):
    try:
        call()
    except cio.CheckpointError as e:
        assert "pip install 'jaxbn[orbax]'" in str(e), e
    else:
        raise AssertionError('not refused')
del sys.modules['orbax']
import orbax.checkpoint as ocp
plain = ocp.StandardCheckpointer().restore({str(path)!r})['batch_stats']['bn']['num_batches_tracked']
flat = cio.read_checkpoint({str(path)!r})
print(plain.dtype, flat['batch_stats/bn/num_batches_tracked'].dtype, int(flat['batch_stats/bn/num_batches_tracked']),
      flat['params/conv/kernel'].dtype, flat['params/half/scale'].dtype)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_ENABLE_X64="0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["int32", "int64", str(2**40), "float64", "bfloat16"]
    assert sorted(os.listdir(tmp_path)) == ["jax_ckpt", "m.msgpack"]


# ---------------------------------------------------------------- where and how it is written


def test_the_output_path_decides_orbax(tmp_path):
    (tmp_path / "existing.v2").mkdir()
    (tmp_path / "adir.msgpack").mkdir()
    rule = {"ckpt": "orbax", "ckpt/": "orbax", "existing.v2": "orbax", "v.msgpack/": "orbax",
            "v.msgpack": "msgpack", "v.npz": "npz", "adir.msgpack": "msgpack"}
    for name, fmt in rule.items():
        assert formats.format_for_path(str(tmp_path / name) + ("/" if name.endswith("/") else "")) == fmt, name
    with pytest.raises(CheckpointError, match="--format"):
        formats.format_for_path(tmp_path / "v.ckpt")
    with pytest.raises(CheckpointError, match="is a directory"):
        formats.destination(tmp_path / "adir.msgpack")  # a file format never replaces a directory
    cio.write_checkpoint({"params/w": np.ones(2)}, tmp_path / "v.ckpt", format="orbax")
    assert cio.detect_format(tmp_path / "v.ckpt") == "orbax"


def test_convert_refuses_what_orbax_cannot_be(tmp_path, capsys, saved):
    net = _model()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    cases = [
        (["convert", tmp_path / "model.pt", tmp_path / "out", "--to-torch"], "--to-torch writes a torch state_dict"),
        (["convert", tmp_path / "model.pt", tmp_path / "mine"], "not an orbax checkpoint; refusing to replace it"),
        (["convert", tmp_path / "model.pt", tmp_path / "file", "--format", "orbax"], "is a file"),
        (["convert", saved[0], tmp_path / "x.msgpack"], "pass --to-torch"),
        (["convert", saved[0], saved[0], "--to-torch"], "torch state_dict"),
        (["convert", saved[0], tmp_path / "back.pt", "--to-torch", "--max-bytes", 10], "more than max_bytes=10"),
    ]
    for argv, words in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2 and words in _one_line_error(err), (argv, err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
    assert sorted(os.listdir(tmp_path)) == ["file", "mine", "model.pt"]


def _failing(monkeypatch, fail):
    monkeypatch.setattr(formats, "REGISTRY", tuple(
        dataclasses.replace(f, write=fail(f.write)) if f.directory else f for f in formats.REGISTRY))


def test_replacing_a_checkpoint_keeps_the_old_one_when_the_write_fails(tmp_path, monkeypatch):
    cio.write_checkpoint({"params/w": np.arange(3.0)}, tmp_path / "ckpt")
    os.chmod(tmp_path / "ckpt", 0o750)

    def after_writing(write):
        def fail(arrays, directory):
            write(arrays, directory)  # a complete new checkpoint in the temporary directory...
            raise OSError(28, "No space left on device")  # ...then the disk is full
        return fail

    with monkeypatch.context() as m:
        _failing(m, after_writing)
        with pytest.raises(CheckpointError, match="No space left on device"):
            cio.write_checkpoint({"params/w": np.zeros(3)}, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(cio.read_checkpoint(tmp_path / "ckpt")["params/w"], np.arange(3.0))

    renames = []
    real_rename = os.rename

    def rename_in_fails(src, dst):  # the old one is aside, the new one cannot be renamed in
        if os.path.dirname(src) == str(tmp_path):
            renames.append((src, dst))
        if ".tmp" in os.path.basename(src) and str(dst) == str(tmp_path / "ckpt"):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(formats.os, "rename", rename_in_fails)
        with pytest.raises(CheckpointError, match="Input/output error"):
            cio.write_checkpoint({"params/w": np.zeros(3)}, tmp_path / "ckpt")
    assert len(renames) == 3 and renames[-1][1] == str(tmp_path / "ckpt")  # aside, in (failed), back
    assert os.listdir(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(cio.read_checkpoint(tmp_path / "ckpt")["params/w"], np.arange(3.0))

    cio.write_checkpoint({"params/w": np.zeros(3), "params/b": np.ones(1)}, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"] and (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o750
    assert cio.read_checkpoint(tmp_path / "ckpt").keys() == {"params/w", "params/b"}


def test_names_orbax_would_merge_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'params/a.b' and 'params/a/b' as one array"):
        cio.write_checkpoint({"params/a.b": np.ones(1), "params/a/b": np.zeros(1)}, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no arrays"):
        cio.write_checkpoint({}, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


_SLOW_WRITER = """
import dataclasses, os, sys, time
from jaxbn.porting import formats
def slow(arrays, directory):
    with open(os.path.join(directory, "_METADATA"), "w") as f:
        f.write("{")
    open(sys.argv[2], "w").close()
    time.sleep(60)
formats.REGISTRY = tuple(dataclasses.replace(f, write=slow) if f.directory else f for f in formats.REGISTRY)
formats.write_checkpoint({"params/w": __import__("numpy").ones(2)}, sys.argv[1])
"""


def test_sigterm_and_sigkill_mid_write_leave_no_temporary_directory(tmp_path, saved):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {}
    for name in ("termed", "killed"):
        shutil.copytree(saved[0], tmp_path / name)  # an existing checkpoint: never touched
        procs[name] = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path / name),
                                        str(tmp_path / f"{name}.started")], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{n}.started").exists() for n in procs) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs.values()), [p.communicate()[1] for p in procs.values()]
        time.sleep(0.05)
    temps = sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp"))
    assert [t.split(".jaxbn-")[0] for t in temps] == [".killed", ".termed"], temps
    assert all((tmp_path / t).is_dir() for t in temps)
    procs["termed"].send_signal(signal.SIGTERM)
    procs["killed"].kill()
    assert procs["termed"].wait(timeout=60) == -signal.SIGTERM
    assert procs["killed"].wait(timeout=60) == -signal.SIGKILL
    killed_temp = [t for t in temps if t.startswith(".killed")]
    assert sorted(os.listdir(tmp_path)) == sorted(["termed", "killed", "termed.started", "killed.started", *killed_temp])

    stale_old = tmp_path / ".killed.jaxbn-999999999-0123abcd.old"  # replaced, old not yet deleted
    kept_old = tmp_path / ".gone.jaxbn-999999999-0123abcd.old"  # the target is missing: the last copy
    for old in (stale_old, kept_old):
        shutil.copytree(saved[0], old)
    cio.write_checkpoint({"params/w": np.ones(2)}, tmp_path / "killed")
    assert not (tmp_path / killed_temp[0]).exists() and not stale_old.exists() and kept_old.exists()
    assert cio.read_checkpoint(tmp_path / "termed").keys() == saved[1].keys()
    assert cio.read_checkpoint(tmp_path / "killed").keys() == {"params/w"}


# ---------------------------------------------------------------- damaged checkpoints refused


def _delete_data(path):
    for f in (path / "d").iterdir():
        f.unlink()


def _truncate_data(path):
    for f in (path / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _several_items(path):
    inner = path.parent / "inner"
    path.rename(inner)
    path.mkdir()
    inner.rename(path / "default")
    (path / "_CHECKPOINT_METADATA").write_text("{}")


DAMAGE = {
    "missing _METADATA": (lambda p: (p / "_METADATA").unlink(), "_METADATA file (the tree of arrays) is missing"),
    "truncated _METADATA": (lambda p: (p / "_METADATA").write_text('{"tree_metadata": {'), "not readable JSON"),
    "missing manifest.ocdbt": (lambda p: (p / "manifest.ocdbt").unlink(), "manifest.ocdbt file"),
    "deleted array data": (_delete_data, "truncated or corrupt Orbax checkpoint: ValueError: NOT_FOUND"),
    "truncated array data": (_truncate_data, "truncated or corrupt Orbax checkpoint"),
    "empty directory": (lambda p: shutil.rmtree(p) or p.mkdir(), "is an empty directory"),
    "not a checkpoint": (lambda p: shutil.rmtree(p) or p.mkdir() or (p / "a.txt").write_text("x"),
                         "not an Orbax checkpoint (it has none of _METADATA"),
    "a CheckpointManager step": (_several_items, "holds Orbax checkpoint items (default)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_directories_are_refused_naming_them(tmp_path, saved, damage, capsys):
    path = tmp_path / "ckpt"
    shutil.copytree(saved[0], path)
    spoil, words = DAMAGE[damage]
    spoil(path)
    with pytest.raises(CheckpointError, match="ckpt") as e:
        cio.read_checkpoint(path)
    assert words in str(e.value) and "tensorstore_spec" not in str(e.value)
    code, _, err = _run(["convert", path, tmp_path / "back.pt", "--to-torch"], capsys)
    assert code == 2 and words in _one_line_error(err)
    assert not (tmp_path / "back.pt").exists()


def test_an_unfinished_orbax_save_is_refused(tmp_path, saved):
    for name in ("ckpt.orbax-checkpoint-tmp", "ckpt.orbax-checkpoint-tmp-1712", ".ckpt.jaxbn-12-0123abcd.tmp"):
        shutil.copytree(saved[0], tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}.* is an unfinished checkpoint"):
            cio.read_checkpoint(tmp_path / name)


# ---------------------------------------------------------------- port --out DIR

MODEL = '''
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).double()
'''


def test_port_out_directory_writes_orbax(tmp_path, monkeypatch, capsys):
    name = f"orbaxnet_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        base = ["port", f"{name}:build", "--input-shape=2,3,6,6", "--emit", "m.py"]
        code, _, err = _run([*base, "--out", "mine"], capsys)
        assert code == 2 and "refusing to replace it" in _one_line_error(err)
        assert not (tmp_path / "m.py").exists() and os.listdir(tmp_path / "mine") == ["notes.txt"]

        code, out, err = _run([*base, "--out", "variables"], capsys)
        assert code == 0, err
        assert "wrote its variables to variables" in out
        import importlib

        net = importlib.import_module(name).build()
        _, expected = jaxbn.from_torch(net, torch.zeros(2, 3, 6, 6, dtype=torch.float64))
        expected = porting.flatten_tree(expected)
        restored = porting.flatten_tree(ocp.StandardCheckpointer().restore(tmp_path / "variables"))
        assert restored.keys() == expected.keys()
        for k, v in expected.items():
            assert restored[k].dtype == np.asarray(v).dtype, k
            np.testing.assert_array_equal(restored[k], np.asarray(v), err_msg=str(k))
    finally:
        sys.modules.pop(name, None)
