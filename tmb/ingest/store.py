"""Persistence of the daemon's evidence ingest (tables prefixed ``ingest_``): the backend protocol
(:class:`IngestBackend`), the SQLite backend (:class:`IngestStore`, WAL) and :func:`open_ingest_store`, which
picks the backend the config names (:class:`tmb.ingest.store_pg.PgIngestStore` when ``[store] url`` is set,
so daemons sharing verdicts share evidence too).

One row per node (``ingest_nodes``: AK, chain head, IMA replay state and the unverified IMA tail, last quote
clock, policy and binding state as JSON), its chain segments (anchor and link to the previous segment),
every accepted batch (payload, time span, the id of the first verified quote covering it), every quote
(verification summary, raw TPMS_ATTEST/TPMT_SIGNATURE), the findings recorded against the node and its
UEFI event log (``ingest_eventlogs``: the newest one the probe sent, with its SHA-256).
The SQLite caller gives a path or an open :class:`sqlite3.Connection` (so the daemon can share its database);
every ingest request is one transaction, committed before the HTTP answer. A request that changes a node's
chain, IMA or state reads the node's row inside its transaction with ``lock=True`` (``BEGIN IMMEDIATE``
on SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL), so two daemons take a node's evidence in turn and the
second sees what the first committed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tmb.attest.pcr import ReplayState
from tmb.errors import InputError, TmbError
from tmb.ingest.state import NodeState
from tmb.ingest.trail import NonceRow, RecordRow, Trail, schema_sqlite

if TYPE_CHECKING:
    from tmb.config import AttestationConfig, StoreConfig

__all__ = [
    "BatchRow",
    "EventLogRow",
    "EvidenceStoreError",
    "IngestBackend",
    "IngestStore",
    "Listener",
    "NodeRow",
    "SegmentRow",
    "open_ingest_store",
]

log = logging.getLogger("tmb.ingest")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_nodes (
    node TEXT PRIMARY KEY,
    ak BLOB NOT NULL,
    registered_ns INTEGER NOT NULL,
    segment BLOB,
    seq INTEGER,
    head BLOB,
    replay TEXT NOT NULL DEFAULT '{}',
    ima_data BLOB NOT NULL DEFAULT x'',
    state TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS ingest_segments (
    node TEXT NOT NULL,
    segment BLOB NOT NULL,
    anchor_seq INTEGER NOT NULL,
    link_segment BLOB,
    link_seq INTEGER,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (node, segment)
);
CREATE TABLE IF NOT EXISTS ingest_batches (
    node TEXT NOT NULL,
    segment BLOB NOT NULL,
    seq INTEGER NOT NULL,
    digest BLOB NOT NULL,
    prev BLOB NOT NULL,
    payload BLOB NOT NULL,
    t0_ns INTEGER,
    t1_ns INTEGER,
    received_ns INTEGER NOT NULL,
    quote_id INTEGER,
    PRIMARY KEY (node, segment, seq)
);
CREATE INDEX IF NOT EXISTS ingest_batches_time ON ingest_batches (node, t1_ns);
CREATE INDEX IF NOT EXISTS ingest_batches_quote ON ingest_batches (node, quote_id);
CREATE TABLE IF NOT EXISTS ingest_quotes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    segment BLOB,
    seq INTEGER,
    head BLOB,
    summary TEXT NOT NULL,
    message BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_findings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    finding TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ingest_findings_node ON ingest_findings (node, received_ns);
CREATE TABLE IF NOT EXISTS ingest_eventlogs (
    node TEXT PRIMARY KEY,
    received_ns INTEGER NOT NULL,
    digest BLOB NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_identity (
    node TEXT NOT NULL,
    kind TEXT NOT NULL,
    doc TEXT NOT NULL,
    updated_ns INTEGER NOT NULL,
    PRIMARY KEY (node, kind)
);
"""


