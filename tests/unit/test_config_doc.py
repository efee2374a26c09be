"""docs/config.md documents every section and key ``tmb.config`` reads, with its type and default; a
documented key the config does not hold is one it still accepts and ignores (deprecated)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from tmb.config import Config, WorkerConfig, load_config, parse_worker
from tmb.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
TYPES = {"str": "string", "int": "integer", "float": "decimal", "bool": "boolean", "tuple": "list of strings"}
REQUIRED_WORKER_KEYS = {"name", "url", "node"}


def _sections() -> dict[str, type[Any]]:
    """Section name -> its dataclass, read from :class:`Config`'s fields (``workers`` -> WorkerConfig)."""
    hints = typing.get_type_hints(Config)
    out: dict[str, type[Any]] = {}
    for f in dataclasses.fields(Config):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out[f.name] = typing.cast(type[Any], kind)
        elif typing.get_args(kind) and typing.get_args(kind)[0] is WorkerConfig:
            out[f.name] = WorkerConfig
    return out


def _documented() -> dict[str, dict[str, tuple[str, str, str]]]:
    """Section -> key -> (type, default, meaning), from the doc's tables."""
    doc: dict[str, dict[str, tuple[str, str, str]]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^## `\[\[?(\w+)\]\]?`", line):
            section = m[1]
            doc[section] = {}
        elif section and (m := re.match(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \| (.+) \|$", line)):
            doc[section][m[1]] = (m[2].strip(), m[3].strip(), m[4])
    return doc


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return f"`{list(value)!r}`"
    return f"`{value!r}`"


def test_every_section_is_documented() -> None:
    assert set(_documented()) == set(_sections())


@pytest.mark.parametrize("section", sorted(_sections()))
def test_every_key_is_documented_with_its_type_and_default(section: str) -> None:
    cls = _sections()[section]
    rows = _documented()[section]
    for f in dataclasses.fields(cls):
        assert f.name in rows, f"docs/config.md lacks {section}.{f.name}"
        kind, default, _ = rows[f.name]
        assert kind == TYPES[str(f.type).split("[")[0]], f"{section}.{f.name}"
        if section == "workers" and f.name in REQUIRED_WORKER_KEYS:
            assert default == "required"
            entry = {"name": "w", "url": "http://127.0.0.1:1", "node": "n"}
            del entry[f.name]
            with pytest.raises(ConfigError):
                parse_worker(entry, "test")
        else:
            assert default == _default(f.default), f"{section}.{f.name}"


def test_documented_keys_the_config_lacks_are_deprecated_and_accepted(tmp_path: Path) -> None:
    sections = _sections()
    for section, rows in _documented().items():
        known = {f.name for f in dataclasses.fields(sections[section])}
        for key, (kind, _, meaning) in rows.items():
            if key in known:
                continue
            assert "deprecated, ignored" in meaning, f"{section}.{key} is documented but not read"
            value = {"integer": "1", "decimal": "1.0", "boolean": "true", "string": '""'}[kind]
            path = tmp_path / f"{section}-{key}.toml"
            path.write_text(f"[{section}]\n{key} = {value}\n")
            load_config(path, env={})  # accepted (and ignored), not an unknown key
