"""``tmb identity roots [--ek-roots DIR|builtin] [--json]``: what an EK trust store holds.

Lists each root and intermediate of the store ``[identity] ek_roots`` would load (``builtin`` by default:
the curated manufacturer certificates shipped with tmb, ``tmb/data/ek_roots/ORIGINS.md``), with its
validity and the file it came from, so an operator sees what trusting it means and when parts of it expire.
A store that does not load is exit 2 with the reason, like the daemon's start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from cryptography.hazmat.primitives import hashes

from tmb.attest.ekcert import BUILTIN, TrustStore, builtin_roots_dir

__all__ = ["describe", "register"]


def register(sub: Any) -> None:
    p = sub.add_parser("identity", help="node identity: the TPM manufacturer roots EKs are checked against")
    isub = p.add_subparsers(dest="identity_cmd", metavar="SUBCOMMAND")
    isub.required = True
    roots = isub.add_parser("roots", help="list an EK trust store's roots and intermediates, with expiry")
    roots.add_argument(
        "--ek-roots",
        default=BUILTIN,
        metavar="DIR|builtin",
        help="the store, as [identity] ek_roots names it: a directory, 'builtin' (default: the curated "
        "store shipped with tmb) or 'builtin:DIR'",
    )
    roots.add_argument("--json", action="store_true", help="one JSON document instead of text")
    roots.set_defaults(func=_cmd_roots)


def describe(store: TrustStore, at: dt.datetime) -> list[dict[str, Any]]:
    """One entry per certificate, roots first: kind, subject, issuer, serial, validity, SHA-256 and origin."""
    rows = []
    for kind, certs in (("root", store.roots), ("intermediate", store.intermediates)):
        for cert in certs:
            fp = cert.fingerprint(hashes.SHA256())
            after = cert.not_valid_after_utc
            rows.append(
                {
                    "kind": kind,
                    "subject": cert.subject.rfc4514_string(),
                    "issuer": cert.issuer.rfc4514_string(),
                    "serial": f"{cert.serial_number:x}",
                    "not_before": cert.not_valid_before_utc.isoformat(),
                    "not_after": after.isoformat(),
                    "expired": after < at,
                    "sha256": fp.hex(),
                    "origin": store.origins.get(fp, ""),
                }
            )
    return sorted(rows, key=lambda r: (r["kind"] != "root", r["origin"], r["subject"]))


def _cmd_roots(args: argparse.Namespace) -> int:
    store = TrustStore.load(args.ek_roots)
    now = dt.datetime.now(dt.UTC)
    rows = describe(store, now)
    spec = args.ek_roots.strip()
    builtin = spec == BUILTIN or spec.startswith(BUILTIN + ":")
    where = f"{builtin_roots_dir()}{spec[len(BUILTIN) :]}" if builtin else spec
    if args.json:
        json.dump({"store": args.ek_roots, "path": where, "certificates": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"EK trust store {args.ek_roots} ({where}): {len(store.roots)} root(s), "
        f"{len(store.intermediates)} intermediate(s)"
    )
    for r in rows:
        flag = " EXPIRED" if r["expired"] else ""
        print(f"{r['kind']:<12}  until {r['not_after'][:10]}{flag}  {r['subject']}  [{r['origin']}]")
    expired = sum(r["expired"] for r in rows)
    if expired:
        print(f"{expired} expired: EKs that chain only through them are refused (identity.ek_issuer_expired)")
    return 0
