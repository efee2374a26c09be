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

# Modules that add subcommands, in the order they appear in ``tmb --help``, with the commands each adds and
# their one-line help. ``tmb CMD`` imports only CMD's module; ``tmb --help`` (or a mistyped command) imports
# none of them and lists the commands from here (tests/unit/test_cli.py keeps these lines equal to the
# modules' own), so it starts without the scientific stack, aiohttp or cryptography.
SUBCOMMANDS: dict[str, dict[str, str]] = {
    "tmb.attest.cli": {
        "ima": "IMA measurement lists: replay and policy checks",
        "audit": "re-check an evidence bundle offline (quotes, IMA log, policy, verity)",
    },
    "tmb.attest.quote_cli": {"quote": "TPM 2.0 quotes"},
    "tmb.attest.identity_cli": {
        "identity": "node identity: the TPM manufacturer roots EKs are checked against",
    },
    "tmb.attest.boot_cli": {"boot": "measured boot: UEFI/TCG event logs (replay, decode)"},
    "tmb.telemetry.cli": {"telemetry": "record and inspect GPU telemetry traces"},
    "tmb.fingerprint.cli": {
        "enroll": "fit a load-aware fingerprint profile from telemetry traces (runs)",
        "fingerprint": "score telemetry against enrolled profiles",
    },
    "tmb.verity.cli": {
        "verity": "dm-verity hash trees (veritysetup-compatible) and image checks",
        "commit": "model directory -> reproducible EROFS image, hash tree and commitment",
    },
    "tmb.daemon.cli": {"serve": "run the daemon: reverse proxy, verdict API, metrics"},
    "tmb.daemon.evidence_cli": {
        "evidence": "evidence bundles for auditors: export from the daemon's stores",
    },
    "tmb.verdict.cli": {
        "verify-verdict": "check a verdict's signature and decision",
        "config": "configuration tools",
    },
    "tmb.verdict.log_cli": {"log": "the verdict transparency log: check saved checkpoints"},
    "tmb.verdict.keys_cli": {"keys": "verdict keys: list, rotate"},
    "tmb.daemon.notify_cli": {"notify": "webhook notifications: check a received one"},
    "sample_infra.cli": {
        "demo": "run the end-to-end demo on 127.0.0.1 "
        "(workers, probes, swtpm quotes, daemon, verdicts, audit)",
    },
}
SUBCOMMAND_MODULES: tuple[str, ...] = tuple(SUBCOMMANDS)

Handler = Callable[[argparse.Namespace], int]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: with a known command, only that command's module is imported; with none
    (``tmb --help``) or an unknown one, no module is (the commands are listed from :data:`SUBCOMMANDS`).
    Without ``argv``, every module is imported and registered: the complete parser."""
    parser = argparse.ArgumentParser(
        prog="tmb",
        description="Runtime telemetry attestation for AI inference providers.",
    )
    parser.add_argument("--version", action="version", version=f"tmb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    if argv is None:
        wanted = list(SUBCOMMANDS)
    else:
        first = next((a for a in argv if not a.startswith("-")), None)
        wanted = [m for m, cmds in SUBCOMMANDS.items() if first in cmds]
    if wanted:
        for name in wanted:
            importlib.import_module(name).register(sub)
    else:  # only listed: argparse prints help or rejects the command before any would run
        for cmds in SUBCOMMANDS.values():
            for command, text in cmds.items():
                sub.add_parser(command, help=text, add_help=False)
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
