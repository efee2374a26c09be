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

# Modules that add subcommands, in the order they appear in ``tmb --help``, with the commands each adds.
# ``tmb CMD`` imports only CMD's module (the scientific stack takes most of a second to import).
SUBCOMMANDS: dict[str, tuple[str, ...]] = {
    "tmb.attest.cli": ("ima", "audit"),
    "tmb.attest.quote_cli": ("quote",),
    "tmb.attest.boot_cli": ("boot",),
    "tmb.telemetry.cli": ("telemetry",),
    "tmb.fingerprint.cli": ("enroll", "fingerprint"),
    "tmb.verity.cli": ("verity", "commit"),
    "tmb.verdict.cli": ("serve", "verify-verdict", "config"),
    "sample_infra.cli": ("demo",),
}
SUBCOMMAND_MODULES: tuple[str, ...] = tuple(SUBCOMMANDS)

Handler = Callable[[argparse.Namespace], int]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` naming a known command, only that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="tmb",
        description="Runtime telemetry attestation for AI inference providers.",
    )
    parser.add_argument("--version", action="version", version=f"tmb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    first = next((a for a in argv or () if not a.startswith("-")), None)
    wanted = [m for m, cmds in SUBCOMMANDS.items() if first in cmds] or list(SUBCOMMANDS)
    if first is None and "--version" in (argv or ()):
        wanted = []  # argparse prints the version and exits before a command is needed
    for name in wanted:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
