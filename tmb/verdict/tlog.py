"""The verdict transparency log: every final verdict is a leaf of one append-only RFC 9162 Merkle tree.

A verdict's leaf is :func:`verdict_leaf`: the RFC 9162 leaf hash of its canonical bytes without
``signature`` and ``signature_batch`` (the same leaf a batch signature covers), so a client holding a
verdict recomputes it. The stores keep, per log, the leaves in order (``tlog_leaves``: index, request id)
and the hashes of the perfect subtrees (``tlog_nodes``: level, index, hash; level 0 are the leaf hashes),
and the signed checkpoints (``tlog_checkpoints``). Nothing here is ever pruned: retention may drop a
verdict's payload but never its leaf, so a removed verdict still shows in every later proof.

This module is the store-independent part: which nodes an append creates (:func:`appended_nodes`) and
which stored nodes a root or proof reads (:func:`nodes_needed`), so a store can fetch them in one query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tmb.verdict.merkle import NodeSource, consistency_proof, inclusion_proof, leaf_hash, node_hash, tree_hash
from tmb.verdict.model import Verdict, canonical_bytes

__all__ = ["NodeKey", "NodeMap", "appended_nodes", "nodes_needed", "verdict_leaf", "with_nodes"]

NodeKey = tuple[int, int]  # (level, index) of a perfect subtree
T = TypeVar("T")


def verdict_leaf(verdict: Verdict) -> bytes:
    """The verdict's leaf hash in the log (cached by the signer on verdicts it signed)."""
    cached: bytes | None = verdict.__dict__.get("_leaf")
    return cached if cached is not None else leaf_hash(canonical_bytes(verdict.to_dict(signed=False)))


def appended_nodes(
    size: int, leaves: Sequence[bytes], stored: Callable[[Iterable[NodeKey]], Mapping[NodeKey, bytes]]
) -> list[tuple[int, int, bytes]]:
    """The ``(level, index, hash)`` rows appending ``leaves`` to a log of ``size`` leaves creates.

    ``stored`` fetches existing nodes by key (called once, with the left siblings the append needs)."""
    wanted: set[NodeKey] = set()
    for i in range(size, size + len(leaves)):
        level, index = 0, i
        while index & 1:  # a right child: its left sibling completes the parent
            if index << level <= size:  # the sibling's leaves are all stored already
                wanted.add((level, index - 1))
            level, index = level + 1, index >> 1
    known: dict[NodeKey, bytes] = dict(stored(sorted(wanted))) if wanted else {}
    rows: list[tuple[int, int, bytes]] = []
    for offset, leaf in enumerate(leaves):
        level, index, h = 0, size + offset, leaf
        while True:
            known[(level, index)] = h
            rows.append((level, index, h))
            if not index & 1:
                break
            h = node_hash(known[(level, index - 1)], h)
            level, index = level + 1, index >> 1
    return rows


class _Recorder:
    """A node source that records which nodes are read (the shape of a proof does not depend on hashes)."""

    def __init__(self) -> None:
        self.keys: set[NodeKey] = set()

    def node(self, level: int, index: int) -> bytes:
        self.keys.add((level, index))
        return b"\x00" * 32


def nodes_needed(compute: Callable[[NodeSource], object]) -> set[NodeKey]:
    """The stored nodes ``compute(source)`` reads, found by running it on a recorder."""
    recorder = _Recorder()
    compute(recorder)
    return recorder.keys


class NodeMap:
    """Nodes fetched from a store, as a :class:`tmb.verdict.merkle.NodeSource`."""

    def __init__(self, nodes: Mapping[NodeKey, bytes]) -> None:
        self._nodes = nodes

    def node(self, level: int, index: int) -> bytes:
        return self._nodes[(level, index)]


def with_nodes(
    compute: Callable[[NodeSource], T], fetch: Callable[[Iterable[NodeKey]], Mapping[NodeKey, bytes]]
) -> T:
    """Run a root/proof computation over stored nodes, fetching all it needs in one call."""
    keys = nodes_needed(compute)
    return compute(NodeMap(fetch(sorted(keys)) if keys else {}))


