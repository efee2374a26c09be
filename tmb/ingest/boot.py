"""The ingest's boot chain: the node's UEFI event log against the quoted PCRs 0-9, IMA's ``boot_aggregate``
against the same PCRs, and the runtime policy's ``[boot]`` section against what the log says.

A quote proves PCR values; the event log says how they came about (firmware, Secure Boot keys, shim, grub,
the kernel and its command line). The log is believed only as far as it replays to the *quoted* PCRs 0-9
(in the quote's bank: the log's other banks are not bound by the quote). IMA's first entry,
``boot_aggregate``, is the kernel's hash of PCRs 0-9 at IMA's initialisation: an IMA log invented in user
space (with PCR 10 extended to match, which any root process can do) carries another boot's value or none.

Rule for a node that has sent no event log: ``boot.no_eventlog`` is an **error** when the runtime policy
has a ``[boot]`` section or the ingest was started with ``require_eventlog``, and then ``boot_aggregate`` is
still checked against the quoted PCRs; otherwise it is a **warning** and nothing else of the boot chain is
checked (PCR 10 and the IMA log alone, as before event logs existed), so existing deployments keep working.

==========================  ======  ===================================================================
boot.no_eventlog            error*  the node sent no event log (*warning unless one is required)
boot.pcrs_not_quoted        error   PCRs 0-9 of the quote's bank are not in the quote's selection
eventlog.pcr_mismatch       error   the event log does not replay to a quoted PCR 0-9
eventlog.bank_missing       error   the event log has no digests for the quote's bank
boot.aggregate_mismatch     error   IMA's boot_aggregate is not the hash of the quoted PCRs 0-9
boot.no_boot_aggregate      error   the IMA log's first entry is not boot_aggregate (or the log is empty)
boot.aggregate_unchecked    (warn)  the first IMA entry was verified before the daemon kept it
==========================  ======  ===================================================================

plus the event log's own findings (``eventlog.*``: docs/boot.md) and the boot policy's.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass

from tmb.attest.bootagg import check_boot_aggregate
from tmb.attest.bootpolicy import BootPolicy, check_boot
from tmb.attest.eventlog import Event, Replay, check_pcrs, read_eventlog, replay
from tmb.attest.eventlog_events import BootSummary, summarize
from tmb.attest.ima import ImaEntry
from tmb.errors import Report, Severity

__all__ = [
    "BOOT_PCRS",
    "ParsedLog",
    "check_boot_chain",
    "parse_eventlog",
]

BOOT_PCRS = range(10)


@dataclass(frozen=True)
class ParsedLog:
    """A node's event log, parsed once: its SHA-256, the replay of every bank and the boot summary."""

    digest: bytes
    events: tuple[Event, ...]
    replay: Replay
    summary: BootSummary

    def findings_report(self) -> Report:
        """The log's own findings (replay, then data-to-digest checks and the summary's anomalies)."""
        return Report(list(self.replay.report.findings) + list(self.summary.report.findings))


def parse_eventlog(data: bytes, *, name: str) -> ParsedLog:
    """Parse, replay and summarise a whole log; :class:`~tmb.errors.ParseError` when any event does not
    parse (``truncated`` in its context when the log ends inside one)."""
    log = read_eventlog(io.BytesIO(data), name=name)
    events = log.events
    return ParsedLog(hashlib.sha256(data).digest(), events, replay(events), summarize(events))


def check_boot_chain(
    parsed: ParsedLog | None,
    quoted: Mapping[int, bytes],
    bank: str,
    first: ImaEntry | None,
    *,
    ima_checked: bool,
    required: bool,
    boot_policy: BootPolicy | None,
    report: Report,
) -> bool | None:
    """Check one verified quote's boot chain; the findings go to ``report``.

    ``parsed``: the node's event log (None: it sent none); ``quoted``: the PCR values of ``bank`` that the
    quote's selection covers (the log must replay to PCRs 0-9 and to any other the boot policy names);
    ``first``: IMA's first entry as covered by a verified quote, ``ima_checked`` whether it can be checked
    (the IMA log replayed to the quoted PCR 10); ``required``: whether a missing event log is an error;
    ``boot_policy``: the runtime policy's ``[boot]`` rules (None: none). Returns None when nothing was
    checked (no event log, none required), else whether every check held."""
    local = Report()
    if parsed is None:
        local.add(
            "boot.no_eventlog",
            "the node sent no UEFI event log: "
            + ("one is required" if required else "PCRs 0-9 and boot_aggregate are not checked"),
            severity=Severity.ERROR if required else Severity.WARNING,
            required=required,
        )
        if not required:
            report.extend(local.findings)
            return None
    wanted = sorted(set(BOOT_PCRS) | set(boot_policy.pcrs if boot_policy is not None else ()))
    missing = [i for i in wanted if i not in quoted]
    if missing:
        local.add(
            "boot.pcrs_not_quoted",
            f"PCR(s) {', '.join(map(str, missing))} of the {bank} bank are not in the quote: the boot chain"
            " cannot be checked",
            bank=bank,
            missing=missing,
        )
    else:
        if parsed is not None:
            local.extend(parsed.findings_report().findings)
            check_pcrs(parsed.replay, {bank: {i: quoted[i] for i in wanted}}, local)
        if ima_checked:
            local.extend(check_boot_aggregate(first, {bank: {i: quoted[i] for i in BOOT_PCRS}}))
    if boot_policy is not None and parsed is not None:
        local.extend(check_boot(parsed.summary, boot_policy, events=parsed.events))
    report.extend(local.findings)
    return local.ok
