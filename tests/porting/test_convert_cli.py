"""`python -m jaxbn convert`: structural and --like conversions, reports, exit codes, no partial files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxbn import __main__ as cli
from jaxbn import checkpoint_io, porting


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.layer1 = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.BatchNorm1d(4))
        self.fc = torch.nn.Linear(4, 2)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        net.bn1.running_mean.normal_()
        net.bn1.num_batches_tracked.fill_(5)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    return net, tmp_path


def test_convert_round_trip_through_the_cli_is_bit_exact(checkpoint, capsys):
    net, tmp = checkpoint
    assert cli.main(["convert", str(tmp / "model.pt"), str(tmp / "model.msgpack")]) == 0
    out = capsys.readouterr().out
    assert "conv1.weight" in out and "params/conv1/kernel" in out and "conv2d" in out
    assert "layer1.1.running_var" in out and "batch_stats/layer1_1/running_var" in out
    assert "fc.weight" in out and "linear" in out and "15 tensors mapped; OK" in out
    flat = checkpoint_io.read_checkpoint(tmp / "model.msgpack")
    np.testing.assert_array_equal(flat["params/layer1_0/kernel"], np.transpose(net.layer1[0].weight.detach().numpy(), (2, 1, 0)))
    assert flat["batch_stats/bn1/num_batches_tracked"] == 5

    for like in ([], ["--like", str(tmp / "model.pt")]):
        assert cli.main(["convert", str(tmp / "model.msgpack"), str(tmp / "back.pt"), "--to-torch", *like]) == 0
        fresh = Net().double()
        fresh.load_state_dict(torch.load(tmp / "back.pt", weights_only=True), strict=True)
        for k, t in net.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], t), k


def test_convert_into_an_existing_flax_target_with_like(checkpoint, capsys):
    net, tmp = checkpoint
    variables, _ = porting.torch_to_flax(net.state_dict(), porting.structural_flax_target(net.state_dict()))
    variables["params"]["fc"]["kernel"] = np.zeros((4, 3))  # a target that does not fit
    porting.save_variables(variables, str(tmp / "target.safetensors"))
    code = cli.main(["convert", str(tmp / "model.pt"), str(tmp / "out.msgpack"), "--like", str(tmp / "target.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "size mismatch for fc.weight" in err and "nothing was written" in err
    assert not (tmp / "out.msgpack").exists()


def test_corrupt_and_malicious_inputs_exit_2_and_write_nothing(checkpoint, capsys):
    _, tmp = checkpoint
    data = (tmp / "model.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 3])
    (tmp / "out.msgpack").write_bytes(b"keep me")
    for bad in ("truncated.pt", "does_not_exist.pt"):
        assert cli.main(["convert", str(tmp / bad), str(tmp / "out.msgpack")]) == 2
        assert "error:" in capsys.readouterr().err
    assert (tmp / "out.msgpack").read_bytes() == b"keep me"

    marker = tmp / "pwned"
    script = (f"import torch, pathlib\nclass P:\n    def __reduce__(self): return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))\n"
              f"torch.save({{'w': torch.zeros(1), 'p': P()}}, {str(tmp / 'evil.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    out = subprocess.run([sys.executable, "-m", "jaxbn", "convert", str(tmp / "evil.pt"), str(tmp / "evil.msgpack")],
                         capture_output=True, text=True, timeout=120, cwd=Path(cli.__file__).parents[1])
    assert out.returncode == 2 and "refusing to load" in out.stderr
    assert not marker.exists() and not (tmp / "evil.msgpack").exists()


def test_direction_mistakes_are_explained(checkpoint, capsys):
    _, tmp = checkpoint
    assert cli.main(["convert", str(tmp / "model.pt"), str(tmp / "x.pt"), "--to-torch"]) == 2
    assert "does not hold Flax variables" in capsys.readouterr().err
    cli.main(["convert", str(tmp / "model.pt"), str(tmp / "v.safetensors"), "--quiet"])
    assert cli.main(["convert", str(tmp / "v.safetensors"), str(tmp / "y.msgpack")]) == 2
    assert "pass --to-torch" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp / "model.pt"), str(tmp / "out.txt")]) == 2
    assert "extension" in capsys.readouterr().err


# ------------------------------------------------------------------ hardening


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_to_torch_honours_cast(checkpoint, capsys):
    net, tmp = checkpoint
    variables, _ = porting.torch_to_flax(net.float().state_dict(), porting.structural_flax_target(net.float().state_dict()))
    porting.save_variables(variables, str(tmp / "f32.msgpack"))  # float32 Flax, float64 reference
    argv = ["convert", tmp / "f32.msgpack", tmp / "back.pt", "--to-torch", "--like", tmp / "model.pt"]
    code, _, err = _run(argv, capsys)
    assert code == 1 and "pass cast=True" in err and not (tmp / "back.pt").exists()
    code, _, err = _run([*argv, "--cast"], capsys)
    assert code == 0, err
    back = torch.load(tmp / "back.pt", weights_only=True)
    assert back["conv1.weight"].dtype == torch.float64
    assert torch.equal(back["conv1.weight"], net.conv1.weight.detach().double())


def test_output_that_is_the_input_is_refused(checkpoint, capsys):
    _, tmp = checkpoint
    original = (tmp / "model.pt").read_bytes()
    (tmp / "sub").mkdir()
    (tmp / "link.pt").symlink_to(tmp / "model.pt")
    for out in (tmp / "model.pt", tmp / "sub" / ".." / "model.pt", tmp / "link.pt"):
        code, _, err = _run(["convert", tmp / "model.pt", out, "--to-torch"], capsys)
        assert code == 2 and "same file" in _one_line_error(err), err
    code, _, err = _run(["convert", tmp / "model.pt", tmp / "model.pt"], capsys)
    assert code == 2 and ("same file" in err or ".pt" in err)
    assert (tmp / "model.pt").read_bytes() == original


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin"])
def test_torch_to_flax_into_a_torch_file_is_refused(checkpoint, capsys, ext):
    _, tmp = checkpoint
    code, _, err = _run(["convert", tmp / "model.pt", tmp / f"vars{ext}"], capsys)
    assert code == 2 and "--to-torch" in _one_line_error(err)
    assert not (tmp / f"vars{ext}").exists()


def test_colliding_and_invalid_keys_are_refused_naming_them(tmp_path, capsys):
    a, b = np.ones(2), np.zeros(3)
    for i, state in enumerate(({"x/bias.y": a, "x.bias": b}, {"x.bias": b, "x/bias.y": a},
                               {"x.bias.y": a, "x.bias": b}, {"x.bias": b, "x.bias.y": a})):
        checkpoint_io.write_checkpoint(state, tmp_path / f"in{i}.safetensors")
        code, _, err = _run(["convert", tmp_path / f"in{i}.safetensors", tmp_path / f"out{i}.msgpack"], capsys)
        line = _one_line_error(err)
        assert code == 2, err
        assert ("x/bias.y" in line) if "x/bias.y" in state else ("x.bias.y" in line and "'x.bias'" in line), line
        assert not (tmp_path / f"out{i}.msgpack").exists()
    for key in ("a..weight", ".weight", "a.weight."):
        checkpoint_io.write_checkpoint({key: a}, tmp_path / "bad.safetensors")
        code, _, err = _run(["convert", tmp_path / "bad.safetensors", tmp_path / "bad.msgpack"], capsys)
        assert code == 2 and "empty segment" in _one_line_error(err) and repr(key) in err


def test_unwritable_outputs_and_unsupported_tensors_exit_2_with_one_line(checkpoint, capsys):
    _, tmp = checkpoint
    (tmp / "adir.msgpack").mkdir()
    for out, words in ((tmp / "missing" / "v.msgpack", "does not exist"), (tmp / "adir.msgpack", "directory")):
        code, _, err = _run(["convert", tmp / "model.pt", out], capsys)
        assert code == 2 and words in _one_line_error(err)
    torch.save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp / "f8.pt")
    code, _, err = _run(["convert", tmp / "f8.pt", tmp / "f8.msgpack"], capsys)
    assert code == 2 and "'w'" in _one_line_error(err) and "float8_e4m3fn" in err


def test_writing_torch_without_torch_exits_2(checkpoint):
    net, tmp = checkpoint
    porting.save_variables(porting.torch_to_flax(net.state_dict(), porting.structural_flax_target(net.state_dict()))[0],
                           str(tmp / "v.safetensors"))
    script = ("import sys; sys.modules['torch'] = None\nfrom jaxbn import __main__ as cli\n"
              f"sys.exit(cli.main(['convert', {str(tmp / 'v.safetensors')!r}, {str(tmp / 'back.pt')!r}, '--to-torch']))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(cli.__file__).parents[1])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "needs torch" in _one_line_error(out.stderr)
    assert not (tmp / "back.pt").exists()


def test_max_bytes_option_bounds_npz(tmp_path, capsys):
    np.savez_compressed(tmp_path / "zeros.npz", w=np.zeros(100_000))  # 800 kB of zeros, ~1 kB file
    code, _, err = _run(["convert", tmp_path / "zeros.npz", tmp_path / "z.msgpack", "--max-bytes", 799_999], capsys)
    assert code == 2 and "800000 bytes" in _one_line_error(err)
    code, _, err = _run(["convert", tmp_path / "zeros.npz", tmp_path / "z.msgpack", "--max-bytes", 800_000], capsys)
    assert code == 0, err


def test_convert_help_has_no_sphinx_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    assert "structural_flax_target" in out and ":func:" not in out and "``" not in out