# --- the log's tables, for both stores (SQL written with ``?``; PostgreSQL's adapter swaps in ``%s``) ----

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS tlog_leaves(
    idx INTEGER PRIMARY KEY, request_id TEXT NOT NULL, leaf BLOB NOT NULL, added_ns INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tlog_leaves_request ON tlog_leaves(request_id);
CREATE TABLE IF NOT EXISTS tlog_nodes(
    level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL, PRIMARY KEY(level, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tlog_checkpoints(
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, note TEXT NOT NULL, signed_ns INTEGER NOT NULL);
"""
PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tlog_leaves(idx BIGINT PRIMARY KEY, request_id TEXT NOT NULL, "
    "leaf BYTEA NOT NULL, added_ns BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS tlog_leaves_request ON tlog_leaves(request_id)",
    "CREATE TABLE IF NOT EXISTS tlog_nodes(level INTEGER NOT NULL, idx BIGINT NOT NULL, "
    "hash BYTEA NOT NULL, PRIMARY KEY(level, idx))",
    "CREATE TABLE IF NOT EXISTS tlog_checkpoints(size BIGINT PRIMARY KEY, root BYTEA NOT NULL, "
    "note TEXT NOT NULL, signed_ns BIGINT NOT NULL)",
)


class Sql(Protocol):
    """The two calls the log needs from a store's open transaction."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


@dataclass(frozen=True, slots=True)
class LogEntry:
    """Where a verdict sits in the log."""

    index: int
    leaf: bytes


def log_size(sql: Sql) -> int:
    return int(sql.query("SELECT coalesce(max(idx) + 1, 0) FROM tlog_leaves")[0][0])


_CHUNK = 400  # bound parameters per query (SQLite's historical limit is 999)


def append_verdicts(sql: Sql, verdicts: Sequence[Verdict], now_ns: int) -> None:
    """Append each verdict's leaf (in order) unless that very leaf is already logged for its request.

    The leaves already logged for the batch's requests are read in one query per few hundred requests
    (none per verdict), the left siblings the append needs in one query per tree level."""
    keys = list(dict.fromkeys((v.request_id, verdict_leaf(v)) for v in verdicts))
    if not keys:
        return
    logged: set[tuple[str, bytes]] = set()
    ids = list(dict.fromkeys(rid for rid, _ in keys))
    for at in range(0, len(ids), _CHUNK):
        part = ids[at : at + _CHUNK]
        rows = sql.query(
            f"SELECT request_id, leaf FROM tlog_leaves WHERE request_id IN ({', '.join('?' * len(part))})",  # noqa: S608 (placeholders)
            part,
        )
        logged.update((str(rid), bytes(leaf)) for rid, leaf in rows)
    fresh = [key for key in keys if key not in logged]
    if not fresh:
        return
    size = log_size(sql)
    rows = appended_nodes(size, [leaf for _, leaf in fresh], lambda keys: fetch_nodes(sql, keys))
    sql.many(
        "INSERT INTO tlog_leaves(idx, request_id, leaf, added_ns) VALUES (?, ?, ?, ?)",
        [(size + i, rid, leaf, now_ns) for i, (rid, leaf) in enumerate(fresh)],
    )
    sql.many("INSERT INTO tlog_nodes(level, idx, hash) VALUES (?, ?, ?)", rows)


def fetch_nodes(sql: Sql, keys: Iterable[NodeKey]) -> dict[NodeKey, bytes]:
    """The stored nodes ``keys``: one query per level (a root or proof reads at most one node a level or
    two, an append one left sibling a level)."""
    by_level: dict[int, list[int]] = {}
    for level, index in keys:
        by_level.setdefault(level, []).append(index)
    found: dict[NodeKey, bytes] = {}
    for level, indices in by_level.items():
        for at in range(0, len(indices), _CHUNK):
            part = indices[at : at + _CHUNK]
            rows = sql.query(
                f"SELECT idx, hash FROM tlog_nodes WHERE level = ? AND idx IN ({', '.join('?' * len(part))})",  # noqa: S608 (placeholders)
                [level, *part],
            )
            found.update(((level, int(index)), bytes(h)) for index, h in rows)
        for index in indices:
            if (level, index) not in found:
                raise LookupError(f"the log has no node ({level}, {index}): the store is damaged")
    return found


def log_entry(sql: Sql, request_id: str) -> LogEntry | None:
    """The request's newest leaf (a verdict replaced later has a later leaf)."""
    rows = sql.query(
        "SELECT idx, leaf FROM tlog_leaves WHERE request_id = ? ORDER BY idx DESC LIMIT 1", (request_id,)
    )
    return LogEntry(int(rows[0][0]), bytes(rows[0][1])) if rows else None


def log_root(sql: Sql, size: int) -> bytes:
    return with_nodes(lambda src: tree_hash(src, 0, size), lambda keys: fetch_nodes(sql, keys))


def log_inclusion(sql: Sql, index: int, size: int) -> list[bytes]:
    return with_nodes(lambda src: inclusion_proof(src, index, size), lambda keys: fetch_nodes(sql, keys))


def log_consistency(sql: Sql, old: int, new: int) -> list[bytes]:
    return with_nodes(lambda src: consistency_proof(src, old, new), lambda keys: fetch_nodes(sql, keys))


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    root: bytes
    note: str
    signed_ns: int


def add_checkpoint(sql: Sql, size: int, root: bytes, note: str, now_ns: int) -> None:
    """Keep a signed checkpoint (the first one signed for a size wins: a size has one root)."""
    if not sql.query("SELECT 1 FROM tlog_checkpoints WHERE size = ?", (size,)):
        sql.many(
            "INSERT INTO tlog_checkpoints(size, root, note, signed_ns) VALUES (?, ?, ?, ?)",
            [(size, root, note, now_ns)],
        )


def latest_checkpoint(sql: Sql) -> StoredCheckpoint | None:
    rows = sql.query("SELECT size, root, note, signed_ns FROM tlog_checkpoints ORDER BY size DESC LIMIT 1")
    return (
        StoredCheckpoint(int(rows[0][0]), bytes(rows[0][1]), str(rows[0][2]), int(rows[0][3]))
        if rows
        else None
    )


@dataclass(frozen=True, slots=True)
class LogProof:
    """A verdict's inclusion proof against the newest signed checkpoint that covers it."""

    index: int
    leaf: bytes
    tree_size: int
    proof: tuple[bytes, ...]
    checkpoint: str  # the signed note

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tree_size": self.tree_size,
            "leaf": self.leaf.hex(),
            "proof": [h.hex() for h in self.proof],
            "checkpoint": self.checkpoint,
        }


def log_proof(sql: Sql, request_id: str) -> tuple[LogEntry | None, LogProof | None]:
    """The request's leaf, and its proof when a checkpoint covers it yet (``(entry, None)`` until then)."""
    entry = log_entry(sql, request_id)
    if entry is None:
        return None, None
    checkpoint = latest_checkpoint(sql)
    if checkpoint is None or checkpoint.size <= entry.index:
        return entry, None
    proof = log_inclusion(sql, entry.index, checkpoint.size)
    return entry, LogProof(entry.index, entry.leaf, checkpoint.size, tuple(proof), checkpoint.note)
