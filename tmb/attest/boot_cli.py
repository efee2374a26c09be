"""``tmb boot replay|show|policy|check``: UEFI/TCG event logs (``binary_bios_measurements``).

``replay`` prints the replayed PCRs per bank and, with ``--pcrs``, checks them against PCR values: the
``pcrs:`` section of ``tpm2_eventlog`` yaml output, ``tpm2_pcrread`` yaml output, the JSON form
``{"sha256": {"0": "<hex>"}}`` or a tpm2-tools serialized PCR file. ``show`` prints every decoded event and
the boot summary (Secure Boot, boot applications, kernel command lines, db/dbx). ``policy`` drafts a
``[boot]`` policy section from a known-good log; ``check`` replays a log (against ``--pcrs``), checks it
against a policy's ``[boot]`` rules and (``--ima``) IMA's boot_aggregate against the replayed PCRs.
Exit status: 0 every check passed, 1 a PCR mismatch or an error finding, 2 unreadable input. See
docs/boot.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tmb.attest import tpm2
from tmb.attest.bootpolicy import check_boot, draft_policy
from tmb.attest.eventlog import Event, Replay, check_pcrs, replay_file
from tmb.attest.eventlog_events import BootSummary, decode_event, summarize
from tmb.errors import ConfigError, InputError, ParseError, Report, Severity

__all__ = ["load_pcr_file", "parse_pcr_yaml", "register"]

_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
_BANK_LINE = re.compile(r"(\s*)([A-Za-z][A-Za-z0-9_-]*)\s*:\s*(?:#.*)?")
_PCR_LINE = re.compile(r"\s+(\d+)\s*:\s*(?:0x)?([0-9A-Fa-f]+)\s*(?:#.*)?")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = sub.add_parser("boot", help="measured boot: UEFI/TCG event logs (replay, decode)")
    bsub = boot.add_subparsers(dest="boot_command", metavar="COMMAND", required=True)
    rp = bsub.add_parser(
        "replay",
        help="replay an event log into PCRs 0-23 of every bank, optionally check given PCR values",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("eventlog", type=Path, help="binary_bios_measurements (crypto-agile or SHA-1 format)")
    rp.add_argument(
        "--pcrs", type=Path, metavar="FILE", help="PCR values: yaml (tpm2_eventlog/pcrread) or json"
    )
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=_cmd_replay)
    sh = bsub.add_parser("show", help="print the decoded events and the boot summary")
    sh.add_argument("eventlog", type=Path, help="binary_bios_measurements (crypto-agile or SHA-1 format)")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=_cmd_show)
    dp = bsub.add_parser(
        "policy",
        help="draft a [boot] policy section from a known-good event log",
        description="Print a [boot] runtime-policy section that this log meets: Secure Boot as observed, "
        "its boot loaders and kernels, the IMA/dm-verity/root words of its kernel command line, a default "
        "list of forbidden words, its db and dbx entries; each line names the event it came from. Exit 1 "
        "(the draft is still printed) when the log has error findings.",
    )
    dp.add_argument("eventlog", type=Path, help="binary_bios_measurements of a known-good boot")
    dp.set_defaults(func=_cmd_policy)
    ck = bsub.add_parser(
        "check",
        help="check an event log against a policy's [boot] rules (and PCR values, IMA's boot_aggregate)",
        description="Replay the log (and compare the policy's PCRs with --pcrs), check the boot it "
        "records against the [boot] rules of --policy and, with --ima, the IMA log's boot_aggregate "
        "against the replayed PCRs. Exit 0 all held, 1 findings, 2 bad input.",
    )
    ck.add_argument("eventlog", type=Path, help="binary_bios_measurements (crypto-agile or SHA-1 format)")
    ck.add_argument("--policy", type=Path, required=True, help="TOML runtime policy with a [boot] section")
    ck.add_argument(
        "--pcrs",
        type=Path,
        metavar="FILE",
        help="PCR values: yaml (tpm2_eventlog/pcrread), json or serialized",
    )
    ck.add_argument(
        "--ima", type=Path, metavar="IMA_LOG", help="IMA log (binary or ascii): its boot_aggregate"
    )
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.set_defaults(func=_cmd_check)


# ------------------------------------------------------------------------------------------ PCR files


def parse_pcr_yaml(text: str, *, name: str = "<pcrs>") -> dict[str, dict[int, bytes]]:
    """PCR values from the ``pcrs:`` section of ``tpm2_eventlog`` output, or from ``tpm2_pcrread`` output
    (the same ``bank:`` / ``index : 0xhex`` lines at the top level). Only that subset of YAML is read."""
    lines = text.splitlines()
    section = next((i for i, line in enumerate(lines) if line.rstrip() == "pcrs:"), None)
    start = 0 if section is None else section + 1
    out: dict[str, dict[int, bytes]] = {}
    bank: str | None = None
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip() or line.lstrip().startswith("#") or line.strip() == "---":
            continue
        if section is not None and not line[:1].isspace():
            break  # the end of the pcrs: section
        pcr, bank_m = _PCR_LINE.fullmatch(line), _BANK_LINE.fullmatch(line)
        if bank_m is not None:
            bank = bank_m.group(2).lower().replace("-", "_")
            out.setdefault(bank, {})
        elif pcr is not None and bank is not None:
            index, value = (
                int(pcr.group(1)),
                bytes.fromhex(pcr.group(2).rjust(len(pcr.group(2)) + 1 & ~1, "0")),
            )
            if index > 23 or (bank in _SIZES and len(value) != _SIZES[bank]):
                raise ParseError(f"{bank} PCR {index}: {len(value)}-byte value", file=name, line=lineno)
            out[bank][index] = value
        else:
            raise ParseError("not a 'bank:' or 'index : 0xhex' line", file=name, line=lineno, text=line[:80])
    if not any(out.values()):
        raise ParseError("no PCR values found (expected a pcrs: section or bank: lines)", file=name)
    return {b: v for b, v in out.items() if v}


def load_pcr_file(path: Path) -> dict[str, dict[int, bytes]]:
    """PCR values by bank name from yaml, JSON or a tpm2-tools serialized file (auto-detected)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the PCR values file: {exc.strerror}", path=str(path)) from None
    if data.lstrip()[:1] != b"{":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and "\0" not in text:
            return parse_pcr_yaml(text, name=str(path))
    values = tpm2.load_pcr_values(data)
    return {tpm2.alg_name(alg): dict(pcrs) for alg, pcrs in values.banks.items()}


