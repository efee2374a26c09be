"""Shared pytest fixtures. The swtpm fixtures live in tests/swtpm.py, the PostgreSQL ones in tests/pg.py (see
their docstrings); ``_close_async_stores`` (autouse) closes the verdict stores a test left open."""

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pg import pg_url, postgres
from swtpm import swtpm, swtpm_factory, tpm

from tmb.verdict.async_store import AsyncStore

__all__ = ["pg_url", "postgres", "swtpm", "swtpm_factory", "tpm"]


@pytest.fixture(autouse=True)
def _close_async_stores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An :class:`AsyncStore` runs a thread (its checkpointer or writer) until closed. A test that builds one
    for an engine and never closes it would leave the thread running for the rest of the session, where it
    calls module functions another test patches; so every store a test opened is closed after it."""
    opened: list[AsyncStore] = []
    init = AsyncStore.__init__

    def tracked(self: AsyncStore, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(AsyncStore, "__init__", tracked)
    yield
    for store in opened:
        if not store._stop.is_set():  # the test closed it itself otherwise
            asyncio.run(store.close())
