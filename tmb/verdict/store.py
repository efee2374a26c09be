"""Durable storage of spans, verdicts and the evidence references verdicts rest on (SQLite, WAL).

``journal_mode=WAL``; ``[store] sync`` picks what a committed transaction survives:

* ``normal`` (default): ``synchronous=NORMAL``. A commit appends to the WAL file with ``write()``: it is
  in the kernel once the call returns, so whatever the daemon acknowledged survives ``kill -9`` and any
  crash of the daemon; a power loss or kernel crash may lose the last transactions. Writes run on the
  event loop's own thread, batched per loop iteration (no thread hop, no fsync on the request path); WAL
  checkpoints (the only fsyncs) run on a background thread with their own connection.
* ``full``: ``synchronous=FULL``. Every commit is fsynced (survives power loss, as far as the disk honours
  fsync); writes run on one dedicated thread that commits concurrent writes together (group commit).

Tables (schema version 2, ``PRAGMA user_version``; a version-1 store is migrated on open):

* ``spans(id, end_ns, worker, node, outcome, pending, doc)`` -- ``doc`` is the span's JSON
  (:meth:`Span.to_dict`); ``pending`` is 1 while a span a worker served waits for its verdict, else NULL
  (a partial index on it finds what to resume after a restart without reading every span).
* ``verdicts(request_id, decision, created_ns, updated_ns, doc, evidence)`` -- final verdicts only:
  ``doc`` is the signed verdict's canonical bytes (docs/verdict.md), ``evidence`` the JSON array of the
  :class:`EvidenceRef` objects it rests on, in order.
* ``verdict_keys(key_id, public_key, first_ns, last_ns)`` -- every verdict public key a daemon signed with
  on this store (raw 32 bytes), when it was first registered and last used, so ``/v1/keys`` keeps
  publishing a key after its private key is gone. Added to a version-2 store on open (older tmb ignore it).

A request is thus ``final`` (a verdicts row), ``pending`` (a served span, no verdict yet) or unknown.
Per request that is two row inserts and one flag update, the fewest pages a random 128-bit key allows
(version 1 kept a pending verdict row and an evidence table: three times the pages written).

Opening checks the file: a zero-byte file is refused unless ``init`` (it is not a store; SQLite would
silently start a new one in it), and ``PRAGMA integrity_check`` (``quick_check`` for
files over :data:`FULL_CHECK_MAX_BYTES`) must say ``ok``. Each failure is a one-line :class:`StoreError`
naming the file. A missing file is created.

Resuming: :meth:`Store.pending_spans` pages through the pending spans by ``(end_ns, id)`` (keyset
pagination: a page costs the same however many spans precede it, and spans decided meanwhile do not
shift the pages).

Retention: :meth:`Store.prune` deletes spans (and their verdicts) that ended before a cutoff. The daemon
uses the store through :class:`tmb.verdict.async_store.AsyncStore` (group commit, long-poll wake-ups);
:class:`tmb.verdict.store_pg.PgStore` is the same store on PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import time_ns
from typing import Any, TypeVar

from tmb.errors import TmbError
from tmb.spans import Span
from tmb.verdict import tlog
from tmb.verdict.model import Verdict

T = TypeVar("T")
log = logging.getLogger("tmb.store")
_dumps = json.JSONEncoder(check_circular=False).encode  # the text json.dumps gives, a little cheaper
SCHEMA_VERSION = 2
SYNC_MODES = ("normal", "full")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans(
    id TEXT PRIMARY KEY, end_ns INTEGER NOT NULL, worker TEXT, node TEXT, outcome TEXT NOT NULL,
    pending INTEGER, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS spans_end ON spans(end_ns);
CREATE INDEX IF NOT EXISTS spans_pending ON spans(end_ns) WHERE pending IS NOT NULL;
CREATE TABLE IF NOT EXISTS verdicts(
    request_id TEXT PRIMARY KEY, decision TEXT NOT NULL, created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL, doc BLOB NOT NULL, evidence TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdict_keys(
    key_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL);
"""
FULL_CHECK_MAX_BYTES = 256 * 1024 * 1024  # larger stores get PRAGMA quick_check (no index contents)
# Version 1 -> 2, in one transaction: pending rows become the spans' flag, evidence rows a JSON array.
_MIGRATE_V1 = """
ALTER TABLE spans ADD COLUMN pending INTEGER;
UPDATE spans SET pending = 1 WHERE id IN (SELECT request_id FROM verdicts WHERE state = 'pending');
CREATE TABLE verdicts_v2(
    request_id TEXT PRIMARY KEY, decision TEXT NOT NULL, created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL, doc BLOB NOT NULL, evidence TEXT NOT NULL);
INSERT INTO verdicts_v2
    SELECT v.request_id, v.decision, v.created_ns, v.updated_ns, v.doc,
        coalesce((SELECT json_group_array(json(e.doc))
                  FROM (SELECT doc FROM evidence WHERE request_id = v.request_id ORDER BY seq) e), '[]')
    FROM verdicts v WHERE v.state = 'final';
DROP TABLE verdicts;
DROP TABLE evidence;
ALTER TABLE verdicts_v2 RENAME TO verdicts;
"""


