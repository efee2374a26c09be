"""Boot epochs: a node that rebooted starts a new IMA replay on its own.

A reboot resets the TPM (``resetCount`` grows, PCRs start from zero) and the kernel starts a new IMA log.
The first *verified* quote whose ``resetCount`` is above the last verified quote's starts the node's new boot
epoch (:func:`new_boot`): the IMA replay restarts at offset 0 with zero PCRs, the unverified IMA bytes of the
old boot are dropped, and what the old boot's log established (measured files, dm-verity activations, sticky
policy errors, process bindings, ``boot_aggregate``) is forgotten; the answers then carry ``ima_offset`` 0
and the probe ships the new log from its start, so the next quote replays it and the node is attested again
without an operator. The quote says so (``node.rebooted``, info) and the ingest raises the ``node.rebooted``
event.

Evidence of the old boot is refused: a quote with a lower ``resetCount`` is ``quote.reset_count_decreased``;
IMA bytes at the old log's offsets are ``ima.delta_gap``; a quote over a chain head of an old-boot segment
(created before the epoch began, other than the epoch's first segment) is ``epoch.old_boot`` (409), so
old-boot batches can no longer be attested. Across a reboot the TPM clock may restart lower (an unclean
power-off: ``clockInfo.safe`` NO): :func:`previous_clock` then compares only the counters.
"""

from __future__ import annotations

from dataclasses import replace

from tmb.attest.pcr import ReplayState
from tmb.attest.tpm2 import ClockInfo, parse_attest
from tmb.errors import Finding, ParseError, Severity
from tmb.ingest.state import NodeState
from tmb.ingest.store import IngestBackend, NodeRow

__all__ = ["new_boot", "old_boot_head", "previous_clock", "rebooted"]


def _grew(now: int, before: int) -> bool:
    """``now`` is past ``before`` on the TPM's 32-bit counters (wrapping)."""
    delta = (now - before) & 0xFFFFFFFF
    return 0 < delta < 0x80000000


def rebooted(state: NodeState, clock: ClockInfo) -> bool:
    """A verified quote's ``clock`` is of a later boot than the node's last verified quote."""
    return state.clock is not None and _grew(clock.reset_count, state.clock.reset_count)


def previous_clock(state: NodeState, message: bytes) -> ClockInfo | None:
    """What the quote ``message`` is checked against (``verify_quote(previous=)``): the last verified quote's
    clock, except across a reboot, where the clock may go back and only the counters are compared (the
    signature is checked in the same call: an unverified ``message`` cannot relax anything it does not
    prove)."""
    if state.clock is None:
        return None
    try:
        now = parse_attest(message).clock_info
    except ParseError:
        return state.clock
    return replace(state.clock, clock=0) if rebooted(state, now) else state.clock


def old_boot_head(store: IngestBackend, state: NodeState, node: str, segment: bytes) -> Finding | None:
    """The refusal of a quote over a chain head of the old boot: after a reboot, only the epoch's first
    segment and segments whose genesis arrived later are the new boot's."""
    epoch = state.epoch
    if epoch is None or segment.hex() == epoch.get("segment"):
        return None
    held = store.segment(node, segment)
    if held is None or held.created_ns is None or held.created_ns >= int(epoch.get("started_ns", 0)):
        return None
    return Finding(
        "epoch.old_boot",
        "the quoted chain head is telemetry of an earlier boot: it cannot be attested by this boot's TPM",
        Severity.ERROR,
        {"segment": segment.hex(), "reset_count": epoch.get("reset_count")},
    )


def new_boot(
    store: IngestBackend, row: NodeRow, clock: ClockInfo, segment: bytes, now_ns: int
) -> tuple[NodeRow, Finding]:
    """Start the node's new boot epoch (in the caller's transaction) at the quote over a head of
    ``segment``: the row to go on checking with and the finding that says so."""
    state = row.state
    state.epoch = {"reset_count": clock.reset_count, "started_ns": now_ns, "segment": segment.hex()}
    before = state.clock.reset_count if state.clock is not None else None
    state.measured.clear()
    state.dm.clear()
    state.sticky.clear()
    state.verity.clear()
    state.bindings = []
    state.bindings_pending = None
    state.ima_first = None
    state.ima_entries = 0
    fresh = ReplayState()
    store.set_ima(row.node, fresh, b"")
    finding = Finding(
        "node.rebooted",
        "the node rebooted (TPM resetCount grew): a new boot epoch, its IMA log replayed from the start",
        Severity.INFO,
        {
            "reset_count": clock.reset_count,
            "previous_reset_count": before,
            "dropped_ima_bytes": len(row.ima_data),
        },
    )
    return replace(row, replay=fresh, ima_data=b"", state=state), finding
