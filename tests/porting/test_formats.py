"""Safe checkpoint reading/writing: every format round-trips bit-exactly; bad files are refused."""

import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import checkpoint_io as cio
from jaxbn.checkpoint_io import CheckpointError


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_var": torch.rand(4, dtype=torch.float64, generator=g),
        "bn.num_batches_tracked": torch.tensor(2**40, dtype=torch.long),
        "half.weight": torch.randn(5, generator=g).to(torch.bfloat16),
    }


def _assert_bit_exact(flat: dict, state: dict) -> None:
    assert set(flat) == set(state)
    for k, t in state.items():
        back = cio.numpy_to_tensor(flat[k])
        assert back.dtype == t.dtype, k
        assert torch.equal(back, t), k


@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".msgpack"])
def test_round_trip_bit_exact_with_bf16_and_int64(tmp_path, ext):
    state = _state()
    path = tmp_path / f"ckpt{ext}"
    if ext == ".pt":
        torch.save(state, path)
    else:
        cio.write_checkpoint({k: cio.tensor_to_numpy(v) for k, v in state.items()}, path)
    flat = cio.read_checkpoint(path)
    assert flat["half.weight"].dtype == ml_dtypes.bfloat16
    _assert_bit_exact(flat, state)


def test_torch_written_safetensors_read_without_torch_api(tmp_path):
    from safetensors.torch import save_file

    state = _state()
    save_file(state, tmp_path / "m.safetensors")
    _assert_bit_exact(cio.read_checkpoint(tmp_path / "m.safetensors"), state)


def test_npz_and_legacy_torch_format(tmp_path):
    state = {k: v for k, v in _state().items() if v.dtype != torch.bfloat16}
    np.savez(tmp_path / "m.npz", **{k: cio.tensor_to_numpy(v) for k, v in state.items()})
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert cio.detect_format(tmp_path / "m.npz") == "npz"
    assert cio.detect_format(tmp_path / "legacy.pth") == "torch"
    _assert_bit_exact(cio.read_checkpoint(tmp_path / "m.npz"), state)
    _assert_bit_exact(cio.read_checkpoint(tmp_path / "legacy.pth"), state)


def test_format_is_detected_from_content_not_extension(tmp_path):
    state = _state()
    from safetensors.torch import save_file

    save_file(state, tmp_path / "actually_safetensors.pt")
    torch.save(state, tmp_path / "actually_torch.safetensors")
    assert cio.detect_format(tmp_path / "actually_safetensors.pt") == "safetensors"
    assert cio.detect_format(tmp_path / "actually_torch.safetensors") == "torch"
    _assert_bit_exact(cio.read_checkpoint(tmp_path / "actually_safetensors.pt"), state)


class _Payload:
    """Unpickling this touches a marker file: stands in for arbitrary code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"weight": torch.zeros(2), "payload": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        cio.read_checkpoint(path)
    assert not marker.exists()

    # Control: the payload is real -- plain (unsafe) unpickling does run it.
    control = tmp_path / "control.pt"
    control_marker = tmp_path / "control_marker"
    obj["payload"] = _Payload(str(control_marker))
    torch.save(obj, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".npz", ".msgpack"])
def test_truncated_files_raise_checkpoint_error(tmp_path, ext):
    state = {k: v for k, v in _state().items() if v.dtype != torch.bfloat16}
    path = tmp_path / f"m{ext}"
    if ext == ".pt":
        torch.save(state, path)
    else:
        cio.write_checkpoint({k: cio.tensor_to_numpy(v) for k, v in state.items()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt|not a checkpoint"):
        cio.read_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint at all",
                                     np.random.default_rng(64).bytes(64)],  # seeded: stable test ids
                         ids=["empty", "text", "random-bytes"])
def test_garbage_and_missing_files(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00" + content)  # never a valid magic
    with pytest.raises(CheckpointError):
        cio.read_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        cio.read_checkpoint(tmp_path / "missing.pt")


def test_zip_that_is_neither_torch_nor_npz(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="neither"):
        cio.read_checkpoint(path)


def test_npz_object_arrays_need_pickle_and_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="refusing"):
        cio.read_checkpoint(path)


def test_training_checkpoint_needs_key(tmp_path):
    state = {"bn.weight": torch.ones(3)}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="epoch .int.*key="):
        cio.read_checkpoint(tmp_path / "ckpt.pt")
    _assert_bit_exact(cio.read_checkpoint(tmp_path / "ckpt.pt", key="state_dict"), state)
    with pytest.raises(CheckpointError, match="no entry 'model'"):
        cio.read_checkpoint(tmp_path / "ckpt.pt", key="model")


def test_failed_write_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "out.npz"
    path.write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="bfloat16"):
        cio.write_checkpoint({"w": np.ones(2, ml_dtypes.bfloat16)}, path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.npz"]


def test_non_torch_formats_read_without_torch(tmp_path):
    arrays = {"a.weight": np.arange(6.0).reshape(2, 3)}
    for ext in (".safetensors", ".npz", ".msgpack"):
        cio.write_checkpoint(arrays, tmp_path / f"m{ext}")
    torch.save({"a.weight": torch.ones(2)}, tmp_path / "m.pt")
    script = f"""
import sys; sys.modules['torch'] = None
import jaxbn
from jaxbn import checkpoint_io as cio
for ext in ('.safetensors', '.npz', '.msgpack'):
    assert cio.read_checkpoint({str(tmp_path)!r} + '/m' + ext)['a.weight'].sum() == 15.0
try:
    cio.read_checkpoint({str(tmp_path)!r} + '/m.pt')
