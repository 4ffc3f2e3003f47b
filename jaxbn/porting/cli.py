"""``python -m jaxbn convert IN OUT``: port a checkpoint file between torch and Flax.

torch -> Flax (default): ``IN`` is a torch ``state_dict`` (``.pt``/``.pth``, ``.safetensors``,
``.npz``; format detected from the content); ``OUT`` is Flax variables
``{'params', 'batch_stats'}`` written as ``.msgpack`` (``flax.serialization``) or
``.safetensors``/``.npz`` (names ``params/layer1_0/bn1/weight``), never ``.pt``/``.pth``/``.bin``.
Without ``--like`` the conversion is *structural* (:func:`jaxbn.porting.structural_flax_target`):
conv/linear weights (rank >= 2) become Flax kernels, BatchNorm buffers go to ``batch_stats``,
integer indices join their parent with ``_``. ``--like VARS`` fills an existing Flax variables
file instead (names, shapes and dtypes checked strictly).

Flax -> torch (``--to-torch``): ``IN`` is Flax variables, ``OUT`` a torch ``state_dict``
(``.pt``/``.pth``, ``.safetensors``, ``.npz``); ``--like REF`` takes the keys/shapes/dtypes from a
reference torch checkpoint (else the structural inverse, :func:`jaxbn.porting.structural_torch_target`).

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

from . import formats as checkpoint_io
from . import mapping as porting
from . import paths

_TORCH_ONLY_FORMATS = ("torch",)


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
    p.add_argument("input", metavar="IN", help="checkpoint to read (format detected from content)")
    p.add_argument("output", metavar="OUT", help="file to write (.msgpack, .safetensors, .npz, .pt, .pth)")
    p.add_argument("--to-torch", action="store_true", help="Flax variables -> torch state_dict")
    p.add_argument("--like", metavar="REF", help="target file in OUT's framework giving names/shapes/dtypes")
    p.add_argument("--key", help="entry of IN holding the state_dict (e.g. state_dict, model)")
    p.add_argument("--cast", action="store_true", help="allow float dtype conversion (with --like)")
    p.add_argument("--max-bytes", type=int, default=checkpoint_io.DEFAULT_MAX_BYTES, metavar="N",
                   help="refuse an .npz holding more than N bytes decompressed (default: 16 GiB)")
    p.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to ``args.output``; the exit status described in the module doc."""
    try:
        _check_output(args)
        flat = checkpoint_io.read_checkpoint(args.input, key=args.key, max_bytes=args.max_bytes)
        like = checkpoint_io.read_checkpoint(args.like, max_bytes=args.max_bytes) if args.like else None
        if args.to_torch:
            variables = _nest(flat, args.input)
            target = like if like is not None else porting.structural_torch_target(variables)
            out, report = porting.flax_to_torch(variables, target, cast=args.cast)
            checkpoint_io.write_checkpoint(out, args.output)
        else:
            if flat and all(paths.SEP in k for k in flat):
                raise checkpoint_io.CheckpointError(
                    f"{args.input!r} holds Flax variables (names with '/'); pass --to-torch to convert them to torch")
            target = _nest(like, args.like) if like is not None else porting.structural_flax_target(flat)
            variables, report = porting.torch_to_flax(flat, target, cast=args.cast, as_jax=False)
            porting.save_variables(variables, args.output)
    except checkpoint_io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except porting.PortingError as e:
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


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an output that would destroy the input or hold the wrong framework's names."""
    fmt = checkpoint_io.format_for_path(args.output)
    checkpoint_io.check_writable(args.output)
    if args.to_torch and fmt == "msgpack":
        raise checkpoint_io.CheckpointError("--to-torch writes a torch state_dict: use .pt, .pth, .safetensors or .npz")
    if not args.to_torch and fmt in _TORCH_ONLY_FORMATS:
        raise checkpoint_io.CheckpointError(
            f"{args.output!r}: Flax variables are not written as a torch file (.pt/.pth/.bin); use "
            ".msgpack, .safetensors or .npz, or pass --to-torch to convert Flax variables to torch")
    for other in filter(None, (args.input, args.like)):
        if _same_file(other, args.output):
            raise checkpoint_io.CheckpointError(
                f"{args.output!r} is the same file as {other!r}: refusing to overwrite an input; "
                "choose another output")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare the resolved names
        return os.path.realpath(a) == os.path.realpath(b)


def _nest(flat: dict, path: str) -> dict:
    """Flax variables from a flat file (names joined with '/')."""
    if not all(paths.SEP in k for k in flat):
        raise checkpoint_io.CheckpointError(
            f"{path!r} does not hold Flax variables (names like params/conv1/kernel); it looks "
            "like a torch state_dict")
    return paths.tree_from_names(flat)
