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
