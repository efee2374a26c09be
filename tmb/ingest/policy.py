"""The ingest's incremental runtime checks: IMA entries newly covered by a quote against the runtime policy,
the dm-verity devices they activate, and the probe's process bindings.

State carried between quotes: ``measured``, ``dm``, ``sticky`` and ``verity`` of the node's
:class:`~tmb.ingest.state.NodeState`.

Binding findings: the rules are :mod:`tmb.attest.bindings` (``tmb audit`` re-applies them offline); the
ingest adds

==================================  =======================================================================
binding.unquoted                    a posted document the next verified quote does not cover: never in effect
binding.missing                     the quote covers a bindings document the daemon does not hold
==================================  =======================================================================

A bindings document counts only once a verified quote covers its digest (the quote's qualifying data,
:func:`tmb.ingest.wire.qualifying_data`), and is checked at that quote, after its IMA replay
(:func:`tmb.ingest.quotes.check_quote`). Refused at the post (413): ``binding.too_large``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tmb.attest.bindings import DEFAULT_MODEL_PATTERNS, check_processes, measured_ok, verity_devices
from tmb.attest.dm import DM_EVENTS, check_verity, dm_events
from tmb.attest.ima import ImaEntry, parse_fields
from tmb.attest.policy import PolicyChecker, RuntimePolicy
from tmb.errors import ParseError, Report, Severity
from tmb.ingest.state import NodeState

__all__ = [
    "DEFAULT_MODEL_PATTERNS",
    "check_bindings",
    "evaluate_entries",
    "evaluate_verity",
    "required_missing",
]

MAX_STICKY = 100


def evaluate_entries(
    policy: RuntimePolicy, state: NodeState, entries: Iterable[ImaEntry], report: Report
) -> None:
    """Run the policy over entries newly covered by a verified quote; update ``state`` in place."""
    measured, dm, sticky = state.measured, state.dm, state.sticky
    local = Report()
    checker = PolicyChecker(policy, local)
    for entry in entries:
        checker.check(entry)
        try:
            fields = parse_fields(entry)
        except ParseError:
            continue
        if entry.template_name == "ima-buf" and fields.name in DM_EVENTS:
            dm.append(
                (entry.num, entry.offset, entry.size, entry.pcr, entry.template_hash.hex(), entry.data.hex())
            )
            continue
        measured[fields.name] = measured.get(fields.name, False) or measured_ok(policy, entry, fields)
    for f in local:
        report.findings.append(f)
        if f.severity is Severity.ERROR and len(sticky) < MAX_STICKY:
            sticky.append(f)


def required_missing(policy: RuntimePolicy, state: NodeState, report: Report) -> None:
    """``policy.required_missing`` for required paths not yet measured with an allowed digest; fails
    closed on an empty policy (``policy.empty``)."""
    measured = state.measured
    if policy.empty:
        report.add(
            "policy.empty", "the policy allows and requires nothing: failing closed", source=policy.source
        )
    for path in policy.require:
        if not measured.get(path):
            report.add(
                "policy.required_missing",
                "a required measurement is absent (or only present with a disallowed digest)",
                path=path,
            )


def _dm_entries(state: NodeState) -> list[ImaEntry]:
    out = []
    for num, offset, size, pcr, th, data_hex in state.dm:
        data = bytes.fromhex(data_hex)
        out.append(ImaEntry(num, offset, size, 0, pcr, bytes.fromhex(th), "ima-buf", data, data))
    return out


def evaluate_verity(policy: RuntimePolicy, state: NodeState, report: Report) -> bool:
    """Apply the verity rules to every dm event quoted so far; record the activated devices in
    ``state.verity``. True when every required rule is satisfied (and at least one rule exists)."""
    local = Report()
    events = dm_events(_dm_entries(state), local)
    satisfied = check_verity(events, policy.verity, local)
    devices = verity_devices(events, satisfied)
    state.verity = devices
    report.extend(local.findings)
    return bool(policy.verity) and local.ok and all(r.name in satisfied for r in policy.verity if r.required)


def check_bindings(
    policy: RuntimePolicy,
    state: NodeState,
    processes: Sequence[Any],
    model_patterns: Sequence[str],
    report: Report,
) -> None:
    """Check each bound process against what the node's quotes established so far
    (:func:`tmb.attest.bindings.check_processes`, the rules ``tmb audit`` re-applies)."""
    check_processes(policy, state.measured, state.verity.values(), processes, model_patterns, report)