except cio.CheckpointError as e:
    print('refused:', e)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(jaxbn.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "needs torch" in out.stdout


# ------------------------------------------------------------------ hardening


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def test_written_files_respect_the_umask_and_an_existing_mode(tmp_path, umask):
    arrays = {"w": np.ones(2)}
    for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        umask(mask)
        path = tmp_path / f"new{mask}.safetensors"
        cio.write_checkpoint(arrays, path)
        assert path.stat().st_mode & 0o777 == mode, (oct(mask), oct(path.stat().st_mode))
    umask(0o077)
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    cio.write_checkpoint(arrays, existing)
    assert existing.stat().st_mode & 0o777 == 0o640
    assert cio.read_checkpoint(existing)["w"].sum() == 2


def test_symlink_output_is_written_through_to_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "weights.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    cio.write_checkpoint({"w": np.arange(3.0)}, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_array_equal(cio.read_checkpoint(target)["w"], np.arange(3.0))
    assert sorted(os.listdir(tmp_path / "real")) == ["weights.safetensors"]


_SLOW_WRITER = """
import os, sys, time
from jaxbn.porting import formats
started = sys.argv[2]
def slow(arrays, path):
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    open(started, "w").close()
    time.sleep(60)
import dataclasses
formats.REGISTRY = tuple(dataclasses.replace(f, write=slow) for f in formats.REGISTRY)
formats.write_checkpoint({"w": __import__("numpy").ones(2)}, sys.argv[1])
"""


def _slow_write(tmp_path):
    started = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=str(Path(jaxbn.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path / "out.npz"), str(started)], env=env)
    for _ in range(600):
        if started.exists() or proc.poll() is not None:
            break
        import time

        time.sleep(0.1)
    assert started.exists(), "the writer never started"
    temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".out.npz.jaxbn-") and f"-{proc.pid}-" in temps[0], temps
    return proc, temps[0]


def test_sigterm_mid_write_removes_the_temporary_file(tmp_path):
    proc, _ = _slow_write(tmp_path)
    proc.send_signal(15)
    assert proc.wait(timeout=60) == -15  # terminated by SIGTERM, as without the handler
    assert sorted(os.listdir(tmp_path)) == ["started"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    proc, temp = _slow_write(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    alive = f".out.npz.jaxbn-{os.getpid()}-0123abcd.tmp"  # a write in progress elsewhere: kept
    other = ".other.npz.jaxbn-999999999-0123abcd.tmp"  # another target's: not this write's business
    for name in (alive, other):
        (tmp_path / name).write_bytes(b"x")
    assert temp in os.listdir(tmp_path)
    cio.write_checkpoint({"w": np.ones(2)}, tmp_path / "out.npz")
    assert sorted(os.listdir(tmp_path)) == sorted([alive, other, "out.npz", "started"])


def test_msgpack_names_that_collide_or_are_empty_are_refused(tmp_path):
    for flat in ({"x/bias/y": np.ones(1), "x/bias": np.ones(2)}, {"x/bias": np.ones(2), "x/bias/y": np.ones(1)}):
        with pytest.raises(CheckpointError, match="'x/bias'.*'x/bias/y'"):
            cio.write_checkpoint(flat, tmp_path / "c.msgpack")
    with pytest.raises(CheckpointError, match="empty segment"):
        cio.write_checkpoint({"params//w": np.ones(1)}, tmp_path / "c.msgpack")
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["float8", "quantized", "sparse"])
def test_tensors_without_an_exact_numpy_type_are_refused_by_name(tmp_path, kind):
    tensor = {"float8": lambda: torch.zeros(2, dtype=torch.float8_e4m3fn),
              "quantized": lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8),
              "sparse": lambda: torch.eye(2).to_sparse()}[kind]()
    torch.save({"ok": torch.ones(1), "bad.weight": tensor}, tmp_path / "m.pt")
    assert "bad.weight" in torch.load(tmp_path / "m.pt", weights_only=True)  # torch itself loads it
    with pytest.raises(CheckpointError, match=rf"'bad.weight'.*{re.escape(str(tensor.dtype))}"):
        cio.read_checkpoint(tmp_path / "m.pt")


def test_safetensors_float8_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"w8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="'w8' has dtype F8_E4M3"):
        cio.read_checkpoint(tmp_path / "m.safetensors")


def test_npz_decompressed_size_is_bounded_before_reading(tmp_path):
    np.savez_compressed(tmp_path / "zeros.npz", a=np.zeros(50_000), b=np.zeros(50_000, np.float32))
    assert (tmp_path / "zeros.npz").stat().st_size < 10_000
    with pytest.raises(CheckpointError, match="600000 bytes.*max_bytes=599999"):
        cio.read_checkpoint(tmp_path / "zeros.npz", max_bytes=599_999)
    flat = cio.read_checkpoint(tmp_path / "zeros.npz", max_bytes=600_000)
    assert flat["a"].shape == (50_000,) and flat["b"].dtype == np.float32
    assert cio.DEFAULT_MAX_BYTES == 16 * 2**30


def test_safetensors_header_longer_than_the_file_says_so(tmp_path):
    for length in (10_000, 0x85):  # 0x85 as first byte once looked like msgpack
        path = tmp_path / f"h{length}.safetensors"
        path.write_bytes(length.to_bytes(8, "little") + b'{"w": {}}')
        with pytest.raises(CheckpointError, match=f"header length {length} exceeds the file size 17"):
            cio.read_checkpoint(path)


def test_deeply_nested_msgpack_says_so(tmp_path):
    path = tmp_path / "deep.msgpack"
    path.write_bytes(b"\x81\xa1a" * 200_000 + b"\xc0")
    with pytest.raises(CheckpointError, match="nested too deep"):
        cio.read_checkpoint(path)
