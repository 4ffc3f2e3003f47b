"""``python -m jaxbn port MODULE:CALLABLE --input-shape 2,3,224,224 --emit model_flax.py``.

Builds the torch model (``CALLABLE()`` from the importable ``MODULE``; the current directory is
on the path), optionally loads ``--checkpoint`` into it (read safely, ``weights_only``; strict, as
torch's ``load_state_dict`` loads it, but a float dtype that differs is refused unless ``--cast``),
translates it with :func:`jaxbn.from_torch` and writes ``--emit``: a Python file defining
``Model``, a ``flax.linen.Module`` with ``__call__(self, x, train=False)`` that imports no torch
(with ``--nnx``: an ``nnx.Module`` built as ``Model(rngs=nnx.Rngs(0))``, torch's module tree and
modes, ``from_torch(..., api="nnx")``'s). ``--out`` writes the variables for that ``Model``
(``.msgpack``, ``.safetensors``, ``.npz`` or an Orbax checkpoint directory; ``--format``).

Exit status: 0 written; 1 the model has something not translated, or the checkpoint does not fit
it (missing/unexpected keys, shapes, dtypes); 2 bad usage or input: a file that cannot be read, an
input shape or dtype the model does not take, MODULE:CALLABLE that cannot be imported or called,
an output that cannot be written or that would overwrite an input (the checkpoint, the other
output, a source file of the model's modules; also through another spelling or a link). Every
failure is one line on stderr, never a traceback. The files are written only once everything
succeeded, each atomically: a failure leaves neither.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..porting import formats
from ..porting.cli import same_file
from ..porting.copying import Copy, copy_checked
from ..porting.errors import CheckpointError, UnsupportedError
from ..porting.matching import Entry
from ..porting.names import COUNTER
from ..porting.paths import names_from_tree
from ..porting.report import PortReport
from ..porting.tensors import BFLOAT16, numpy_to_tensor, tensor_to_numpy

USAGE, UNTRANSLATABLE = 2, 1


class PortFailure(Exception):
    """Why ``port`` stops: one line on stderr, and the exit status ``code``."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.code = code


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register the ``port`` subcommand."""
    p = sub.add_parser(
        "port",
        help="translate a torch model into a Flax module file (and its variables)",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODULE:CALLABLE", help="e.g. torchvision.models:resnet18 or mynet:build")
    p.add_argument("--input-shape", required=True, help="example input shape, NCHW, e.g. 2,3,224,224")
    p.add_argument("--dtype", default=None, help="example input dtype (default: the model's parameters')")
    p.add_argument("--checkpoint", help="torch state_dict to load first (.pt/.pth, .safetensors, .npz)")
    p.add_argument("--key", help="entry of the checkpoint holding the state_dict")
    p.add_argument("--cast", action="store_true",
                   help="allow float dtype conversion of the checkpoint into the model (torch casts silently)")
    p.add_argument("--emit", required=True, metavar="FILE.py", help="the Flax source file to write")
    p.add_argument("--out", metavar="VARS", help="variables to write (.msgpack, .safetensors, .npz, or an Orbax "
                   "checkpoint directory: a path ending in /, an existing directory, or one without extension)")
    p.add_argument("--format", choices=formats.FORMATS, help="--out's format (default: from its path)")
    p.add_argument("--channels-last", action="store_true", help="the Flax Model takes NHWC (and computes NHWC)")
    p.add_argument("--fold-bn", action="store_true",
                   help="an inference-only Model: every eval BatchNorm right after a conv or linear "
                        "layer folded into it (jaxbn.fold_batch_norm); the report is printed")
    p.add_argument("--nnx", action="store_true",
                   help="write a Flax NNX Model (torch's module tree and modes; Model(rngs=nnx.Rngs(0))) "
                        "instead of a linen one; --out then holds its NNX state")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Port ``args.model``; the exit status described in the module doc."""
    try:
        _port(args)
    except PortFailure as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.code
    return 0


