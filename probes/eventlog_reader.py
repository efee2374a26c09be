"""Reads the firmware's UEFI event log for the daemon: whole, bounded, once per probe start.

The production path is ``/sys/kernel/security/tpm0/binary_bios_measurements`` (securityfs; root only): the
log the firmware, shim and grub wrote while extending PCRs 0-9, fixed for the rest of the boot. Tests and the
demo point the probe at a file written by :class:`tmb.attest.eventlog_build.EventLogBuilder`. The probe does
not parse it (the daemon does, and replays it to the quoted PCRs); it only bounds what it reads and sends.
"""

from __future__ import annotations

from pathlib import Path

from tmb.errors import Finding, Severity, finding
from tmb.ingest.wire import MAX_EVENTLOG_BYTES

__all__ = ["MAX_EVENTLOG_BYTES", "read_eventlog"]

CHUNK = 1 << 16


def read_eventlog(path: str | Path, limit: int = MAX_EVENTLOG_BYTES) -> tuple[bytes | None, Finding | None]:
    """``(data, None)``, or ``(None, finding)``: ``probe.eventlog_unreadable`` (warning: a missing file,
    no permission), ``probe.eventlog_empty`` (warning) or ``probe.eventlog_too_large`` (error: more than
    ``limit`` bytes; nothing is sent). Reads at most ``limit + 1`` bytes, looping over short reads."""
    parts: list[bytes] = []
    got = 0
    try:
        with open(path, "rb", buffering=0) as fh:
            while got <= limit:
                chunk = fh.read(min(CHUNK, limit + 1 - got))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
    except OSError as exc:
        return None, finding(
            "probe.eventlog_unreadable",
            f"cannot read the UEFI event log: {exc.strerror}",
            severity=Severity.WARNING,
            path=str(path),
            hint='the probe needs read access to securityfs (root); eventlog = "" sends none',
        )
    if got > limit:
        return None, finding(
            "probe.eventlog_too_large",
            f"the UEFI event log is larger than {limit} bytes: not sent",
            path=str(path),
            limit=limit,
        )
    if not got:
        return None, finding(
            "probe.eventlog_empty", "the UEFI event log is empty", severity=Severity.WARNING, path=str(path)
        )
    return b"".join(parts), None
