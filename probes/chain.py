"""The probe side of the telemetry hash chain: :class:`Chain` seals batches for one probe run.

The batch, its digest and wire form are shared with the daemon and live in :mod:`tmb.ingest.wire`
(the encoding is documented there and in docs/probe.md).
"""

from __future__ import annotations

import os

from tmb.ingest.wire import MAX_NODE_LEN, SEGMENT_LEN, ZERO, Head, TelemetryBatch, batch_digest
from tmb.telemetry.sample import SampleBatch, SourceKind

__all__ = ["Chain"]


class Chain:
    """Seals batches for one probe run: a new random segment, a genesis, then ``seq`` 1, 2, ..."""

    def __init__(self, node: str, *, previous_head: bytes = ZERO, segment: bytes | None = None) -> None:
        if not 0 < len(node.encode("utf-8")) <= MAX_NODE_LEN:
            raise ValueError("node id must be 1..255 bytes of UTF-8")
        self.node = node
        self.segment = segment if segment is not None else os.urandom(SEGMENT_LEN)
        self._next_seq = 0
        self._prev = previous_head
        self.last: TelemetryBatch | None = None

    def seal(self, payload: bytes) -> TelemetryBatch:
        batch = TelemetryBatch(
            self.node,
            self.segment,
            self._next_seq,
            self._prev,
            payload,
            batch_digest(self.node, self.segment, self._next_seq, self._prev, payload),
        )
        self._next_seq += 1
        self._prev = batch.digest
        self.last = batch
        return batch

    def genesis(self, source: SourceKind) -> TelemetryBatch:
        """Seal seq 0: an empty sample batch labelled with the source kind."""
        if self._next_seq != 0:
            raise ValueError("the genesis is the first batch of a segment")
        return self.seal(SampleBatch.empty(source).encode())

    @property
    def head(self) -> Head | None:
        return self.last.head if self.last is not None else None
