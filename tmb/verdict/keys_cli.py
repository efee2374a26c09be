"""``tmb keys``: the daemon's verdict keys.

``tmb keys list --config FILE`` prints every key the store recorded (key id, first and last use, which one
the key file holds now). ``tmb keys rotate --config FILE`` swaps a new key into ``[verdicts] key_file``,
keeps the old private key beside it (``<key_file>.retired-<key id>``, mode 0600: destroy it once no daemon
signs with it) and records the new public key in the store, so ``GET /v1/keys`` lists old and new keys
with their validity periods: verdicts and log checkpoints signed before keep verifying. A running daemon
signs with the key it loaded until it is restarted (all daemons sharing a PostgreSQL store).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tmb.errors import InputError


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="verdict keys: list, rotate")
    ksub = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    ksub.required = True
    for name, helptext, func in (
        ("list", "list the verdict keys the store recorded, with when each was used", _list),
        ("rotate", "swap in a new verdict key (old verdicts and checkpoints keep verifying)", _rotate),
    ):
        c = ksub.add_parser(name, help=helptext)
        c.add_argument("--config", type=Path, help="the daemon's TOML config (docs/config.md)")
        c.set_defaults(func=func)


def open_existing_store(config: Any) -> Any:
    """The verdict store the config names, for the offline commands: PostgreSQL, or a SQLite file that must
    already exist (never created here)."""
    if config.store.url:
        from tmb.extras import require

        require("pg", "a PostgreSQL store ([store] url)")
        from tmb.verdict.store_pg import PgStore

        return PgStore(config.store.url)
    from tmb.verdict.store import Store

    path = Path(config.store.path)
    if not path.exists():
        raise InputError("the store does not exist yet (start tmb serve once first)", path=str(path))
    return Store(path)


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def _list(args: argparse.Namespace) -> int:
    from tmb.config import load_config
    from tmb.verdict.signing import load_or_create_key

    config = load_config(args.config)
    key_file = Path(config.verdicts.key_file)
    current = load_or_create_key(key_file).key_id if key_file.exists() else None
    store = open_existing_store(config)
    try:
        keys = store.known_keys()
    finally:
        store.close()
    for k in keys:
        mark = "  (the key file's: current)" if k.key_id == current else ""
        print(f"{k.key_id}  first {_when(k.first_ns)}  last {_when(k.last_ns)}{mark}")
    if current is not None and all(k.key_id != current for k in keys):
        print(f"{current}  (the key file's; not yet used by a daemon)")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from tmb.config import load_config
    from tmb.verdict.signing import rotate_key

    config = load_config(args.config)
    store = open_existing_store(config)  # before the swap: a missing store leaves the key file alone
    try:
        old, new, retired = rotate_key(config.verdicts.key_file)
        store.remember_key(old.public.raw, old.key_id)
        store.remember_key(new.public.raw, new.key_id)
    finally:
        store.close()
    print(f"rotated: {old.key_id[:16]}... -> {new.key_id[:16]}...")
    print(f"the old private key is kept at {retired} (0600): destroy it once no daemon signs with it")
    print("restart the daemon (every daemon sharing the store) to sign with the new key")
    return 0
