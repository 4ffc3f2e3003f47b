"""Safe checkpoint reading/writing: every format round-trips bit-exactly; bad files are refused."""

import os
import pickle
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


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint at all", os.urandom(64)])
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
