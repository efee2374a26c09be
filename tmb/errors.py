"""The error model.

Two kinds of bad news, kept apart (see STYLE.md):

* **Findings** are outcomes: something in the evidence failed a check. They are data with a stable dotted
  id (``ima.template_hash_mismatch``), a severity, a human message and context (entry index, offset, path,
  PCR, bank, expected, got). Verifiers collect *every* finding into a :class:`Report`; nothing is raised.
* **TmbError** (and subclasses) are failures of the program or its inputs: a file that cannot be read, a
  config that does not parse. ``diagnostics()`` gives the text the CLI prints instead of a traceback.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.Enum):
    """How a finding affects the outcome: ``error`` fails it, ``warning`` and ``info`` do not."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


@dataclass(frozen=True)
class Finding:
    """One failed (or noteworthy) check: a stable id, a message and where/what context."""

    id: str
    message: str
    severity: Severity = Severity.ERROR
    context: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity.value,
            "message": self.message,
            "context": _jsonable(dict(self.context)),
        }

    def __str__(self) -> str:
        where = ", ".join(f"{k}={_short(v)}" for k, v in self.context.items())
        return f"[{self.severity.value}] {self.id}: {self.message}" + (f" ({where})" if where else "")


def _short(value: Any) -> str:
    value = _jsonable(value)
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def finding(fid: str, message: str, *, severity: Severity = Severity.ERROR, **context: Any) -> Finding:
    """Shorthand constructor: ``finding("ima.truncated", "...", offset=12)``."""
    return Finding(fid, message, severity, context)


@dataclass
class Report:
    """An ordered collection of findings; ``ok`` when none of them is an error."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, fid: str, message: str, *, severity: Severity = Severity.ERROR, **context: Any) -> Finding:
        item = Finding(fid, message, severity, context)
        self.findings.append(item)
        return item

    def extend(self, items: Iterable[Finding]) -> None:
        self.findings.extend(items)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def to_list(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.findings]


class TmbError(Exception):
    """Root of every error tmb raises on purpose. The CLI prints :meth:`diagnostics`, never a traceback."""

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = context

    def diagnostics(self) -> str:
        lines = [f"error: {self.message}"]
        for key, value in self.context.items():
            lines.append(f"  {key}: {_short(value)}")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class InputError(TmbError):
    """A file or value given to tmb is missing, unreadable or malformed."""


class ParseError(InputError):
    """Bytes that do not follow the format they claim; context names the offset."""


class ConfigError(InputError):
    """A configuration or policy file that is invalid."""


class TpmError(TmbError):
    """The TPM (or swtpm) could not do what was asked."""
