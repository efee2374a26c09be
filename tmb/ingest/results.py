"""What the ingest answers: :class:`IngestResult` for a piece of evidence (taken or refused, with the
findings and the answer's data; never an HTTP status: :mod:`tmb.ingest.routes` maps findings to statuses),
:class:`AttestationSummary` for a verified quote, and :class:`AttestedWindow` for the verdict engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tmb.errors import Finding, Severity
from tmb.ingest.state import finding_from_dict
from tmb.telemetry.sample import SampleBatch

__all__ = ["AttestationSummary", "AttestedWindow", "BatchRef", "IngestResult", "refused", "taken"]


@dataclass(frozen=True)
class IngestResult:
    """The ingest's answer to one piece of evidence.

    ``accepted``: the evidence was taken (``refusal`` is None) or refused (``refusal`` is the finding that
    says why; its id decides the HTTP status). ``findings``: every finding to report, the refusal included.
    ``data``: the answer's other fields (accepted sequence numbers, quote id, summary, ...). ``attested``:
    how many batches a verified quote attested (the verdict engine is woken when it is not 0).
    """

    accepted: bool
    findings: tuple[Finding, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    refusal: Finding | None = None
    message: str = ""  # what went wrong, for a person (the refusal's message unless said otherwise)
    attested: int = 0

    @property
    def ok(self) -> bool:
        """Taken, and no finding is an error."""
        return self.accepted and not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.findings]


def taken(
    findings: Sequence[Finding] = (), data: Mapping[str, Any] | None = None, *, attested: int = 0
) -> IngestResult:
    return IngestResult(True, tuple(findings), dict(data or {}), attested=attested)


def refused(
    refusal: Finding,
    findings: Sequence[Finding] | None = None,
    data: Mapping[str, Any] | None = None,
    *,
    message: str = "",
) -> IngestResult:
    """Refused because of ``refusal`` (reported with ``findings``; by default the refusal alone)."""
    return IngestResult(
        False,
        tuple(findings) if findings is not None else (refusal,),
        dict(data or {}),
        refusal,
        message or refusal.message,
    )


@dataclass(frozen=True)
class AttestationSummary:
    """What one verified quote attests about a node (the verdict engine's view)."""

    node: str
    quote_id: int
    quote_clock: int
    reset_count: int
    restart_count: int
    pcr10: str  # hex of the quoted PCR 10 in ``pcr_bank``
    pcr_bank: str
    pcr_matched: bool  # the received IMA log replays to pcr10
    policy_ok: bool
    verity_ok: bool  # every required verity rule (model commitment) is satisfied
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    quote_time_ns: int = 0  # wall clock (ns) when the daemon verified the quote
    verity: Mapping[str, str] = field(default_factory=dict)  # satisfied rule (commitment) -> its root
    boot_ok: bool | None = None  # the boot chain held (None: not checked, no event log and none required)
    pcrs: Mapping[str, Mapping[str, str]] = field(
        default_factory=dict
    )  # every quoted PCR: bank -> idx -> hex
    quote_digest: str = ""  # SHA-256 (hex) of the quote's TPMS_ATTEST as signed (the evidence trail's key)
    ak_digest: str = ""  # SHA-256 (hex) of the AK as registered (the trail's blob)
    eventlog_digest: str = ""  # SHA-256 (hex) of the event log the boot chain was checked against ("": none)
    policy_digest: str = ""  # SHA-256 (hex) of the policy text the quote was checked against ("": unrecorded)

    @property
    def ok(self) -> bool:
        return (
            self.pcr_matched
            and self.policy_ok
            and self.verity_ok
            and self.boot_ok is not False
            and not any(f.severity is Severity.ERROR for f in self.findings)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "quote_id": self.quote_id,
            "quote_clock": self.quote_clock,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "pcr10": self.pcr10,
            "pcr_bank": self.pcr_bank,
            "pcr_matched": self.pcr_matched,
            "policy_ok": self.policy_ok,
            "verity_ok": self.verity_ok,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "quote_time_ns": self.quote_time_ns,
            "verity": dict(self.verity),
            "boot_ok": self.boot_ok,
            "pcrs": {bank: dict(values) for bank, values in self.pcrs.items()},
            "quote_digest": self.quote_digest,
            "ak_digest": self.ak_digest,
            "eventlog_digest": self.eventlog_digest,
            "policy_digest": self.policy_digest,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> AttestationSummary:
        return cls(
            doc["node"],
            doc["quote_id"],
            doc["quote_clock"],
            doc["reset_count"],
            doc["restart_count"],
            doc["pcr10"],
            doc["pcr_bank"],
            doc["pcr_matched"],
            doc["policy_ok"],
            doc["verity_ok"],
            tuple(finding_from_dict(f) for f in doc["findings"]),
            int(doc.get("quote_time_ns", 0)),  # summaries stored before these fields existed
            dict(doc.get("verity", {})),
            doc.get("boot_ok"),
            {str(b): dict(v) for b, v in doc.get("pcrs", {}).items()},
            str(doc.get("quote_digest", "")),
            str(doc.get("ak_digest", "")),
            str(doc.get("eventlog_digest", "")),
            str(doc.get("policy_digest", "")),
        )


@dataclass(frozen=True)
class BatchRef:
    """A stored batch (``ingest_batches``: node, segment, seq) and the quote row that attested it."""

    segment: bytes
    seq: int
    digest: bytes
    quote_id: int | None


@dataclass(frozen=True)
class AttestedWindow:
    """What the engine gets for a node's window: the samples with ``t0_ns <= t < t1_ns``, the summary of
    the verified quote covering all of them (None when any is not yet covered, or there are none), the
    findings, and references naming the stored records the window rests on (the batches, by chain position
    and digest, and the quote row ``quote_id``)."""

    node: str
    t0_ns: int
    t1_ns: int
    samples: SampleBatch
    summary: AttestationSummary | None
    findings: tuple[Finding, ...]
    batches: tuple[BatchRef, ...] = ()

    @property
    def quote_id(self) -> int | None:
        return self.summary.quote_id if self.summary is not None else None

    def covers_end(self) -> bool:
        """Attested, and the last sample is within two sampling periods (at least 100 ms; 1 s with fewer
        than two samples) of the window's end: the telemetry for the whole window is in."""
        samples = self.samples
        if self.summary is None or not len(samples):
            return False
        if len(samples) < 2:
            slack = 1_000_000_000
        else:
            period = int((int(samples.t_ns[-1]) - int(samples.t_ns[0])) / (len(samples) - 1))
            slack = max(2 * period, 100_000_000)
        return int(samples.t_ns[-1]) >= self.t1_ns - slack
