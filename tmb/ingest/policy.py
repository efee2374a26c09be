"""The ingest's incremental runtime checks: IMA entries newly covered by a quote against the runtime policy,
the dm-verity devices they activate, and the probe's process bindings.

State carried between quotes: ``measured``, ``dm``, ``sticky`` and ``verity`` of the node's
:class:`~tmb.ingest.state.NodeState`.

Binding findings:

==================================  =======================================================================
binding.process_unreadable          (warning) the probe could not read the process (gone, permission)
binding.exe_not_allowlisted         the executable's path has no allowed digest in the runtime policy
binding.exe_not_measured            allowlisted path, but no quoted IMA entry measured it (allowed digest)
binding.exe_deleted                 the process runs an executable that was deleted or replaced on disk
binding.no_verity_device            a model file is mapped but no policy verity rule is satisfied yet
binding.model_not_from_verity       a model file is mapped from a device other than the active verity device
binding.model_bypasses_verity       ... from the verity device's *data* device: dm-verity bypassed
binding.malformed                   the bindings document does not follow the wire format
binding.unquoted                    a posted document the next verified quote does not cover: never in effect
binding.missing                     the quote covers a bindings document the daemon does not hold
==================================  =======================================================================

A bindings document counts only once a verified quote covers its digest (the quote's qualifying data,
:func:`tmb.ingest.wire.qualifying_data`), and is checked at that quote, after its IMA replay
(:func:`tmb.ingest.quotes.check_quote`). Refused at the post (413): ``binding.too_large``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tmb.attest.dm import DM_EVENTS, check_verity, dm_events
from tmb.attest.ima import ImaEntry, parse_fields
from tmb.attest.policy import PolicyChecker, RuntimePolicy
from tmb.errors import ParseError, Report, Severity
from tmb.ingest.state import NodeState, VerityDevice

__all__ = [
    "DEFAULT_MODEL_PATTERNS",
    "check_bindings",
    "evaluate_entries",
    "evaluate_verity",
    "required_missing",
]

DEFAULT_MODEL_PATTERNS = (r"\.(safetensors|gguf|bin|pt|pth|onnx|engine|plan|erofs)$",)
MAX_STICKY = 100


def _allowed(policy: RuntimePolicy, name: str, alg: str, digest: bytes) -> bool:
    digests = set(policy.allow.get(name, frozenset())) | set(policy.allow_any_path)
    return any(d.digest == digest and (d.alg is None or d.alg == alg) for d in digests)


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
        ok = not entry.is_violation and _allowed(policy, fields.name, fields.digest_alg, fields.digest)
        measured[fields.name] = measured.get(fields.name, False) or ok
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
    devices: dict[str, VerityDevice] = {}
    for rule, resume_at in satisfied.items():
        load = None
        for ev in events:
            if ev.event == "dm_table_load" and ev.entry_index < resume_at:
                resumed = next(e for e in events if e.entry_index == resume_at)
                if ev.device_key == resumed.device_key:
                    load = ev
        if load is None:
            continue
        target = next((t for t in load.targets if t.get("target_name") == "verity"), {})
        devices[rule] = VerityDevice(
            target.get("root_digest", ""),  # the rule's committed root, as the quoted log shows it
            f"{load.device.get('major', '')}:{load.device.get('minor', '')}",
            target.get("data_device_name", ""),
            resume_at,
        )
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
    """Check each bound process (wire form of :class:`probes.bindings.ProcessBinding`)."""
    measured = state.measured
    devs = {v.dev for v in state.verity.values()}
    data_devs = {v.data_dev for v in state.verity.values()}
    patterns = [re.compile(p) for p in model_patterns]
    for i, proc in enumerate(processes):
        if not isinstance(proc, Mapping) or not isinstance(proc.get("pid"), int):
            report.add(
                "binding.malformed", "a process binding must be an object with an integer pid", index=i
            )
            continue
        pid, exe, error = proc["pid"], proc.get("exe"), proc.get("error")
        if error is not None or not isinstance(exe, str):
            report.add(
                "binding.process_unreadable",
                "the probe could not read this GPU process",
                severity=Severity.WARNING,
                pid=pid,
                error=str(error),
            )
            continue
        if exe.endswith(" (deleted)"):
            report.add("binding.exe_deleted", "the GPU process runs a deleted executable", pid=pid, exe=exe)
            exe = exe.removesuffix(" (deleted)")
        if exe not in policy.allow:
            report.add(
                "binding.exe_not_allowlisted",
                "the GPU process's executable is not allowlisted by the runtime policy",
                pid=pid,
                exe=exe,
            )
        elif not measured.get(exe):
            report.add(
                "binding.exe_not_measured",
                "no quoted IMA entry measured the GPU process's executable with an allowed digest",
                pid=pid,
                exe=exe,
            )
        maps = proc.get("maps", [])
        if not isinstance(maps, list):
            report.add("binding.malformed", "maps must be a list of {path, dev}", pid=pid)
            continue
        for m in maps:
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("path"), str)
                or not isinstance(m.get("dev"), str)
            ):
                report.add("binding.malformed", "a mapping must be {path: str, dev: 'major:minor'}", pid=pid)
                break
            path, dev = m["path"], m["dev"]
            if not any(p.search(path) for p in patterns):
                continue
            if not devs:
                report.add(
                    "binding.no_verity_device",
                    "a model file is mapped but no dm-verity model image is activated in the quoted IMA log",
                    pid=pid,
                    path=path,
                    dev=dev,
                )
            elif dev in data_devs:
                report.add(
                    "binding.model_bypasses_verity",
                    "a model file is mapped from the verity device's underlying data device: reads bypass "
                    "dm-verity",
                    pid=pid,
                    path=path,
                    dev=dev,
                    expected=sorted(devs),
                )
            elif dev not in devs:
                report.add(
                    "binding.model_not_from_verity",
                    "a model file is mapped from a device other than the activated dm-verity device",
                    pid=pid,
                    path=path,
                    dev=dev,
                    expected=sorted(devs),
                )
