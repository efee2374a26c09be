"""The verdict engine's view of the evidence: a node's attested window (:class:`AttestedWindow`), read from
the ingest's store, with each stored batch decoded once (a bounded memo by batch digest: consecutive and
concurrent requests' windows overlap the same batches).

The memo holds what is a pure function of a batch's bytes (its digest names them): the decoded samples and,
on them, what the engine computes per sample (:meth:`SampleBatch.per_sample`: the fingerprint's per-sample
features), which the windows cut from the batch gather instead of computing again. Never whether a batch
is attested: that, the quote and the findings are read from the store for every window. So a reboot, a
new segment, a fork or a batch not yet attested cannot be answered from the memo; the memo only saves
decoding and per-sample work. Bounded by batches, by samples in all and by samples of one node (least
recently used first); a node's entries are dropped when it reboots.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from tmb.errors import Finding, ParseError, Severity
from tmb.ingest.results import AttestationSummary, AttestedWindow, BatchRef
from tmb.ingest.state import finding_from_dict
from tmb.ingest.store import BatchRow, IngestBackend
from tmb.telemetry.sample import SampleBatch

__all__ = ["DECODED_CACHE", "DECODED_NODE_SAMPLES", "DECODED_SAMPLES", "SHARED_READ_NS", "Windows"]

DECODED_CACHE = 4096  # decoded sample batches kept (by batch digest), all nodes together
DECODED_SAMPLES = 250_000  # their samples, all nodes together (about 100 MB with the per-sample features)
DECODED_NODE_SAMPLES = 64_000  # of one node (an 8-GPU node at 20 Hz: 400 s)
SHARED_READ_NS = 30 * 10**9  # windows read together within this span share one read of their batches
_NO_SAMPLES = SampleBatch.empty("nvml")  # immutable; built once


class Windows:
    """Reads windows from ``store`` under ``db`` (the ingest's database lock); decodes outside it. Safe to
    use from several threads (the memo has its own lock). ``memo=False``: decoded batches do not keep their
    per-sample work for the windows cut from them (the peer of bench/bench_slices.py)."""

    def __init__(self, store: IngestBackend, db: AbstractContextManager[Any], *, memo: bool = True) -> None:
        self.store, self._db = store, db
        self.memo = memo
        self._decoded: OrderedDict[tuple[str, bytes], int] = OrderedDict()  # LRU order: (node, digest) -> n
        self._nodes: dict[str, OrderedDict[bytes, SampleBatch]] = {}  # per node, LRU order
        self._node_samples: dict[str, int] = {}
        self._samples_held = 0
        self._decoded_lock = threading.Lock()

    @property
    def held(self) -> tuple[int, int]:
        """(decoded batches, their samples) in the memo."""
        with self._decoded_lock:
            return len(self._decoded), self._samples_held

    def forget(self, node: str) -> None:
        """Drop the node's decoded batches (it rebooted: its windows move to a new segment)."""
        with self._decoded_lock:
            for digest in list(self._nodes.get(node, ())):
                self._drop(node, digest)

    def _drop(self, node: str, digest: bytes) -> None:
        n = self._decoded.pop((node, digest))
        mine = self._nodes[node]
        del mine[digest]
        self._samples_held -= n
        self._node_samples[node] -= n
        if not mine:
            del self._nodes[node], self._node_samples[node]

    def _samples(self, node: str, payload: bytes, digest: bytes) -> SampleBatch:
        """A stored batch's samples, decoded once (the engine's windows overlap the same batches)."""
        with self._decoded_lock:
            mine = self._nodes.get(node)
            batch = mine.get(digest) if mine is not None else None
            if mine is not None and batch is not None:
                self._decoded.move_to_end((node, digest))
                mine.move_to_end(digest)
                return batch
        batch = SampleBatch.decode(payload)
        if self.memo:
            batch.memoised()
        n = len(batch)
        if n > DECODED_NODE_SAMPLES:
            return batch  # larger than a node's share: not kept
        with self._decoded_lock:
            if (node, digest) in self._decoded:  # another thread decoded it meanwhile
                return self._nodes[node][digest]
            self._decoded[(node, digest)] = n
            self._nodes.setdefault(node, OrderedDict())[digest] = batch
            self._node_samples[node] = self._node_samples.get(node, 0) + n
            self._samples_held += n
            mine = self._nodes[node]
            while self._node_samples[node] > DECODED_NODE_SAMPLES:
                self._drop(node, next(iter(mine)))
            while len(self._decoded) > DECODED_CACHE or self._samples_held > DECODED_SAMPLES:
                self._drop(*next(iter(self._decoded)))
        return batch

    def attested_window(self, node: str, t0_ns: int, t1_ns: int) -> AttestedWindow:
        """The node's samples with ``t0_ns <= t < t1_ns``, the summary of the quote that covers all of them
        (None when any is not yet covered by a verified quote, or there are none), and the findings."""
        got = self.attested_windows(node, [(t0_ns, t1_ns)])[0]
        assert got is not None  # noqa: S101 (the first window is always built)
        return got

    def attested_windows(
        self,
        node: str,
        ranges: Sequence[tuple[int, int]],
        more: Callable[[AttestedWindow], bool] = lambda first: True,
    ) -> list[AttestedWindow | None]:
        """:meth:`attested_window` of each of ``ranges`` (``t0_ns, t1_ns``; the engine's span and those it
        reads ahead, at most 65), read from the store together: one read of the batches when the windows lie
        within :data:`SHARED_READ_NS`, each quote summary read and parsed once. The windows after the first
        are read (their findings and quotes; their batches as the first read found them) and cut only when
        ``more(first)`` says so, else they are None: the engine wants them only once the first window's
        evidence is complete."""
        if not ranges:
            return []
        docs: dict[int, dict[str, Any] | None] = {}
        summaries: dict[int, AttestationSummary | None] = {}

        def read(t0: int, t1: int) -> tuple[list[BatchRow], list[dict[str, Any]]]:
            """Under the database lock: the window's rows, its quote's summary and its stored findings."""
            if shared is not None:  # the rows the query for this window would give, in the same order
                rows = [r for r in shared if _overlaps(r, t0, t1)]
            else:
                rows = self.store.batches_overlapping(node, t0, t1)
            quote_ids = [r.quote_id for r in rows if r.quote_id is not None]
            if quote_ids and max(quote_ids) not in docs:
                docs[max(quote_ids)] = self.store.quote_summary(max(quote_ids))
            return rows, self.store.findings(node, t0, t1)

        def summary(quote_id: int) -> AttestationSummary | None:
            if quote_id not in summaries:
                doc = docs[quote_id]
                summaries[quote_id] = AttestationSummary.from_dict(doc) if doc else None
            return summaries[quote_id]

        with self._db:
            if not self.store.has_node(node):
                return [
                    AttestedWindow(node, t0, t1, _NO_SAMPLES, None, (_unknown(node),)) for t0, t1 in ranges
                ]
            lo, hi = min(t0 for t0, _ in ranges), max(t1 for _, t1 in ranges)
            shared = self.store.batches_overlapping(node, lo, hi) if hi - lo <= SHARED_READ_NS else None
            head = read(*ranges[0])
        first = self._cut(node, *ranges[0], *head, summary)
        out: list[AttestedWindow | None] = [first]
        if len(ranges) > 1 and not more(first):
            out += [None] * (len(ranges) - 1)
        elif len(ranges) > 1:
            cut: dict[tuple[int, int], AttestedWindow] = {(ranges[0][0], ranges[0][1]): first}
            todo = [r for r in dict.fromkeys(ranges[1:]) if r not in cut]  # windows on one grid: read once
            with self._db:
                rest = [read(t0, t1) for t0, t1 in todo]
            for (t0, t1), r in zip(todo, rest, strict=True):
                cut[(t0, t1)] = self._cut(node, t0, t1, *r, summary)
            out += [cut[(t0, t1)] for t0, t1 in ranges[1:]]
        return out

    def _cut(
        self,
        node: str,
        t0_ns: int,
        t1_ns: int,
        rows: list[BatchRow],
        stored: list[dict[str, Any]],
        summary: Callable[[int], AttestationSummary | None],
    ) -> AttestedWindow:
        """The window from its rows and stored findings (outside the database lock)."""
        findings: list[Finding] = []
        refs = tuple(BatchRef(r.segment, r.seq, r.digest, r.quote_id) for r in rows)
        batches = [self._samples(node, r.payload, r.digest) for r in rows]
        try:
            cut = SampleBatch.cut_time(batches, t0_ns, t1_ns)
        except ParseError:
            raise
        except Exception as exc:  # mixed sources: InputError
            findings.append(Finding("ingest.window_mixed_sources", str(exc), Severity.ERROR, {"node": node}))
            parts = [p for p in (b.slice_time(t0_ns, t1_ns) for b in batches) if len(p)]
            cut = SampleBatch.concat([p for p in parts if p.source == parts[0].source])
        samples = _NO_SAMPLES if cut is None else cut
        findings.extend(finding_from_dict(f) for f in stored)

        def window(summary: AttestationSummary | None) -> AttestedWindow:
            return AttestedWindow(node, t0_ns, t1_ns, samples, summary, tuple(findings), refs)

        if cut is None:
            findings.append(
                _err(
                    "ingest.window_empty",
                    "no telemetry from this node in the window",
                    node=node,
                    t0_ns=t0_ns,
                    t1_ns=t1_ns,
                )
            )
            return window(None)
        pending = [r for r in rows if r.quote_id is None]
        if pending:
            findings.append(
                _err(
                    "ingest.window_unattested",
                    "telemetry in the window is not yet covered by a verified quote",
                    node=node,
                    batches=len(pending),
                    first={"segment": pending[0].segment.hex(), "seq": pending[0].seq},
                )
            )
            return window(None)
        return window(summary(max(r.quote_id for r in rows if r.quote_id is not None)))


def _overlaps(row: BatchRow, t0_ns: int, t1_ns: int) -> bool:
    """``batches_overlapping``'s condition (``t1_ns >= t0 AND t0_ns < t1``; a NULL time never holds)."""
    return row.t0_ns is not None and row.t1_ns is not None and row.t1_ns >= t0_ns and row.t0_ns < t1_ns


def _unknown(node: str) -> Finding:
    return _err("ingest.unknown_node", "this node is not registered", node=node)


def _err(fid: str, message: str, **context: Any) -> Finding:
    return Finding(fid, message, Severity.ERROR, context)
