"""The ``tmb`` command line.

Each subsystem owns its subcommands in its own ``cli`` module exposing ``register(subparsers)``; a
registered parser sets ``func`` (``argparse.Namespace -> int``, the exit status). Exit codes: 0 success,
1 verification failed (findings), 2 bad usage or input (a :class:`~tmb.errors.TmbError`), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from tmb import __version__
from tmb.errors import TmbError

# Modules that add subcommands, in the order they appear in ``tmb --help``.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "tmb.attest.cli",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmb",
        description="Runtime telemetry attestation for AI inference providers.",
    )
    parser.add_argument("--version", action="version", version=f"tmb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
