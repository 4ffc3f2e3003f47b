"""`python -m jaxbn port` never silent, never destructive: refusals, atomic writes, checkpoints as torch loads them.

Run in-process through ``jaxbn.__main__.main``. Torch decides every loaded value: whether a
checkpoint without ``num_batches_tracked`` loads, and what the loaded model holds, come from
``model.load_state_dict`` itself; the port's variables are compared with ``from_torch`` of that
torch-loaded model.
"""

from __future__ import annotations

import errno
import os
import sys
import uuid

import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import __main__ as cli
from jaxbn import checkpoint_io
from jaxbn.porting.paths import names_from_tree

SHAPE = (2, 3, 6, 6)

MODEL_SOURCE = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4, momentum=None)  # cumulative average: the counter matters
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def build():
    torch.manual_seed(0)
    return Net().double()


def build_float32():
    torch.manual_seed(0)
    return Net()


def build_counted():
    net = build()
    net.bn.num_batches_tracked.fill_(7)
    return net


def build_untracked_later():
    net = build_counted()
    net.bn.track_running_stats = False  # torch's _load_from_state_dict then fills no counter
    return net


def build_recurrent():
    return Recurrent().double()


def raising():
    raise RuntimeError("no weights here")


def not_a_module():
    return 3
'''


class Project:
    """A directory holding the model's module (a fresh name per test), the current directory."""

    def __init__(self, path, name):
        self.path, self.name = path, name
        self.source = path / f"{name}.py"

    def port(self, capsys, *args, model="build", shape=SHAPE):
        """``python -m jaxbn port NAME:model --input-shape ... *args`` -> (exit code, stdout, stderr)."""
        spec = model.format(self.name) if "{}" in model or ":" in model else f"{self.name}:{model}"
        code = cli.main(["port", spec, "--input-shape=" + ",".join(map(str, shape)), *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    def files(self) -> set[str]:
        return {p.name for p in self.path.iterdir() if p.name != "__pycache__"}


@pytest.fixture
def project(tmp_path, monkeypatch):
    name = f"portnet_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODEL_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield Project(tmp_path, name)
    for module in [m for m in sys.modules if m.startswith(name) or m.startswith("alias_") or m.startswith("broken_")]:
        del sys.modules[module]


def load_module(project):
    import importlib

    return importlib.import_module(project.name)


def trained_state(project, builder="build"):
    """A state_dict differing from the builder's fresh one (so that loading it shows)."""
    net = getattr(load_module(project), builder)()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
        net.bn.running_mean.add_(0.25)
    return net.state_dict()


def assert_refused(code, err, expected_code):
    assert code == expected_code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err


def port_variables(path) -> dict[str, np.ndarray]:
    return checkpoint_io.read_checkpoint(path)


def from_torch_variables(net) -> dict[str, np.ndarray]:
    _, variables = jaxbn.from_torch(net, torch.zeros(SHAPE, dtype=next(net.parameters()).dtype))
    return {k: np.asarray(v) for k, v in names_from_tree(variables).items()}


# ---------------------------------------------------------------- outputs never destroy inputs


def spell(project, target: str, spelling: str, suffix: str) -> str:
    """Another name for ``target``: itself, a relative detour, a symbolic link or a hard link."""
    if spelling == "same":
        return target
    if spelling == "relative":
        os.mkdir(project.path / "sub")
        return os.path.join(".", "sub", "..", target)
    if spelling == "absolute":
        return str(project.path / target)
    link = f"link_{spelling}{suffix}"
    (os.symlink if spelling == "symlink" else os.link)(target, project.path / link)
    return link


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink"])
@pytest.mark.parametrize("output", ["--out", "--emit"])
def test_an_output_that_is_the_checkpoint_is_refused(project, capsys, output, spelling):
    checkpoint_io.write_checkpoint(trained_state(project), "model.npz")
    before = (project.path / "model.npz").read_bytes()
    args = {"--emit": "model_flax.py", "--out": "variables.msgpack"}
    args[output] = spell(project, "model.npz", spelling, ".npz" if output == "--out" else ".py")
    files = project.files()
    code, _, err = project.port(capsys, "--checkpoint", "model.npz", *[a for kv in args.items() for a in kv])
    assert_refused(code, err, 2)
    assert "model.npz" in err and "same file" in err
    assert (project.path / "model.npz").read_bytes() == before
    assert project.files() == files


def test_a_torch_checkpoint_as_out_is_refused(project, capsys):
    torch.save(trained_state(project), "model.pt")
    before = (project.path / "model.pt").read_bytes()
    code, _, err = project.port(capsys, "--checkpoint", "model.pt", "--emit", "m.py", "--out", "model.pt")
    assert_refused(code, err, 2)
    assert (project.path / "model.pt").read_bytes() == before
    assert not (project.path / "m.py").exists()


@pytest.mark.parametrize("spelling", ["same", "absolute", "symlink", "hardlink"])
def test_emit_and_out_naming_one_file_are_refused(project, capsys, spelling):
    if spelling in ("symlink", "hardlink"):
        (project.path / "existing.npz").write_text("keep me")
    target = "existing.npz" if spelling in ("symlink", "hardlink") else "both.npz"
    out = spell(project, target, spelling, ".npz")
    files = project.files()
    code, _, err = project.port(capsys, "--emit", target, "--out", out)
    assert_refused(code, err, 2)
    assert project.files() == files
    if spelling in ("symlink", "hardlink"):
        assert (project.path / "existing.npz").read_text() == "keep me"


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink"])
@pytest.mark.parametrize("output", ["--emit", "--out"])
def test_an_output_over_the_model_source_is_refused(project, capsys, output, spelling):
    args = {"--emit": "model_flax.py", "--out": "variables.npz"}
    args[output] = spell(project, project.source.name, spelling, ".npz" if output == "--out" else ".py")
    files = project.files()
    code, _, err = project.port(capsys, *[a for kv in args.items() for a in kv])
    assert_refused(code, err, 2)
    assert project.name in err
    assert project.source.read_text() == MODEL_SOURCE
    assert project.files() == files


def test_the_source_of_a_module_the_callable_comes_from_is_protected(project, capsys):
    """``alias:build`` where alias.py only imports ``build`` from the file that defines it."""
    alias = f"alias_{project.name}"
    (project.path / f"{alias}.py").write_text(f"from {project.name} import build\n")
    code, _, err = project.port(capsys, "--emit", project.source.name, model=f"{alias}:build")
    assert_refused(code, err, 2)
    assert project.source.read_text() == MODEL_SOURCE


# ---------------------------------------------------------------- all or nothing


def test_a_failed_variables_write_leaves_no_emitted_file(project, capsys, monkeypatch):
    (project.path / "model_flax.py").write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    files = project.files()
    code, _, err = project.port(capsys, "--emit", "model_flax.py", "--out", "variables.npz")
    assert_refused(code, err, 2)
    assert "No space left on device" in err
    assert (project.path / "model_flax.py").read_text() == "old"
    assert project.files() == files  # no variables file, no temporary file left


def test_an_unwritable_out_is_refused_before_anything_is_written(project, capsys):
    files = project.files()
    code, _, err = project.port(capsys, "--emit", "model_flax.py", "--out", "missing/variables.msgpack")
    assert_refused(code, err, 2)
    assert "does not exist" in err
    assert project.files() == files


def test_success_writes_both_files(project, capsys):
    code, out, err = project.port(capsys, "--emit", "model_flax.py", "--out", "variables.msgpack")
    assert code == 0, err
    assert "wrote Model" in out and "class Model(nn.Module)" in (project.path / "model_flax.py").read_text()
    net = load_module(project).build()
    flat = port_variables(project.path / "variables.msgpack")
    expected = from_torch_variables(net)
    assert flat.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(flat[k], expected[k], err_msg=k)
    assert project.files() == {project.source.name, "model_flax.py", "variables.msgpack"}


# ---------------------------------------------------------------- checkpoints as torch loads them


def without_counter(state: dict, how: str, path) -> None:
    """Save ``state`` without ``num_batches_tracked`` as a plain dict, a state_dict keeping torch's
    version metadata, or safetensors (which has none)."""
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if how == "plain":
        torch.save(kept, path)
    elif how == "with_metadata":
        for k in list(state):
            if k.endswith("num_batches_tracked"):
                del state[k]  # an OrderedDict from state_dict(): _metadata stays
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(kept, str(path))


def torch_loaded(builder, path, how):
    """torch's own answer: the builder's model after ``load_state_dict``, or the error it raises."""
    if how == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    net = builder()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        return None, str(e)
    return net, None


@pytest.mark.parametrize("how", ["plain", "with_metadata", "safetensors"])
@pytest.mark.parametrize("builder", ["build_counted", "build_untracked_later"])
def test_a_checkpoint_without_num_batches_tracked_loads_as_torch_loads_it(project, capsys, builder, how):
    suffix = ".safetensors" if how == "safetensors" else ".pt"
    without_counter(trained_state(project, builder), how, project.path / f"model{suffix}")
    net, torch_error = torch_loaded(getattr(load_module(project), builder), project.path / f"model{suffix}", how)
    code, out, err = project.port(capsys, "--checkpoint", f"model{suffix}", "--emit", "m.py",
                                  "--out", "v.msgpack", model=builder)
    if torch_error is not None:  # torch refuses: so does the port
        assert "num_batches_tracked" in torch_error
        assert_refused(code, err, 1)
        assert "num_batches_tracked" in err
        assert not (project.path / "m.py").exists() and not (project.path / "v.msgpack").exists()
        return
    assert code == 0, err
    assert "num_batches_tracked" in out  # said, not silent
    flat = port_variables(project.path / "v.msgpack")
    expected = from_torch_variables(net)
    assert int(flat["batch_stats/bn/num_batches_tracked"]) == int(net.bn.num_batches_tracked) == 7
    assert flat.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(flat[k], expected[k], err_msg=k)


def test_which_counter_cases_torch_accepts(project):
    """The parametrization above covers both torch answers (else it could not fail either way)."""
    module = load_module(project)
    answers = {}
    for builder in ("build_counted", "build_untracked_later"):
        for how in ("plain", "with_metadata", "safetensors"):
            path = project.path / f"{builder}_{how}.bin"
            without_counter(trained_state(project, builder), how, path)
            answers[builder, how] = torch_loaded(getattr(module, builder), path, how)[1] is None
    assert answers == {("build_counted", "plain"): True, ("build_counted", "with_metadata"): False,
                       ("build_counted", "safetensors"): True, ("build_untracked_later", "plain"): False,
                       ("build_untracked_later", "with_metadata"): False,
                       ("build_untracked_later", "safetensors"): False}


def test_a_float64_checkpoint_into_a_float32_model_needs_cast(project, capsys):
    torch.save(trained_state(project, "build"), "model.pt")  # float64
    args = ("--checkpoint", "model.pt", "--emit", "m.py", "--out", "v.msgpack")
    code, _, err = project.port(capsys, *args, model="build_float32")
    assert_refused(code, err, 1)
    assert "float64" in err and "float32" in err and "--cast" in err
    assert not (project.path / "m.py").exists() and not (project.path / "v.msgpack").exists()

    code, _, err = project.port(capsys, *args, "--cast", model="build_float32")
    assert code == 0, err
    net = load_module(project).build_float32()
    net.load_state_dict(torch.load("model.pt", weights_only=True))  # torch casts silently
    flat = port_variables(project.path / "v.msgpack")
    expected = from_torch_variables(net)
    for k in expected:
        assert flat[k].dtype == expected[k].dtype, k
        np.testing.assert_array_equal(flat[k], expected[k], err_msg=k)


# ---------------------------------------------------------------- bad input: one line, exit 2


BAD_INPUTS = {
    "absent checkpoint": ("build", SHAPE, ["--checkpoint", "absent.pt"]),
    "checkpoint is a directory": ("build", SHAPE, ["--checkpoint", "."]),
    "corrupt checkpoint": ("build", SHAPE, ["--checkpoint", "garbage.pt"]),
    "missing --key": ("build", SHAPE, ["--checkpoint", "model.pt", "--key", "state_dict"]),
    "shape not integers": ("build", ("2", "x", "6", "6"), []),
    "negative shape": ("build", (-1, 3, 6, 6), []),
    "shape the model does not take": ("build", (2, 5, 6, 6), []),
    "empty shape": ("build", ("",), []),
    "unknown dtype": ("build", SHAPE, ["--dtype", "float65"]),
    "dtype that is not a dtype": ("build", SHAPE, ["--dtype", "Tensor"]),
    "no colon": ("{}", SHAPE, []),
    "no callable": ("{}:", SHAPE, []),
    "unknown module": ("no_such_module_xyz:build", SHAPE, []),
    "unknown callable": ("nope", SHAPE, []),
    "callable raises": ("raising", SHAPE, []),
    "not a module": ("not_a_module", SHAPE, []),
    "module with a syntax error": ("broken_syntax:build", SHAPE, []),
    "module raising on import": ("broken_import:build", SHAPE, []),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(project, capsys, case):
    model, shape, extra = BAD_INPUTS[case]
    torch.save(trained_state(project), "model.pt")
    (project.path / "garbage.pt").write_bytes(b"\x80\x04 not a checkpoint")
    (project.path / "broken_syntax.py").write_text("def build(:\n")
    (project.path / "broken_import.py").write_text("raise RuntimeError('needs a GPU')\n")
    files = project.files()
    code, _, err = project.port(capsys, "--emit", "m.py", "--out", "v.msgpack", *extra, model=model, shape=shape)
    assert_refused(code, err, 2)
    assert project.files() == files


def test_an_untranslatable_model_is_one_line_and_exit_1(project, capsys):
    code, _, err = project.port(capsys, "--emit", "m.py", model="build_recurrent", shape=(2, 5, 3))
    assert_refused(code, err, 1)
    assert "LSTM" in err and "nothing was written" in err
    assert not (project.path / "m.py").exists()
