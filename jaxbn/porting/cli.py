"""``python -m jaxbn convert IN OUT``: port a checkpoint file between torch and Flax.

torch -> Flax (default): ``IN`` is a torch ``state_dict`` (``.pt``/``.pth``, ``.safetensors``,
``.npz``; format detected from the content); ``OUT`` is Flax variables
``{'params', 'batch_stats'}`` written as ``.msgpack`` (``flax.serialization``) or
``.safetensors``/``.npz`` (names ``params/layer1_0/bn1/weight``). Without ``--like`` the
conversion is *structural* (:func:`jaxbn.porting.structural_flax_target`): conv/linear weights
(rank >= 2) become Flax kernels, BatchNorm buffers go to ``batch_stats``, integer indices join
their parent with ``_``. ``--like VARS`` fills an existing Flax variables file instead (names,
shapes and dtypes checked strictly).

Flax -> torch (``--to-torch``): ``IN`` is Flax variables, ``OUT`` a torch ``state_dict``
(``.pt``/``.pth``, ``.safetensors``, ``.npz``); ``--like REF`` takes the keys/shapes/dtypes from a
reference torch checkpoint (else the structural inverse).

Exit status: 0 converted; 1 the checkpoint does not fit (missing/unexpected keys, shape or dtype
mismatch, all listed); 2 a file is unreadable, corrupt or unsafe. ``OUT`` is written only on
success, atomically.
"""

from __future__ import annotations

import argparse
import sys

from . import formats as checkpoint_io
from . import mapping as porting


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand."""
    p = sub.add_parser(
        "convert",
        help="port a checkpoint: torch state_dict -> Flax variables (or --to-torch)",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="checkpoint to read (format detected from content)")
    p.add_argument("output", metavar="OUT", help="file to write (.msgpack, .safetensors, .npz, .pt, .pth)")
    p.add_argument("--to-torch", action="store_true", help="Flax variables -> torch state_dict")
    p.add_argument("--like", metavar="REF", help="target file in OUT's framework giving names/shapes/dtypes")
    p.add_argument("--key", help="entry of IN holding the state_dict (e.g. state_dict, model)")
    p.add_argument("--cast", action="store_true", help="allow float dtype conversion (with --like)")
    p.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to ``args.output``; the exit status described in the module doc."""
    try:
        if args.to_torch and checkpoint_io.format_for_path(args.output) == "msgpack":
            raise checkpoint_io.CheckpointError("--to-torch writes a torch state_dict: use .pt, .pth, .safetensors or .npz")
        checkpoint_io.format_for_path(args.output)
        flat = checkpoint_io.read_checkpoint(args.input, key=args.key)
        like = checkpoint_io.read_checkpoint(args.like) if args.like else None
        if args.to_torch:
            variables = _nest(flat, args.input)
            target = like if like is not None else porting.structural_torch_target(variables)
            out, report = porting.flax_to_torch(variables, target)
        else:
            if flat and all("/" in k for k in flat):
                raise checkpoint_io.CheckpointError(
                    f"{args.input!r} holds Flax variables (names with '/'); pass --to-torch to convert them to torch")
            target = _nest(like, args.like) if like is not None else porting.structural_flax_target(flat)
            variables, report = porting.torch_to_flax(flat, target, cast=args.cast)
            out = {"/".join(map(str, p)): v for p, v in porting.flatten_tree(variables).items()}
        checkpoint_io.write_checkpoint(out, args.output)
    except checkpoint_io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except porting.PortingError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    lines = str(report).splitlines()
    print("\n".join(lines[-1:] if args.quiet else lines))
    direction = "torch state_dict" if args.to_torch else "Flax variables"
    print(f"wrote {direction} to {args.output}")
    return 0


def _nest(flat: dict, path: str) -> dict:
    """Flax variables from a flat file (names joined with '/')."""
    if not all("/" in k for k in flat):
        raise checkpoint_io.CheckpointError(
            f"{path!r} does not hold Flax variables (names like params/conv1/kernel); it looks "
            "like a torch state_dict")
    return porting.unflatten_tree({tuple(k.split("/")): v for k, v in flat.items()})