def _port(args: argparse.Namespace) -> None:
    """Check the arguments and outputs, build, load, translate, then write both files."""
    import torch

    if args.nnx and (args.channels_last or args.fold_bn):
        raise PortFailure(f"--nnx with {'--channels-last' if args.channels_last else '--fold-bn'}: folding and "
                          "channels-last are linen-only (the NNX Model computes in torch's layout, as torch does)")
    shape = parse_shape(args.input_shape)
    dtype = parse_dtype(args.dtype)
    emit, out = checked_outputs(args)
    model = build_model(args.model)
    refuse_overwriting_sources(filter(None, (args.emit, args.out)), args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, key=args.key, cast=args.cast)
    example = torch.zeros(shape, dtype=dtype or model_dtype(model))
    check_runs(model, example, args.model)
    source, variables, torch_type, report = translate(model, example, args.channels_last, args.fold_bn, nnx=args.nnx)
    write_outputs(emit, source, out, variables)
    if report is not None:
        print(report)
    print(f"wrote Model ({torch_type}) to {args.emit}")
    if args.out:
        print(f"wrote its variables to {args.out}")


def one_line(message: str) -> str:
    """A (multi-line, torch-style) message as one line: its lines joined by ``; ``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    joined = ""
    for line in lines:
        joined += line if not joined else (" " if joined.endswith(":") else "; ") + line
    return joined


# ---------------------------------------------------------------- arguments


def parse_shape(text: str) -> tuple[int, ...]:
    """``'2,3,224,224'`` -> ``(2, 3, 224, 224)``; anything but positive integers is refused."""
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text) or any(int(s) < 1 for s in text.split(",")):
        raise PortFailure(f"--input-shape {text!r}: expected positive integers separated by commas, "
                          "e.g. 2,3,224,224")
    return tuple(int(s) for s in text.split(","))


def parse_dtype(name: str | None) -> Any:
    """``'float64'`` -> ``torch.float64``; ``None`` stays ``None`` (the model's dtype)."""
    import torch

    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PortFailure(f"--dtype {name!r} is not a torch dtype (e.g. float32, float64, bfloat16)")
    return dtype


def model_dtype(model: Any) -> Any:
    """The dtype of the model's first floating parameter or buffer, else ``torch.float32``."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


# ---------------------------------------------------------------- outputs never destroy inputs


def checked_outputs(args: argparse.Namespace) -> tuple[str, formats.Destination | None]:
    """``(--emit's target file, --out's Destination)``, refused (exit 2) before any work if one
    cannot be written, ``--out`` cannot hold Flax variables, or an output is the checkpoint or
    the other output (compared as :func:`jaxbn.porting.cli.same_file`: links and spellings seen through)."""
    from ..porting.cli import extensions_holding

    if args.format and not args.out:
        raise PortFailure(f"--format {args.format} is the format of --out: pass --out VARS too")
    try:
        emit = formats.check_writable(args.emit)
        out = formats.destination(args.out, args.format) if args.out else None
    except CheckpointError as e:
        raise PortFailure(str(e)) from e
    if out is not None and not out.format.holds("flax"):
        raise PortFailure(f"--out {args.out!r}: Flax variables are not written as {out.format.name}; "
                          f"use {extensions_holding('flax')}")
    pairs = [(args.emit, "--emit", args.checkpoint, "--checkpoint")]
    if args.out:
        pairs += [(args.out, "--out", args.checkpoint, "--checkpoint"), (args.out, "--out", args.emit, "--emit")]
    for output, output_flag, other, other_flag in pairs:
        if other and same_file(other, output):
            raise PortFailure(f"{output_flag} {output!r} is the same file as {other_flag} {other!r}: "
                              "refusing to overwrite it; choose another output")
    return emit, out


def refuse_overwriting_sources(outputs: Iterable[str], spec: str) -> None:
    """Refuse (exit 2) an existing output that is the source file of an imported module: the
    module defining ``MODULE:CALLABLE`` and everything it imported."""
    existing = [o for o in outputs if os.path.exists(o)]
    if not existing:
        return
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        for output in existing:
            if isinstance(source, str) and same_file(source, output):
                raise PortFailure(f"{output!r} is the source file of the module {name!r} (imported to "
                                  f"build {spec}): refusing to overwrite it; choose another output")


# ---------------------------------------------------------------- the model


def build_model(spec: str) -> Any:
    """``MODULE:CALLABLE`` -> ``CALLABLE()``, a ``torch.nn.Module``; every failure of the user's
    code (import, attribute, call) is a :class:`PortFailure` (exit 2) naming it."""
    import torch

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PortFailure(f"expected MODULE:CALLABLE (e.g. torchvision.models:resnet18), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:
        raise PortFailure(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise PortFailure(f"{spec}: {getattr(factory, '__name__', module_name)!r} has no attribute {part!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise PortFailure(f"{spec} is a {type(factory).__name__}, not a callable returning a torch module")
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise PortFailure(f"{spec}() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise PortFailure(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_runs(model: Any, example: Any, spec: str) -> None:
    """Refuse (exit 2) an example input the torch model itself does not take: one forward in
    eval mode under ``torch.no_grad()`` (no running statistics move), then each submodule's mode
    restored."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:
        raise PortFailure(f"{spec}() does not run on an input of shape {tuple(example.shape)} "
                          f"({example.dtype}): {type(e).__name__}: {e}") from e
    finally:
        for m, training in modes:
            m.training = training


def translate(model: Any, example: Any, channels_last: bool, fold_bn: bool = False, *, nnx: bool = False
              ) -> tuple[str, dict[str, np.ndarray], str, Any]:
    """``(Flax source, flat variables, torch type, fold report or None)``, in memory; exit 1 if
    not translated. With ``nnx``: the NNX source and its state (:func:`translate_nnx`)."""
    from .emit import emit_source
    from .fold import fold_batch_norm
    from .port import example_arrays, from_torch

    report = None
    try:
        if nnx:
            return (*translate_nnx(model, example), None)
        ported = from_torch(model, example, channels_last=channels_last)
        if fold_bn:
            ported, report = fold_batch_norm(ported, *example_arrays(example, channels_last))
        source = emit_source(ported.module.block)
        flat = {k: np.asarray(v) for k, v in names_from_tree(ported.variables).items()}
    except UnsupportedError as e:
        raise PortFailure(f"{e}; nothing was written", UNTRANSLATABLE) from e
    except Exception as e:
        raise PortFailure(f"translating the model failed: {type(e).__name__}: {e}; nothing was written",
                          UNTRANSLATABLE) from e
    return source, flat, ported.module.block.torch_type, report


def translate_nnx(model: Any, example: Any) -> tuple[str, dict[str, np.ndarray], str]:
    """``(NNX source, flat state, torch type)``: the emitted ``Model``'s tree and modes are
    ``from_torch(model, example, api="nnx")``'s, whose ``nnx.Param`` / ``nnx.BatchStat`` state
    (its ``FrozenParam`` too: a ``Param`` in the source) is written under NNX's names
    (``layer1/0/bn1/running_mean``)."""
    from flax import nnx

    from .emit import emit_source
    from .nnx_layers import FrozenParam
    from .nnx_module import module_types
    from .port import captured, nnx_model

    block = captured(model, example, "nnx")
    ported = nnx_model(model, block)
    source = emit_source(block, "nnx", training=model.training, containers=module_types(model))
    state = nnx.state(ported, (nnx.Param, nnx.BatchStat, FrozenParam))
    return source, {k: np.asarray(v) for k, v in names_from_tree(state).items()}, block.torch_type


# ---------------------------------------------------------------- the checkpoint


def load_checkpoint(model: Any, path: str, *, key: str | None = None, cast: bool = False) -> None:
    """``model.load_state_dict(checkpoint, strict=True)``, as torch loads the file, except that a
    floating dtype differing from the model's is refused unless ``cast`` (torch casts silently).

    A missing ``num_batches_tracked`` is filled as torch's ``_NormBase._load_from_state_dict``
    fills it (:func:`missing_counters`); the model's own version metadata then goes with the
    state (a plain dict has none, and torch's BatchNorm would add ``num_batches_tracked`` to a
    layer built without running statistics whose ``track_running_stats`` was set later).

    Raises:
      PortFailure: the file cannot be read (exit 2), or does not fit the model (exit 1).
    """
    try:
        flat = formats.read_checkpoint(path, key=key)
    except CheckpointError as e:
        raise PortFailure(str(e)) from e
    expected = model.state_dict()
    filled = missing_counters(model, flat, lambda: checkpoint_versions(path, key))
    flat = checked_dtypes({**flat, **filled}, expected, cast, path)
    state = collections.OrderedDict((k, numpy_to_tensor(v)) for k, v in flat.items())
    state._metadata = getattr(expected, "_metadata", None)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # torch's RuntimeError listing every missing/unexpected key and shape
        hint = (f"; torch fills a missing {COUNTER} only for a layer tracking running statistics "
                "whose checkpoint has no version metadata (a plain dict), so it refuses this too"
                if COUNTER in str(e) else "")
        raise PortFailure(f"{one_line(str(e))}{hint}; nothing was written", UNTRANSLATABLE) from e
    if filled:
        print(f"note: the checkpoint has no {', '.join(filled)}: kept the model's counter "
              f"({', '.join(str(int(v)) for v in filled.values())}), as torch's load_state_dict does")


def missing_counters(model: Any, flat: Mapping[str, Any], versions: Any) -> dict[str, np.ndarray]:
    """``{key: counter}`` for each ``num_batches_tracked`` the checkpoint lacks and torch fills.

    PyTorch equivalent: ``_NormBase._load_from_state_dict`` (torch 2.13) -- when the state
    dict's version for the layer is ``None`` or below 2 (no metadata: a plain dict, safetensors,
    npz) and the layer's ``track_running_stats`` is true, a missing ``num_batches_tracked`` is
    the layer's current counter (``tensor(0)`` if it has none or it is on the meta device).
    A layer without the buffer expects no key and is left alone. ``versions()`` returns the
    checkpoint's ``{module prefix: version}`` (called only if a counter is missing).
    """
    import torch
    from torch.nn.modules.batchnorm import _NormBase

    candidates = {}
    for name, module in model.named_modules():
        key = f"{name}.{COUNTER}" if name else COUNTER
        if (isinstance(module, _NormBase) and module.track_running_stats
                and module.num_batches_tracked is not None and key not in flat):
            counter = module.num_batches_tracked
            candidates[name] = (key, counter if counter.device.type != "meta" else torch.tensor(0))
    if not candidates:
        return {}
    known = versions() or {}
    return {key: tensor_to_numpy(counter) for name, (key, counter) in candidates.items()
            if (known.get(name) or {}).get("version") is None or known[name]["version"] < 2}


def checkpoint_versions(path: str, key: str | None) -> Mapping[str, Any] | None:
    """The checkpoint's torch version metadata (``state_dict()._metadata``), or ``None``.

    Only a torch file saved from ``module.state_dict()`` has it; the file was already read
    safely, and is read again the same way (``weights_only``, memory-mapped when possible).
    """
    if formats.detect_format(path) != "torch":
        return None
    import torch

    try:
        try:
            loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise PortFailure(f"cannot read the version metadata of {path!r}: {type(e).__name__}: {e}") from e
    return getattr(loaded if key is None else loaded[key], "_metadata", None)


def checked_dtypes(flat: dict[str, np.ndarray], expected: Mapping[str, Any], cast: bool, path: str) -> dict[str, np.ndarray]:
    """``flat`` with each tensor in the model's dtype, by :func:`jaxbn.porting.copying.copy_checked`'s
    rule (the one ``convert`` uses): floats differ only with ``cast``, integers if they fit.

    Keys the model lacks and shapes that differ are left to ``load_state_dict`` to report.

    Raises:
      PortFailure: a dtype mismatch (exit 1), each one named.
    """
    copies = []
    for k, value in flat.items():
        if k in expected and tuple(expected[k].shape) == value.shape:
            want = tensor_to_numpy(expected[k].new_empty(0)).dtype
            target = np.broadcast_to(np.zeros((), want), value.shape)
            copies.append(Copy(Entry(k, (k,), "identity", value.shape, value.shape), k, k, value, target, ""))
    coerced = copy_checked(copies, cast, PortReport())
    refused: dict[tuple[np.dtype, np.dtype], list[str]] = {}
    for c in copies:
        if c.key not in coerced:
            refused.setdefault((c.value.dtype, c.target.dtype), []).append(c.key)
    if refused:
        groups = [f"{len(keys)} tensor(s) are {have} where the model has {want} "
                  f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" for (have, want), keys in refused.items()]
        floats = any(_floating(h) and _floating(w) for h, w in refused)
        raise PortFailure(f"{path!r} does not fit the model's dtypes: {'; '.join(groups)}"
                          + ("; pass --cast to convert floating dtypes (torch's load_state_dict casts "
                             "them silently)" if floats and not cast else "")
                          + "; nothing was written", UNTRANSLATABLE)
    return {**flat, **coerced}


def _floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == BFLOAT16


# ---------------------------------------------------------------- writing


def write_outputs(emit: str, source: str, out: formats.Destination | None, variables: dict[str, np.ndarray]) -> None:
    """Write the source to ``emit`` and the variables to ``out``, each atomically (a temporary
    file renamed over the target): the variables are written while the source's temporary file
    is open, so a failure of either leaves neither (the only window: renaming the source after
    the variables' rename).

    Raises:
      PortFailure: a write failed (exit 2); nothing was written.
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(source)
        if out is not None:
            out.write(variables)

    try:
        formats.atomic_write(emit, write)
    except CheckpointError as e:
        raise PortFailure(f"{e}; nothing was written") from e