# -------------------------------------------------------------------------------------------- replay


def _counts(report: Report) -> tuple[int, int]:
    errors = len(report.errors)
    return errors, sum(1 for f in report if f.severity is Severity.WARNING)


def _replay_dict(result: Replay) -> dict[str, Any]:
    return {
        "banks": list(result.banks),
        "events": result.events,
        "locality": result.locality,
        "pcrs": {b: {str(i): v.hex() for i, v in sorted(p.items())} for b, p in result.pcrs.items()},
        "last_event": {str(k): v for k, v in sorted(result.last_event.items())},
        "findings": result.report.to_list(),
        "ok": result.report.ok,
    }


def _cmd_replay(args: argparse.Namespace) -> int:
    expected = load_pcr_file(args.pcrs) if args.pcrs is not None else None
    result = replay_file(args.eventlog, expected=expected)
    if args.json:
        print(json.dumps(_replay_dict(result), indent=2))
        return 0 if result.report.ok else 1
    shown = set(result.last_event) | ({0} if result.locality is not None else set())
    for values in (expected or {}).values():
        shown |= set(values)
    for bank in result.banks:
        print(f"{bank}:")
        for pcr in sorted(shown):
            print(f"  {pcr:<2} : 0x{result.pcrs[bank][pcr].hex()}")
    for item in result.report:
        print(item)
    errors, warnings = _counts(result.report)
    checked = sum(len(v) for v in (expected or {}).values())
    what = f"{checked} PCR value(s) match" if expected else "no PCR values given to check"
    verdict = f"OK: {what}" if not errors else f"FAILED: {errors} error(s)"
    warn = f", {warnings} warning(s)" if warnings else ""
    print(f"eventlog {verdict}; {result.events} events, banks {', '.join(result.banks)}{warn}")
    return 0 if not errors else 1


