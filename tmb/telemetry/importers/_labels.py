"""What a recording was of: workload labels, load and run, from flags or a sidecar JSON/TOML file."""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from tmb.errors import ConfigError, InputError

WORKLOAD_KEYS: Final = ("model", "precision", "engine", "gpu_type", "regime")


@dataclass(frozen=True)
class Labels:
    """Workload labels (``meta["workload"]``), the constant load and the run; None = not given."""

    model: str | None = None
    precision: str | None = None
    engine: str | None = None
    gpu_type: str | None = None
    regime: str | None = None
    load: float | None = None
    run_id: str | None = None
    node: str | None = None
    day: str | None = None

    def __post_init__(self) -> None:
        if self.load is not None and not (math.isfinite(self.load) and self.load >= 0):
            raise InputError("--load must be a finite, non-negative number of requests", load=self.load)
        if self.day is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.day):
            raise InputError("--day must be YYYY-MM-DD", day=self.day)

    def over(self, base: Labels) -> Labels:
        """These labels where given, ``base``'s elsewhere (command-line flags over a sidecar file)."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(base, **given)

    def workload(self) -> dict[str, str]:
        return {k: v for k in WORKLOAD_KEYS if (v := getattr(self, k)) is not None}

    @classmethod
    def from_file(cls, path: str | Path) -> Labels:
        """A sidecar: a JSON object or TOML table with any of the keys of :class:`Labels`."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read labels file: {exc}", path=str(p)) from None
        data: Any
        try:
            if p.suffix.lower() == ".toml":
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"labels file is not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}", path=str(p)
            ) from None
        if not isinstance(data, dict):
            raise ConfigError("labels file must hold an object (JSON) or table (TOML)", path=str(p))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) in labels file: {', '.join(unknown)}", path=str(p), known=sorted(known)
            )
        for key, value in data.items():
            ok = (
                isinstance(value, int | float) and not isinstance(value, bool)
                if key == "load"
                else isinstance(value, str)
            )
            if not ok:
                want = "a number" if key == "load" else "a string"
                raise ConfigError(f"labels file: {key} must be {want}", path=str(p), field=key)
        given: dict[str, Any] = {k: (float(v) if k == "load" else v) for k, v in data.items()}
        return cls(**given)
