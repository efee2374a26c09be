"""The ingest's chain checks: a request's batches against the node's chain head (continuity, forks, gaps,
segments and the holes the probe reported), each accepted batch stored in the caller's transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tmb.errors import Finding, ParseError, Severity
from tmb.ingest.state import Hole, NodeState, finding_from_dict
from tmb.ingest.store import IngestBackend
from tmb.ingest.wire import ZERO, TelemetryBatch

__all__ = ["Position", "take_batches"]

Position = tuple[bytes | None, int | None, bytes | None]  # the node's head: segment, seq, digest


def take_batches(
    store: IngestBackend,
    node: str,
    position: Position,
    state: NodeState,
    batches: Sequence[TelemetryBatch],
    probe_findings: Sequence[Mapping[str, Any]],
    now: int,
) -> tuple[list[Finding], list[int], int, Finding | None]:
    """Check and store ``batches`` in chain order (inside the caller's transaction); stops at the first
    batch refused. Returns the findings (the probe's first), the accepted sequence numbers, the number of
    duplicates and the refusal (None when every batch was taken). Updates ``state`` and the stored head."""
    findings: list[Finding] = []
    accepted: list[int] = []
    duplicates = 0
    refusal = None
    if probe_findings:
        store.add_findings(node, now, probe_findings)
        for f in probe_findings:
            if f["id"] == "probe.buffer_evicted":
                context = f.get("context", {})
                spans = context.get("batches", []) if isinstance(context, Mapping) else []
                state.holes.extend(h for h in map(Hole.from_wire, spans) if h is not None)
        findings.extend(finding_from_dict(f) for f in probe_findings)
    stored = len(findings)  # the probe's findings are stored above, once
    head = position
    for i, batch in enumerate(batches):
        problem, head, dup = _one_batch(store, node, batch, head, batches[i + 1 :], state, now, findings)
        if problem is not None:
            findings.append(problem)
            if problem.severity is Severity.ERROR:
                refusal = problem
                break
        if dup:
            duplicates += 1
        elif problem is None or problem.severity is not Severity.ERROR:
            accepted.append(batch.seq)
    if head[0] is not None and head[1] is not None and head[2] is not None:
        store.set_head(node, head[0], head[1], head[2])
    errors = [f.to_dict() for f in findings[stored:] if f.severity is Severity.ERROR]
    if errors:
        store.add_findings(node, now, errors)
    return findings, accepted, duplicates, refusal


def _one_batch(
    store: IngestBackend,
    node: str,
    b: TelemetryBatch,
    head: Position,
    later: Sequence[TelemetryBatch],
    state: NodeState,
    now: int,
    notes: list[Finding],
) -> tuple[Finding | None, Position, bool]:
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
    held = store.batch(node, b.segment, b.seq)
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
        elif not state.hole_before(b.segment, expected, b.seq):
            return _gap(b, expected, later, where), head, False
        else:
            store.set_anchor(node, b.segment, b.seq)
    elif b.seq == 0 or state.hole_before(b.segment, 0, b.seq):
        if store.segment(node, b.segment) is not None:
            return (
                _err("chain.fork", "a segment that was already started is started again", **where),
                head,
                False,
            )
        anchor = b.seq
        if b.seq == 0 and cur_head is not None and b.prev == cur_head and cur_seg is not None:
            link = (cur_seg, int(cur_seq or 0))
        elif b.seq == 0 and (cur_head is not None or b.prev != ZERO):
            found = store.find_digest(node, b.prev)
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
        store.add_segment(node, b.segment, anchor, link, now)
    else:
        return (
            _err("chain.unknown_segment", "a batch of a segment whose genesis was never received", **where),
            head,
            False,
        )
    span = (int(samples.t_ns[0]), int(samples.t_ns[-1])) if len(samples) else None
    store.add_batch(node, b.segment, b.seq, b.digest, b.prev, b.payload, span, now)
    return None, (b.segment, b.seq, b.digest), False


def _gap(b: TelemetryBatch, expected: int, later: Sequence[TelemetryBatch], where: dict[str, Any]) -> Finding:
    if any(x.segment == b.segment and x.seq == expected for x in later):
        return _err("chain.reorder", "batches arrived out of order", expected=expected, **where)
    return _err("chain.gap", "a batch is missing before this one", expected=expected, **where)


def _err(fid: str, message: str, **context: Any) -> Finding:
    return Finding(fid, message, Severity.ERROR, context)