@dataclass(frozen=True)
class NodeRow:
    node: str
    ak: bytes
    segment: bytes | None
    seq: int | None
    head: bytes | None
    replay: ReplayState  # where the IMA replay stands (verified up to replay.offset)
    ima_data: bytes  # the unverified IMA tail, from replay.offset
    state: NodeState

    @property
    def ima_end(self) -> int:
        """How many bytes of the node's IMA log the daemon holds (verified and not)."""
        return self.replay.offset + len(self.ima_data)


NODE_COLUMNS = "node, ak, segment, seq, head, replay, ima_data, state"


def node_row(row: Sequence[Any]) -> NodeRow:
    """A :class:`NodeRow` from the ``NODE_COLUMNS`` of an ``ingest_nodes`` row (either backend)."""
    replay = json.loads(row[5])
    return NodeRow(
        str(row[0]),
        bytes(row[1]),
        None if row[2] is None else bytes(row[2]),
        row[3],
        None if row[4] is None else bytes(row[4]),
        ReplayState.from_json(replay) if replay else ReplayState(),
        bytes(row[6]),
        NodeState.from_json(row[7]),
    )


@dataclass(frozen=True)
class SegmentRow:
    segment: bytes
    anchor_seq: int
    link_segment: bytes | None
    link_seq: int | None
    created_ns: int | None = None  # when the daemon received its genesis


@dataclass(frozen=True)
class BatchRow:
    segment: bytes
    seq: int
    digest: bytes
    payload: bytes
    t0_ns: int | None
    t1_ns: int | None
    quote_id: int | None


@dataclass(frozen=True)
class EventLogRow:
    received_ns: int
    digest: bytes  # SHA-256 of data
    data: bytes


class EvidenceStoreError(TmbError):
    """The evidence store cannot be opened, read or written (PostgreSQL: the URL named without password)."""


class Listener(Protocol):
    """A running subscription to another daemon's attestations (:meth:`IngestBackend.listen`)."""

    def close(self) -> None: ...


