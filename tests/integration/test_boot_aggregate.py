"""IMA's boot_aggregate against PCRs 0-9 of a real swtpm: the kernel's first entry holds, an IMA log
invented in user space (the PCR 10 forgery: any root process can extend PCR 10) does not."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from swtpm import SwtpmFactory

from probes.tpm import TpmClient
from tmb.attest.bootagg import boot_aggregate, check_boot_aggregate
from tmb.attest.ima import ImaEntry, iter_log
from tmb.attest.ima_build import LogBuilder


@pytest.fixture
def booted(swtpm_factory: SwtpmFactory) -> Iterator[TpmClient]:
    """A fresh swtpm whose PCRs 0-9 hold a measured boot (firmware, bootloader, kernel, command line)."""
    with swtpm_factory().client() as client:
        for pcr, what in [(0, b"firmware"), (2, b"option roms"), (4, b"shim+grub"), (7, b"secure boot")]:
            client.pcr_extend(pcr, {b: hashlib.new(b, what).digest() for b in ("sha1", "sha256")})
        client.pcr_extend(
            8, {b: hashlib.new(b, b"root=/dev/vda ima_policy=tcb").digest() for b in ("sha1", "sha256")}
        )
        client.pcr_extend(9, {b: hashlib.new(b, b"vmlinuz").digest() for b in ("sha1", "sha256")})
        yield client


def _pcrs(client: TpmClient) -> dict[str, dict[int, bytes]]:
    values = client.pcr_read(range(10), ("sha1", "sha256"))
    out: dict[str, dict[int, bytes]] = {}
    for bank in ("sha1", "sha256"):
        out[bank] = {i: v for i in range(10) if (v := values.get(bank, i)) is not None}
    return out


def _log(tmp_path: Path, first: tuple[str, bytes, str]) -> Path:
    path = tmp_path / "ima.bin"
    with path.open("wb") as f:
        b = LogBuilder(f)
        name, digest, alg = first
        b.add("ima-ng", name, digest=digest, alg=alg)
        b.file("/usr/bin/inference-engine", b"engine")
    return path


def _first(path: Path) -> ImaEntry:
    with path.open("rb") as f:
        return next(iter(iter_log(f)))


def test_the_kernels_boot_aggregate_holds_in_both_forms(booted: TpmClient, tmp_path: Path) -> None:
    pcrs = _pcrs(booted)
    # Linux >= 5.8 with a SHA-256 bank: SHA-256 over PCRs 0-9; SHA-1: over PCRs 0-7
    assert len(pcrs["sha256"]) == 10 and pcrs["sha256"][8] != bytes(32)
    agg256 = boot_aggregate(pcrs["sha256"], "sha256")
    assert agg256 == hashlib.sha256(b"".join(pcrs["sha256"][i] for i in range(10))).digest()
    assert check_boot_aggregate(_first(_log(tmp_path, ("boot_aggregate", agg256, "sha256"))), pcrs) == []
    agg1 = boot_aggregate(pcrs["sha1"], "sha1")
    assert check_boot_aggregate(_first(_log(tmp_path, ("boot_aggregate", agg1, "sha1"))), pcrs) == []


def test_a_user_space_ima_log_does_not_match_this_boot(booted: TpmClient, tmp_path: Path) -> None:
    """The forgery: an invented measurement list (with a boot_aggregate of another boot, or of none),
    PCR 10 extended to match from user space. PCRs 0-9 cannot be rewound, so boot_aggregate gives it away."""
    pcrs = _pcrs(booted)
    other_boot = dict(pcrs["sha256"])
    other_boot[4] = hashlib.sha256(b"a kernel without IMA").digest()
    forged = boot_aggregate(other_boot, "sha256")
    (f,) = check_boot_aggregate(_first(_log(tmp_path, ("boot_aggregate", forged, "sha256"))), pcrs)
    assert f.id == "boot.aggregate_mismatch" and f.context["entry"] == 0
    (f,) = check_boot_aggregate(_first(_log(tmp_path, ("boot_aggregate", bytes(32), "sha256"))), pcrs)
    assert f.id == "boot.aggregate_mismatch"  # "booted without a TPM" on a machine that has one
    (f,) = check_boot_aggregate(_first(_log(tmp_path, ("/usr/bin/sh", forged, "sha256"))), pcrs)
    assert f.id == "boot.no_boot_aggregate"
    # the forger extends PCR 10 to match, but that does not touch PCRs 0-9
    booted.pcr_extend(10, {"sha256": hashlib.sha256(b"anything").digest()})
    assert _pcrs(booted) == pcrs


def test_missing_pcrs_are_named(tmp_path: Path) -> None:
    entry = _first(_log(tmp_path, ("boot_aggregate", bytes(32), "sha256")))
    (f,) = check_boot_aggregate(entry, {"sha256": {i: bytes(32) for i in range(8)}})
    assert f.id == "boot.pcrs_missing" and f.context["bank"] == "sha256"
    assert check_boot_aggregate(None, {})[0].id == "boot.no_boot_aggregate"
