"""``python -m jaxbn port MODULE:CALLABLE --input-shape 2,3,224,224 --emit model_flax.py``.

Builds the torch model (``CALLABLE()`` from the importable ``MODULE``; the current directory is
on the path), optionally loads ``--checkpoint`` into it (read safely, ``weights_only``; strict),
translates it with :func:`jaxbn.from_torch` and writes ``--emit``: a Python file defining
``Model``, a ``flax.linen.Module`` with ``__call__(self, x, train=False)`` that imports no torch.
``--out`` writes the variables (``.msgpack``, ``.safetensors`` or ``.npz``) for that ``Model``.

Exit status: 0 written; 1 the model has something not translated, or the checkpoint does not fit
it; 2 a file or the model cannot be read.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..porting.errors import CheckpointError, UnsupportedError


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
    p.add_argument("--emit", required=True, metavar="FILE.py", help="the Flax source file to write")
    p.add_argument("--out", metavar="VARS", help="variables file to write (.msgpack, .safetensors, .npz)")
    p.add_argument("--channels-last", action="store_true", help="the Flax Model takes NHWC")
    p.set_defaults(func=run)
    return p


def build_model(spec: str):
    """``MODULE:CALLABLE`` -> ``CALLABLE()`` (a torch module)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected MODULE:CALLABLE, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    factory = importlib.import_module(module_name)
    for part in attribute.split("."):
        factory = getattr(factory, part)
    return factory()


def load_checkpoint(model, flat: dict) -> None:
    """``model.load_state_dict(flat, strict=True)`` with the model's own version metadata (a
    plain dict has none, and torch's BatchNorm then adds ``num_batches_tracked`` to a layer
    built without running statistics whose ``track_running_stats`` was set later)."""
    import collections

    from ..porting.tensors import numpy_to_tensor

    state = collections.OrderedDict((k, numpy_to_tensor(v)) for k, v in flat.items())
    state._metadata = getattr(model.state_dict(), "_metadata", None)
    model.load_state_dict(state, strict=True)


def run(args: argparse.Namespace) -> int:
    """Port ``args.model``; the exit status described in the module doc."""
    import torch

    from .. import checkpoint_io, porting
    from .emit import emit_source
    from .port import from_torch

    try:
        model = build_model(args.model)
        if args.checkpoint:
            load_checkpoint(model, checkpoint_io.read_checkpoint(args.checkpoint, key=args.key))
        shape = tuple(int(s) for s in args.input_shape.split(","))
        dtype = getattr(torch, args.dtype) if args.dtype else next(
            (p.dtype for p in model.parameters()), torch.float32)
        ported = from_torch(model, torch.zeros(shape, dtype=dtype), channels_last=args.channels_last)
        source = emit_source(ported.module.block, channels_last=args.channels_last)
    except (CheckpointError, ImportError, AttributeError, ValueError) as e:
        if isinstance(e, porting.PortingError):
            print(f"error: {e}\nnothing was written.", file=sys.stderr)
            return 1
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UnsupportedError, RuntimeError) as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    with open(args.emit, "w", encoding="utf-8") as f:
        f.write(source)
    print(f"wrote Model ({ported.module.block.torch_type}) to {args.emit}")
    if args.out:
        porting.save_variables(ported.variables, args.out)
        print(f"wrote its variables to {args.out}")
    return 0
