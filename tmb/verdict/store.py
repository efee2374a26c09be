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

A request is thus ``final`` (a verdicts row), ``pending`` (a served span, no verdict yet) or unknown.
Per request that is two row inserts and one flag update, the fewest pages a random 128-bit key allows
(version 1 kept a pending verdict row and an evidence table: three times the pages written).

Retention: :meth:`Store.prune` deletes spans (and their verdicts and evidence rows) that ended before a
cutoff. :class:`AsyncStore` runs every call on one dedicated thread, commits concurrent writes together
(group commit) and wakes long-pollers on publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import time_ns
from typing import Any, Protocol, TypeVar

from tmb.errors import TmbError
from tmb.proxy.spans import Span
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
"""
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
    return _dumps([e.to_dict() for e in evidence])


# One write of a group commit: spans, or a final verdict with its evidence.
Write = tuple[Sequence[Span] | None, tuple[Verdict, Sequence[EvidenceRef]] | None]


@dataclass(frozen=True)
class VerdictRecord:
    """What the store knows about a request id. ``state``: ``pending``, ``final`` or ``unknown``."""

    request_id: str
    state: str
    doc: bytes | None = None  # canonical signed verdict when final
    span: Span | None = None


class Store:
    """Synchronous SQLite store; not thread-safe on its own (use :class:`AsyncStore` from asyncio)."""

    def __init__(self, path: str | Path, *, sync: str = "full") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        self.path = Path(path)
        self.sync = sync
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            self.db.execute("PRAGMA busy_timeout=5000")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise StoreError("store has an unknown schema version", path=str(self.path), got=version)
            if version == 1:
                self._migrate_v1()
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store: {exc}", path=str(self.path)) from exc

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
        """Ids of served spans still waiting for a verdict, oldest first (resumed after a restart)."""
        rows = self.db.execute(
            "SELECT id FROM spans WHERE pending IS NOT NULL ORDER BY end_ns, id LIMIT ?", (limit,)
        )
        return [r[0] for r in rows]

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
            db.execute(f"DELETE FROM verdicts WHERE request_id IN ({old})", args)
            n = db.execute(f"DELETE FROM spans WHERE id IN ({old})", args).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return n


class Backend(Protocol):
    """What :class:`AsyncStore` needs of a store: :class:`Store` (SQLite) or ``store_pg.PgStore``."""

    def write_batch(self, writes: Sequence[Write]) -> None: ...
    def lookup(self, request_id: str) -> VerdictRecord: ...
    def evidence(self, request_id: str) -> list[EvidenceRef]: ...
    def pending(self, limit: int = 1000) -> list[str]: ...
    def counts(self) -> dict[str, int]: ...
    def prune(self, before_ns: int) -> int: ...
    def close(self) -> None: ...


class AsyncStore:
    """A store for asyncio code: group commit, long-poll wake-ups on publish.

    Over a SQLite :class:`Store` with ``sync="normal"`` (inline mode), writes run on the event loop's own
    thread: every write queued during one loop iteration is committed in one transaction at the start of
    the next (``write()`` to the WAL, no fsync); verdict writes, which no response waits for, linger up to
    ``LINGER_S`` to share a transaction with others; reads run at once, and a background thread checkpoints
    the WAL every second on its own connection. Otherwise (``sync="full"``, or another backend such as
    PostgreSQL) every call is queued to one dedicated thread: writes queued while a transaction commits
    are written together in the next one (one ``COMMIT``, one fsync, one wake-up of the event loop for the
    whole group); other calls (reads, prune) run one by one after the group's commit, in the order queued.
    Either way a caller's future resolves only after the transaction holding its write committed, so the
    ``ack = "commit"`` guarantee holds per write.
    """

    def __init__(self, target: str | Path | Backend, *, sync: str = "normal") -> None:
        self.store: Backend = Store(target, sync=sync) if isinstance(target, str | Path) else target
        self.inline = isinstance(self.store, Store) and self.store.sync == "normal"
        if isinstance(self.store, Store) and self.inline:
            self.store.db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._batch: list[_Op] = []  # inline mode: writes waiting for the next loop iteration
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False  # the pending flush is for the next iteration (not LINGER_S away)
        self._spans: list[Span] | None = None  # add_span: the spans of the write being gathered
        self._spans_future: asyncio.Future[None] | None = None
        self._spans_sealed_by_flush = False
        self._stop = threading.Event()
        if self.inline:
            self._thread = threading.Thread(target=self._checkpointer, name="tmb-store-ckpt", daemon=True)
        else:
            self._thread = threading.Thread(target=self._writer, name="tmb-store", daemon=True)
        self._thread.start()

    def _submit(self, kind: int, payload: Any, *, soon: bool = True) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self.inline and kind == _WRITE:
            self._batch.append((kind, payload, fut))
            if soon and not self._flush_soon:  # a response waits for this write: next iteration
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush_handle = loop.call_soon(self._flush)
                self._flush_soon = True
            elif self._flush_handle is None:  # nobody's response waits: gather more first
                self._flush_handle = loop.call_later(LINGER_S, self._flush)
        else:
            self._queue.put((kind, payload, fut))
        return fut

    def _flush(self) -> None:
        """Inline mode: commit the writes queued since the last flush, in one transaction."""
        batch, self._batch, self._flush_handle, self._flush_soon = self._batch, [], None, False
        if self._spans_sealed_by_flush:
            self._spans, self._spans_sealed_by_flush = None, False  # the next add_span starts a new write
        if batch:
            _resolve(_commit(self.store, batch))

    async def _run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` against the store: at once in inline mode, else on the store's thread."""
        if self.inline:
            return fn(*args)
        return await self._submit(_CALL, (fn, args))

    def _writer(self) -> None:
        q, store = self._queue, self.store
        while True:
            first = q.get()
            if first is None:
                return
            ops = [first]
            stop = False
            while True:
                try:
                    op = q.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                ops.append(op)
            done = _commit(store, [op for op in ops if op[0] != _CALL])
            for kind, payload, fut in ops:
                if kind == _CALL:
                    fn, args = payload
                    try:
                        done.append((fut, None, fn(*args)))
                    except Exception as exc:
                        done.append((fut, exc, None))
            _post(done)
            if stop:
                return

    def _checkpointer(self) -> None:
        """Inline mode: copy the WAL into the database file every second (the fsyncs happen here)."""
        assert isinstance(self.store, Store)
        try:
            db = sqlite3.connect(self.store.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.exception("store checkpointer cannot open %s", self.store.path)
            return
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or full disk: the next round tries again
                    log.warning("store checkpoint failed: %s", exc)
        finally:
            db.close()

    async def record_spans(self, spans: Sequence[Span]) -> None:
        await self._submit(_WRITE, (spans, None))

    def add_span(self, span: Span) -> asyncio.Future[None]:
        """Queue ``span`` for the next group commit, without a task or a queue hop (the proxy's hot path).

        Every span added during one loop iteration goes into the same write: they share the returned
        future, which resolves once that write committed (or fails for all of them)."""
        if self._spans is not None:
            self._spans.append(span)
            assert self._spans_future is not None
            return self._spans_future
        spans = [span]
        self._spans = spans
        if self.inline:  # the flush reads the list at the next iteration: it can keep growing until then
            self._spans_future = self._submit(_WRITE, (spans, None))
            self._spans_sealed_by_flush = True
        else:  # the writer thread may take a queued write at once: queue the list once it is complete
            loop = asyncio.get_running_loop()
            self._spans_future = loop.create_future()
            loop.call_soon(self._seal_spans)
        return self._spans_future

    def _seal_spans(self) -> None:
        spans, fut = self._spans, self._spans_future
        self._spans = None
        if spans and fut is not None:
            self._queue.put((_WRITE, (spans, None), fut))

    async def publish(self, verdict: Verdict, evidence: Sequence[EvidenceRef] = ()) -> None:
        """The engine's write: store the final signed verdict, then wake whoever waits for it."""
        await self.publish_many([(verdict, evidence)])

    async def publish_many(self, finals: Sequence[tuple[Verdict, Sequence[EvidenceRef]]]) -> None:
        """Several final verdicts in one write (they commit together), then wake whoever waits for them."""
        if not finals:
            return
        if any(not verdict.signature for verdict, _ in finals):
            raise ValueError("refusing to store an unsigned verdict")
        await self._submit(_WRITE, [(None, final) for final in finals], soon=False)
        for verdict, _ in finals:
            for fut in self._waiters.pop(verdict.request_id, ()):
                if not fut.done():
                    fut.set_result(None)

    async def lookup(self, request_id: str) -> VerdictRecord:
        rec: VerdictRecord = await self._run(self.store.lookup, request_id)
        return rec

    async def wait(self, request_id: str, timeout_s: float) -> VerdictRecord:
        """Like :meth:`lookup`, but while pending wait up to ``timeout_s`` for the final verdict."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(request_id, set()).add(fut)
            try:
                rec = await self.lookup(request_id)
                remaining = deadline - loop.time()
                if rec.state != "pending" or remaining <= 0:
                    return rec
                # re-check at least once a second (another daemon may share the store)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, min(remaining, 1.0))
            finally:
                waiters = self._waiters.get(request_id)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._waiters[request_id]

    async def evidence(self, request_id: str) -> list[EvidenceRef]:
        refs: list[EvidenceRef] = await self._run(self.store.evidence, request_id)
        return refs

    async def pending(self, limit: int = 1000) -> list[str]:
        ids: list[str] = await self._run(self.store.pending, limit)
        return ids

    async def prune(self, before_ns: int) -> int:
        if not self.inline:
            n: int = await self._run(self.store.prune, before_ns)
            return n
        assert isinstance(self.store, Store)
        total = 0
        while True:  # in slices, so the loop (and the proxy on it) never stalls for a big purge
            n = self.store.prune(before_ns, limit=PRUNE_SLICE)
            total += n
            if n < PRUNE_SLICE:
                return total
            await asyncio.sleep(0)

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = await self._run(self.store.counts)
        return counts

    async def close(self) -> None:
        """Finish what is queued, stop the thread, close the store."""
        if self._spans is not None and not self.inline:
            self._seal_spans()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        if self._thread.is_alive():
            self._stop.set()
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
        if self.inline:
            assert isinstance(self.store, Store)
            with contextlib.suppress(sqlite3.Error):
                self.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.store.close()


CHECKPOINT_INTERVAL_S = 1.0
LINGER_S = 0.005  # inline mode: how long a verdict write waits for company (no response waits for it)
PRUNE_SLICE = 2000


def _commit(store: Backend, writes: list[_Op]) -> list[tuple[asyncio.Future[Any], BaseException | None, Any]]:
    """Commit ``writes`` in one transaction; when that fails, each on its own (the good ones still land)."""
    if not writes:
        return []
    try:  # an op's payload is one Write or a list of them (publish_many)
        store.write_batch([w for op in writes for w in (op[1] if isinstance(op[1], list) else [op[1]])])
        return [(op[2], None, None) for op in writes]
    except Exception:
        done: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        for op in writes:
            try:
                store.write_batch(op[1] if isinstance(op[1], list) else [op[1]])
                done.append((op[2], None, None))
            except Exception as exc:
                done.append((op[2], exc, None))
        return done


_WRITE, _CALL = 0, 1
_Op = tuple[int, Any, "asyncio.Future[Any]"]


def _post(done: list[tuple[asyncio.Future[Any], BaseException | None, Any]]) -> None:
    """Resolve futures from the writer thread: one ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], BaseException | None, Any]]] = {}
    for item in done:
        by_loop.setdefault(item[0].get_loop(), []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[Any], BaseException | None, Any]]) -> None:
    for fut, exc, value in items:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