class IngestBackend(Protocol):
    """What the ingest needs of its store: :class:`IngestStore` (SQLite) or
    :class:`tmb.ingest.store_pg.PgIngestStore` (PostgreSQL). Not thread-safe: the ingest calls it under one
    lock. Writes happen inside :meth:`transaction`; reads may happen outside one."""

    shared: bool  # other daemons may write the same evidence (their wake-ups come through listen())

    def close(self) -> None: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def listen(self, attested: Callable[[str], None], resync: Callable[[], None]) -> Listener | None:
        """Call ``attested(node)`` when another daemon's quote attests batches of a node, ``resync()`` when
        such calls may have been missed; None when no other daemon writes this store."""
        ...

    def upsert_node(self, node: str, ak: bytes, now_ns: int) -> None: ...
    def node(self, node: str, *, lock: bool = False) -> NodeRow | None: ...
    def has_node(self, node: str) -> bool:
        """Whether the node is registered (:meth:`node` without reading its state)."""
        ...

    def set_head(self, node: str, segment: bytes, seq: int, head: bytes) -> None: ...
    def set_ima(self, node: str, replay: ReplayState, data: bytes) -> None: ...
    def set_state(self, node: str, state: NodeState) -> None: ...
    def segment(self, node: str, segment: bytes) -> SegmentRow | None: ...
    def add_segment(
        self, node: str, segment: bytes, anchor: int, link: tuple[bytes, int] | None, now_ns: int
    ) -> None: ...
    def set_anchor(self, node: str, segment: bytes, anchor: int) -> None: ...
    def batch(self, node: str, segment: bytes, seq: int) -> BatchRow | None: ...
    def find_digest(self, node: str, digest: bytes) -> tuple[bytes, int] | None: ...
    def add_batch(
        self,
        node: str,
        segment: bytes,
        seq: int,
        digest: bytes,
        prev: bytes,
        payload: bytes,
        span: tuple[int, int] | None,
        now_ns: int,
    ) -> None: ...
    def attest(self, node: str, segment: bytes, seq: int, quote_id: int) -> int: ...
    def batches_overlapping(self, node: str, t0_ns: int, t1_ns: int) -> list[BatchRow]: ...
    def count_batches(self, node: str, *, attested: bool | None = None) -> int: ...
    def add_quote(
        self,
        node: str,
        now_ns: int,
        ok: bool,
        head: tuple[bytes, int, bytes] | None,
        summary: dict[str, Any],
        message: bytes,
        signature: bytes,
    ) -> int: ...
    def set_quote_summary(self, quote_id: int, summary: dict[str, Any]) -> None: ...
    def quote_summary(self, quote_id: int) -> dict[str, Any] | None: ...
    def last_quote(self, node: str) -> dict[str, Any] | None: ...
    def set_eventlog(self, node: str, now_ns: int, digest: bytes, data: bytes) -> None: ...
    def eventlog(self, node: str) -> EventLogRow | None: ...
    def eventlog_digest(self, node: str) -> bytes | None: ...
    def add_findings(self, node: str, now_ns: int, findings: Sequence[Mapping[str, Any]]) -> None: ...
    def findings(self, node: str, t0_ns: int = 0, t1_ns: int = 1 << 62) -> list[dict[str, Any]]: ...
    def quote_times(self) -> list[tuple[str, int, int | None]]:
        """Every node: ``(node, registered_ns, received_ns of its last verified quote or None)``."""
        ...

    def drop_identities(self, kind: str, before_ns: int) -> int:
        """Delete the identity records of ``kind`` last written before ``before_ns`` (expired challenges)."""
        ...

    def identity(self, node: str, kind: str) -> dict[str, Any] | None:
        """The node's identity record of ``kind`` (:mod:`tmb.ingest.identity`: pinned, challenge, rekey)."""
        ...

    def set_identity(self, node: str, kind: str, doc: Mapping[str, Any] | None, now_ns: int) -> None:
        """Write (``doc``) or delete (None) the node's identity record of ``kind``."""
        ...

    # The evidence trail and the nonce log (tmb.ingest.trail.Trail, shared by both backends).
    def put_blob(self, kind: str, data: bytes) -> bytes: ...
    def blob(self, digest: bytes) -> bytes | None: ...
    def keep(
        self, node: str, kind: str, now_ns: int, data: bytes, ref: int | None = None, **meta: Any
    ) -> bytes: ...
    def records(
        self, node: str, kind: str, *, until_ns: int | None = None, limit: int = ...
    ) -> list[RecordRow]: ...
    def last_record(
        self, node: str, kind: str, *, until_ns: int | None = None, digest: bytes | None = None
    ) -> RecordRow | None: ...
    def quote_records(self, node: str, first: int, last: int, limit: int) -> list[RecordRow]: ...
    def ima_since_reset(self, node: str, until_ns: int, limit: int) -> list[RecordRow]: ...
    def batches_of_quote(
        self, node: str, quote_id: int, limit: int
    ) -> list[tuple[bytes, int, bytes, bytes, bytes]]: ...
    def issue_nonce(self, node: str, nonce: bytes, now_ns: int) -> None: ...
    def fresh_nonce(self, node: str, since_ns: int) -> bytes | None: ...
    def nonce_row(self, node: str, nonce: bytes) -> NonceRow | None: ...
    def consume_nonce(self, node: str, nonce: bytes, now_ns: int, quote_digest: bytes) -> bool: ...
    def consumed_nonces(self, node: str, quote_digests: Sequence[bytes]) -> list[NonceRow]: ...
    def use_request_nonce(
        self, node: str, n: bytes, t_ms: int, prune_before_ms: int, prune_limit: int = ...
    ) -> bool:
        """The evidence requests' shared replay window (:mod:`tmb.ingest.auth`): False for a used ``n``."""
        ...

    def request_nonces(self) -> int: ...
    def prune_evidence(self, cutoff_ns: int, limit: int) -> int:
        """Evidence retention (:mod:`tmb.ingest.retention`): at most ``limit`` rows deleted."""
        ...


