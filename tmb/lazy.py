"""Package names loaded on first use (PEP 562), so importing one submodule does not load its siblings.

A package lists where each public name lives and installs the module-level hooks::

    _WHERE = {"Judge": "tmb.fingerprint.judge", ...}
    __getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names in ``where`` load on first use."""

    def getattr_(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later reads skip the hook
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *where})

    return getattr_, dir_