class StoreError(TmbError):
    """The store cannot be opened or written."""


@dataclass(frozen=True)
class EvidenceRef:
    """A piece of evidence a verdict rests on, by reference (the evidence itself lives with the ingest).

    ``kind``: ``quote``, ``telemetry_batch``, ``ima_log``, ``policy``, ``commitment``, ``profile``, ...;
    ``digest``: lowercase hex SHA-256 of the referenced record's canonical bytes; ``node``: the node it
    came from; ``t_ns``: its time (wall ns) when it has one; ``uri``: where to fetch it, when known;
    ``detail``: small JSON-able context (sequence numbers, PCR index, ...).
    """

    kind: str
    digest: str
    node: str | None = None
    t_ns: int | None = None
    uri: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "digest": self.digest,
            "node": self.node,
            "t_ns": self.t_ns,
            "uri": self.uri,
            "detail": dict(self.detail),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvidenceRef:
        return cls(
            data["kind"],
            data["digest"],
            data.get("node"),
            data.get("t_ns"),
            data.get("uri"),
            dict(data.get("detail") or {}),
        )


def evidence_json(evidence: Sequence[EvidenceRef]) -> str:
    """The ``verdicts.evidence`` column: the references as one JSON array, in order."""
    return _dumps([e.to_dict() for e in evidence]) if evidence else "[]"


# One write of a group commit: spans, or a final verdict with its evidence.
Write = tuple[Sequence[Span] | None, tuple[Verdict, Sequence[EvidenceRef]] | None]


@dataclass(frozen=True)
class VerdictRecord:
    """What the store knows about a request id. ``state``: ``pending``, ``final`` or ``unknown``."""

    request_id: str
    state: str
    doc: bytes | None = None  # canonical signed verdict when final
    span: Span | None = None


@dataclass(frozen=True)
class KnownKey:
    """A verdict public key the store has seen: raw 32 bytes, first registered and last used (wall ns)."""

    key_id: str
    public_key: bytes
    first_ns: int
    last_ns: int


# A position in the pending spans, in the order they are resumed: (end_ns, id) of the last one read.
Cursor = tuple[int, str]


