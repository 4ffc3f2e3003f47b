"""``python -m jaxbn``: the command-line entry point.

With no arguments (or ``table``) it prints torch's BatchNorm behaviour table, observed live by
running jaxbn on a built-in example, with an "agrees with torch" column when torch is installed;
the exit code is 1 if any row disagrees with torch.

``convert IN OUT`` ports a checkpoint between torch and Flax (see :mod:`jaxbn.porting.cli` and
docs/porting.md); ``port MODULE:CALLABLE`` writes a torch model as Flax source
(:mod:`jaxbn.translate.cli`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax


def _table(args: argparse.Namespace) -> int:
    from .testing import behaviour

    with_torch = False if args.no_torch else None
    rows = behaviour.behaviour_table(with_torch=with_torch)
    ex = behaviour.example()
    print(
        "torch.nn.BatchNorm2d behaviour, observed by running jaxbn.batch_norm (float64) on an "
        f"input of shape {ex.x.shape}\nwith running_mean={ex.state.running_mean.tolist()}, "
        f"running_var={ex.state.running_var.tolist()}, num_batches_tracked="
        f"{int(ex.state.num_batches_tracked)}, eps={behaviour.EPS:g}.\n"
    )
    print(behaviour.format_table(rows))
    ran_torch = any(r.torch_diff is not None for r in rows)
    if not ran_torch:
        print("\ncomparison with torch skipped (--no-torch)." if args.no_torch else
              "\ntorch is not installed: no comparison (pip install 'jaxbn[torch]' torch==2.13.0).")
        return 0
    import torch

    bad = [r for r in rows if not r.agrees]
    print(f"\ntorch {torch.__version__}: {len(rows) - len(bad)} of {len(rows)} rows agree "
          f"(tolerance {behaviour.AGREEMENT_TOLERANCE:g}).")
    return 1 if bad else 0


def _program_name() -> str:
    """``python -m jaxbn`` when run as a module, else the name it was called by (``jaxbn``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m jaxbn" if name in ("", "__main__.py", "-c") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_program_name(), description="PyTorch's BatchNorm, exactly, in JAX.")
    sub = parser.add_subparsers(dest="command")
    table = sub.add_parser("table", help="print the behaviour table (the default)")
    table.add_argument("--no-torch", action="store_true", help="skip the comparison with torch")
    table.set_defaults(func=_table)
    from .porting import cli as convert_cli

    convert_cli.add_parser(sub)
    from .translate import cli as port_cli

    port_cli.add_parser(sub)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """The names of the parser's subcommands (whatever registered itself)."""
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def main(argv: list[str] | None = None) -> int:
    jax.config.update("jax_enable_x64", True)
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in subcommands(parser) and argv[0] not in ("-h", "--help")):
        argv = ["table", *argv]  # table is the default subcommand, options included
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
