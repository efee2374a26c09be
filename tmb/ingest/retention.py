"""Evidence retention: what of a node's evidence trail may go once it is older than a cutoff, for both
backends (SQL with ``?`` placeholders through the backend's ``_rows``;
:meth:`tmb.ingest.trail.Trail.prune_evidence`).

The daemon prunes with the verdicts' retention (``[store] retention_days``), its cutoff moved back by the
longest window an export covers (:data:`tmb.ingest.export.MAX_WINDOW_NS`), so the bundle of every request
whose verdict is still kept can be exported and audits as before. Per node, the **first kept quote** is the
oldest verified quote attesting a telemetry batch that ends at or after the cutoff (none: the node's last
verified quote); everything an export of a window from there on reads is kept (:mod:`tmb.ingest.export`):

==================  =================================================================================
deleted             only when (and kept otherwise)
==================  =================================================================================
telemetry batches   attested by a quote before the first kept one (never a batch not yet attested: a later
                    quote may still attest it) and received before the cutoff
``ingest_quotes``   before the first kept quote, received before the cutoff, once no batch names it
quote records       (the trail's ``quote`` records) before the first kept quote, received before the cutoff
nonce log entries   issued before the cutoff and not consumed by a quote whose record is kept
IMA segments        received before the cutoff and before the start (offset 0) of the IMA log in force
                    at the first kept quote (the replay of every kept quote starts there)
event logs, AKs,    received before the cutoff and older than the node's record of that kind in force at
EK records,         the first kept quote
bindings records
findings            received before the cutoff
blobs               of a deleted record, when no record is left that names it by its ``digest``, and only
                    blobs of the kinds records name that way (``ima``, ``eventlog``, ``quote``, ``ak``,
                    ``ek``): blobs a record names from its ``meta`` (quote signatures and PCR values, the
                    bindings documents quotes cover, EK certificates, policies, their files and
                    commitments) are kept, and a blob put with
                    such a kind keeps it whoever else sent the same bytes (:meth:`Trail.put_blob`)
==================  =================================================================================

Never deleted: the nodes, their chain segments, identity records, the policy records (node ``""``) and
the evidence requests' nonces (pruned on their own, :mod:`tmb.ingest.auth`). A node whose trail has no
record of its first kept quote (kept before the trail existed) keeps its records and blobs.

Each call deletes at most ``limit`` rows, and the blobs of the trail records among them, the steps in the
order above (a step runs only when the ones before it left nothing to delete), in the caller's
transaction; the caller repeats it while it deleted ``limit`` or more. Pruning is idempotent: a second
pass with the same cutoff deletes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tmb.ingest.trail import RECORD_BLOB_KINDS

__all__ = ["prune"]

Rows = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
Lock = Callable[[bytes], None]
_BLOB_KINDS_SQL = ", ".join(f"'{k}'" for k in sorted(RECORD_BLOB_KINDS))


def _first_kept_quote(rows: Rows, node: str, cutoff_ns: int) -> int | None:
    got = rows(
        "SELECT MIN(quote_id) FROM ingest_batches WHERE node = ? AND quote_id IS NOT NULL AND t1_ns >= ?",
        (node, cutoff_ns),
    )
    if got and got[0][0] is not None:
        return int(got[0][0])
    last = rows("SELECT MAX(id) FROM ingest_quotes WHERE node = ? AND ok = 1", (node,))
    return int(last[0][0]) if last and last[0][0] is not None else None


def _delete(rows: Rows, table: str, key: str, where: str, args: Sequence[Any], budget: int) -> int:
    """Delete at most ``budget`` rows of ``table`` matching ``where`` (by their ``key``); returns how many."""
    if budget <= 0:
        return 0
    sql = (
        f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {where} "  # noqa: S608 (constants)
        f"LIMIT {int(budget)}) RETURNING 1"
    )
    return len(rows(sql, args))


def _delete_records(rows: Rows, lock: Lock, where: str, args: Sequence[Any], budget: int) -> int:
    """Delete at most ``budget`` trail records matching ``where`` and the blobs only they named; returns the
    rows deleted (records and blobs)."""
    if budget <= 0:
        return 0
    sql = (
        f"DELETE FROM ingest_records WHERE id IN (SELECT id FROM ingest_records WHERE {where} "  # noqa: S608 (constants)
        f"ORDER BY id LIMIT {int(budget)}) RETURNING digest"
    )
    deleted = rows(sql, args)
    n = len(deleted)
    for digest in sorted({bytes(r[0]) for r in deleted}):
        lock(digest)  # PostgreSQL: a record naming it that another daemon is adding commits first
        n += len(
            rows(
                f"DELETE FROM ingest_blobs WHERE digest = ? AND kind IN ({_BLOB_KINDS_SQL}) "  # noqa: S608
                "AND NOT EXISTS (SELECT 1 FROM ingest_records WHERE digest = ?) RETURNING 1",
                (digest, digest),
            )
        )
    return n


def _prune_node(rows: Rows, lock: Lock, node: str, cutoff_ns: int, budget: int) -> int:
    used = 0
    first = _first_kept_quote(rows, node, cutoff_ns)
    if first is not None:
        used += _delete(
            rows,
            "ingest_batches",
            "node, segment, seq",
            "node = ? AND quote_id < ? AND received_ns < ?",
            (node, first, cutoff_ns),
            budget - used,
        )
        if used >= budget:
            return used
        used += _delete(
            rows,
            "ingest_quotes",
            "id",
            "node = ? AND id < ? AND received_ns < ? AND NOT EXISTS "  # a batch left over names it
            "(SELECT 1 FROM ingest_batches b WHERE b.node = ? AND b.quote_id = ingest_quotes.id)",
            (node, first, cutoff_ns, node),
            budget - used,
        )
        if used >= budget:
            return used
        used += _delete_records(
            rows,
            lock,
            "node = ? AND kind = 'quote' AND ref < ? AND received_ns < ?",
            (node, first, cutoff_ns),
            budget - used,
        )
        if used >= budget:
            return used
    used += _delete(
        rows,
        "ingest_nonces",
        "node, nonce",
        "node = ? AND issued_ns < ? AND (quote_digest IS NULL OR quote_digest NOT IN "
        "(SELECT digest FROM ingest_records WHERE node = ? AND kind = 'quote'))",
        (node, cutoff_ns, node),
        budget - used,
    )
    if used >= budget:
        return used
    kept = rows(
        "SELECT MIN(received_ns) FROM ingest_records WHERE node = ? AND kind = 'quote' AND ref >= ?",
        (node, first if first is not None else 1 << 62),
    )
    since_ns = kept[0][0] if kept and kept[0][0] is not None else None
    if since_ns is not None:  # the records in force at the first kept quote, and all after it, stay
        start = rows(
            "SELECT MAX(id) FROM ingest_records WHERE node = ? AND kind = 'ima' AND ref = 0 "
            "AND received_ns <= ?",
            (node, since_ns),
        )
        if start and start[0][0] is not None:
            used += _delete_records(
                rows,
                lock,
                "node = ? AND kind = 'ima' AND id < ? AND received_ns < ?",
                (node, int(start[0][0]), cutoff_ns),
                budget - used,
            )
        for kind in ("eventlog", "ak", "ek", "bindings"):
            if used >= budget:
                return used
            current = rows(
                "SELECT MAX(id) FROM ingest_records WHERE node = ? AND kind = ? AND received_ns <= ?",
                (node, kind, since_ns),
            )
            if current and current[0][0] is not None:
                used += _delete_records(
                    rows,
                    lock,
                    "node = ? AND kind = ? AND id < ? AND received_ns < ?",
                    (node, kind, int(current[0][0]), cutoff_ns),
                    budget - used,
                )
    if used >= budget:
        return used
    used += _delete(
        rows, "ingest_findings", "id", "node = ? AND received_ns < ?", (node, cutoff_ns), budget - used
    )
    return used


def prune(rows: Rows, lock: Lock, cutoff_ns: int, limit: int) -> int:
    """Delete at most ``limit`` rows of evidence older than ``cutoff_ns`` that nothing kept needs (the module
    docstring says what); returns the rows deleted."""
    used = 0
    for (node,) in rows("SELECT node FROM ingest_nodes ORDER BY node", ()):
        used += _prune_node(rows, lock, str(node), cutoff_ns, limit - used)
        if used >= limit:
            break
    return used
