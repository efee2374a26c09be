"""The wire types shared by the probe and the daemon's ingest: the telemetry hash chain's
:class:`TelemetryBatch` and :class:`Head`, the quote's qualifying data, and the size limits both sides check.

The probe seals batches with :class:`probes.chain.Chain`; the daemon checks them (:mod:`tmb.ingest.batches`).

Digest (SHA-256; all integers big-endian; see docs/probe.md)::

    digest = SHA-256( b"tmb-telemetry-batch\\x00v1"      domain tag, 22 bytes
                    ‖ u16 len(node) ‖ node (UTF-8)
                    ‖ segment                            16 bytes
                    ‖ u64 seq
                    ‖ prev                               32 bytes
                    ‖ u32 len(payload) ‖ payload )       SampleBatch.encode() bytes

A *segment* is one run of the probe (a fresh random 16-byte id per start). Its first batch (seq 0, the
*genesis*) carries an empty sample batch and ``prev`` = the last head the probe persisted before it stopped
(all zeros on a node's very first start), so consecutive segments link. Every later batch has
``prev`` = the digest of batch ``seq - 1``. A quote's qualifying data is ``SHA-256(nonce ‖ head digest)``
(:func:`qualifying_data`), which covers the head and, through the chain, every batch before it; a quote
that names a process bindings document (``"bindings": hex`` in the quote) covers it too:
``SHA-256(nonce ‖ head digest ‖ SHA-256(bindings_bytes(document)))`` (:func:`bindings_bytes`, the
canonical JSON; the probe posts the document before the quote).

Wire form (JSON, :meth:`TelemetryBatch.to_wire`): ``{"node", "segment": hex, "seq", "prev": hex,
"payload": base64, "digest": hex}``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tmb.attest.trail import (
    CHAIN_DOMAIN,
    MAX_BINDINGS_BYTES,
    batch_digest,
    bindings_bytes,
    qualifying_data,
)
from tmb.errors import ParseError
from tmb.telemetry.sample import SampleBatch

__all__ = [
    "DOMAIN",
    "MAX_BINDINGS_BYTES",
    "MAX_EVENTLOG_BYTES",
    "MAX_NODE_LEN",
    "SEGMENT_LEN",
    "ZERO",
    "Head",
    "TelemetryBatch",
    "batch_digest",
    "bindings_bytes",
    "qualifying_data",
]

DOMAIN = CHAIN_DOMAIN
ZERO = bytes(32)
SEGMENT_LEN = 16
MAX_NODE_LEN = 255
MAX_EVENTLOG_BYTES = (
    4 * 1024 * 1024
)  # a whole UEFI event log; real ones are 10-100 KiB, dbx-heavy a few hundred


@dataclass(frozen=True)
class Head:
    """A chain position: segment id, sequence number, digest of the batch there."""

    segment: bytes
    seq: int
    digest: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"segment": self.segment.hex(), "seq": self.seq, "digest": self.digest.hex()}

    @classmethod
    def from_wire(cls, doc: Any) -> Head:
        if not isinstance(doc, Mapping):
            raise ParseError("head must be an object {segment, seq, digest}")
        return cls(
            _hex(doc.get("segment"), "head.segment", SEGMENT_LEN),
            _uint(doc.get("seq"), "head.seq"),
            _hex(doc.get("digest"), "head.digest", 32),
        )


@dataclass(frozen=True)
class TelemetryBatch:
    """One sealed batch. ``payload`` is the canonical :class:`SampleBatch` encoding."""

    node: str
    segment: bytes
    seq: int
    prev: bytes
    payload: bytes
    digest: bytes

    @property
    def is_genesis(self) -> bool:
        return self.seq == 0

    @property
    def head(self) -> Head:
        return Head(self.segment, self.seq, self.digest)

    def expected_digest(self) -> bytes:
        return batch_digest(self.node, self.segment, self.seq, self.prev, self.payload)

    def intact(self) -> bool:
        """True when ``digest`` is the digest of the other fields (the batch was not edited)."""
        return self.expected_digest() == self.digest

    def samples(self) -> SampleBatch:
        """Decode the payload (:class:`ParseError` when it is not a canonical batch)."""
        return SampleBatch.decode(self.payload)

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "segment": self.segment.hex(),
            "seq": self.seq,
            "prev": self.prev.hex(),
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "digest": self.digest.hex(),
        }

    @classmethod
    def from_wire(cls, doc: Any) -> TelemetryBatch:
        """Parse the wire form; :class:`ParseError` names the bad field. The digest is *not* checked here."""
        if not isinstance(doc, Mapping):
            raise ParseError("a batch must be a JSON object")
        node = doc.get("node")
        if not isinstance(node, str) or not 0 < len(node.encode("utf-8")) <= MAX_NODE_LEN:
            raise ParseError("batch.node must be a non-empty string of at most 255 bytes")
        payload = doc.get("payload")
        if not isinstance(payload, str):
            raise ParseError("batch.payload must be base64 text")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ParseError("batch.payload is not valid base64") from None
        return cls(
            node,
            _hex(doc.get("segment"), "batch.segment", SEGMENT_LEN),
            _uint(doc.get("seq"), "batch.seq"),
            _hex(doc.get("prev"), "batch.prev", 32),
            raw,
            _hex(doc.get("digest"), "batch.digest", 32),
        )


def _hex(value: Any, name: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != size:
        raise ParseError(f"{name} must be {size} bytes of hex", field=name)
    return raw


def _uint(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ParseError(f"{name} must be a non-negative integer", field=name)
    return value
