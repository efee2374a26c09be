"""Events worth telling an operator about, raised by the rooms that see them, delivered by the daemon.

The ingest (a node rebooted, was re-keyed, went stale or unattested, attests again) and the verdict
pipeline (a ``model_mismatch``) raise an :class:`Event` through an :data:`EventSink` they were given; they
know nothing of how it travels. The daemon wires the sink to its notifier (signed, durable webhooks). A sink
must not block or raise: it records the event and returns.

The daemon's sink is ``app[DAEMON_KEY].notifier.emit`` (:class:`tmb.daemon.notify.Notifier`): it may be
called from any thread (the ingest's workers included); it writes the event to a fsynced SQLite outbox (one
local commit, a few milliseconds at most) and returns, so an event is durable once ``emit`` returned. Events
of kinds ``[notify] kinds`` leaves out, and every event when ``[notify] urls`` is empty, are discarded.
``data`` should be small JSON-able values (mappings, lists, strings, integers): sets become lists, bytes
hex, other objects their ``str``, and data over 64 KiB is replaced by a note saying so. Receivers dedupe on
the notification id, so an event raised twice (a retried request) is delivered twice: raise each
transition once.

Kinds (stable ids, documented with the webhooks in docs/verdict.md):

=========================  ==========================================================================
``node.unattested``        a node's evidence stopped attesting (a quote failed verification, or its replay,
                           policy, verity, boot chain or process bindings failed)
``node.attested``          a node attests again after being unattested, rebooted or stale (not per quote)
``node.stale``             no verified quote for ``[attestation] stale_after_s``
``node.rekeyed``           an admin approved a new AK or EK for an enrolled node
``node.rebooted``          a node came back with a new boot epoch (a new IMA replay and chain segment)
``verdict.model_mismatch`` a verdict said the served model is not the claimed one
=========================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Event", "EventSink", "discard"]

KINDS = frozenset(
    {
        "node.unattested",
        "node.attested",
        "node.stale",
        "node.rekeyed",
        "node.rebooted",
        "verdict.model_mismatch",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its kind, what it is about (a node id or a request id), when, and JSON-able details."""

    kind: str
    subject: str
    t_ns: int  # wall clock, nanoseconds since the Unix epoch
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "t_ns": self.t_ns, "data": dict(self.data)}


EventSink = Callable[[Event], None]


def discard(_event: Event) -> None:
    """The sink used when nothing listens."""
