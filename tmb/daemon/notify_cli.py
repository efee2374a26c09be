"""``tmb notify verify``: check a received webhook notification (docs/verdict.md, "Notifications").

``tmb notify verify BODY --headers FILE (--key PUB | --keys-url URL) [--url RECEIVER] [--any-time]`` exits 0
when :func:`tmb.daemon.notify.verify_notification` accepts it (and prints the event), 1 when it refuses it
(the reason's id and why), 2 when an input cannot be read.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from tmb.errors import InputError

MAX_INPUT_BYTES = 2 * 1024 * 1024


def register(sub: Any) -> None:
    p = sub.add_parser("notify", help="webhook notifications: check a received one")
    nsub = p.add_subparsers(dest="notify_command", metavar="SUBCOMMAND")
    nsub.required = True
    v = nsub.add_parser("verify", help="check a notification's signature, key, time and receiver")
    v.add_argument("body", type=Path, help="the request body, byte for byte")
    v.add_argument(
        "--headers",
        type=Path,
        required=True,
        help="the request headers: a JSON object, or 'Name: value' lines (as curl -D or a log writes them)",
    )
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", type=Path, help="public key: PEM, 64 hex digits, or a saved /v1/keys document")
    g.add_argument("--keys-url", help="URL of the daemon's /v1/keys")
    v.add_argument("--url", help="this receiver's URL: refuse a notification sent to another")
    v.add_argument("--tolerance-s", type=float, default=300.0, help="how old (or new) it may be (300)")
    v.add_argument("--any-time", action="store_true", help="skip the time check (a stored notification)")
    v.set_defaults(func=_verify)


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror}", path=str(path)) from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"the {what} is over {MAX_INPUT_BYTES} bytes", path=str(path))
    return data


def parse_headers(data: bytes, origin: str) -> dict[str, str]:
    """Headers from a JSON object or from ``Name: value`` lines (a status line and blank lines skipped)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("the headers are not UTF-8 text", path=origin) from None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InputError(f"the headers are not JSON: {exc}", path=origin) from None
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise InputError("the headers must be a JSON object of strings", path=origin)
        return {str(k): v for k, v in doc.items()}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("HTTP/"):
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise InputError("a header line without ':'", path=origin, got=line[:80])
        out[name.strip()] = value.strip()
    return out


def _keys(args: argparse.Namespace) -> dict[str, bytes]:
    from tmb.verdict.cli import load_keys

    return {k.key_id: k.raw for k in load_keys(args)}


def _verify(args: argparse.Namespace) -> int:
    from tmb.daemon.notify import NotificationError, verify_notification

    if not args.tolerance_s > 0:
        raise InputError("--tolerance-s must be positive", got=args.tolerance_s)
    body = _read(args.body, "body")
    headers = parse_headers(_read(args.headers, "headers"), str(args.headers))
    tolerance = math.inf if args.any_time else args.tolerance_s
    try:
        doc = verify_notification(body, headers, _keys(args), tolerance_s=tolerance, url=args.url)
    except NotificationError as exc:
        print(f"FAIL {exc.reason}: {exc.message}")
        return 1
    event = doc["event"]
    print(
        f"ok: notification {doc['id']} (seq {doc['seq']}) from {doc['daemon']['origin']}, "
        f"key {doc['daemon']['key_id'][:16]}: {event['kind']} {event['subject']}"
    )
    print(json.dumps(event, indent=2, sort_keys=True))
    return 0
