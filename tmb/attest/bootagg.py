"""IMA's ``boot_aggregate``: the first entry of the measurement list, which ties the IMA log to the boot
that the firmware measured into PCRs 0-9.

The kernel computes it once, at IMA's initialisation, from the TPM's PCRs:

* with the SHA-1 bank (TPM 1.2, or a TPM 2.0 whose chosen bank is SHA-1): ``SHA1(PCR0 ‖ … ‖ PCR7)``;
* with any other bank (Linux 5.8 and later, TPM 2.0): ``H(PCR0 ‖ … ‖ PCR9)`` in the bank of IMA's hash
  algorithm (PCR 8 and 9 hold grub's kernel command line and kernel image in the usual allocation),
  or the SHA-1 form when that bank is not allocated.

The entry's ``d-ng`` field names the algorithm (``sha256:…``); the legacy ``ima`` template carries a SHA-1
digest. :func:`check_boot_aggregate` recomputes it from quoted PCR values (or from PCRs replayed from the
firmware's event log) and compares. A log whose first entry is not ``boot_aggregate``, or whose value no
PCR bank reproduces, was not written by the kernel that this boot measured: someone extended PCR 10 from
user space with a log of their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from tmb.attest.ima import ImaEntry
from tmb.errors import Finding, Severity, finding

BOOT_AGGREGATE = "boot_aggregate"
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}


def boot_aggregate(pcrs: Mapping[int, bytes], bank: str) -> bytes:
    """The boot aggregate the kernel computes from ``pcrs`` (index -> value) of ``bank``.

    SHA-1: PCRs 0-7; other banks: PCRs 0-9. A missing PCR raises ``KeyError`` (callers check first).
    """
    last = 8 if bank == "sha1" else 10
    h = hashlib.new(bank)
    for i in range(last):
        h.update(pcrs[i])
    return h.digest()


def _needed(bank: str) -> range:
    return range(8) if bank == "sha1" else range(10)


def check_boot_aggregate(entry: ImaEntry | None, pcrs: Mapping[str, Mapping[int, bytes]]) -> list[Finding]:
    """Findings (empty: it holds) for the IMA log's first entry against PCR values per bank.

    ``pcrs`` maps bank -> (index -> value), from a verified quote or an event-log replay. The entry's own
    algorithm picks the bank; when that bank's PCRs 0-9 are not all given, the SHA-1 form is tried.
    """
    if entry is None:
        return [finding("boot.no_boot_aggregate", "the IMA log is empty: no boot_aggregate entry")]
    where = entry.where()
    fields = entry.fields()
    if fields.name != BOOT_AGGREGATE or entry.num != 0:
        return [
            finding(
                "boot.no_boot_aggregate",
                f"the IMA log's first entry is {fields.name!r}, not boot_aggregate: the log does not start"
                " at the kernel's initialisation",
                **where,
            )
        ]
    alg = fields.digest_alg or "sha1"
    candidates = [alg] + (["sha1"] if alg != "sha1" else [])
    tried: list[str] = []
    for bank in candidates:
        values = pcrs.get(bank, {})
        if not all(i in values for i in _needed(bank)):
            continue
        tried.append(bank)
        if bank == alg and len(fields.digest) == _DIGEST_SIZES.get(bank, -1):
            expected = boot_aggregate(values, bank)
            if expected == fields.digest:
                return []
        elif bank == "sha1" and alg != "sha1":
            # A kernel without the entry's bank allocated hashes the SHA-1 PCRs, zero-padded to the digest.
            expected = boot_aggregate(values, "sha1")
            if expected.ljust(len(fields.digest), b"\0") == fields.digest:
                return []
    if not tried:
        return [
            finding(
                "boot.pcrs_missing",
                f"PCRs {_needed(alg).start}-{_needed(alg).stop - 1} of the {alg} bank are needed to check"
                " boot_aggregate",
                severity=Severity.ERROR,
                bank=alg,
                have={b: sorted(v) for b, v in pcrs.items()},
                **where,
            )
        ]
    return [
        finding(
            "boot.aggregate_mismatch",
            "boot_aggregate does not match PCRs 0-9 of this boot: the IMA log was not written by the kernel"
            " the firmware measured",
            algorithm=alg,
            logged=fields.digest.hex(),
            banks_tried=tried,
            **where,
        )
    ]
