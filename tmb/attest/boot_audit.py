"""The boot chain of an evidence bundle, checked offline: firmware event log → PCRs 0-9 of a verified quote
→ boot policy → IMA's boot_aggregate.

What it proves: the quoted PCRs 0-9 replay from the event log (so its events are what the firmware and
bootloader measured), the log's Secure Boot state, bootloaders, kernel and command line meet the policy's
``[boot]`` rules, and the IMA log's first entry is the boot_aggregate of exactly those PCRs (so the IMA log
was started by the kernel this boot measured, not invented in user space with PCR 10 extended to match).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmb.attest.bootagg import check_boot_aggregate
from tmb.attest.eventlog import read_eventlog, replay
from tmb.attest.eventlog_events import BootSummary, summarize
from tmb.attest.ima import ImaEntry
from tmb.errors import Finding, ParseError, Report, Severity

BOOT_PCRS = tuple(range(10))


@dataclass
class BootAudit:
    """What the report shows of the boot chain: each link with whether it held."""

    eventlog: bool = False
    events: int = 0
    pcrs_replayed: bool | None = None  # None: not checked (no log, or no quote covering PCRs 0-9)
    secure_boot: bool | None = None
    boot_apps: list[dict[str, Any]] = field(default_factory=list)
    kernel_cmdlines: list[str] = field(default_factory=list)
    policy_checked: bool = False
    boot_aggregate: bool | None = None
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eventlog": self.eventlog,
            "events": self.events,
            "pcrs_replayed": self.pcrs_replayed,
            "secure_boot": self.secure_boot,
            "boot_apps": self.boot_apps,
            "kernel_cmdlines": self.kernel_cmdlines,
            "policy_checked": self.policy_checked,
            "boot_aggregate": self.boot_aggregate,
        }


def audit_boot(
    eventlog: Path | None,
    quoted: Mapping[str, Mapping[int, bytes]] | None,
    first_ima_entry: ImaEntry | None,
    boot_policy: Any,
    report: Report,
) -> BootAudit:
    """Check the chain; findings go to ``report`` (and ``result.findings``).

    ``quoted``: PCR values (bank -> index -> value) of the last verified quote, None when none verified.
    ``boot_policy``: the runtime policy's ``[boot]`` rules (None: no rules; the chain is still checked).
    Without an event log the chain cannot be checked: an error when the policy has boot rules, else a
    warning (older bundles carry none).
    """
    result = BootAudit()

    def add(fid: str, message: str, severity: Severity = Severity.ERROR, **ctx: Any) -> None:
        f = Finding(fid, message, severity, ctx)
        result.findings.append(f)
        report.extend([f])

    if eventlog is None:
        add(
            "boot.no_eventlog",
            "the bundle has no firmware event log: the boot chain (PCRs 0-9, boot_aggregate) is not checked",
            Severity.ERROR if boot_policy is not None else Severity.WARNING,
        )
        return result
    try:
        log = read_eventlog(eventlog)
    except ParseError as exc:
        add("eventlog.malformed", exc.message, **exc.context)
        return result
    result.eventlog = True
    local = Report()
    replayed = replay(log.events, report=local)
    result.events = replayed.events
    summary: BootSummary = summarize(log.events, local)
    for f in local:
        result.findings.append(f)
    report.extend(list(local))
    result.secure_boot = summary.secure_boot
    result.boot_apps = [
        {"event": a.event, "role": a.role, "path": a.path, "sha256": a.digests.get("sha256")}
        for a in summary.boot_apps
    ]
    result.kernel_cmdlines = [c.text for c in summary.kernel_cmdlines]
    covered = {
        bank: {i: v for i, v in values.items() if i in BOOT_PCRS}
        for bank, values in (quoted or {}).items()
        if all(i in values for i in BOOT_PCRS) and bank in replayed.pcrs
    }
    if not covered:
        add(
            "boot.pcrs_not_quoted",
            "no verified quote covers PCRs 0-9 in a bank of the event log: the log cannot be tied to the TPM",
            banks_quoted=sorted((quoted or {}).keys()),
            log_banks=list(replayed.banks),
        )
    else:
        mismatches = [
            (bank, i)
            for bank, values in covered.items()
            for i, v in values.items()
            if replayed.pcrs[bank].get(i) != v
        ]
        result.pcrs_replayed = not mismatches
        for bank, i in mismatches:
            add(
                "eventlog.pcr_mismatch",
                f"replaying the event log does not give the quoted {bank} PCR {i}",
                bank=bank,
                pcr=i,
                quoted=covered[bank][i].hex(),
                replayed=replayed.pcrs[bank][i].hex(),
                last_event=replayed.last_event.get(i),
            )
        agg = check_boot_aggregate(first_ima_entry, covered)
        result.boot_aggregate = not agg
        for f in agg:
            result.findings.append(f)
        report.extend(agg)
    if boot_policy is not None:
        from tmb.attest.bootpolicy import check_boot

        result.policy_checked = True
        found = check_boot(summary, boot_policy)
        result.findings.extend(found)
        report.extend(found)
    return result


def boot_lines(boot: BootAudit) -> list[str]:
    """The boot chain, link by link: firmware event log -> PCRs 0-9 -> policy -> boot_aggregate -> IMA."""

    def mark(ok: bool | None) -> str:
        return "not checked" if ok is None else "ok" if ok else "FAIL"

    if not boot.eventlog:
        return ["boot chain: not checked (no firmware event log in the bundle)"]
    apps = ", ".join(
        " ".join(p for p in (a["role"], a["path"], f"(event {a['event']})") if p) for a in boot.boot_apps
    )
    lines = [
        f"boot chain: firmware event log ({boot.events} events) -> quoted PCRs 0-9 replayed:"
        f" {mark(boot.pcrs_replayed)}",
        "  Secure Boot: " + {True: "on", False: "off", None: "not measured"}[boot.secure_boot],
        f"  loaded: {apps or '(no boot application measured)'}",
    ]
    lines += [f"  kernel command line: {c}" for c in boot.kernel_cmdlines]
    lines.append(f"  boot policy: {'checked' if boot.policy_checked else 'none in the policy'}")
    lines.append(f"  IMA boot_aggregate = this boot's PCRs 0-9: {mark(boot.boot_aggregate)}")
    return lines
