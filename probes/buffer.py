"""The probe's on-disk evidence buffer: a bounded FIFO of items not yet acknowledged by the daemon.

Every item (a batch, a quote, an IMA delta, a process binding, the event log) is written to
``<dir>/<n>.<kind>.json`` (``n`` a 16-digit counter, written atomically: temporary file, fsync when asked,
rename) before it is sent, and removed when the daemon acknowledges it, so a probe or daemon crash loses
nothing that was sealed. Sending happens strictly in counter order. When the buffer holds more than
``max_bytes`` (default 64 MiB) or ``max_items`` items, the oldest are evicted; each eviction is recorded as a
``probe.buffer_evicted`` finding (counts per kind, the evicted batch sequence ranges per segment) that the
probe ships to the daemon with its next batches.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmb.errors import Finding, InputError, Severity

__all__ = ["DiskBuffer", "Item"]

KINDS = ("batch", "quote", "ima", "bindings", "eventlog")


@dataclass(frozen=True)
class Item:
    """One buffered piece of evidence: its counter, kind, JSON document and encoded size."""

    n: int
    kind: str
    doc: dict[str, Any]
    size: int


class DiskBuffer:
    """Bounded, crash-safe FIFO of evidence items in directory ``path``."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_items: int = 100_000,
        fsync: bool = True,
    ) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create the probe buffer directory: {exc.strerror}", path=str(path)
            ) from None
        self.max_bytes, self.max_items, self.fsync = max_bytes, max_items, fsync
        self._items: deque[Item] = deque()
        self._bytes = 0
        self.findings: list[Finding] = []  # evictions not yet shipped
        self.evicted = 0
        self._load()

    def _load(self) -> None:
        entries = []
        for p in self.path.glob("*.json"):
            n_s, _, kind = p.stem.partition(".")
            if not n_s.isdigit() or kind not in KINDS:
                continue
            try:
                raw = p.read_bytes()
                doc = json.loads(raw)
            except (OSError, ValueError):
                p.unlink(missing_ok=True)  # torn write from a crash: never acknowledged, never sent whole
                continue
            entries.append(Item(int(n_s), kind, doc, len(raw)))
        for item in sorted(entries, key=lambda i: i.n):
            self._items.append(item)
            self._bytes += item.size
        self._next = self._items[-1].n + 1 if self._items else 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _file(self, item: Item) -> Path:
        return self.path / f"{item.n:016d}.{item.kind}.json"

    def has(self, kind: str) -> bool:
        """Whether an item of ``kind`` waits in the buffer."""
        return any(item.kind == kind for item in self._items)

    def put(self, kind: str, doc: dict[str, Any]) -> Item:
        """Append an item (written to disk before this returns), then evict the oldest beyond the limits."""
        if kind not in KINDS:
            raise ValueError(f"unknown buffer item kind {kind!r}")
        raw = json.dumps(doc, separators=(",", ":")).encode()
        item = Item(self._next, kind, doc, len(raw))
        self._next += 1
        target = self._file(item)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(raw)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        self._items.append(item)
        self._bytes += item.size
        self._evict()
        return item

    def _evict(self) -> None:
        gone: list[Item] = []
        while len(self._items) > 1 and (self._bytes > self.max_bytes or len(self._items) > self.max_items):
            item = self._items.popleft()
            self._bytes -= item.size
            self._file(item).unlink(missing_ok=True)
            gone.append(item)
        if not gone:
            return
        self.evicted += len(gone)
        kinds: dict[str, int] = {}
        ranges: dict[str, list[int]] = {}
        for item in gone:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
            if item.kind == "batch":
                seg, seq = str(item.doc.get("segment")), int(item.doc.get("seq", -1))
                lo_hi = ranges.setdefault(seg, [seq, seq])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], seq), max(lo_hi[1], seq)
        self.findings.append(
            Finding(
                "probe.buffer_evicted",
                "the daemon was unreachable and the disk buffer was full: oldest evidence evicted",
                Severity.WARNING,
                {
                    "count": len(gone),
                    "kinds": kinds,
                    "batches": [
                        {"segment": s, "first_seq": r[0], "last_seq": r[1]} for s, r in ranges.items()
                    ],
                    "max_bytes": self.max_bytes,
                    "max_items": self.max_items,
                },
            )
        )

    def peek(self, limit: int = 1) -> list[Item]:
        """Up to ``limit`` oldest items, oldest first."""
        return [self._items[i] for i in range(min(limit, len(self._items)))]

    def ack(self, item: Item) -> None:
        """Remove ``item`` (it must be the oldest): the daemon has it, or refused it for good."""
        if not self._items or self._items[0].n != item.n:
            return  # evicted meanwhile
        self._items.popleft()
        self._bytes -= item.size
        self._file(item).unlink(missing_ok=True)

    def take_findings(self, limit: int = 64) -> list[Finding]:
        """The oldest ``limit`` findings to ship (the daemon takes at most 64 a request); the rest stay."""
        out, self.findings = self.findings[:limit], self.findings[limit:]
        return out
