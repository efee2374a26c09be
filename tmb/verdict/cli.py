"""``tmb verify-verdict`` and ``tmb config show`` (``tmb serve`` is :mod:`tmb.daemon.cli`).

``tmb verify-verdict VERDICT.json [--key PUB | --keys-url URL]`` exits 0 only when the signature verifies
and the decision is ``verified`` (or ``demo``, with a note that it rests on synthetic telemetry), 1 when
the signature fails or the decision is anything else, 2 when the input (verdict or key) cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmb.errors import InputError

if TYPE_CHECKING:
    from tmb.verdict.signing import PublicKey

# Each command imports what it needs in its handler: `tmb verify-verdict` loads the verdict model and
# Ed25519 (not aiohttp or numpy), `tmb config show` only the config module.


def register(sub: Any) -> None:
    p = sub.add_parser("verify-verdict", help="check a verdict's signature and decision")
    p.add_argument("verdict", type=Path, help="verdict JSON (as served by GET /v1/verdicts/{id})")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", type=Path, help="public key: PEM, 64 hex digits, or a saved /v1/keys document")
    g.add_argument("--keys-url", help="URL of a daemon's /v1/keys")
    p.add_argument(
        "--log-key",
        help="the verdict log's checkpoint verifier key (<origin>+<id>+<key>, as /v1/keys lists it, or a "
        "file holding it): also check the verdict's inclusion proof (its 'log' member)",
    )
    p.set_defaults(func=_verify)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    show = csub.add_parser("show", help="print the effective configuration (secrets redacted)")
    show.add_argument("--config", type=Path, help="TOML config file")
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.set_defaults(func=_config_show)


def _config_show(args: argparse.Namespace) -> int:
    from tmb.config import load_config, to_toml

    config = load_config(args.config)
    data = config.redacted()
    print(json.dumps(data, indent=2) if args.json else to_toml(data), end="\n" if args.json else "")
    return 0


def load_keys(args: argparse.Namespace) -> list[PublicKey]:
    """The public keys ``--key FILE`` or ``--keys-url URL`` name (the verifying commands' shared options)."""
    from tmb.verdict.signing import load_public_keys

    if args.key is not None:
        try:
            data = args.key.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read public key: {exc.strerror}", path=str(args.key)) from exc
        return load_public_keys(data, str(args.key))
    from tmb.fetch import fetch

    return load_public_keys(fetch(args.keys_url, "keys"), args.keys_url)


def read_log_key(value: str) -> list[Any]:
    """The checkpoint verifier(s) from ``--log-key``: the key string itself or a file holding it."""
    from tmb.verdict.checkpoint import parse_verifier_key

    text = value
    if "+" not in value or Path(value).is_file():
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the log key: {exc}", path=value) from None
    return [parse_verifier_key(line) for line in text.splitlines() if line.strip()]


def _check_log(doc: dict[str, Any], log_key: str) -> bool:
    from tmb.verdict.logverify import check_inclusion

    report, checkpoint = check_inclusion(doc, read_log_key(log_key))
    for f in report:
        print(f, file=sys.stderr)
    if not report.ok or checkpoint is None:
        print("FAIL: the verdict is not proven to be in the verdict log", file=sys.stderr)
        return False
    index = doc["log"]["index"]
    print(f"in the verdict log {checkpoint.origin}: entry {index} of a checkpoint of {checkpoint.size}")
    return True


def _verify(args: argparse.Namespace) -> int:
    from tmb.verdict.model import Decision
    from tmb.verdict.signing import verify_verdict

    try:
        doc = json.loads(args.verdict.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read verdict: {exc.strerror}", path=str(args.verdict)) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"verdict is not JSON: {exc}", path=str(args.verdict)) from exc
    if not isinstance(doc, dict):
        raise InputError("verdict must be a JSON object", path=str(args.verdict))
    keys = load_keys(args)
    report = verify_verdict(doc, keys)
    for f in report:
        print(f, file=sys.stderr)
    if not report.ok:
        print("FAIL: signature not valid", file=sys.stderr)
        return 1
    decision = doc.get("decision")
    print(
        f"signature OK (key {doc['key_id'][:16]}...), request {doc.get('request_id')}, decision: {decision}"
    )
    if args.log_key:
        if not _check_log(doc, args.log_key):
            return 1
    elif "log" in doc:
        print("note: the verdict carries a log inclusion proof; give --log-key to check it")
    for reason in doc.get("reasons") or ():
        if isinstance(reason, dict):
            print(f"  reason {reason.get('id')}: {reason.get('message')}")
    if decision == Decision.VERIFIED.value:
        return 0
    if decision == Decision.DEMO.value:
        print(
            "note: decision 'demo' rests on synthetic telemetry (a demo deployment): it is not evidence "
            "about real hardware"
        )
        return 0
    print(f"FAIL: decision is {decision!r}, not 'verified'", file=sys.stderr)
    return 1
