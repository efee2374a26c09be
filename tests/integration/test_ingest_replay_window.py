"""The evidence requests' replay window is the store's, not a daemon's (tmb.ingest.auth): a signed request
captured on its way to one daemon and replayed to another sharing the PostgreSQL store, or to the same
daemon after a restart on its SQLite file, is ``auth.replayed``; honest requests keep being taken; the
window's rows are pruned a few per request."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tmb.attest.policy import RuntimePolicy
from tmb.ingest.auth import sign_request
from tmb.ingest.service import Ingest
from tmb.ingest.store import IngestBackend
from tmb.ingest.store_pg import PgIngestStore
from tmb.ingest.trail import PRUNE_PER_REQUEST

NODE = "node-a"
BODY = b'{"batches": []}'


def _enrolled(store: IngestBackend, key: bytes) -> None:
    """The node's pin as activation leaves it (tmb.ingest.identity): only its evidence key matters here."""
    doc = {
        "ek_sha256": "00" * 32,
        "ek_trust": "pin",
        "ak_public": "00",
        "ak_name": "00",
        "key": key.hex(),
        "enrolled_ns": 1,
    }
    with store.transaction():
        store.set_identity(NODE, "pinned", doc, 1)


def _ids(ingest: Ingest, header: str, body: bytes = BODY) -> str | None:
    finding = ingest.authenticate(NODE, "POST", "batches", header, body)
    return None if finding is None else finding.id


def _pg(url: str) -> Ingest:
    return Ingest(PgIngestStore(url), policy=RuntimePolicy())


def test_a_request_replayed_to_another_daemon_on_the_store_is_refused(pg_url: str) -> None:
    key = os.urandom(32)
    a, b = _pg(pg_url), _pg(pg_url)
    try:
        _enrolled(a.store, key)
        header = sign_request(key, "POST", NODE, "batches", BODY)
        assert _ids(a, header) is None  # the honest delivery to daemon A
        assert _ids(b, header) == "auth.replayed"  # captured on the way, replayed to daemon B
        assert _ids(a, header) == "auth.replayed"  # and to A again (its memory answers, no database work)
        # delivered to B first (the probe's request was held back): A refuses the copy
        other = sign_request(key, "POST", NODE, "batches", BODY)
        assert _ids(b, other) is None and _ids(a, other) == "auth.replayed"
        # the honest probe keeps working against either daemon
        for ingest in (a, b, a, b):
            assert _ids(ingest, sign_request(key, "POST", NODE, "batches", BODY)) is None
        # forged and stale requests are refused before the window is touched
        rows = a.store.request_nonces()
        assert _ids(b, sign_request(os.urandom(32), "POST", NODE, "batches", BODY)) == "auth.bad_mac"
        old = sign_request(key, "POST", NODE, "batches", BODY, t_ms=int(time.time() * 1000) - 10**9)
        assert _ids(b, old) == "auth.stale"
        assert a.store.request_nonces() == rows == 6
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_request_replayed_after_a_restart_is_refused(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    def start() -> Ingest:
        if backend == "sqlite":
            return Ingest(tmp_path / "ingest.db", policy=RuntimePolicy())
        return _pg(request.getfixturevalue("pg_url"))

    key = os.urandom(32)
    first = start()
    _enrolled(first.store, key)
    header = sign_request(key, "POST", NODE, "batches", BODY)
    held_back = sign_request(key, "POST", NODE, "batches", BODY)  # signed before the restart, sent after
    assert _ids(first, header) is None
    first.close()
    again = start()  # the daemon restarts on the same store
    try:
        assert _ids(again, header) == "auth.replayed"
        assert _ids(again, held_back) is None  # taken once (it never reached the daemon before) ...
        assert _ids(again, held_back) == "auth.replayed"  # ... and only once
        assert _ids(again, sign_request(key, "POST", NODE, "batches", BODY)) is None
    finally:
        again.close()


def test_the_window_is_pruned_a_few_rows_per_request(tmp_path: Path) -> None:
    ingest = Ingest(tmp_path / "ingest.db", policy=RuntimePolicy())
    try:
        key = os.urandom(32)
        _enrolled(ingest.store, key)
        long_ago = int(time.time() * 1000) - 2 * ingest.auth.skew_ms - 60_000  # past window and margin
        recent = int(time.time() * 1000) - ingest.auth.skew_ms  # a replay of it could still be taken
        with ingest.store.transaction():
            for k in range(19):
                ingest.store.use_request_nonce("gone", k.to_bytes(16, "big"), long_ago, 0)
            ingest.store.use_request_nonce("kept", b"\x01" * 16, recent, 0)
        assert ingest.store.request_nonces() == 19 + 1 and PRUNE_PER_REQUEST == 8
        held = []
        for _ in range(4):  # each request deletes at most 8 expired rows, and adds its own
            assert _ids(ingest, sign_request(key, "POST", NODE, "batches", BODY)) is None
            held.append(ingest.store.request_nonces())
        # 11 old + recent + 1 own; 3 old + recent + 2; recent + 3; recent + 4 (nothing more to prune)
        assert held == [13, 6, 4, 5]
        with ingest.store.transaction():  # the recent one was kept: it is still a replay
            assert not ingest.store.use_request_nonce("kept", b"\x01" * 16, recent, 0)
    finally:
        ingest.close()