# ---------------------------------------------------------------------------------------------- show


def _event_line(event: Event) -> str:
    try:
        decoded = decode_event(event)
    except ParseError as exc:
        decoded = {"malformed": exc.message}
    text = " ".join(f"{k}={_short(v)}" for k, v in decoded.items())
    return f"{event.index:>4}  PCR {event.pcr:<2} {event.type_name:<34} {text}"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} entries]"
    text = str(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _summary_lines(summary: BootSummary) -> list[str]:
    sb = {True: "enabled", False: "disabled", None: "not measured"}[summary.secure_boot]
    where = f" (SecureBoot variable, event {summary.secure_boot_event})" if summary.secure_boot_event else ""
    lines = ["", f"Secure Boot: {sb}{where}", "Boot applications:"]
    for app in summary.boot_apps:
        digest = app.digests.get("sha256") or next(iter(app.digests.values()), "")
        lines.append(f"  event {app.event:<4} {app.role:<14} {app.path or '(no file path)'}  sha256:{digest}")
    lines.append("Kernel command lines:")
    lines += [f"  event {c.event:<4} {c.source}: {c.text}" for c in summary.kernel_cmdlines]
    for name, sigs in summary.variables.items():
        kinds = sorted({s.kind for s in sigs})
        counts = ", ".join(f"{sum(s.kind == k for s in sigs)} {k}" for k in kinds)
        lines.append(f"{name}: {len(sigs)} entries" + (f" ({counts})" if sigs else ""))
        lines += [f"  x509 {s.subject}  sha256:{s.sha256}" for s in sigs if s.kind == "x509"]
    return lines


def _cmd_show(args: argparse.Namespace) -> int:
    events: list[Event] = []
    result = replay_file(args.eventlog, on_event=events.append)
    summary = summarize(events, result.report)
    if args.json:
        doc = {
            "events": [_event_dict(e) for e in events],
            "summary": summary.to_dict(),
            "ok": summary.report.ok,
        }
        print(json.dumps(doc, indent=2, default=str))
        return 0 if summary.report.ok else 1
    for event in events:
        print(_event_line(event))
    for line in _summary_lines(summary):
        print(line)
    for item in summary.report:
        print(item)
    errors, warnings = _counts(summary.report)
    sb = {True: "on", False: "off", None: "unknown"}[summary.secure_boot]
    verdict = "OK" if not errors else f"FAILED: {errors} error(s)"
    print(
        f"eventlog {verdict}; {len(events)} events, Secure Boot {sb}, {len(summary.boot_apps)} boot "
        f"application(s), {len(summary.kernel_cmdlines)} kernel command line(s), {warnings} warning(s)"
    )
    return 0 if not errors else 1


def _event_dict(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": event.index,
        "offset": event.offset,
        "pcr": event.pcr,
        "type": event.type_name,
        "digests": {b: d.hex() for b, d in event.digests.items()},
    }
    try:
        out["decoded"] = decode_event(event)
    except ParseError as exc:
        out["malformed"] = exc.message
    return out


# -------------------------------------------------------------------------------------- policy, check


def _cmd_policy(args: argparse.Namespace) -> int:
    events: list[Event] = []
    result = replay_file(args.eventlog, on_event=events.append)
    summary = summarize(events, result.report)
    sys.stdout.write(draft_policy(summary, events=events, source=str(args.eventlog)))
    errors = summary.report.errors
    for item in errors:
        print(item, file=sys.stderr)
    if errors:
        print(
            f"warning: the log has {len(errors)} error finding(s): it is not a known-good log to draft from",
            file=sys.stderr,
        )
    return 1 if errors else 0


def _pcr_text(pcrs: Sequence[int]) -> str:
    if list(pcrs) == list(range(pcrs[0], pcrs[-1] + 1)) and len(pcrs) > 1:
        return f"{pcrs[0]}-{pcrs[-1]}"
    return ", ".join(map(str, pcrs))


def _check_quoted(
    result: Replay, given: Mapping[str, Mapping[int, bytes]], pcrs: Sequence[int], report: Report
) -> bool:
    """The policy's PCRs against given values: some bank of the log must give them all, and every given
    value of them (in a bank of the log) must be what the log replays to."""
    expected = {
        bank: {i: values[i] for i in pcrs if i in values}
        for bank, values in given.items()
        if bank in result.pcrs
    }
    expected = {bank: values for bank, values in expected.items() if values}
    complete = [bank for bank, values in expected.items() if len(values) == len(pcrs)]
    if not complete:
        report.add(
            "boot.pcrs_not_covered",
            f"the PCR values do not give PCRs {_pcr_text(pcrs)} in any bank of the log: the log is not "
            "tied to them",
            pcrs=list(pcrs),
            given={bank: sorted(values) for bank, values in given.items()},
            log_banks=list(result.banks),
        )
    return check_pcrs(result, expected, report) and bool(complete)


def _first_ima_entry(path: Path) -> Any:
    from tmb.attest.ima import iter_log, open_log

    with open_log(path) as stream:
        return next(iter_log(stream), None)


def _cmd_check(args: argparse.Namespace) -> int:
    from tmb.attest.bootagg import check_boot_aggregate
    from tmb.attest.policy import load_policy

    policy = load_policy(args.policy)
    if policy.boot is None:
        raise ConfigError(
            "the policy has no [boot] section",
            path=str(args.policy),
            hint="draft one from a known-good log with `tmb boot policy EVENTLOG`",
        )
    rules = policy.boot
    given = load_pcr_file(args.pcrs) if args.pcrs is not None else None
    first_ima = _first_ima_entry(args.ima) if args.ima is not None else None
    events: list[Event] = []
    result = replay_file(args.eventlog, on_event=events.append)
    report = result.report
    pcrs_ok: bool | None = None
    if given is not None:
        pcrs_ok = _check_quoted(result, given, rules.pcrs, report)
    else:
        report.add(
            "boot.pcrs_not_checked",
            "no PCR values given (--pcrs): nothing ties this log to a TPM",
            severity=Severity.WARNING,
            pcrs=list(rules.pcrs),
        )
    summary = summarize(events, report)
    report.extend(check_boot(summary, rules, events=events))
    aggregate_ok: bool | None = None
    if args.ima is not None:
        found = check_boot_aggregate(first_ima, result.pcrs)
        report.extend(found)
        aggregate_ok = not found
    if args.json:
        doc = {
            "eventlog": str(args.eventlog),
            "policy": str(args.policy),
            "ok": report.ok,
            "events": len(events),
            "secure_boot": summary.secure_boot,
            "boot_apps": [vars(a) for a in summary.boot_apps],
            "kernel_cmdlines": [vars(c) for c in summary.kernel_cmdlines],
            "pcrs": list(rules.pcrs),
            "pcrs_match": pcrs_ok,
            "boot_aggregate": aggregate_ok,
            "findings": report.to_list(),
        }
        print(json.dumps(doc, indent=2))
        return 0 if report.ok else 1
    for item in report:
        print(item)
    errors, warnings = _counts(report)
    pcr_state = {None: "not checked", True: "match", False: "do NOT match"}[pcrs_ok]
    parts = [f"PCRs {_pcr_text(rules.pcrs)} {pcr_state}"]
    if aggregate_ok is not None:
        parts.append("boot_aggregate " + ("matches" if aggregate_ok else "does NOT match"))
    verdict = "OK" if not errors else f"FAILED: {errors} error(s)"
    warn = f", {warnings} warning(s)" if warnings else ""
    print(f"boot policy {verdict}; {len(events)} events, {', '.join(parts)}{warn}")
    return 0 if not errors else 1
