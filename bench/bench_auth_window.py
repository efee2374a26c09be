"""What the shared replay window costs an authenticated evidence request (tmb.ingest.auth).

For each backend, ``--n`` freshly signed requests of one enrolled node go through ``Ingest.authenticate``
(key lookup, HMAC, time window, the in-memory filter, one transaction inserting the request's nonce into
``ingest_auth_nonces`` and pruning expired rows), and the same number through the check as it was before
the window was the store's (key lookup, HMAC, time window, the in-memory window alone). The table is first
filled with ``--held`` rows (a window's worth for many nodes) of which some have expired, so pruning runs.
SQLite: a file in a temporary directory (WAL, synchronous=NORMAL, the daemon's default); PostgreSQL: the test
suite's private server (tests/pg.py: unix socket, ``fsync=off``, so a commit costs less than on a durable
server) unless ``--pg-url`` names one. Prints microseconds per request for each, and LAST the ratio
window / memory-only on SQLite.

    PATH=/usr/sbin:$PATH .venv/bin/python bench/bench_auth_window.py [--n 3000] [--held 20000] [--no-pg]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]

from tmb.attest.policy import RuntimePolicy  # noqa: E402
from tmb.ingest.auth import sign_request  # noqa: E402
from tmb.ingest.service import Ingest  # noqa: E402
from tmb.ingest.store_pg import PgIngestStore  # noqa: E402

NODE = "node-a"
BODY = b'{"batches": []}' * 64  # about 1 KiB


def _setup(ingest: Ingest, held: int) -> bytes:
    key = os.urandom(32)
    doc = {"ek_sha256": "00", "ek_trust": "pin", "ak_public": "00", "ak_name": "00", "key": key.hex()}
    now = int(time.time() * 1000)
    with ingest.store.transaction():
        ingest.store.set_identity(NODE, "pinned", {**doc, "enrolled_ns": 1}, 1)
        for k in range(held):  # a quarter expired, the rest within the window, over 64 nodes
            t = now - 3 * ingest.auth.skew_ms if k % 4 == 0 else now - k % 1000
            ingest.store.use_request_nonce(f"n{k % 64}", os.urandom(16), t, 0)
    return key


def _memory_only(ingest: Ingest, header: str) -> str | None:
    """The check before the store held the window: key, HMAC, time, the in-memory window."""
    key = ingest._evidence_key(NODE)
    assert isinstance(key, bytes)
    now_ms = ingest.auth.now_ms()
    got = ingest.auth.verify(key, header, "POST", NODE, "batches", BODY, now_ms)
    if isinstance(got, str):
        return got
    if ingest.auth.seen(NODE, got[1], now_ms):
        return "auth.replayed"
    ingest.auth.remember(NODE, got[1], now_ms)
    return None


def measure(ingest: Ingest, n: int, held: int) -> tuple[float, float]:
    key = _setup(ingest, held)
    headers = [sign_request(key, "POST", NODE, "batches", BODY) for _ in range(2 * n)]
    t = time.perf_counter()
    for h in headers[:n]:
        assert _memory_only(ingest, h) is None
    memory = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for h in headers[n:]:
        assert ingest.authenticate(NODE, "POST", "batches", h, BODY) is None
    window = (time.perf_counter() - t) / n
    assert ingest.authenticate(NODE, "POST", "batches", headers[-1], BODY) is not None  # a replay
    return memory, window


def main(n: int, held: int, pg: bool, pg_url: str | None) -> None:
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ingest = Ingest(Path(tmp) / "ingest.db", policy=RuntimePolicy())
        try:
            results["sqlite"] = measure(ingest, n, held)
        finally:
            ingest.close()
    if pg:
        server = None
        if pg_url is None:
            from pg import start_server

            server = start_server()
            pg_url = server.url()
        try:
            ingest = Ingest(PgIngestStore(pg_url), policy=RuntimePolicy())
            try:
                results["postgres"] = measure(ingest, n, held)
            finally:
                ingest.close()
        finally:
            if server is not None:
                server.stop()
    for name, (memory, window) in results.items():
        print(
            f"{name:9s} memory-only {memory * 1e6:8.1f} us/request   "
            f"shared window {window * 1e6:8.1f} us/request   added {(window - memory) * 1e6:8.1f} us"
        )
    memory, window = results["sqlite"]
    print(f"ratio window / memory-only (sqlite): {window / memory:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--held", type=int, default=20000)
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--pg-url")
    args = parser.parse_args()
    main(args.n, args.held, not args.no_pg, args.pg_url)
