"""Process bindings against what the quoted evidence established: the pure rules the daemon's ingest applies
at each verified quote that covers a bindings document, and ``tmb audit`` re-applies offline.

A bindings document (``{"processes": [{pid, exe, maps: [{path, dev}], error}]}``, the probe's wire form of
:class:`probes.bindings.ProcessBinding`) says which executable each GPU process runs and from which device
it maps its model files. Checked against the IMA entries covered so far (``measured``: path -> measured with
an allowed digest) and the dm-verity devices the quoted IMA log activated (:func:`verity_devices`):

==================================  =======================================================================
binding.process_unreadable          (warning) the probe could not read the process (gone, permission)
binding.exe_not_allowlisted         the executable's path has no allowed digest in the runtime policy
binding.exe_not_measured            allowlisted path, but no quoted IMA entry measured it (allowed digest)
binding.exe_deleted                 the process runs an executable that was deleted or replaced on disk
binding.no_verity_device            a model file is mapped but no policy verity rule is satisfied yet
binding.model_not_from_verity       a model file is mapped from a device other than the active verity device
binding.model_bypasses_verity       ... from the verity device's *data* device: dm-verity bypassed
binding.malformed                   the bindings document does not follow the wire format
==================================  =======================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tmb.attest.dm import DmEvent
from tmb.attest.ima import ImaEntry, ImaFields
from tmb.attest.policy import RuntimePolicy
from tmb.errors import Report, Severity

__all__ = [
    "DEFAULT_MODEL_PATTERNS",
    "VerityDevice",
    "check_processes",
    "measured_ok",
    "verity_devices",
]

DEFAULT_MODEL_PATTERNS = (r"\.(safetensors|gguf|bin|pt|pth|onnx|engine|plan|erofs)$",)


@dataclass(frozen=True)
class VerityDevice:
    """The dm-verity device a satisfied verity rule activated, as the quoted IMA log shows it."""

    root: str  # the rule's committed root digest
    dev: str  # "major:minor" of the verity device
    data_dev: str  # its underlying data device (reads from there bypass dm-verity)
    entry: int  # IMA entry of the dm_device_resume that activated it


def allowed(policy: RuntimePolicy, name: str, alg: str, digest: bytes) -> bool:
    """Whether the policy allows a measurement of ``name`` with this digest (path-bound or any path)."""
    digests = set(policy.allow.get(name, frozenset())) | set(policy.allow_any_path)
    return any(d.digest == digest and (d.alg is None or d.alg == alg) for d in digests)


def measured_ok(policy: RuntimePolicy, entry: ImaEntry, fields: ImaFields) -> bool:
    """Whether ``entry`` (parsed: ``fields``) measured its path with a digest the policy allows (a violation
    never does): what the ``measured`` map the bindings rules read records per path."""
    return not entry.is_violation and allowed(policy, fields.name, fields.digest_alg, fields.digest)


def verity_devices(events: Sequence[DmEvent], satisfied: Mapping[str, int]) -> dict[str, VerityDevice]:
    """The device each satisfied verity rule (``satisfied``: rule -> the resume entry that satisfied it,
    :func:`tmb.attest.dm.check_verity`) activated: the table load before that resume, for the same device."""
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
    return devices


def check_processes(
    policy: RuntimePolicy,
    measured: Mapping[str, bool],
    devices: Iterable[VerityDevice],
    processes: Sequence[Any],
    model_patterns: Sequence[str],
    report: Report,
) -> None:
    """Check each bound process (wire form) against ``measured`` and the activated ``devices``."""
    devices = list(devices)
    devs = {v.dev for v in devices}
    data_devs = {v.data_dev for v in devices}
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
