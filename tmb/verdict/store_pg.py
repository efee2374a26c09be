"""The verdict store on PostgreSQL, for several daemons sharing one set of verdicts (psycopg 3).

Same tables (schema version 2), columns and semantics as the SQLite :class:`tmb.verdict.store.Store` (its
module docstring describes them); the differences are PostgreSQL's types (``BIGINT`` times, ``BYTEA`` verdict
docs, span docs and evidence arrays as ``TEXT`` so their bytes round-trip exactly) and the schema version,
kept in the one-row table ``tmb_meta`` instead of ``PRAGMA user_version``. The ``verdict_keys`` table is
created on open when missing, as on SQLite (the schema version stays 2: older tmb ignore the table).

A version-1 database (a ``pending`` verdicts row per served span, evidence in a table of its own) is migrated
on open, in one transaction under the schema lock, so daemons starting together migrate it once and none
sees it half done.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from time import time_ns
from typing import Any, TypeVar

import psycopg

from tmb.pgconn import PgConnection
from tmb.pgurl import redact, scrub
from tmb.spans import Span
from tmb.verdict import tlog
from tmb.verdict.model import Verdict
from tmb.verdict.store import (
    SCHEMA_VERSION,
    Cursor,
    EvidenceRef,
    KnownKey,
    StoreError,
    VerdictRecord,
    Write,
    pending_page,
    signer_of,
)

__all__ = ["PgStore", "redact", "scrub"]  # redact and scrub live in tmb.pgurl (kept importable here)

T = TypeVar("T")
log = logging.getLogger("tmb.store")
_dumps = json.JSONEncoder(check_circular=False).encode  # the text json.dumps gives (as Store writes it)
_Cursor = psycopg.Cursor[tuple[Any, ...]]

_SCHEMA_LOCK = 0x746D62_0001  # pg_advisory_xact_lock key: daemons starting together create the schema once
_LOG_LOCK = 0x746D62_0002  # taken by every transaction that appends to the verdict log (one log, in order)
_META = """
CREATE TABLE IF NOT EXISTS tmb_meta(
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), version INTEGER NOT NULL)
"""
_VERDICTS = """(
    request_id TEXT PRIMARY KEY, decision TEXT NOT NULL, created_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL, doc BYTEA NOT NULL, evidence TEXT NOT NULL)"""
_KEYS = """CREATE TABLE IF NOT EXISTS verdict_keys(
    key_id TEXT PRIMARY KEY, public_key BYTEA NOT NULL, first_ns BIGINT NOT NULL, last_ns BIGINT NOT NULL)"""
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS spans_end ON spans(end_ns)",
    "CREATE INDEX IF NOT EXISTS spans_pending ON spans(end_ns) WHERE pending IS NOT NULL",
)
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS spans(
    id TEXT PRIMARY KEY, end_ns BIGINT NOT NULL, worker TEXT, node TEXT, outcome TEXT NOT NULL,
    pending SMALLINT, doc TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS verdicts" + _VERDICTS,
    *_INDEXES,
)
_V1 = 1  # the schema version migrated from: pending verdicts rows, an evidence table
# Version 1 -> 2: pending verdicts rows become the spans' flag, evidence rows (in seq order) a JSON array
# in the verdicts row; a migrated database ends up with the same tables, indexes and names as a new one.
_MIGRATE_V1 = (
    "ALTER TABLE spans ADD COLUMN pending SMALLINT",
    "UPDATE spans SET pending = 1 WHERE id IN (SELECT request_id FROM verdicts WHERE state = 'pending')",
    "CREATE TABLE verdicts_v2" + _VERDICTS,
    """INSERT INTO verdicts_v2(request_id, decision, created_ns, updated_ns, doc, evidence)
    SELECT v.request_id, v.decision, v.created_ns, v.updated_ns, v.doc,
        coalesce((SELECT json_agg(e.doc::json ORDER BY e.seq)::text FROM evidence e
                  WHERE e.request_id = v.request_id), '[]')
    FROM verdicts v WHERE v.state = 'final'""",
    "DROP TABLE evidence",
    "DROP TABLE verdicts",
    "ALTER TABLE verdicts_v2 RENAME TO verdicts",
    "ALTER INDEX verdicts_v2_pkey RENAME TO verdicts_pkey",
    *_INDEXES,
)


class PgStore:
    """Synchronous PostgreSQL store with :class:`~tmb.verdict.store.Store`'s methods and semantics.

    Use it when several tmb daemons (behind one load balancer, say) must share verdicts: a verdict one daemon
    publishes is what another serves from ``/verdicts/<id>``. A single daemon is better served by the
    embedded SQLite :class:`~tmb.verdict.store.Store` (no server to run, and a faster commit).

    ``url`` is a libpq connection string (``postgresql://user:pw@host/db`` or ``host=... dbname=...``);
    the tables are created on first use and the schema version checked (version 1 is migrated, an unknown
    one is refused).
    Every call is one transaction on one connection, committed before it returns (PostgreSQL's own
    durability, ``synchronous_commit`` as the server sets it); not thread-safe on its own, like
    :class:`~tmb.verdict.store.Store`. Span inserts are ``ON CONFLICT DO NOTHING``, so
    daemons recording the same span at once both succeed; a transaction chosen as a deadlock victim is
    retried. Errors (connection, SQL) are :class:`~tmb.verdict.store.StoreError` naming the URL without its
    password; after a lost connection the next call reconnects.
    """

    def __init__(self, url: str) -> None:
        self.url = redact(url)  # safe to print
        self._pg = PgConnection(url, error=StoreError, init=self._init_schema)

    # -- connection (tmb/pgconn.py: timeouts, reconnects, deadlock retries, passwords out of errors) ------

    def _init_schema(self, db: psycopg.Connection[tuple[Any, ...]]) -> None:
        with db.transaction(), db.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cur.execute(_META)
            row = cur.execute("SELECT version FROM tmb_meta").fetchone()
            if row is None:
                for statement in _SCHEMA:
                    cur.execute(statement)
                cur.execute("INSERT INTO tmb_meta(version) VALUES (%s)", (SCHEMA_VERSION,))
            elif row[0] == SCHEMA_VERSION:
                pass
            elif row[0] == _V1:
                log.info("migrating store %s from schema version 1 to %d", self.url, SCHEMA_VERSION)
                for statement in _MIGRATE_V1:
                    cur.execute(statement)
                cur.execute("UPDATE tmb_meta SET version = %s", (SCHEMA_VERSION,))
            else:
                raise StoreError(
                    "store has an unknown schema version",
                    url=self.url,
                    got=row[0],
                    expected=SCHEMA_VERSION,
                    hint="a newer tmb wrote this database; run that version, or point tmb at another",
                )
            cur.execute(_KEYS)
            for statement in tlog.PG_SCHEMA:
                cur.execute(statement)

    def _run(self, what: str, fn: Callable[[_Cursor], T]) -> T:
        """``fn(cursor)`` in one transaction: committed if it returns, rolled back if it raises."""
        return self._pg.run(what, fn)

    def close(self) -> None:
        self._pg.close()

    # -- writes --------------------------------------------------------------------------------------

    def record_spans(self, spans: Sequence[Span]) -> None:
        """Insert spans (ignoring ids already stored); a served one is pending until its verdict lands."""
        self.write_batch([(spans, None)])

    def put_verdict(self, verdict: Verdict, evidence: Sequence[EvidenceRef] = ()) -> None:
        """Store the final signed verdict (replacing any earlier one) and its evidence references."""
        self.write_batch([(None, (verdict, evidence))])

    def write_batch(self, writes: Sequence[Write]) -> None:
        """Several writes in one transaction: each is ``(spans, None)`` or ``(None, (verdict, evidence))``,
        applied in order. All or nothing."""
        for _, final in writes:
            if final is not None and not final[0].signature:
                raise ValueError("refusing to store an unsigned verdict")

        def apply(cur: _Cursor) -> None:
            now = time_ns()
            for spans, final in writes:
                if spans is not None:
                    _insert_spans(cur, spans)
                if final is not None:
                    _insert_verdict(cur, final[0], final[1], now)
            logged = [final[0] for _, final in writes if final is not None]
            if logged:  # one log across daemons: appends take turns
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOG_LOCK,))
                tlog.append_verdicts(_Sql(cur), logged, now)
            key_ids = sorted({final[0].key_id for _, final in writes if final is not None})
            if key_ids:  # the keys that signed these verdicts were last used now
                cur.execute(
                    "UPDATE verdict_keys SET last_ns = %s WHERE key_id = ANY(%s) AND last_ns < %s",
                    (now, key_ids, now),
                )

        self._run("cannot write to store", apply)

    def prune(self, before_ns: int, limit: int = -1) -> int:
        """Delete spans ended before ``before_ns`` (the oldest ``limit`` of them; -1: all), their verdicts
        and evidence; returns spans deleted."""

        def apply(cur: _Cursor) -> int:
            row = cur.execute(
                "WITH old AS (DELETE FROM spans WHERE id IN "
                "(SELECT id FROM spans WHERE end_ns < %(t)s ORDER BY end_ns LIMIT %(n)s) RETURNING id), "
                "v AS (DELETE FROM verdicts WHERE request_id IN (SELECT id FROM old)) "
                "SELECT count(*) FROM old",
                {"t": before_ns, "n": limit if limit >= 0 else None},  # LIMIT NULL: no limit
            ).fetchone()
            return int(row[0]) if row else 0

        return self._run("cannot prune store", apply)

    # -- reads ---------------------------------------------------------------------------------------

    # -- the verdict transparency log (tmb/verdict/tlog.py) ------------------------------------------

    def _log(self, what: str, fn: Callable[[tlog.Sql], T]) -> T:
        return self._run(what, lambda cur: fn(_Sql(cur)))

    def log_size(self) -> int:
        return self._log("cannot read the log", tlog.log_size)

    def log_entry(self, request_id: str) -> tlog.LogEntry | None:
        return self._log("cannot read the log", lambda sql: tlog.log_entry(sql, request_id))

    def log_root(self, size: int) -> bytes:
        return self._log("cannot read the log", lambda sql: tlog.log_root(sql, size))

    def log_inclusion(self, index: int, size: int) -> list[bytes]:
        return self._log("cannot read the log", lambda sql: tlog.log_inclusion(sql, index, size))

    def log_consistency(self, old: int, new: int) -> list[bytes]:
        return self._log("cannot read the log", lambda sql: tlog.log_consistency(sql, old, new))

    def add_checkpoint(self, size: int, root: bytes, note: str, now_ns: int | None = None) -> None:
        now = time_ns() if now_ns is None else now_ns
        self._log("cannot write to the log", lambda sql: tlog.add_checkpoint(sql, size, root, note, now))

    def latest_checkpoint(self) -> tlog.StoredCheckpoint | None:
        return self._log("cannot read the log", tlog.latest_checkpoint)

    def log_proof(self, request_id: str) -> tuple[tlog.LogEntry | None, tlog.LogProof | None]:
        return self._log("cannot read the log", lambda sql: tlog.log_proof(sql, request_id))

    def get_span(self, request_id: str) -> Span | None:
        def read(cur: _Cursor) -> Span | None:
            row = cur.execute("SELECT doc FROM spans WHERE id = %s", (request_id,)).fetchone()
            return Span.from_dict(json.loads(row[0])) if row else None

        return self._run("cannot read store", read)

    def lookup(self, request_id: str) -> VerdictRecord:
        def read(cur: _Cursor) -> VerdictRecord:
            row = cur.execute(
                "SELECT v.doc, s.pending, s.doc FROM (SELECT %s::text AS id) k "
                "LEFT JOIN verdicts v ON v.request_id = k.id LEFT JOIN spans s ON s.id = k.id",
                (request_id,),
            ).fetchone()
            doc, pending, span_doc = row if row else (None, None, None)
            span = Span.from_dict(json.loads(span_doc)) if span_doc is not None else None
            if doc is not None:
                return VerdictRecord(request_id, "final", bytes(doc), span)
            if pending is not None:
                return VerdictRecord(request_id, "pending", None, span)
            return VerdictRecord(request_id, "unknown", None, span)

        return self._run("cannot read store", read)

    def evidence(self, request_id: str) -> list[EvidenceRef]:
        def read(cur: _Cursor) -> list[EvidenceRef]:
            row = cur.execute("SELECT evidence FROM verdicts WHERE request_id = %s", (request_id,)).fetchone()
            return [EvidenceRef.from_dict(e) for e in json.loads(row[0])] if row else []

        return self._run("cannot read store", read)

    def pending(self, limit: int = 1000) -> list[str]:
        """Ids of served spans still waiting for a verdict, oldest first (resumed after a restart)."""

        def read(cur: _Cursor) -> list[str]:
            cur.execute(
                "SELECT id FROM spans WHERE pending IS NOT NULL ORDER BY end_ns, id LIMIT %s", (limit,)
            )
            return [r[0] for r in cur.fetchall()]

        return self._run("cannot read store", read)

    def pending_spans(
        self, after: Cursor | None = None, *, before_ns: int | None = None, limit: int = 500
    ) -> tuple[list[Span], Cursor | None]:
        """One page of the spans waiting for a verdict, in ``(end_ns, id)`` order (see
        :meth:`tmb.verdict.store.Store.pending_spans`)."""
        sql = "SELECT end_ns, id, doc FROM spans WHERE pending IS NOT NULL"
        args: list[Any] = []
        if after is not None:
            sql += " AND end_ns >= %s AND (end_ns, id) > (%s, %s)"
            args += [after[0], after[0], after[1]]
        if before_ns is not None:
            sql += " AND end_ns < %s"
            args.append(before_ns)
        sql += " ORDER BY end_ns, id LIMIT %s"

        def read(cur: _Cursor) -> list[tuple[Any, ...]]:
            return cur.execute(sql, (*args, limit)).fetchall()

        return pending_page(self._run("cannot read store", read), limit)

    def remember_key(self, public_key: bytes, key_id: str, now_ns: int | None = None) -> None:
        """Record a verdict public key this store's verdicts are (or will be) signed with."""
        now = time_ns() if now_ns is None else now_ns

        def apply(cur: _Cursor) -> None:
            cur.execute(
                "INSERT INTO verdict_keys(key_id, public_key, first_ns, last_ns) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (key_id) DO UPDATE SET "
                "last_ns = GREATEST(verdict_keys.last_ns, excluded.last_ns)",
                (key_id, public_key, now, now),
            )

        self._run("cannot write to store", apply)

    def known_keys(self) -> list[KnownKey]:
        """Every verdict public key recorded, oldest first."""

        def read(cur: _Cursor) -> list[KnownKey]:
            rows = cur.execute(
                "SELECT key_id, public_key, first_ns, last_ns FROM verdict_keys ORDER BY first_ns, key_id"
            ).fetchall()
            return [KnownKey(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

        return self._run("cannot read store", read)

    def verdict_signers(self) -> list[str]:
        """Key ids the stored verdicts were signed with ([] when there is no verdict; see
        :meth:`tmb.verdict.store.Store.verdict_signers`)."""

        def read(cur: _Cursor) -> list[str]:
            row = cur.execute("SELECT doc FROM verdicts LIMIT 1").fetchone()
            if row is None:
                return []
            keys = [r[0] for r in cur.execute("SELECT key_id FROM verdict_keys ORDER BY first_ns, key_id")]
            return keys or [signer_of(bytes(row[0]))]

        return self._run("cannot read store", read)

    def counts(self) -> dict[str, int]:
        def read(cur: _Cursor) -> dict[str, int]:
            row = cur.execute(
                "SELECT (SELECT count(*) FROM spans), "
                "(SELECT count(*) FROM spans WHERE pending IS NOT NULL), "
                "(SELECT count(*) FROM verdicts), "
                "(SELECT coalesce(sum(json_array_length(evidence::json)), 0) FROM verdicts)"
            ).fetchone()
            spans, pending, final, evidence = row if row else (0, 0, 0, 0)
            return {"spans": spans, "pending": pending, "final": final, "evidence": evidence}

        return self._run("cannot read store", read)


def _insert_spans(cur: _Cursor, spans: Sequence[Span]) -> None:
    # Rows in id order: two daemons inserting overlapping spans take the row locks in the same order.
    ordered = sorted(spans, key=lambda s: s.id)
    if not ordered:
        return
    dumps = _dumps
    cur.executemany(
        "INSERT INTO spans(id, end_ns, worker, node, outcome, pending, doc) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
        [
            (s.id, s.end_ns, s.worker, s.node, s.outcome.value, 1 if s.served else None, dumps(s.to_dict()))
            for s in ordered
        ],
    )


class _Sql:
    """A cursor as the log's :class:`tmb.verdict.tlog.Sql` (``?`` placeholders become ``%s``)."""

    def __init__(self, cur: _Cursor) -> None:
        self._cur = cur

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._cur.execute(sql.replace("?", "%s"), tuple(params)).fetchall()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])


def _insert_verdict(cur: _Cursor, verdict: Verdict, evidence: Sequence[EvidenceRef], now: int) -> None:
    # One statement, one round trip: the upsert, then the span (if any) no longer pending.
    cur.execute(
        "WITH v AS (INSERT INTO verdicts(request_id, decision, created_ns, updated_ns, doc, evidence) "
        "VALUES (%(id)s, %(decision)s, %(now)s, %(now)s, %(doc)s, %(evidence)s) "
        "ON CONFLICT (request_id) DO UPDATE SET decision = excluded.decision, "
        "updated_ns = excluded.updated_ns, doc = excluded.doc, evidence = excluded.evidence) "
        "UPDATE spans SET pending = NULL WHERE id = %(id)s AND pending IS NOT NULL",
        {
            "id": verdict.request_id,
            "decision": verdict.decision.value,
            "now": now,
            "doc": verdict.encode(),
            "evidence": _dumps([e.to_dict() for e in evidence]),
        },
    )
