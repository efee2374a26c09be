"""What the ingest keeps about a node between requests: the persisted :class:`NodeState` (the quote nonces
are in the store's nonce log, :mod:`tmb.ingest.trail`).

:class:`NodeState` is stored as JSON in ``ingest_nodes.state`` (:mod:`tmb.ingest.store`); its keys are the
ones the ingest has always written, so databases written before the state was typed load unchanged:

==============  ============================================================================================
``holes``       batch ranges the probe evicted unsent (``probe.buffer_evicted``): the chain may skip them
``measured``    path -> true when a quoted IMA entry measured it with an allowed digest
``dm``          the dm ``ima-buf`` entries quoted so far (num, offset, size, pcr, template hash, data)
``sticky``      policy errors: once a disallowed file ran, the node stays tainted until its PCRs reset
``verity``      per satisfied verity rule, the activated device (root, ``major:minor``, data device, entry)
``bindings``    the error findings of the process bindings document in effect (the last one a verified
                quote covered, checked at that quote)
``bindings_sha256``   that document's digest (hex; its canonical bytes are in the evidence trail)
``bindings_pending``  the digest (hex) of the document posted since the last verified quote: in effect only
                if the next verified quote covers it (else ``binding.unquoted``). A list here (the
                findings of a post, as daemons before quoted bindings wrote it) is read as none pending
``clock``       the TPM clock of the last verified quote (a later quote must not go back)
``ima_first``   IMA's first entry (``boot_aggregate``) once a verified quote covered it
``ima_entries`` how many IMA entries verified quotes have covered
``epoch``       the current boot epoch once a reboot was seen: resetCount, when it started, its first segment
==============  ============================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tmb.attest.bindings import VerityDevice
from tmb.attest.ima import ImaEntry
from tmb.attest.tpm2 import ClockInfo
from tmb.errors import Finding, Severity

__all__ = ["DmRecord", "Hole", "NodeState", "VerityDevice", "finding_from_dict"]

DmRecord = tuple[int, int, int, int, str, str]  # num, offset, size, pcr, template hash hex, data hex


def finding_from_dict(doc: Mapping[str, Any]) -> Finding:
    """A finding from its ``to_dict`` form (stored rows, the probe's findings)."""
    return Finding(
        str(doc["id"]),
        str(doc.get("message", "")),
        Severity(doc.get("severity", "error")),
        dict(doc.get("context", {})),
    )


@dataclass(frozen=True)
class Hole:
    """Batches ``first_seq..last_seq`` of ``segment`` (hex) the probe evicted: the chain may resume after."""

    segment: str
    first_seq: int
    last_seq: int

    def covers(self, segment: bytes, expected: int, seq: int) -> bool:
        """Whether a batch at ``seq`` may follow the node's head when ``expected`` was due."""
        return self.segment == segment.hex() and self.first_seq <= expected and self.last_seq == seq - 1

    @classmethod
    def from_wire(cls, doc: Any) -> Hole | None:
        """From the probe's ``probe.buffer_evicted`` context (None when it is not a range)."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("segment"), str):
            return None
        first, last = doc.get("first_seq", -1), doc.get("last_seq")
        if not isinstance(first, int) or not isinstance(last, int):
            return None
        return cls(doc["segment"], first, last)


@dataclass
class NodeState:
    """A node's evidence state carried from one request to the next (mutated in place by the checks)."""

    holes: list[Hole] = field(default_factory=list)
    measured: dict[str, bool] = field(default_factory=dict)
    dm: list[DmRecord] = field(default_factory=list)
    sticky: list[Finding] = field(default_factory=list)
    verity: dict[str, VerityDevice] = field(default_factory=dict)
    bindings: list[Finding] = field(default_factory=list)
    bindings_sha256: str | None = None  # the document in effect (hex), None: none covered yet
    bindings_pending: str | None = None  # posted, not yet covered by a verified quote (hex digest)
    clock: ClockInfo | None = None
    ima_first: ImaEntry | None = None
    ima_entries: int = 0
    epoch: dict[str, Any] | None = None  # {"reset_count", "started_ns", "segment": hex} (tmb.ingest.epochs)

    def hole_before(self, segment: bytes, expected: int, seq: int) -> bool:
        return any(h.covers(segment, expected, seq) for h in self.holes)

    def to_json(self) -> str:
        doc: dict[str, object] = {
            "holes": [
                {"segment": h.segment, "first_seq": h.first_seq, "last_seq": h.last_seq} for h in self.holes
            ],
            "measured": self.measured,
            "dm": [list(d) for d in self.dm],
            "sticky": [f.to_dict() for f in self.sticky],
            "verity": {
                rule: {"root": v.root, "dev": v.dev, "data_dev": v.data_dev, "entry": v.entry}
                for rule, v in self.verity.items()
            },
            "bindings": [f.to_dict() for f in self.bindings],
            "ima_entries": self.ima_entries,
        }
        if self.epoch is not None:
            doc["epoch"] = self.epoch
        if self.bindings_pending is not None:
            doc["bindings_pending"] = self.bindings_pending
        if self.bindings_sha256 is not None:
            doc["bindings_sha256"] = self.bindings_sha256
        if self.clock is not None:
            c = self.clock
            doc["clock"] = {
                "clock": c.clock,
                "reset_count": c.reset_count,
                "restart_count": c.restart_count,
                "safe": c.safe,
            }
        if self.ima_first is not None:
            e = self.ima_first
            doc["ima_first"] = [
                e.num,
                e.offset,
                e.size,
                e.pcr,
                e.template_hash.hex(),
                e.template_name,
                e.data.hex(),
                e.hashed.hex(),
            ]
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> NodeState:
        doc = json.loads(text)
        clock = doc.get("clock")
        return cls(
            holes=[h for h in map(Hole.from_wire, doc.get("holes", [])) if h is not None],
            measured={str(k): bool(v) for k, v in doc.get("measured", {}).items()},
            dm=[(int(a), int(b), int(c), int(d), str(e), str(f)) for a, b, c, d, e, f in doc.get("dm", [])],
            sticky=[finding_from_dict(f) for f in doc.get("sticky", [])],
            verity={
                str(rule): VerityDevice(
                    str(v.get("root", "")), str(v["dev"]), str(v["data_dev"]), int(v.get("entry", 0))
                )
                for rule, v in doc.get("verity", {}).items()
            },
            bindings=[finding_from_dict(f) for f in doc.get("bindings", [])],
            bindings_sha256=_hex_or_none(doc.get("bindings_sha256")),
            bindings_pending=_hex_or_none(doc.get("bindings_pending")),
            clock=ClockInfo(**clock) if isinstance(clock, dict) else None,
            ima_first=_entry(doc.get("ima_first")),
            ima_entries=int(doc.get("ima_entries", 0)),
            epoch=dict(doc["epoch"]) if isinstance(doc.get("epoch"), dict) else None,
        )


def _hex_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _entry(doc: Any) -> ImaEntry | None:
    if not isinstance(doc, list) or len(doc) != 8:
        return None
    num, offset, size, pcr, th, template, data, hashed = doc
    return ImaEntry(
        num, offset, size, 0, pcr, bytes.fromhex(th), template, bytes.fromhex(data), bytes.fromhex(hashed)
    )