class Store:
    """Synchronous SQLite store; not thread-safe on its own (use ``async_store.AsyncStore`` from asyncio).

    ``init``: accept a zero-byte file and make a store of it (``tmb serve --init``); ``check``: run
    ``PRAGMA integrity_check`` (or ``quick_check`` on a big file) before using the file.
    """

    def __init__(
        self, path: str | Path, *, sync: str = "full", init: bool = False, check: bool = True
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        self.path = Path(path)
        self.sync = sync
        if not init:
            _refuse_empty(self.path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        try:
            self.db.execute("PRAGMA busy_timeout=5000")
            if check:
                self._check_integrity()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise StoreError("store has an unknown schema version", path=str(self.path), got=version)
            if version == 1:
                self._migrate_v1()
            self.db.executescript(_SCHEMA)
            self.db.executescript(tlog.SQLITE_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self.db.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        except BaseException:
            self.db.close()
            raise

    def _check_integrity(self) -> None:
        """``PRAGMA integrity_check`` (``quick_check`` over :data:`FULL_CHECK_MAX_BYTES`): a damaged file
        is a one-line :class:`StoreError` with SQLite's first findings, before anything reads or writes it."""
        size = self.path.stat().st_size if self.path.exists() else 0
        pragma = "integrity_check" if size <= FULL_CHECK_MAX_BYTES else "quick_check"
        try:
            rows = [str(r[0]) for r in self.db.execute(f"PRAGMA {pragma}(3)")]
        except sqlite3.DatabaseError as exc:  # too damaged for the check to go on: that is its verdict
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                raise  # not a SQLite file at all: "cannot open store ...: file is not a database"
            rows = [str(exc)]
        if rows != ["ok"]:
            said = "; ".join(" ".join(r.split()) for r in rows)
            raise StoreError(
                f"store {self.path} is damaged: PRAGMA {pragma}: {said} "
                "(restore it from a backup, or salvage it with sqlite3's .recover into a new file)"
            )

    def _migrate_v1(self) -> None:
        log.info("migrating store %s from schema version 1 to %d", self.path, SCHEMA_VERSION)
        db = self._tx()
        try:
            for statement in _MIGRATE_V1.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def record_spans(self, spans: Sequence[Span]) -> None:
        """Insert spans (ignoring ids already stored); a served one is pending until its verdict lands."""
        self.write_batch([(spans, None)])

    def put_verdict(self, verdict: Verdict, evidence: Sequence[EvidenceRef] = ()) -> None:
        """Store the final signed verdict (replacing any earlier one) and its evidence references."""
        self.write_batch([(None, (verdict, evidence))])

    def write_batch(self, writes: Sequence[Write]) -> None:
        """Several writes in one transaction (one fsync): each is ``(spans, None)`` or ``(None, (verdict,
        evidence))``, applied in order. All or nothing."""
        for _, final in writes:
            if final is not None and not final[0].signature:
                raise ValueError("refusing to store an unsigned verdict")
        now = time_ns()
        db = self._tx()
        try:
            finals: list[tuple[Verdict, Sequence[EvidenceRef]]] = []  # consecutive ones: one executemany
            for spans, final in writes:
                if spans is not None:
                    self._insert_verdicts(db, finals, now)
                    finals = []
                    self._insert_spans(db, spans, now)
                if final is not None:
                    finals.append(final)
            self._insert_verdicts(db, finals, now)
            self._touch_keys(db, writes, now)
            logged = [final[0] for _, final in writes if final is not None]
            if logged:
                tlog.append_verdicts(_Sql(db), logged, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _insert_spans(db: sqlite3.Connection, spans: Sequence[Span], now: int) -> None:
        dumps = _dumps
        db.executemany(
            "INSERT OR IGNORE INTO spans(id, end_ns, worker, node, outcome, pending, doc) "
            "VALUES (?,?,?,?,?,?,?)",
            [
                (
                    s.id,
                    s.end_ns,
                    s.worker,
                    s.node,
                    s.outcome.value,
                    1 if s.served else None,
                    dumps(s.to_dict()),
                )
                for s in spans
            ],
        )

    @staticmethod
    def _insert_verdicts(
        db: sqlite3.Connection, finals: Sequence[tuple[Verdict, Sequence[EvidenceRef]]], now: int
    ) -> None:
        if not finals:
            return
        db.executemany(
            "INSERT INTO verdicts(request_id, decision, created_ns, updated_ns, doc, evidence) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
            "decision=excluded.decision, updated_ns=excluded.updated_ns, doc=excluded.doc, "
            "evidence=excluded.evidence",
            [
                (v.request_id, v.decision.value, now, now, v.encode(), evidence_json(evidence))
                for v, evidence in finals
            ],
        )
        db.executemany(
            "UPDATE spans SET pending = NULL WHERE id = ? AND pending IS NOT NULL",
            [(v.request_id,) for v, _ in finals],
        )

    @staticmethod
    def _touch_keys(db: sqlite3.Connection, writes: Sequence[Write], now: int) -> None:
        """The keys that signed these verdicts were last used now."""
        ids = {final[0].key_id for _, final in writes if final is not None}
        if ids:
            db.executemany("UPDATE verdict_keys SET last_ns = ? WHERE key_id = ?", [(now, k) for k in ids])

    # -- the verdict transparency log (tmb/verdict/tlog.py) ------------------------------------------

    def log_size(self) -> int:
        return tlog.log_size(_Sql(self.db))

    def log_entry(self, request_id: str) -> tlog.LogEntry | None:
        return tlog.log_entry(_Sql(self.db), request_id)

    def log_root(self, size: int) -> bytes:
        return tlog.log_root(_Sql(self.db), size)

    def log_inclusion(self, index: int, size: int) -> list[bytes]:
        return tlog.log_inclusion(_Sql(self.db), index, size)

    def log_consistency(self, old: int, new: int) -> list[bytes]:
        return tlog.log_consistency(_Sql(self.db), old, new)

    def add_checkpoint(self, size: int, root: bytes, note: str, now_ns: int | None = None) -> None:
        db = self._tx()
        try:
            tlog.add_checkpoint(_Sql(db), size, root, note, time_ns() if now_ns is None else now_ns)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def latest_checkpoint(self) -> tlog.StoredCheckpoint | None:
        return tlog.latest_checkpoint(_Sql(self.db))

    def log_proof(self, request_id: str) -> tuple[tlog.LogEntry | None, tlog.LogProof | None]:
        return tlog.log_proof(_Sql(self.db), request_id)

    def get_span(self, request_id: str) -> Span | None:
        row = self.db.execute("SELECT doc FROM spans WHERE id=?", (request_id,)).fetchone()
        return Span.from_dict(json.loads(row[0])) if row else None

    def lookup(self, request_id: str) -> VerdictRecord:
        row = self.db.execute("SELECT doc FROM verdicts WHERE request_id=?", (request_id,)).fetchone()
        span_row = self.db.execute("SELECT pending, doc FROM spans WHERE id=?", (request_id,)).fetchone()
        span = Span.from_dict(json.loads(span_row[1])) if span_row else None
        if row is not None:
            return VerdictRecord(request_id, "final", bytes(row[0]), span)
        if span_row is not None and span_row[0] is not None:
            return VerdictRecord(request_id, "pending", None, span)
        return VerdictRecord(request_id, "unknown", None, span)

    def evidence(self, request_id: str) -> list[EvidenceRef]:
        row = self.db.execute("SELECT evidence FROM verdicts WHERE request_id=?", (request_id,)).fetchone()
        return [EvidenceRef.from_dict(e) for e in json.loads(row[0])] if row else []

    def pending(self, limit: int = 1000) -> list[str]:
        """Ids of the first ``limit`` served spans still waiting for a verdict, oldest first (a look at the
        backlog; to go through all of it use :meth:`pending_spans`)."""
        rows = self.db.execute(
            "SELECT id FROM spans WHERE pending IS NOT NULL ORDER BY end_ns, id LIMIT ?", (limit,)
        )
        return [r[0] for r in rows]

    def pending_spans(
        self, after: Cursor | None = None, *, before_ns: int | None = None, limit: int = 500
    ) -> tuple[list[Span], Cursor | None]:
        """One page of the spans still waiting for a verdict, in ``(end_ns, id)`` order: the first ``limit``
        after ``after`` (None: from the start) that ended before ``before_ns`` (None: any), and the cursor
        for the next page (None when this was the last). A span whose JSON cannot be read is skipped (and
        logged): it must not stop the ones behind it."""
        sql = "SELECT end_ns, id, doc FROM spans WHERE pending IS NOT NULL"
        args: list[Any] = []
        if after is not None:
            sql += " AND end_ns >= ? AND (end_ns > ? OR id > ?)"
            args += [after[0], after[0], after[1]]
        if before_ns is not None:
            sql += " AND end_ns < ?"
            args.append(before_ns)
        rows = self.db.execute(sql + " ORDER BY end_ns, id LIMIT ?", (*args, limit)).fetchall()
        return pending_page(rows, limit)

    def remember_key(self, public_key: bytes, key_id: str, now_ns: int | None = None) -> None:
        """Record a verdict public key this store's verdicts are (or will be) signed with."""
        now = time_ns() if now_ns is None else now_ns
        db = self._tx()
        try:
            db.execute(
                "INSERT INTO verdict_keys(key_id, public_key, first_ns, last_ns) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key_id) DO UPDATE SET last_ns = max(last_ns, excluded.last_ns)",
                (key_id, public_key, now, now),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def known_keys(self) -> list[KnownKey]:
        """Every verdict public key recorded, oldest first."""
        rows = self.db.execute(
            "SELECT key_id, public_key, first_ns, last_ns FROM verdict_keys ORDER BY first_ns, key_id"
        )
        return [KnownKey(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    def verdict_signers(self) -> list[str]:
        """Key ids the stored verdicts were signed with: [] when the store holds no verdict; else the keys
        recorded (a store written before keys were recorded: the key id of one of its verdicts)."""
        row = self.db.execute("SELECT doc FROM verdicts LIMIT 1").fetchone()
        if row is None:
            return []
        return [k.key_id for k in self.known_keys()] or [signer_of(bytes(row[0]))]

    def counts(self) -> dict[str, int]:
        one = self.db.execute
        return {
            "spans": one("SELECT count(*) FROM spans").fetchone()[0],
            "pending": one("SELECT count(*) FROM spans WHERE pending IS NOT NULL").fetchone()[0],
            "final": one("SELECT count(*) FROM verdicts").fetchone()[0],
            "evidence": one("SELECT coalesce(sum(json_array_length(evidence)), 0) FROM verdicts").fetchone()[
                0
            ],
        }

    def prune(self, before_ns: int, limit: int = -1) -> int:
        """Delete spans ended before ``before_ns`` (the oldest ``limit`` of them; -1: all), their verdicts
        and evidence; returns spans deleted."""
        db = self._tx()
        try:
            old = "SELECT id FROM spans WHERE end_ns < ? ORDER BY end_ns LIMIT ?"
            args = (before_ns, limit)
            db.execute(f"DELETE FROM verdicts WHERE request_id IN ({old})", args)  # noqa: S608 (placeholders)
            n = db.execute(f"DELETE FROM spans WHERE id IN ({old})", args).rowcount  # noqa: S608 (placeholders)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return n


class _Sql:
    """A connection as the log's :class:`tmb.verdict.tlog.Sql`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


def _refuse_empty(path: Path) -> None:
    """A zero-byte file where a store should be is not a store: SQLite would quietly make a new, empty one
    of it, hiding a truncated or wrongly restored file (a store tmb made is never 0 bytes: the WAL mode is
    written into its first page as it is created). Refused; a missing file is a first start, fine."""
    try:
        if path.stat().st_size != 0:
            return
    except OSError:
        return  # missing (created), or unreadable: sqlite3 says what is wrong
    raise StoreError(
        f"store {path} is an empty file (0 bytes), not a store: refusing to start a new store over it "
        "(restore the file, or start once with `tmb serve --init` to create a new store there)"
    )


def pending_page(rows: Sequence[Sequence[Any]], limit: int) -> tuple[list[Span], Cursor | None]:
    """Rows ``(end_ns, id, doc)`` of a page of pending spans -> the spans and the next page's cursor."""
    spans: list[Span] = []
    for _, request_id, doc in rows:
        try:
            spans.append(Span.from_dict(json.loads(doc)))
        except (ValueError, KeyError, TypeError):
            log.error("pending span %s has an unreadable record: not resumed", request_id)
    after = (int(rows[-1][0]), str(rows[-1][1])) if len(rows) == limit else None
    return spans, after


def signer_of(doc: bytes) -> str:
    """The ``key_id`` a stored verdict (canonical bytes) names, or ``unknown``."""
    try:
        key_id = json.loads(doc).get("key_id")
    except (ValueError, AttributeError):
        key_id = None
    return key_id if isinstance(key_id, str) else "unknown"
