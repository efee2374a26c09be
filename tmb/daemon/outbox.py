"""The notifier's durable outbox: one SQLite file (WAL, ``synchronous=FULL``: every commit is fsynced).

An event is acknowledged once :meth:`Outbox.add` returned: it survives kill -9, power loss (as far as the
disk honours fsync) and restarts. Each event gets a sequence number (``AUTOINCREMENT``: never reused, so it
only grows, even after rows are deleted) and a random id, and one delivery per receiver URL:

* ``pending``: due at ``next_ns`` (wall clock, so a restart keeps the backoff), ``attempts`` made so far;
* ``dead``: given up (``error`` says why); kept for inspection until the outbox is full;
* delivered: the row is deleted, and the event with its last delivery.

The outbox holds at most ``max_events`` events: adding one to a full outbox removes the oldest events whose
deliveries are all dead first, then, when none is left, the oldest events still undelivered, which
:meth:`Outbox.add` reports (the notifier logs and counts them: never silently).

Thread-safe (one connection behind a lock): the ingest emits from its worker threads, the delivery task
from the event loop's default executor.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tmb.errors import TmbError

__all__ = ["Added", "Delivery", "Outbox", "OutboxError"]

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
    url TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_ns INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (seq, url)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_ns);
"""
MAX_ERROR_CHARS = 300


class OutboxError(TmbError):
    """The outbox file cannot be opened."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event to one receiver, as the delivery task attempts it."""

    seq: int
    id: str
    url: str
    event: str  # the event's JSON (tmb.events.Event.to_dict)
    created_ns: int
    attempts: int  # made before this one

    @property
    def key(self) -> tuple[int, str]:
        return (self.seq, self.url)


@dataclass(frozen=True, slots=True)
class Added:
    seq: int
    id: str
    evicted_dead: int  # dead events removed to make room
    dropped: tuple[tuple[int, str], ...]  # (seq, kind) of undelivered events removed to make room


class Outbox:
    def __init__(self, path: str | Path, *, max_events: int) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the notification outbox {self.path}: {exc}") from None
        try:
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise OutboxError(
                    "the notification outbox has an unknown schema version", path=str(self.path), got=version
                )
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self.db.close()
            raise OutboxError(f"cannot open the notification outbox {self.path}: {exc}") from None
        except BaseException:
            self.db.close()
            raise
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.db.close()

    def add(self, event_json: str, kind: str, urls: Sequence[str], now_ns: int) -> Added:
        """Record an event with a pending delivery to each URL, due now; durable when this returns."""
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                evicted, dropped = self._make_room(db)
                ident = secrets.token_hex(16)
                cur = db.execute(
                    "INSERT INTO events (id, event, created_ns) VALUES (?, ?, ?)", (ident, event_json, now_ns)
                )
                seq = int(cur.lastrowid or 0)
                db.executemany(
                    "INSERT INTO deliveries (seq, url, state, next_ns) VALUES (?, ?, 'pending', ?)",
                    [(seq, url, now_ns) for url in urls],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Added(seq, ident, evicted, dropped)

    def _make_room(self, db: sqlite3.Connection) -> tuple[int, tuple[tuple[int, str], ...]]:
        (held,) = db.execute("SELECT count(*) FROM events").fetchone()
        over = held - self.max_events + 1
        if over <= 0:
            return 0, ()
        dead = [  # events none of whose deliveries is still pending, oldest first
            r[0]
            for r in db.execute(
                "SELECT seq FROM events e WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = e.seq "
                "AND d.state = 'pending') ORDER BY seq LIMIT ?",
                (over,),
            )
        ]
        db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in dead])
        over -= len(dead)
        dropped: list[tuple[int, str]] = []
        if over > 0:
            rows = db.execute(
                "SELECT seq, json_extract(event, '$.kind') FROM events ORDER BY seq LIMIT ?", (over,)
            ).fetchall()
            dropped = [(int(s), str(k)) for s, k in rows]
            db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s, _ in dropped])
        return len(dead), tuple(dropped)

    def due(self, now_ns: int, limit: int, skip: Iterable[tuple[int, str]] = ()) -> list[Delivery]:
        """Up to ``limit`` pending deliveries due by ``now_ns`` (earliest first), not in ``skip``."""
        skipped = set(skip)
        with self._lock:
            rows = self.db.execute(
                "SELECT d.seq, e.id, d.url, e.event, e.created_ns, d.attempts FROM deliveries d "
                "JOIN events e ON e.seq = d.seq WHERE d.state = 'pending' AND d.next_ns <= ? "
                "ORDER BY d.next_ns, d.seq LIMIT ?",
                (now_ns, limit + len(skipped)),
            ).fetchall()
        out = [Delivery(*r) for r in rows if (r[0], r[2]) not in skipped]
        return out[:limit]

    def next_due_ns(self, skip: Iterable[tuple[int, str]] = ()) -> int | None:
        """When the earliest pending delivery not in ``skip`` is due; None when there is none."""
        skipped = set(skip)
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, url, next_ns FROM deliveries WHERE state = 'pending' ORDER BY next_ns LIMIT ?",
                (len(skipped) + 1,),
            ).fetchall()
        return next((int(n) for s, u, n in rows if (s, u) not in skipped), None)

    def delivered(self, seq: int, url: str) -> None:
        """The receiver took it: the delivery goes, and the event once it has no delivery left."""
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM deliveries WHERE seq = ? AND url = ?", (seq, url))
                db.execute(
                    "DELETE FROM events WHERE seq = ? AND NOT EXISTS "
                    "(SELECT 1 FROM deliveries WHERE seq = ?)",
                    (seq, seq),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def retry(self, seq: int, url: str, attempts: int, next_ns: int, error: str) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE deliveries SET attempts = ?, next_ns = ?, error = ? WHERE seq = ? AND url = ?",
                (attempts, next_ns, error[:MAX_ERROR_CHARS], seq, url),
            )

    def dead(self, seq: int, url: str, attempts: int, error: str) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE deliveries SET state = 'dead', attempts = ?, error = ? WHERE seq = ? AND url = ?",
                (attempts, error[:MAX_ERROR_CHARS], seq, url),
            )

    def abandon_other_urls(self, urls: Sequence[str]) -> int:
        """Pending deliveries to a URL no longer configured become dead; how many."""
        with self._lock:
            marks = ",".join("?" * len(urls))
            cur = self.db.execute(
                "UPDATE deliveries SET state = 'dead', error = 'the URL is no longer in [notify] urls' "  # noqa: S608
                f"WHERE state = 'pending' AND url NOT IN ({marks})",
                tuple(urls),
            )
            return cur.rowcount

    def counts(self) -> dict[str, int]:
        """Deliveries by state (``pending``, ``dead``) and the events held (``events``)."""
        with self._lock:
            if self._closed:
                return {"pending": 0, "dead": 0, "events": 0}
            out = {"pending": 0, "dead": 0}
            out.update(
                {
                    s: int(n)
                    for s, n in self.db.execute("SELECT state, count(*) FROM deliveries GROUP BY state")
                }
            )
            (out["events"],) = self.db.execute("SELECT count(*) FROM events").fetchone()
        return out

    def dead_deliveries(self) -> list[tuple[int, str, int, str]]:
        """``(seq, url, attempts, error)`` of every dead delivery (tests, inspection)."""
        with self._lock:
            return [
                (int(s), str(u), int(a), str(e))
                for s, u, a, e in self.db.execute(
                    "SELECT seq, url, attempts, error FROM deliveries WHERE state = 'dead' ORDER BY seq"
                )
            ]
