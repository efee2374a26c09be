"""``tmb evidence export --config FILE --request-id ID --out DIR``: the bundle of one request's verdict,
written from the daemon's stores (the verdicts and the evidence the config names) without a running daemon,
the same bundle ``GET /v1/evidence/{id}/bundle`` serves (:mod:`tmb.daemon.evidence`). The nonce log is
signed with the verdict key in ``[verdicts] key_file`` (it must exist). Exit 0 written, 1 no final verdict
for the id, 2 a bad config, store or argument."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from tmb.errors import InputError

__all__ = ["register"]


def register(sub: Any) -> None:
    ev = sub.add_parser("evidence", help="evidence bundles for auditors: export from the daemon's stores")
    ev_sub = ev.add_subparsers(dest="evidence_command", metavar="COMMAND", required=True)
    ex = ev_sub.add_parser(
        "export",
        help="write the evidence bundle of one request's verdict (docs/evidence-bundle.md)",
        description="Write the bundle `tmb audit` reads for a request: its verdict, the node's quotes, "
        "IMA segments, telemetry chain, AK, event log, the signed nonce log, the policy, commitments and "
        "profiles in force.",
    )
    ex.add_argument("--config", type=Path, help="the daemon's TOML config (docs/config.md)")
    ex.add_argument("--request-id", required=True, help="the 128-bit request id (32 hex digits)")
    ex.add_argument("--out", type=Path, required=True, help="the bundle directory to create (new or empty)")
    ex.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from tmb.attest.policy import load_policy
    from tmb.config import load_config
    from tmb.daemon.evidence import export_request
    from tmb.ingest.service import Ingest
    from tmb.ingest.store import open_ingest_store
    from tmb.verdict.keys_cli import open_existing_store
    from tmb.verdict.signing import load_or_create_key

    rid = str(args.request_id)
    if not re.fullmatch(r"[0-9a-f]{32}", rid):
        raise InputError("a tmb request id is 32 lowercase hex digits", got=rid)
    config = load_config(args.config)
    key_file = Path(config.verdicts.key_file)
    if not key_file.exists():
        raise InputError("the verdict key file does not exist ([verdicts] key_file)", path=str(key_file))
    store = open_existing_store(config)
    try:
        rec = store.lookup(rid)
    finally:
        store.close()
    if rec.state != "final" or rec.doc is None:
        print(f"no final verdict for request {rid} ({rec.state})")
        return 1
    a = config.attestation
    if not a.policy:
        raise InputError("the config has no evidence ingest ([attestation] policy)")
    # the evidence store as it is: no node registered, no policy recorded (an export writes nothing there)
    ingest = Ingest(
        open_ingest_store(a, config.store),
        policy=load_policy(a.policy),
        nonce_ttl_s=a.nonce_ttl_s,
        pcr_bank=a.pcr_bank,
    )
    try:
        out = export_request(config, ingest, load_or_create_key(key_file), rec.doc, args.out)
    finally:
        ingest.close()
    print(f"evidence bundle of request {rid}: {out} (check it with `tmb audit {out}`)")
    return 0
