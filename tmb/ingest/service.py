"""The daemon's evidence ingest: per-node chain continuity, nonces, quotes, IMA deltas, process bindings.

:class:`Ingest` takes the probe's evidence (wire formats in docs/probe.md), verifies it and persists it
(:mod:`tmb.attest.ingest_store`). Every method returns an :class:`Outcome`: an HTTP status, a JSON body and
the findings; nothing raises for bad evidence. Finding ids:

==========================  ======  ===================================================================
ingest.unknown_node         404     the node is not registered (``register_node``)
ingest.ak_unregistered      403     the quote names an AK other than the node's registered one
ingest.malformed            400     a document does not follow the wire format
ingest.nonce_unknown        409     the quote's nonce was never issued to this node (or the daemon restarted)
ingest.nonce_expired        409     issued more than ``nonce_ttl_s`` ago
ingest.nonce_reused         409     already consumed by an earlier quote: a replayed quote
ingest.quote_head_unknown   409     the quoted chain head is not a batch the daemon holds
chain.node_mismatch         409     a batch sealed for another node
chain.digest_mismatch       409     the digest is not the digest of the batch's fields: edited after sealing
chain.fork                  409     a different batch at a (segment, seq) already held, or prev != head
chain.gap                   409     a batch beyond the next expected one (a batch is missing)
chain.reorder               409     ... and the missing batch comes later in the same request
chain.unknown_segment       409     a non-genesis batch of a segment whose genesis was never received
chain.segment_unlinked      (warn)  a new segment's genesis does not link to the node's last head
ima.delta_gap               409     an IMA delta starting past the bytes received so far
ima.delta_conflict          409     an IMA delta that rewrites bytes already received
eventlog.too_large          413     an event log larger than 4 MiB
eventlog.malformed          422     an event log some event of which does not parse (not stored)
eventlog.truncated          422     an event log that ends inside an event (not stored)
pcr.mismatch                (200)   no entry of the received IMA log replays to the quoted PCR 10
==========================  ======  ===================================================================

plus every ``quote.*`` (422 when the quote fails), ``policy.*``, ``dm.*``, ``binding.*`` finding and, on
each verified quote, the boot chain's (``boot.*``, ``eventlog.*``: :mod:`tmb.attest.ingest_boot`, which
also states the rule for a node without an event log). Only batches covered by a verified quote over a
later chain head count as attested (:meth:`attested_window`); a quote with any error finding attests
nothing (its summary is not ``ok``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from probes.chain import ZERO, Head, TelemetryBatch, qualifying_data
from tmb.attest import tpm2
from tmb.attest.ima import ImaEntry, Incomplete, parse_record
from tmb.attest.ingest_boot import (
    MAX_EVENTLOG_BYTES,
    ParsedLog,
    check_boot_chain,
    entry_from_state,
    entry_to_state,
    parse_eventlog,
)
from tmb.attest.ingest_policy import (
    DEFAULT_MODEL_PATTERNS,
    check_bindings,
    evaluate_entries,
    evaluate_verity,
    required_missing,
)
from tmb.attest.ingest_store import IngestStore, NodeRow
from tmb.attest.pcr import ReplayState, replay
from tmb.attest.policy import RuntimePolicy
from tmb.attest.quote import AkPublic, load_ak, verify_quote
from tmb.attest.tpm2 import ClockInfo, PcrValues
from tmb.errors import Finding, ParseError, Report, Severity
from tmb.telemetry.sample import SampleBatch

__all__ = ["AttestationSummary", "Ingest", "Outcome"]

MAX_IMA_PENDING = 64 * 1024 * 1024
MAX_BATCHES_PER_REQUEST = 1024


@dataclass(frozen=True)
class Outcome:
    """What an ingest call answers: HTTP status, JSON body (findings included), the findings."""

    status: int
    body: dict[str, Any]
    findings: tuple[Finding, ...] = ()


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
            tuple(_finding(f) for f in doc["findings"]),
            int(doc.get("quote_time_ns", 0)),  # summaries stored before these fields existed
            dict(doc.get("verity", {})),
            doc.get("boot_ok"),
            {str(b): dict(v) for b, v in doc.get("pcrs", {}).items()},
        )


def _finding(doc: Mapping[str, Any]) -> Finding:
    return Finding(
        str(doc["id"]),
        str(doc.get("message", "")),
        Severity(doc.get("severity", "error")),
        dict(doc.get("context", {})),
    )


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise ParseError(f"{name} must be base64 text", field=name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(f"{name} is not valid base64", field=name) from None


class _Nonces:
    """Daemon-issued nonces, in memory: random 32 bytes, single use, valid ``ttl_s``; a few outstanding per
    node, the newest handed out until it is half-way to expiry. A restart forgets them (quotes in flight are
    then refused with ``ingest.nonce_unknown`` and the probe quotes again with a fresh one)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self.issued: dict[str, dict[bytes, float]] = {}
        self.used: dict[str, deque[bytes]] = {}

    def current(self, node: str) -> bytes:
        now = self.clock()
        issued = self.issued.setdefault(node, {})
        for nonce, t in list(issued.items()):
            if now - t > self.ttl_s:
                del issued[nonce]
        if issued:
            newest, t = max(issued.items(), key=lambda kv: kv[1])
            if now - t < self.ttl_s / 2:
                return newest
        nonce = os.urandom(32)
        issued[nonce] = now
        while len(issued) > 4:
            del issued[min(issued, key=lambda k: issued[k])]
        return nonce

    def consume(self, node: str, nonce: bytes) -> str | None:
        """None when ``nonce`` was valid (it is now used up), else the finding id."""
        issued = self.issued.setdefault(node, {})
        used = self.used.setdefault(node, deque(maxlen=256))
        t = issued.pop(nonce, None)
        if t is None:
            return "ingest.nonce_reused" if nonce in used else "ingest.nonce_unknown"
        used.append(nonce)
        return "ingest.nonce_expired" if self.clock() - t > self.ttl_s else None