def covered_by(
    store: IngestBackend, node: str, segment: bytes, seq: int, mark: Callable[[bytes, int, int], int]
) -> int:
    """The batches a quote over (segment, seq) covers, for either backend's :meth:`IngestBackend.attest`:
    ``mark(segment, first_seq, last_seq)`` for that segment from its anchor up to ``seq``, then, while a
    segment's genesis links to the head of the previous one and its anchor is 0, for the previous segment up
    to the linked batch (unless that one is attested already). Returns the sum of what ``mark`` returned."""
    count = 0
    for _ in range(10_000):
        seg = store.segment(node, segment)
        if seg is None:
            break
        count += mark(segment, seg.anchor_seq, seq)
        if seg.anchor_seq != 0 or seg.link_segment is None or seg.link_seq is None:
            break
        linked = store.batch(node, seg.link_segment, seg.link_seq)
        if linked is None or linked.quote_id is not None:
            break
        segment, seq = seg.link_segment, seg.link_seq
    return count


def open_ingest_store(attestation: AttestationConfig, store: StoreConfig) -> IngestBackend:
    """The evidence store the config names: PostgreSQL on ``[store] url`` when it is set (the database the
    verdicts are in: every daemon on it sees every node's evidence), else the SQLite file
    ``[attestation] db`` (default: the verdict store's file ``[store] path``)."""
    if store.url:
        from tmb.ingest.store_pg import PgIngestStore

        if attestation.db:
            log.warning("[attestation] db is ignored: evidence goes to the [store] url database")
        return PgIngestStore(store.url)
    return IngestStore(attestation.db or store.path)


