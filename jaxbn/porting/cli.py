"""``python -m jaxbn convert IN OUT``: port a checkpoint file between torch and Flax.

torch -> Flax (default): ``IN`` is a torch ``state_dict`` (``.pt``/``.pth``, ``.safetensors``,
``.npz``; format detected from the content); ``OUT`` is Flax variables
``{'params', 'batch_stats'}`` written as ``.msgpack`` (``flax.serialization``),
``.safetensors``/``.npz`` (names ``params/layer1_0/bn1/weight``) or an Orbax checkpoint
directory (what ``orbax.checkpoint.StandardCheckpointer`` saves and restores), never
``.pt``/``.pth``/``.bin``. OUT's format comes from its extension; an OUT ending in ``/``, naming
an existing directory or without an extension is an Orbax directory; ``--format`` overrides both.
Without ``--like`` the conversion is *structural* (:func:`jaxbn.porting.structural_flax_target`):
conv/linear weights (rank >= 2) become Flax kernels, BatchNorm buffers go to ``batch_stats``,
integer indices join their parent with ``_``. ``--like VARS`` fills an existing Flax variables
file instead (names, shapes and dtypes checked strictly).

Flax -> torch (``--to-torch``): ``IN`` is Flax variables (a file, or an Orbax checkpoint
directory), ``OUT`` a torch ``state_dict`` (``.pt``/``.pth``, ``.safetensors``, ``.npz``);
``--like REF`` takes the keys/shapes/dtypes from a reference torch checkpoint (else the
structural inverse, :func:`jaxbn.porting.structural_torch_target`).

Exit status: 0 converted; 1 the checkpoint does not fit (missing/unexpected keys, shape or dtype
mismatch, all listed); 2 a file is unreadable, corrupt, unsafe or unsupported, or OUT cannot be
written (missing directory, OUT is IN, ...). Every failure is reported on stderr, never as a
traceback. ``OUT`` is written only on success, atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Literal

import numpy as np

from . import formats, paths
from .directions import flax_to_torch, torch_to_flax
from .errors import CheckpointError
from .report import PortingError, PortReport
from .targets import structural_flax_target, structural_torch_target


def _plain(doc: str) -> str:
    """Docstring text for ``--help``: Sphinx roles and ``literal`` markup removed."""
    return re.sub(r":[a-z]+:`([^`]*)`", r"\1", doc).replace("``", "")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand."""
    p = sub.add_parser(
        "convert",
        help="port a checkpoint: torch state_dict -> Flax variables (or --to-torch)",
        description=_plain(__doc__.split("\n\n", 1)[1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN",
                   help="checkpoint file or Orbax directory to read (format detected from content)")
    p.add_argument("output", metavar="OUT",
                   help="file to write (.msgpack, .safetensors, .npz, .pt, .pth), or an Orbax checkpoint "
                        "directory (a path ending in /, an existing directory, or one without extension)")
    p.add_argument("--format", choices=formats.FORMATS, help="OUT's format (default: from OUT's path)")
    p.add_argument("--to-torch", action="store_true", help="Flax variables -> torch state_dict")
    p.add_argument("--like", metavar="REF", help="target file in OUT's framework giving names/shapes/dtypes")
    p.add_argument("--key", help="entry of IN holding the state_dict (e.g. state_dict, model)")
    p.add_argument("--cast", action="store_true", help="allow float dtype conversion (with --like)")
    p.add_argument("--max-bytes", type=int, default=formats.DEFAULT_MAX_BYTES, metavar="N",
                   help="refuse an .npz or Orbax checkpoint holding more than N bytes decompressed "
                        "(default: 16 GiB)")
    p.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to ``args.output``; the exit status described in the module doc.

    One walk: check OUT, read IN (and REF), convert, write OUT.
    """
    try:
        out = _checked_output(args)
        flat = formats.read_checkpoint(args.input, key=args.key, max_bytes=args.max_bytes)
        like = formats.read_checkpoint(args.like, max_bytes=args.max_bytes) if args.like else None
        convert = _flax_to_torch if args.to_torch else _torch_to_flax
        converted, report = convert(flat, like, args)
        out.write(converted)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PortingError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    lines = str(report).splitlines()
    print("\n".join(lines[-1:] if args.quiet else lines))
    direction = "torch state_dict" if args.to_torch else "Flax variables"
    print(f"wrote {direction} to {args.output}")
    return 0


def _checked_output(args: argparse.Namespace) -> formats.Destination:
    """OUT, refused if it cannot be written, would destroy an input or holds the wrong framework's names."""
    out = formats.destination(args.output, args.format)
    if args.to_torch and not out.format.holds("torch"):
        raise CheckpointError(f"--to-torch writes a torch state_dict, not {_described(out.format)}: use "
                              f"{extensions_holding('torch')}")
    if not args.to_torch and not out.format.holds("flax"):
        raise CheckpointError(
            f"{args.output!r}: Flax variables are not written as {_described(out.format)}; use "
            f"{extensions_holding('flax')}, or pass --to-torch to convert Flax variables to torch")
    for other in filter(None, (args.input, args.like)):
        if same_file(other, args.output):
            raise CheckpointError(
                f"{args.output!r} is the same file as {other!r}: refusing to overwrite an input; "
                "choose another output")
    return out


def extensions_holding(framework: Literal["torch", "flax"]) -> str:
    """``'.pt, .pth, .bin, .safetensors or .npz'``: the extensions of the formats holding its
    names (``'... or an orbax directory'`` for a directory format)."""
    extensions = [e for fmt in formats.REGISTRY if fmt.holds(framework) for e in fmt.extensions]
    extensions += [_described(fmt) for fmt in formats.REGISTRY if fmt.holds(framework) and fmt.directory]
    return ", ".join(extensions[:-1]) + " or " + extensions[-1]


def _described(fmt: formats.Format) -> str:
    """``'a torch file (.pt/.pth/.bin)'`` or ``'an orbax directory'``."""
    return f"an {fmt.name} directory" if fmt.directory else f"a {fmt.name} file ({'/'.join(fmt.extensions)})"


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file: through symbolic links, relative spellings and hard
    links (``os.path.samefile``); for a file that does not exist yet, its resolved name."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare the resolved names
        return os.path.realpath(a) == os.path.realpath(b)


def _torch_to_flax(flat: dict, like: dict | None, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], PortReport]:
    """A torch ``state_dict`` as Flax variables named ``params/conv/kernel`` (into REF's if given)."""
    if flat and all(paths.SEP in k for k in flat):
        raise CheckpointError(
            f"{args.input!r} holds Flax variables (names with '/'); pass --to-torch to convert them to torch")
    target = _nest(like, args.like) if like is not None else structural_flax_target(flat)
    variables, report = torch_to_flax(flat, target, cast=args.cast, as_jax=False)
    return paths.names_from_tree(variables), report


def _flax_to_torch(flat: dict, like: dict | None, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], PortReport]:
    """Flax variables as a torch ``state_dict`` (REF's keys if given, else the structural ones)."""
    variables = _nest(flat, args.input)
    target = like if like is not None else structural_torch_target(variables)
    return flax_to_torch(variables, target, cast=args.cast)


def _nest(flat: dict, path: str) -> dict:
    """Flax variables from a flat file (names joined with '/')."""
    if not all(paths.SEP in k for k in flat):
        raise CheckpointError(
            f"{path!r} does not hold Flax variables (names like params/conv1/kernel); it looks "
            "like a torch state_dict")
    return paths.tree_from_names(flat)