class Ingest:
    """Evidence ingest for any number of nodes over one SQLite database (path or shared connection)."""

    def __init__(
        self,
        db: str | Path | sqlite3.Connection,
        *,
        policy: RuntimePolicy,
        nonce_ttl_s: float = 120.0,
        pcr_bank: str = "sha256",
        model_patterns: Sequence[str] = DEFAULT_MODEL_PATTERNS,
        clock_ns: Callable[[], int] = time.time_ns,
        synchronous: str = "NORMAL",
        require_eventlog: bool = False,
    ) -> None:
        self.store = IngestStore(db, synchronous=synchronous)
        self.policy = policy
        self.pcr_bank = pcr_bank
        self.require_eventlog = require_eventlog
        self._eventlogs: dict[str, ParsedLog] = {}  # parsed once per node and log
        self.model_patterns = tuple(model_patterns)
        self.clock_ns = clock_ns
        self.nonces = _Nonces(nonce_ttl_s, time.monotonic)
        self._aks: dict[str, AkPublic] = {}
        self._quote_wanted: set[str] = set()

    def close(self) -> None:
        self.store.close()

    # ----------------------------------------------------------------------------------------- nodes

    def register_node(self, node: str, ak: bytes | str) -> AkPublic:
        """Register (or re-key) ``node`` with its AK (PEM, DER, TPM2B_PUBLIC or TPMT_PUBLIC)."""
        raw = ak.encode() if isinstance(ak, str) else bytes(ak)
        key = load_ak(raw)
        if not node or len(node.encode()) > 255:
            raise ParseError("node id must be 1..255 bytes")
        with self.store.transaction():
            self.store.upsert_node(node, raw, self.clock_ns())
        self._aks[node] = key
        return key

    def _ak(self, row: NodeRow) -> AkPublic:
        key = self._aks.get(row.node)
        if key is None:
            key = self._aks[row.node] = load_ak(row.ak)
        return key

    def request_quote(self, node: str) -> None:
        """Ask the node's probe for a quote now (answered in the ``quote`` field of its next response)."""
        self._quote_wanted.add(node)

    def _extra(self, node: str, row: NodeRow | None = None) -> dict[str, Any]:
        row = row or self.store.node(node)
        end = 0
        eventlog = None
        if row is not None:
            end = int(row.replay.get("offset", 0)) + len(row.ima_data)
            eventlog = self.store.eventlog_digest(node)
        return {
            "nonce": self.nonces.current(node).hex(),
            "quote": node in self._quote_wanted,
            "ima_offset": end,
            "eventlog": eventlog.hex() if eventlog is not None else None,
            "head": (
                Head(row.segment, row.seq, row.head).to_wire()
                if row is not None
                and row.segment is not None
                and row.seq is not None
                and row.head is not None
                else None
            ),
        }

    def _answer(self, node: str, status: int, findings: Sequence[Finding], **body: Any) -> Outcome:
        doc: dict[str, Any] = dict(body)
        doc["findings"] = [f.to_dict() for f in findings]
        if status < 300 and "error" not in doc:
            doc["ok"] = doc.get("ok", not any(f.severity is Severity.ERROR for f in findings))
        doc.update(self._extra(node))
        return Outcome(status, doc, tuple(findings))

    def _known(self, node: str) -> tuple[NodeRow | None, Outcome | None]:
        row = self.store.node(node)
        if row is None:
            f = Finding(
                "ingest.unknown_node",
                "this node is not registered with the daemon",
                Severity.ERROR,
                {"node": node},
            )
            return None, Outcome(404, {"error": f.message, "findings": [f.to_dict()]}, (f,))
        return row, None

    def _malformed(self, node: str, exc: ParseError) -> Outcome:
        f = Finding("ingest.malformed", exc.message, Severity.ERROR, dict(exc.context))
        return self._answer(node, 400, [f], error=exc.message)

    def nonce(self, node: str) -> Outcome:
        bad = self._known(node)[1]
        if bad is not None:
            return bad
        return self._answer(node, 200, [], expires_in_s=self.nonces.ttl_s)

    # ----------------------------------------------------------------------------------------- batches

    def add_batches(self, node: str, doc: Any) -> Outcome:
        """``{"batches": [batch...], "probe_findings": [finding...]}``; batches in chain order."""
        row, bad = self._known(node)
        if bad is not None or row is None:
            return bad  # type: ignore[return-value]
        try:
            if not isinstance(doc, Mapping) or not isinstance(doc.get("batches"), list):
                raise ParseError('expected {"batches": [...]}')
            if len(doc["batches"]) > MAX_BATCHES_PER_REQUEST:
                raise ParseError(f"at most {MAX_BATCHES_PER_REQUEST} batches per request")
            batches = [TelemetryBatch.from_wire(b) for b in doc["batches"]]
            probe_findings = doc.get("probe_findings", [])
            if not isinstance(probe_findings, list) or not all(
                isinstance(f, Mapping) and isinstance(f.get("id"), str) for f in probe_findings
            ):
                raise ParseError("probe_findings must be a list of findings")
        except ParseError as exc:
            return self._malformed(node, exc)
        now = self.clock_ns()
        findings: list[Finding] = []
        accepted: list[int] = []
        duplicates = 0
        status = 200
        with self.store.transaction():
            state = row.state
            if probe_findings:
                self.store.add_findings(node, now, probe_findings)
                holes = state.setdefault("holes", [])
                for f in probe_findings:
                    if f["id"] == "probe.buffer_evicted":
                        holes.extend(f.get("context", {}).get("batches", []))
                findings.extend(_finding(f) for f in probe_findings)
            stored = len(findings)  # the probe's findings are stored above, once
            head = (row.segment, row.seq, row.head)
            for i, batch in enumerate(batches):
                problem, head, dup = self._one_batch(
                    node, batch, head, batches[i + 1 :], state, now, findings
                )
                if problem is not None:
                    findings.append(problem)
                    if problem.severity is Severity.ERROR:
                        status = 409
                        break
                if dup:
                    duplicates += 1
                elif problem is None or problem.severity is not Severity.ERROR:
                    accepted.append(batch.seq)
            if head[0] is not None and head[1] is not None and head[2] is not None:
                self.store.set_head(node, head[0], head[1], head[2])
            self.store.set_state(node, state)
            errors = [f.to_dict() for f in findings[stored:] if f.severity is Severity.ERROR]
            if errors:
                self.store.add_findings(node, now, errors)
        return self._answer(
            node,
            status,
            findings,
            accepted=accepted,
            duplicates=duplicates,
            **({"error": findings[-1].message} if status != 200 else {}),
        )

    def _one_batch(
        self,
        node: str,
        b: TelemetryBatch,
        head: tuple[bytes | None, int | None, bytes | None],
        later: Sequence[TelemetryBatch],
        state: dict[str, Any],
        now: int,
        notes: list[Finding],
    ) -> tuple[Finding | None, tuple[bytes | None, int | None, bytes | None], bool]:
        where = {"segment": b.segment.hex(), "seq": b.seq}
        if b.node != node:
            return (
                _err("chain.node_mismatch", "the batch was sealed for another node", got=b.node, **where),
                head,
                False,
            )
        if not b.intact():
            return (
                _err(
                    "chain.digest_mismatch",
                    "the batch's digest does not match its contents: edited after sealing",
                    expected=b.expected_digest().hex(),
                    got=b.digest.hex(),
                    **where,
                ),
                head,
                False,
            )
        held = self.store.batch(node, b.segment, b.seq)
        if held is not None:
            if held.digest == b.digest:
                return None, head, True
            return (
                _err(
                    "chain.fork",
                    "a different batch is already held at this position",
                    held=held.digest.hex(),
                    got=b.digest.hex(),
                    **where,
                ),
                head,
                False,
            )
        try:
            samples = b.samples()
        except ParseError as exc:
            return (
                _err("ingest.malformed", f"batch payload: {exc.message}", **where, **exc.context),
                head,
                False,
            )
        cur_seg, cur_seq, cur_head = head
        link: tuple[bytes, int] | None = None
        anchor = 0
        if b.segment == cur_seg and cur_seq is not None:
            expected = cur_seq + 1
            if b.seq == expected:
                if b.prev != cur_head:
                    return (
                        _err(
                            "chain.fork",
                            "prev is not the digest of the previous batch: another history",
                            expected=(cur_head or b"").hex(),
                            got=b.prev.hex(),
                            **where,
                        ),
                        head,
                        False,
                    )
            elif not self._hole(state, b.segment, expected, b.seq):
                return self._gap(b, expected, later, where), head, False
            else:
                self.store.set_anchor(node, b.segment, b.seq)
        elif b.seq == 0 or self._hole(state, b.segment, 0, b.seq):
            if self.store.segment(node, b.segment) is not None:
                return (
                    _err("chain.fork", "a segment that was already started is started again", **where),
                    head,
                    False,
                )
            anchor = b.seq
            if b.seq == 0 and cur_head is not None and b.prev == cur_head and cur_seg is not None:
                link = (cur_seg, int(cur_seq or 0))
            elif b.seq == 0 and (cur_head is not None or b.prev != ZERO):
                found = self.store.find_digest(node, b.prev)
                notes.append(
                    Finding(
                        "chain.segment_unlinked",
                        "a new chain segment does not continue the node's last head "
                        "(batches lost, or the probe lost its state)",
                        Severity.WARNING,
                        {
                            **where,
                            "prev": b.prev.hex(),
                            "head": (cur_head or b"").hex(),
                            "prev_known": found is not None,
                        },
                    )
                )
            self.store.add_segment(node, b.segment, anchor, link, now)
        else:
            return (
                _err(
                    "chain.unknown_segment", "a batch of a segment whose genesis was never received", **where
                ),
                head,
                False,
            )
        span = (int(samples.t_ns[0]), int(samples.t_ns[-1])) if len(samples) else None
        self.store.add_batch(node, b.segment, b.seq, b.digest, b.prev, b.payload, span, now)
        return None, (b.segment, b.seq, b.digest), False

    @staticmethod
    def _hole(state: Mapping[str, Any], segment: bytes, expected: int, seq: int) -> bool:
        for h in state.get("holes", []):
            if (
                h.get("segment") == segment.hex()
                and h.get("first_seq", -1) <= expected
                and h.get("last_seq") == seq - 1
            ):
                return True
        return False

    @staticmethod
    def _gap(
        b: TelemetryBatch, expected: int, later: Sequence[TelemetryBatch], where: dict[str, Any]
    ) -> Finding:
        if any(x.segment == b.segment and x.seq == expected for x in later):
            return _err("chain.reorder", "batches arrived out of order", expected=expected, **where)
        return _err("chain.gap", "a batch is missing before this one", expected=expected, **where)

    # ----------------------------------------------------------------------------------------- IMA

    def add_ima(self, node: str, doc: Any) -> Outcome:
        """``{"offset": int, "data": base64}``: binary IMA records from byte ``offset`` of the node's log."""
        row, bad = self._known(node)
        if bad is not None or row is None:
            return bad  # type: ignore[return-value]
        try:
            if not isinstance(doc, Mapping):
                raise ParseError('expected {"offset": int, "data": base64}')
            offset = doc.get("offset")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ParseError("offset must be a non-negative integer", field="offset")
            data = _b64(doc.get("data"), "data")
        except ParseError as exc:
            return self._malformed(node, exc)
        base = int(row.replay.get("offset", 0))
        pending = row.ima_data
        end = base + len(pending)
        if offset > end:
            f = _err(
                "ima.delta_gap",
                "an IMA delta starts past the bytes received so far",
                expected=end,
                got=offset,
            )
            return self._answer(node, 409, [f], error=f.message)
        lo, hi = max(offset, base), min(offset + len(data), end)
        if hi > lo and data[lo - offset : hi - offset] != pending[lo - base : hi - base]:
            f = _err("ima.delta_conflict", "an IMA delta rewrites log bytes already received", offset=lo)
            return self._answer(node, 409, [f], error=f.message)
        new = data[max(0, end - offset) :]
        if len(pending) + len(new) > MAX_IMA_PENDING:
            f = _err("ima.pending_too_large", "too many unquoted IMA bytes", limit=MAX_IMA_PENDING)
            return self._answer(node, 413, [f], error=f.message)
        if new:
            with self.store.transaction():
                self.store.set_ima(node, row.replay, pending + new)
        return self._answer(node, 200, [], appended=len(new))

    # ----------------------------------------------------------------------------------------- event log

    def add_eventlog(self, node: str, doc: Any) -> Outcome:
        """``{"data": base64, "sha256": hex}``: the node's whole UEFI event log (binary_bios_measurements) of
        this boot (``sha256`` optional). It replaces the one held; every later quote's PCRs 0-9 are checked
        against it. A log that does not parse is refused (422) and recorded as a finding against the node."""
        row, bad = self._known(node)
        if bad is not None or row is None:
            return bad  # type: ignore[return-value]
        try:
            if not isinstance(doc, Mapping):
                raise ParseError('expected {"data": base64, "sha256": hex (optional)}')
            data = _b64(doc.get("data"), "data")
            claimed = doc.get("sha256")
            if claimed is not None and claimed != hashlib.sha256(data).hexdigest():
                raise ParseError("sha256 is not the SHA-256 of data (lower-case hex)", field="sha256")
        except ParseError as exc:
            return self._malformed(node, exc)
        now = self.clock_ns()
        if len(data) > MAX_EVENTLOG_BYTES:
            f = _err(
                "eventlog.too_large",
                "the event log is larger than the daemon accepts",
                limit=MAX_EVENTLOG_BYTES,
                size=len(data),
            )
            with self.store.transaction():
                self.store.add_findings(node, now, [f.to_dict()])
            return self._answer(node, 413, [f], error=f.message)
        digest = hashlib.sha256(data).digest()
        held = self.store.eventlog_digest(node)
        if held == digest:
            parsed = self._parsed_eventlog(node)
            findings = parsed.findings_report().findings if parsed is not None else []
            return self._answer(node, 200, findings, digest=digest.hex(), replaced=False)
        try:
            parsed = parse_eventlog(data, name=f"event log of {node}")
        except ParseError as exc:
            fid = "eventlog.truncated" if exc.context.get("truncated") else "eventlog.malformed"
            context = {k: v for k, v in exc.context.items() if k != "truncated"}
            f = Finding(fid, exc.message, Severity.ERROR, context)
            with self.store.transaction():
                self.store.add_findings(node, now, [f.to_dict()])
            return self._answer(node, 422, [f], error=f"the event log does not parse: {exc.message}")
        with self.store.transaction():
            self.store.set_eventlog(node, now, digest, data)
        self._eventlogs[node] = parsed
        return self._answer(
            node,
            200,
            parsed.findings_report().findings,
            digest=digest.hex(),
            replaced=held is not None,
            events=len(parsed.events),
            banks=list(parsed.replay.banks),
        )

    def _parsed_eventlog(self, node: str) -> ParsedLog | None:
        """The node's event log, parsed (cached while its digest is the stored one); None when it has none."""
        digest = self.store.eventlog_digest(node)
        if digest is None:
            return None
        cached = self._eventlogs.get(node)
        if cached is not None and cached.digest == digest:
            return cached
        held = self.store.eventlog(node)
        if held is None:
            return None
        try:
            parsed = parse_eventlog(held.data, name=f"event log of {node}")
        except ParseError:  # stored logs parsed when they arrived; a damaged row is as good as none
            return None
        self._eventlogs[node] = parsed
        return parsed

    def _boot(
        self, node: str, quoted: Mapping[int, bytes], matched: bool, state: dict[str, Any], report: Report
    ) -> bool | None:
        """The boot chain of a verified quote (:func:`~tmb.attest.ingest_boot.check_boot_chain`)."""
        boot_policy = self.policy.boot
        first = entry_from_state(state.get("ima_first"))
        replayed = int(state.get("ima_entries", 0))
        if matched and first is None and replayed > 0:
            report.add(
                "boot.aggregate_unchecked",
                "the IMA log's first entry was verified before the daemon kept it: boot_aggregate unchecked",
                severity=Severity.WARNING,
            )
        return check_boot_chain(
            self._parsed_eventlog(node),
            quoted,
            self.pcr_bank,
            first,
            ima_checked=matched and (first is not None or replayed == 0),
            required=self.require_eventlog or boot_policy is not None,
            boot_policy=boot_policy,
            report=report,
        )

    # ----------------------------------------------------------------------------------------- quotes

    def add_quote(self, node: str, doc: Any) -> Outcome:
        """``{"message", "signature": base64, "pcrs": {bank: {idx: hex}}, "nonce": hex, "head": {...},
        "ak_name": hex (optional)}``."""
        row, bad = self._known(node)
        if bad is not None or row is None:
            return bad  # type: ignore[return-value]
        try:
            if not isinstance(doc, Mapping):
                raise ParseError("a quote must be a JSON object")
            message = _b64(doc.get("message"), "message")
            signature = _b64(doc.get("signature"), "signature")
            pcrs = PcrValues.from_dict(doc.get("pcrs"))
            head = Head.from_wire(doc.get("head"))
            nonce_hex = doc.get("nonce")
            nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
            if len(nonce) != 32:
                raise ParseError("nonce must be 32 bytes of hex", field="nonce")
            ak_name = doc.get("ak_name")
        except (ParseError, ValueError) as exc:
            return self._malformed(node, exc if isinstance(exc, ParseError) else ParseError(str(exc)))
        ak = self._ak(row)
        if isinstance(ak_name, str) and ak.name is not None and ak_name != ak.name.hex():
            f = _err(
                "ingest.ak_unregistered",
                "the quote was made with an AK not registered for this node",
                expected=ak.name.hex(),
                got=ak_name,
            )
            return self._answer(node, 403, [f], error=f.message)
        problem = self.nonces.consume(node, nonce)
        if problem is not None:
            f = _err(
                problem,
                {
                    "ingest.nonce_reused": "the nonce was already used: a replayed quote",
                    "ingest.nonce_expired": "the nonce expired before the quote arrived",
                    "ingest.nonce_unknown": "the daemon never issued this nonce to this node",
                }[problem],
                nonce=nonce.hex(),
            )
            return self._answer(node, 409, [f], error=f.message)
        held = self.store.batch(node, head.segment, head.seq)
        if held is None or held.digest != head.digest:
            f = _err(
                "ingest.quote_head_unknown",
                "the quoted chain head is not a batch the daemon holds",
                **head.to_wire(),
            )
            return self._answer(node, 409, [f], error=f.message)
        state = row.state
        prev_clock = state.get("clock")
        previous = ClockInfo(**prev_clock) if isinstance(prev_clock, dict) else None
        try:
            qr = verify_quote(
                ak,
                message,
                signature,
                nonce=qualifying_data(nonce, head.digest),
                pcrs=pcrs,
                require_pcrs=[10],
                previous=previous,
            )
        except ParseError as exc:
            return self._malformed(node, exc)
        ci = qr.attest.clock_info
        pcr10 = pcrs.get(self.pcr_bank, 10)
        selected = qr.attest.quote.selected() if qr.attest.quote else []
        bank_id = tpm2.hash_id(self.pcr_bank)
        bank_selected = any(a == bank_id and i == 10 for a, i in selected)
        quoted = {  # the other PCRs the signature covers, in the bank the IMA log is checked in
            i: v for a, i in selected if a == bank_id and i != 10 and (v := pcrs.get(a, i)) is not None
        }
        report = Report(list(qr.report.findings))
        if qr.ok and (pcr10 is None or not bank_selected):
            report.add(
                "quote.pcr_missing",
                f"PCR 10 of the {self.pcr_bank} bank is not quoted",
                pcr=10,
                bank=self.pcr_bank,
            )
        now = self.clock_ns()
        with self.store.transaction():
            if not report.ok:
                summary = self._summary(node, 0, ci, pcr10, False, False, False, report.findings)
                self.store.add_quote(
                    node,
                    now,
                    False,
                    (head.segment, head.seq, head.digest),
                    summary.to_dict(),
                    message,
                    signature,
                )
                self.store.add_findings(node, now, [f.to_dict() for f in report.errors])
                return self._answer(node, 422, report.findings, error="the quote failed verification")
            assert pcr10 is not None
            matched = self._replay(row, pcr10, state, report)
            boot_ok = self._boot(node, quoted, matched, state, report)
            required_missing(self.policy, state, report)
            verity_ok = evaluate_verity(self.policy, state, report)
            sticky = [_finding(f) for f in state.get("sticky", [])]
            binding = [_finding(f) for f in state.get("bindings", [])]
            policy_ok = (
                matched
                and not sticky
                and not any(
                    f.severity is Severity.ERROR and f.id.startswith(("policy.", "ima.")) for f in report
                )
            )
            all_findings = _dedup(list(report.findings) + sticky + binding)
            state["clock"] = {
                "clock": ci.clock,
                "reset_count": ci.reset_count,
                "restart_count": ci.restart_count,
                "safe": ci.safe,
            }
            quote_id = self.store.add_quote(
                node, now, True, (head.segment, head.seq, head.digest), {}, message, signature
            )
            summary = self._summary(node, quote_id, ci, pcr10, matched, policy_ok, verity_ok, all_findings)
            verity = {rule: str(dev.get("root", "")) for rule, dev in state.get("verity", {}).items()}
            signed = {  # the values the signature covers (an auditor recomputes pcrDigest from them)
                tpm2.alg_name(a): {str(i): v.hex() for a2, i in selected if a2 == a and (v := pcrs.get(a, i))}
                for a in dict.fromkeys(a for a, _ in selected)
            }
            summary = replace(summary, quote_time_ns=now, verity=verity, boot_ok=boot_ok, pcrs=signed)
            self.store.set_quote_summary(quote_id, summary.to_dict())
            attested = self.store.attest(node, head.segment, head.seq, quote_id)
            self.store.set_state(node, state)
        self._quote_wanted.discard(node)
        return self._answer(
            node,
            200,
            all_findings,
            ok=summary.ok,
            quote_id=quote_id,
            attested=attested,
            summary=summary.to_dict(),
        )

    def _summary(
        self,
        node: str,
        quote_id: int,
        ci: ClockInfo,
        pcr10: bytes | None,
        matched: bool,
        policy_ok: bool,
        verity_ok: bool,
        findings: Sequence[Finding],
    ) -> AttestationSummary:
        return AttestationSummary(
            node,
            quote_id,
            ci.clock,
            ci.reset_count,
            ci.restart_count,
            pcr10.hex() if pcr10 else "",
            self.pcr_bank,
            matched,
            policy_ok,
            verity_ok,
            tuple(findings),
        )

    def _replay(self, row: NodeRow, pcr10: bytes, state: dict[str, Any], report: Report) -> bool:
        """Replay the unverified IMA tail to the quoted PCR 10; on a match advance the persisted replay state,
        drop the verified bytes and run the policy over the newly covered entries."""
        start = ReplayState.from_json(row.replay) if row.replay else ReplayState()
        data = row.ima_data
        entries: list[ImaEntry] = []
        pos, names, index = 0, {}, start.index  # type: int, dict[bytes, str], int
        while pos < len(data):
            try:
                entry, pos = parse_record(data, pos, start.offset, index, names)
            except Incomplete:
                break
            except ParseError as exc:
                report.add("ima.malformed_record", exc.message, **exc.context)
                break
            entries.append(entry)
            index += 1
        local = Report()
        result = replay(
            entries, banks=("sha1", self.pcr_bank), state=start, expected={self.pcr_bank: pcr10}, report=local
        )
        report.extend(f for f in local if f.id != "pcr.mode_detected")
        if result.matched is None:
            return False
        newly = [e for e in entries if e.num < result.matched.index]
        if newly and newly[0].num == 0:
            state["ima_first"] = entry_to_state(newly[0])  # boot_aggregate, checked on every quote
        state["ima_entries"] = result.matched.index
        evaluate_entries(self.policy, state, newly, report)
        self.store.set_ima(
            row.node, dict(result.matched.to_json()), data[result.matched.offset - start.offset :]
        )
        return True

    # ----------------------------------------------------------------------------------------- bindings

    def add_bindings(self, node: str, doc: Any) -> Outcome:
        """``{"t_ns": int, "processes": [binding...]}``: checked against the last verified quote's state."""
        row, bad = self._known(node)
        if bad is not None or row is None:
            return bad  # type: ignore[return-value]
        if not isinstance(doc, Mapping) or not isinstance(doc.get("processes"), list):
            return self._malformed(node, ParseError('expected {"t_ns": int, "processes": [...]}'))
        report = Report()
        check_bindings(self.policy, row.state, doc["processes"], self.model_patterns, report)
        state = row.state
        state["bindings"] = [f.to_dict() for f in report.errors]
        with self.store.transaction():
            self.store.set_state(node, state)
            if report.errors:
                self.store.add_findings(node, self.clock_ns(), [f.to_dict() for f in report.errors])
        return self._answer(node, 200, report.findings, processes=len(doc["processes"]))

    # ----------------------------------------------------------------------------------------- queries

    def attested_window(
        self, node: str, t0_ns: int, t1_ns: int
    ) -> tuple[SampleBatch, AttestationSummary | None, list[Finding]]:
        """The node's samples with ``t0_ns <= t < t1_ns``, the summary of the quote that covers all of them
        (None when any is not yet covered by a verified quote, or there are none), and the findings."""
        findings: list[Finding] = []
        if self.store.node(node) is None:
            findings.append(
                Finding("ingest.unknown_node", "this node is not registered", Severity.ERROR, {"node": node})
            )
            return SampleBatch.empty("nvml"), None, findings
        rows = self.store.batches_overlapping(node, t0_ns, t1_ns)
        parts = [p for p in (SampleBatch.decode(r.payload).slice_time(t0_ns, t1_ns) for r in rows) if len(p)]
        try:
            samples = SampleBatch.concat(parts) if parts else SampleBatch.empty("nvml")
        except ParseError:
            raise
        except Exception as exc:  # mixed sources: InputError
            findings.append(Finding("ingest.window_mixed_sources", str(exc), Severity.ERROR, {"node": node}))
            samples = SampleBatch.concat([p for p in parts if p.source == parts[0].source])
        findings.extend(_finding(f) for f in self.store.findings(node, t0_ns, t1_ns))
        if not parts:
            findings.append(
                Finding(
                    "ingest.window_empty",
                    "no telemetry from this node in the window",
                    Severity.ERROR,
                    {"node": node, "t0_ns": t0_ns, "t1_ns": t1_ns},
                )
            )
            return samples, None, findings
        pending = [r for r in rows if r.quote_id is None]
        if pending:
            findings.append(
                Finding(
                    "ingest.window_unattested",
                    "telemetry in the window is not yet covered by a verified quote",
                    Severity.ERROR,
                    {
                        "node": node,
                        "batches": len(pending),
                        "first": {"segment": pending[0].segment.hex(), "seq": pending[0].seq},
                    },
                )
            )
            return samples, None, findings
        quote_id = max(r.quote_id for r in rows if r.quote_id is not None)
        doc = self.store.quote_summary(quote_id)
        summary = AttestationSummary.from_dict(doc) if doc else None
        return samples, summary, findings

    def status(self, node: str) -> dict[str, Any] | None:
        row = self.store.node(node)
        if row is None:
            return None
        return {
            "node": node,
            "batches": self.store.count_batches(node),
            "attested": self.store.count_batches(node, attested=True),
            "last_quote": self.store.last_quote(node),
            **self._extra(node, row),
        }


def _err(fid: str, message: str, **context: Any) -> Finding:
    return Finding(fid, message, Severity.ERROR, context)


def _dedup(findings: Sequence[Finding]) -> list[Finding]:
    seen: set[str] = set()
    out = []
    for f in findings:
        key = f"{f.id}|{sorted(f.context.items(), key=str)}"
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
