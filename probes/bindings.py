"""Process bindings: which executable a GPU process runs and which devices its mapped files live on.

For each pid: ``/proc/<pid>/exe`` (the executable's path, `` (deleted)`` kept as the kernel writes it) and
the file-backed mappings of ``/proc/<pid>/maps`` as ``{"path", "dev": "major:minor"}`` (decimal; the
kernel prints hex ``MM:mm``), one per distinct path. The daemon checks the executable against the runtime
policy and the IMA log, and that model files are mapped from the dm-verity device the IMA log names.

Wire form: ``{"pid", "exe": str | null, "maps": [{"path", "dev"}], "error": str | null}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProcessBinding", "bind", "bind_all"]


@dataclass(frozen=True)
class ProcessBinding:
    pid: int
    exe: str | None
    maps: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (path, "major:minor")
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "exe": self.exe,
            "maps": [{"path": p, "dev": d} for p, d in self.maps],
            "error": self.error,
        }


def _parse_maps(text: str) -> tuple[tuple[str, str], ...]:
    seen: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue  # anonymous, [heap], [stack], [vdso] ...
        dev, inode, path = parts[3], parts[4], parts[5]
        if inode == "0":
            continue
        major_s, _, minor_s = dev.partition(":")
        try:
            dev_dec = f"{int(major_s, 16)}:{int(minor_s, 16)}"
        except ValueError:
            continue
        seen.setdefault(path, dev_dec)
    return tuple(sorted(seen.items()))


def bind(pid: int, proc: str = "/proc") -> ProcessBinding:
    """The binding of ``pid`` (``error`` set when the process is gone or not readable)."""
    try:
        exe = os.readlink(f"{proc}/{pid}/exe")
        with open(f"{proc}/{pid}/maps") as fh:
            maps = _parse_maps(fh.read())
    except FileNotFoundError:
        return ProcessBinding(pid, None, (), "no such process")
    except PermissionError:
        return ProcessBinding(pid, None, (), "permission denied (the probe needs CAP_SYS_PTRACE or root)")
    except OSError as exc:
        return ProcessBinding(pid, None, (), exc.strerror or "unreadable")
    return ProcessBinding(pid, exe, maps)


def bind_all(pids: Iterable[int], proc: str = "/proc") -> list[ProcessBinding]:
    return [bind(pid, proc) for pid in sorted(set(pids))]
