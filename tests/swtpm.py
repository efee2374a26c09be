"""pytest fixtures around :mod:`sample_infra.swtpm` (a real swtpm per test session or per test).

Fixtures (registered in conftest.py): ``swtpm`` (one per test session), ``swtpm_factory`` (fresh TPMs, torn
down after the test) and ``tpm`` (a :class:`probes.tpm.TpmClient` on the session swtpm). A missing ``swtpm``
binary is a test *failure*, never a skip.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from probes.tpm import TpmClient
from sample_infra.swtpm import Swtpm, provision_ek_cert
from tmb.errors import TpmError

__all__ = ["Swtpm", "provision_ek_cert"]


def _start(state_dir: Path, *, ek_cert: bool = False) -> Swtpm:
    try:
        return Swtpm(state_dir, ek_cert=ek_cert)
    except TpmError as exc:
        pytest.fail(exc.diagnostics())


SwtpmFactory = Callable[..., Swtpm]


@pytest.fixture(scope="session")
def swtpm() -> Iterator[Swtpm]:
    """One swtpm for the whole test session (shared: tests must not assume PCR values)."""
    with tempfile.TemporaryDirectory(prefix="tmb-swtpm-") as tmp:
        instance = _start(Path(tmp) / "state")
        try:
            yield instance
        finally:
            instance.stop()


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[SwtpmFactory]:
    """``swtpm_factory(ek_cert=False) -> Swtpm``: fresh TPMs with their own state, stopped after the test."""
    started: list[Swtpm] = []

    def make(*, ek_cert: bool = False) -> Swtpm:
        instance = _start(tmp_path / f"swtpm{len(started)}", ek_cert=ek_cert)
        started.append(instance)
        return instance

    try:
        yield make
    finally:
        for instance in started:
            instance.stop()


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[TpmClient]:
    """A TPM client on the session swtpm."""
    with swtpm.client() as client:
        yield client
