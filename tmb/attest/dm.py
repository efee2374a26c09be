"""Device-mapper critical-data events in the IMA log, and the dm-verity rule for model images.

The kernel (dm-ima, 5.15+) measures ``ima-buf`` entries named ``dm_table_load``, ``dm_device_resume``,
``dm_device_remove``, ``dm_table_clear``, ``dm_device_rename`` and ``dm_target_update``. Their payload is
ASCII: sections separated by ``;``, ``key=value`` pairs separated by ``,``::

    dm_version=4.45.0;name=model,uuid=...,major=253,minor=0,minor_count=1,num_targets=1;
    target_index=0,target_begin=0,target_len=204808,target_name=verity,...,verity_algorithm=sha256,
    root_digest=<hex>,salt=<hex|->,...;

``dm_device_resume`` carries ``active_table_hash=<alg>:<hex>``, the d-ng digest of the table load that
became live. A verity rule is satisfied by a table load whose single verity target matches a model
commitment (root digest, algorithm, salt and the data size: ``target_len`` in 512-byte sectors), the
resume that activates exactly that table, and no later reload, clear, remove, rename or hash failure of
the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tmb.attest.ima import ImaEntry, parse_fields
from tmb.errors import ParseError, Report, Severity

DM_EVENTS = frozenset(
    {
        "dm_table_load",
        "dm_device_resume",
        "dm_device_remove",
        "dm_table_clear",
        "dm_device_rename",
        "dm_target_update",
    }
)
SECTOR = 512


@dataclass(frozen=True)
class DmEvent:
    """One parsed dm event: the IMA entry it came from, the device and the per-target sections."""

    entry_index: int
    event: str
    digest: str  # "<alg>:<hex>" of the payload, as active_table_hash names it
    device: Mapping[str, str]
    targets: tuple[Mapping[str, str], ...]
    extra: Mapping[str, str]

    @property
    def device_key(self) -> str:
        """Identity of the device across events: name plus uuid (both are in every event)."""
        return f"{self.device.get('name', '')}|{self.device.get('uuid', '')}"


def parse_payload(payload: bytes) -> tuple[dict[str, str], list[dict[str, str]], dict[str, str]]:
    """Split a dm-ima payload into (device metadata, target sections, other key/values)."""
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("dm event payload is not ASCII") from None
    device: dict[str, str] = {}
    targets: list[dict[str, str]] = []
    extra: dict[str, str] = {}
    for section in text.split(";"):
        section = section.strip()
        if not section:
            continue
        pairs: dict[str, str] = {}
        for item in section.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise ParseError(f"dm event item {item[:60]!r} is not key=value")
            if key == "device_active_metadata":  # dm_device_remove nests the device section
                key, _, value = value.partition("=")
            pairs[key] = value
        if "target_index" in pairs:
            targets.append(pairs)
        elif "name" in pairs and not device:
            device = pairs
        else:
            extra.update(pairs)
    return device, targets, extra


def dm_events(entries: Iterable[ImaEntry], report: Report) -> list[DmEvent]:
    """The dm events among ``entries`` (ima-buf with a dm_* name); malformed payloads are findings."""
    out: list[DmEvent] = []
    for entry in entries:
        if entry.template_name != "ima-buf":
            continue
        try:
            fields = parse_fields(entry)
        except ParseError as exc:
            report.add("ima.malformed_entry", exc.message, **entry.where())
            continue
        if fields.name not in DM_EVENTS:
            continue
        try:
            device, targets, extra = parse_payload(fields.buf)
        except ParseError as exc:
            report.add("dm.malformed_event", exc.message, **entry.where(), event=fields.name)
            continue
        digest = f"{fields.digest_alg}:{fields.digest.hex()}"
        out.append(DmEvent(entry.num, fields.name, digest, device, tuple(targets), extra))
    return out


@dataclass(frozen=True)
class VerityRule:
    """A model image the node may mount: what a commitment pins (see ``tmb.verity``)."""

    name: str
    root_digest: str
    verity_algorithm: str = "sha256"
    salt: str = "-"
    data_blocks: int | None = None
    data_block_size: int = 4096
    device: str | None = None  # expected dm device name, when the operator fixes it
    required: bool = True

    @property
    def target_len(self) -> int | None:
        if self.data_blocks is None:
            return None
        return self.data_blocks * self.data_block_size // SECTOR


@dataclass
class _DeviceTrack:
    load: DmEvent
    rule: VerityRule | None
    resumed_at: int | None = None
    problems: list[str] = field(default_factory=list)


def check_verity(events: Sequence[DmEvent], rules: Sequence[VerityRule], report: Report) -> dict[str, int]:
    """Apply verity rules to dm events in log order. Returns rule name -> entry index of the resume that
    activated it (only for rules fully satisfied)."""
    by_root = {r.root_digest.lower(): r for r in rules}
    live: dict[str, _DeviceTrack] = {}  # device key -> the verity table last loaded for it
    satisfied: dict[str, int] = {}
    for ev in events:
        key = ev.device_key
        track = live.get(key)
        if ev.event == "dm_table_load":
            verity = [t for t in ev.targets if t.get("target_name") == "verity"]
            if track is not None and track.resumed_at is not None:
                _after_resume(report, track, ev, "reloaded (a new table was loaded)")
            if not verity:
                if track is not None:
                    live.pop(key)
                continue
            rule = _match_rule(ev, verity, by_root, report)
            live[key] = _DeviceTrack(ev, rule)
        elif ev.event == "dm_device_resume":
            if track is None:
                continue
            active = ev.extra.get("active_table_hash", "")
            if track.resumed_at is None:
                if active.lower() != track.load.digest.lower():
                    report.add(
                        "dm.active_table_mismatch",
                        "the resumed device runs a table other than the verity table measured for it",
                        entry=ev.entry_index,
                        device=ev.device.get("name", ""),
                        expected=track.load.digest,
                        got=active,
                    )
                    continue
                track.resumed_at = ev.entry_index
                if track.rule is not None:
                    satisfied[track.rule.name] = ev.entry_index
        elif track is not None and track.resumed_at is not None:
            if ev.event == "dm_target_update":
                failed = [t for t in ev.targets if t.get("hash_failed") == "C"]
                if failed:
                    report.add(
                        "dm.verity_hash_failed",
                        "dm-verity detected corrupted data blocks (hash_failed=C)",
                        entry=ev.entry_index,
                        device=ev.device.get("name", ""),
                    )
                    if track.rule is not None:
                        satisfied.pop(track.rule.name, None)
                continue
            what = {
                "dm_device_remove": "removed",
                "dm_table_clear": "cleared (its inactive table)",
                "dm_device_rename": "renamed",
            }[ev.event]
            _after_resume(report, track, ev, what)
            if ev.event in ("dm_device_remove", "dm_device_rename"):
                live.pop(key, None)
                if track.rule is not None and ev.event == "dm_device_remove":
                    satisfied.pop(track.rule.name, None)
    for track in live.values():
        if track.resumed_at is None and track.rule is not None:
            report.add(
                "dm.verity_not_resumed",
                "verity table loaded but never activated by a dm_device_resume naming it",
                entry=track.load.entry_index,
                device=track.load.device.get("name", ""),
                rule=track.rule.name,
            )
    for rule in rules:
        if rule.required and rule.name not in satisfied:
            report.add(
                "dm.verity_missing",
                "no activated dm-verity device matches this model commitment",
                rule=rule.name,
                root_digest=rule.root_digest,
            )
    return satisfied


def _after_resume(report: Report, track: _DeviceTrack, ev: DmEvent, what: str) -> None:
    severity = Severity.WARNING if ev.event == "dm_device_rename" else Severity.ERROR
    report.add(
        "dm.device_modified_after_resume",
        f"verity device {what} after it was activated",
        severity=severity,
        entry=ev.entry_index,
        event=ev.event,
        device=ev.device.get("name", ""),
        loaded_at=track.load.entry_index,
        rule=track.rule.name if track.rule else None,
    )


def _match_rule(
    ev: DmEvent, verity: list[Mapping[str, str]], by_root: Mapping[str, VerityRule], report: Report
) -> VerityRule | None:
    where: dict[str, Any] = {"entry": ev.entry_index, "device": ev.device.get("name", "")}
    if len(ev.targets) != 1:
        report.add(
            "dm.verity_extra_targets",
            f"verity table has {len(ev.targets)} targets; a model image must be one verity target",
            **where,
        )
    target = verity[0]
    root = target.get("root_digest", "").lower()
    rule = by_root.get(root)
    if rule is None:
        report.add(
            "dm.verity_root_mismatch",
            "dm-verity root digest matches no model commitment in the policy",
            **where,
            got=root,
            expected=sorted(by_root) or "(no verity rules in the policy)",
        )
        return None
    checks = {
        "verity_algorithm": (rule.verity_algorithm, target.get("verity_algorithm", "")),
        "salt": (rule.salt.lower() or "-", (target.get("salt", "") or "-").lower()),
        "target_begin": ("0", target.get("target_begin", "")),
    }
    if rule.target_len is not None:
        checks["target_len"] = (str(rule.target_len), target.get("target_len", ""))
    if rule.device is not None:
        checks["name"] = (rule.device, ev.device.get("name", ""))
    ok = True
    for fld, (want, got) in checks.items():
        if want != got:
            ok = False
            report.add(
                "dm.verity_param_mismatch",
                f"verity table {fld} differs from the commitment",
                **where,
                rule=rule.name,
                field=fld,
                expected=want,
                got=got,
            )
    return rule if ok else None
