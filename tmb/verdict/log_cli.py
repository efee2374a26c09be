"""``tmb log verify OLD NEW --log-key KEY [--proof FILE | --url DAEMON]``: prove that no verdict in an
auditor's saved checkpoint was removed or changed since (RFC 9162 consistency between two signed C2SP
checkpoints of the verdict log).

The consistency proof comes from a file (``{"proof": [hex, ...]}``, as ``GET /v1/log/proof/consistency``
answers) or is fetched from the daemon at ``--url``. Exit 0 when both checkpoints verify and the newer
extends the older, 1 when they do not (``log.inconsistent``, ``log.rollback``, ``log.checkpoint_invalid``),
2 when an input cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tmb.errors import InputError

MAX_BYTES = 1 << 20


def register(sub: Any) -> None:
    p = sub.add_parser("log", help="the verdict transparency log: check saved checkpoints")
    lsub = p.add_subparsers(dest="log_command", metavar="SUBCOMMAND")
    lsub.required = True
    v = lsub.add_parser("verify", help="check that a newer checkpoint extends an older one you saved")
    v.add_argument("old", type=Path, help="the checkpoint you saved earlier (GET /v1/log/checkpoint)")
    v.add_argument("new", type=Path, help="a newer checkpoint")
    v.add_argument("--log-key", required=True, help="the log's verifier key (/v1/keys 'log'), or a file")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--proof", type=Path, help='the consistency proof: {"proof": [hex, ...]}')
    g.add_argument("--url", help="the daemon's base URL to fetch the proof from")
    v.add_argument("--origin", help="the log's origin the checkpoints must name (default: the key's name)")
    v.set_defaults(func=_verify)


def _read(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()[: MAX_BYTES + 1]
        if len(data) > MAX_BYTES:
            raise InputError(f"the {what} is larger than 1 MiB", path=str(path))
        return data.decode("utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror}", path=str(path)) from None
    except UnicodeDecodeError:
        raise InputError(f"the {what} is not UTF-8 text", path=str(path)) from None


def _size(note: str) -> int:
    lines = note.split("\n")
    if len(lines) < 2 or not lines[1].isdigit():
        raise InputError("a checkpoint's second line is its tree size")
    return int(lines[1])


def _fetch_proof(url: str, first: int, second: int) -> Any:
    from tmb.fetch import fetch

    full = f"{url.rstrip('/')}/v1/log/proof/consistency?first={first}&second={second}"
    data = fetch(full, "the consistency proof", limit=MAX_BYTES)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise InputError(f"the consistency proof is not JSON: {exc}", url=full) from None


def _verify(args: argparse.Namespace) -> int:
    from tmb.verdict.cli import read_log_key
    from tmb.verdict.logverify import check_consistency

    verifiers = read_log_key(args.log_key)
    old, new = _read(args.old, "old checkpoint"), _read(args.new, "new checkpoint")
    if args.proof is not None:
        try:
            doc = json.loads(_read(args.proof, "proof"))
        except ValueError as exc:
            raise InputError(f"the proof is not JSON: {exc}", path=str(args.proof)) from None
    else:
        doc = _fetch_proof(args.url, _size(old), _size(new))
    proof = doc.get("proof") if isinstance(doc, dict) else None
    origin = args.origin or verifiers[0].name
    report, a, b = check_consistency(old, new, proof, verifiers, origin)
    for f in report:
        print(f, file=sys.stderr)
    if not report.ok or a is None or b is None:
        print("FAIL: the newer checkpoint does not provably extend the saved one", file=sys.stderr)
        return 1
    print(
        f"consistent: {b.origin} grew from {a.size} to {b.size} verdicts; none of the first {a.size} changed"
    )
    return 0