class IngestStore(Trail):
    """Typed access to the ingest tables on SQLite. Not thread-safe: one per event loop."""

    shared = False  # one daemon's file

    def __init__(self, db: str | Path | sqlite3.Connection, *, synchronous: str = "NORMAL") -> None:
        if isinstance(db, sqlite3.Connection):
            self.conn, self._owned = db, False
        else:
            try:
                self.conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise InputError(f"cannot open the ingest database: {exc}", path=str(db)) from None
            self._owned = True
        if synchronous not in ("NORMAL", "FULL"):
            raise InputError("synchronous must be NORMAL or FULL")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)
        self.conn.executescript(schema_sqlite())

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, args).fetchall()

    def close(self) -> None:
        if self._owned:
            self.conn.close()

    def listen(self, attested: Callable[[str], None], resync: Callable[[], None]) -> Listener | None:
        return None  # only this daemon writes the file: its own quotes wake its waiters

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------------------------------ nodes

    def upsert_node(self, node: str, ak: bytes, now_ns: int) -> None:
        self.conn.execute(
            "INSERT INTO ingest_nodes (node, ak, registered_ns) VALUES (?, ?, ?) "
            "ON CONFLICT(node) DO UPDATE SET ak = excluded.ak",
            (node, ak, now_ns),
        )

    def node(self, node: str, *, lock: bool = False) -> NodeRow | None:
        """The node's row (``lock``: the caller's ``BEGIN IMMEDIATE`` already holds the database)."""
        row = self.conn.execute(
            f"SELECT {NODE_COLUMNS} FROM ingest_nodes WHERE node = ?",  # noqa: S608 (constant columns)
            (node,),
        ).fetchone()
        return node_row(row) if row is not None else None

    def has_node(self, node: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM ingest_nodes WHERE node = ?", (node,)).fetchone()
        return row is not None

    def set_head(self, node: str, segment: bytes, seq: int, head: bytes) -> None:
        self.conn.execute(
            "UPDATE ingest_nodes SET segment = ?, seq = ?, head = ? WHERE node = ?",
            (segment, seq, head, node),
        )

    def set_ima(self, node: str, replay: ReplayState, data: bytes) -> None:
        self.conn.execute(
            "UPDATE ingest_nodes SET replay = ?, ima_data = ? WHERE node = ?",
            (json.dumps(replay.to_json()), data, node),
        )

    def set_state(self, node: str, state: NodeState) -> None:
        self.conn.execute("UPDATE ingest_nodes SET state = ? WHERE node = ?", (state.to_json(), node))

    # ------------------------------------------------------------------------------------------ chain

    def segment(self, node: str, segment: bytes) -> SegmentRow | None:
        row = self.conn.execute(
            "SELECT segment, anchor_seq, link_segment, link_seq, created_ns FROM ingest_segments "
            "WHERE node = ? AND segment = ?",
            (node, segment),
        ).fetchone()
        return SegmentRow(*row) if row else None

    def add_segment(
        self, node: str, segment: bytes, anchor: int, link: tuple[bytes, int] | None, now_ns: int
    ) -> None:
        self.conn.execute(
            "INSERT INTO ingest_segments VALUES (?, ?, ?, ?, ?, ?)",
            (node, segment, anchor, link[0] if link else None, link[1] if link else None, now_ns),
        )

    def set_anchor(self, node: str, segment: bytes, anchor: int) -> None:
        self.conn.execute(
            "UPDATE ingest_segments SET anchor_seq = ? WHERE node = ? AND segment = ?",
            (anchor, node, segment),
        )

    def batch(self, node: str, segment: bytes, seq: int) -> BatchRow | None:
        row = self.conn.execute(
            "SELECT segment, seq, digest, payload, t0_ns, t1_ns, quote_id FROM ingest_batches "
            "WHERE node = ? AND segment = ? AND seq = ?",
            (node, segment, seq),
        ).fetchone()
        return BatchRow(*row) if row else None

    def find_digest(self, node: str, digest: bytes) -> tuple[bytes, int] | None:
        row = self.conn.execute(
            "SELECT segment, seq FROM ingest_batches WHERE node = ? AND digest = ?", (node, digest)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def add_batch(
        self,
        node: str,
        segment: bytes,
        seq: int,
        digest: bytes,
        prev: bytes,
        payload: bytes,
        span: tuple[int, int] | None,
        now_ns: int,
    ) -> None:
        self.conn.execute(
            "INSERT INTO ingest_batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (node, segment, seq, digest, prev, payload, *(span or (None, None)), now_ns),
        )

    def attest(self, node: str, segment: bytes, seq: int, quote_id: int) -> int:
        """Mark the batches a quote over (segment, seq) covers (:func:`covered_by`) with ``quote_id``;
        returns how many batches became attested."""

        def mark(segment: bytes, first: int, last: int) -> int:
            return self.conn.execute(
                "UPDATE ingest_batches SET quote_id = ? WHERE node = ? AND segment = ? AND seq >= ? "
                "AND seq <= ? AND quote_id IS NULL",
                (quote_id, node, segment, first, last),
            ).rowcount

        return covered_by(self, node, segment, seq, mark)

    def batches_overlapping(self, node: str, t0_ns: int, t1_ns: int) -> list[BatchRow]:
        rows = self.conn.execute(
            "SELECT segment, seq, digest, payload, t0_ns, t1_ns, quote_id FROM ingest_batches "
            "WHERE node = ? AND t1_ns >= ? AND t0_ns < ? ORDER BY t0_ns, received_ns, segment, seq",
            (node, t0_ns, t1_ns),
        ).fetchall()
        return [BatchRow(*r) for r in rows]

    def count_batches(self, node: str, *, attested: bool | None = None) -> int:
        sql = "SELECT COUNT(*) FROM ingest_batches WHERE node = ?"
        if attested is not None:
            sql += " AND quote_id IS NOT NULL" if attested else " AND quote_id IS NULL"
        return int(self.conn.execute(sql, (node,)).fetchone()[0])

    # ------------------------------------------------------------------------------------------ quotes

    def add_quote(
        self,
        node: str,
        now_ns: int,
        ok: bool,
        head: tuple[bytes, int, bytes] | None,
        summary: dict[str, Any],
        message: bytes,
        signature: bytes,
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO ingest_quotes (node, received_ns, ok, segment, seq, head, summary, message, "
            "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (node, now_ns, int(ok), *(head or (None, None, None)), json.dumps(summary), message, signature),
        )
        return int(cur.lastrowid or 0)

    def set_quote_summary(self, quote_id: int, summary: dict[str, Any]) -> None:
        self.conn.execute(
            "UPDATE ingest_quotes SET summary = ? WHERE id = ?", (json.dumps(summary), quote_id)
        )

    def quote_summary(self, quote_id: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT summary FROM ingest_quotes WHERE id = ?", (quote_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def last_quote(self, node: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT summary FROM ingest_quotes WHERE node = ? ORDER BY id DESC LIMIT 1", (node,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    # ------------------------------------------------------------------------------------------ event log

    def set_eventlog(self, node: str, now_ns: int, digest: bytes, data: bytes) -> None:
        self.conn.execute(
            "INSERT INTO ingest_eventlogs (node, received_ns, digest, data) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(node) DO UPDATE SET received_ns = excluded.received_ns, digest = excluded.digest, "
            "data = excluded.data",
            (node, now_ns, digest, data),
        )

    def eventlog(self, node: str) -> EventLogRow | None:
        row = self.conn.execute(
            "SELECT received_ns, digest, data FROM ingest_eventlogs WHERE node = ?", (node,)
        ).fetchone()
        return EventLogRow(*row) if row else None

    def eventlog_digest(self, node: str) -> bytes | None:
        row = self.conn.execute("SELECT digest FROM ingest_eventlogs WHERE node = ?", (node,)).fetchone()
        return bytes(row[0]) if row else None

    # ------------------------------------------------------------------------------------------ findings

    def add_findings(self, node: str, now_ns: int, findings: Sequence[Mapping[str, Any]]) -> None:
        self.conn.executemany(
            "INSERT INTO ingest_findings (node, received_ns, finding) VALUES (?, ?, ?)",
            [(node, now_ns, json.dumps(f)) for f in findings],
        )

    def findings(self, node: str, t0_ns: int = 0, t1_ns: int = 1 << 62) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT finding FROM ingest_findings WHERE node = ? AND received_ns >= ? AND received_ns < ? "
            "ORDER BY id",
            (node, t0_ns, t1_ns),
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    # ------------------------------------------------------------------------------------------ identity

    def identity(self, node: str, kind: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT doc FROM ingest_identity WHERE node = ? AND kind = ?", (node, kind)
        ).fetchone()
        return dict(json.loads(row[0])) if row is not None else None

    def set_identity(self, node: str, kind: str, doc: Mapping[str, Any] | None, now_ns: int) -> None:
        if doc is None:
            self.conn.execute("DELETE FROM ingest_identity WHERE node = ? AND kind = ?", (node, kind))
            return
        self.conn.execute(
            "INSERT INTO ingest_identity (node, kind, doc, updated_ns) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(node, kind) DO UPDATE SET doc = excluded.doc, updated_ns = excluded.updated_ns",
            (node, kind, json.dumps(dict(doc)), now_ns),
        )

    def drop_identities(self, kind: str, before_ns: int) -> int:
        cur = self.conn.execute(
            "DELETE FROM ingest_identity WHERE kind = ? AND updated_ns < ?", (kind, before_ns)
        )
        return int(cur.rowcount)

    def quote_times(self) -> list[tuple[str, int, int | None]]:
        rows = self.conn.execute(
            "SELECT n.node, n.registered_ns, MAX(q.received_ns) FROM ingest_nodes n "
            "LEFT JOIN ingest_quotes q ON q.node = n.node AND q.ok = 1 GROUP BY n.node, n.registered_ns "
            "ORDER BY n.node"
        ).fetchall()
        return [(str(r[0]), int(r[1]), None if r[2] is None else int(r[2])) for r in rows]
