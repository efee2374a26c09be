"""The verdict engine's view of the evidence: a node's attested window (:class:`AttestedWindow`), read from
the ingest's store, with each stored batch decoded once (a bounded cache by batch digest: consecutive
requests' windows overlap the same batches)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import AbstractContextManager
from typing import Any

from tmb.errors import Finding, ParseError, Severity
from tmb.ingest.results import AttestationSummary, AttestedWindow, BatchRef
from tmb.ingest.state import finding_from_dict
from tmb.ingest.store import IngestBackend
from tmb.telemetry.sample import SampleBatch

__all__ = ["DECODED_CACHE", "Windows"]

DECODED_CACHE = 4096  # decoded sample batches kept (by batch digest)


class Windows:
    """Reads windows from ``store`` under ``db`` (the ingest's database lock); decodes outside it."""

    def __init__(self, store: IngestBackend, db: AbstractContextManager[Any]) -> None:
        self.store, self._db = store, db
        self._decoded: OrderedDict[bytes, SampleBatch] = OrderedDict()
        self._decoded_lock = threading.Lock()

    def _samples(self, payload: bytes, digest: bytes) -> SampleBatch:
        """A stored batch's samples, decoded once (the engine's windows overlap the same batches)."""
        with self._decoded_lock:
            batch = self._decoded.get(digest)
            if batch is not None:
                self._decoded.move_to_end(digest)
                return batch
        batch = SampleBatch.decode(payload)
        with self._decoded_lock:
            self._decoded[digest] = batch
            while len(self._decoded) > DECODED_CACHE:
                self._decoded.popitem(last=False)
        return batch

    def attested_window(self, node: str, t0_ns: int, t1_ns: int) -> AttestedWindow:
        """The node's samples with ``t0_ns <= t < t1_ns``, the summary of the quote that covers all of them
        (None when any is not yet covered by a verified quote, or there are none), and the findings."""
        findings: list[Finding] = []
        with self._db:
            if self.store.node(node) is None:
                findings.append(_err("ingest.unknown_node", "this node is not registered", node=node))
                return AttestedWindow(node, t0_ns, t1_ns, SampleBatch.empty("nvml"), None, tuple(findings))
            rows = self.store.batches_overlapping(node, t0_ns, t1_ns)
            stored = self.store.findings(node, t0_ns, t1_ns)
            quote_ids = [r.quote_id for r in rows if r.quote_id is not None]
            doc = self.store.quote_summary(max(quote_ids)) if quote_ids else None
        refs = tuple(BatchRef(r.segment, r.seq, r.digest, r.quote_id) for r in rows)
        parts = [
            p for p in (self._samples(r.payload, r.digest).slice_time(t0_ns, t1_ns) for r in rows) if len(p)
        ]
        try:
            samples = SampleBatch.concat(parts) if parts else SampleBatch.empty("nvml")
        except ParseError:
            raise
        except Exception as exc:  # mixed sources: InputError
            findings.append(Finding("ingest.window_mixed_sources", str(exc), Severity.ERROR, {"node": node}))
            samples = SampleBatch.concat([p for p in parts if p.source == parts[0].source])
        findings.extend(finding_from_dict(f) for f in stored)

        def window(summary: AttestationSummary | None) -> AttestedWindow:
            return AttestedWindow(node, t0_ns, t1_ns, samples, summary, tuple(findings), refs)

        if not parts:
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
        return window(AttestationSummary.from_dict(doc) if doc else None)


def _err(fid: str, message: str, **context: Any) -> Finding:
    return Finding(fid, message, Severity.ERROR, context)
