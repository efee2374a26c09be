"""``tmb audit`` of the boot chain on a real swtpm: the firmware's event log (built the way firmware writes
it, PCRs 0-9 extended with exactly its digests), IMA's boot_aggregate computed from those PCRs, a quote
over PCRs 0-10; then the attacks: an edited event log, a kernel command line the policy forbids, and the
user-space forgery (an IMA log of another boot, PCR 10 extended to match)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.tpm import TpmClient
from sample_infra.swtpm import Swtpm
from tmb.attest.bootagg import boot_aggregate
from tmb.attest.bootpolicy import draft_policy
from tmb.attest.eventlog import read_eventlog
from tmb.attest.eventlog_build import EventLogBuilder, standard_boot
from tmb.attest.eventlog_events import summarize
from tmb.attest.evidence import audit_bundle, render_text, write_bundle
from tmb.attest.ima_build import LogBuilder
from tmb.report import render_html

AK_HANDLE = 0x81010002
ENGINE = b"engine binary"


def _boot(tpm: TpmClient, cmdline: str = "root=/dev/vda1 ro ima_policy=tcb ima_hash=sha256") -> bytes:
    log = standard_boot(EventLogBuilder(banks=("sha1", "sha256")), cmdline=cmdline)
    log.extend_into(tpm.pcr_extend)
    return log.getvalue()


def _ima(tpm: TpmClient, agg: bytes) -> bytes:
    out = io.BytesIO()
    b = LogBuilder(out)
    for built in (
        b.add("ima-ng", "boot_aggregate", digest=agg, alg="sha256"),
        b.file("/usr/bin/vllm", ENGINE),
    ):
        tpm.pcr_extend(10, {"sha1": built.extends["sha1"], "sha256": built.extends["sha256"]})
    return out.getvalue()


def _policy(agg: bytes, eventlog: bytes) -> str:
    boot = draft_policy(summarize(read_eventlog(io.BytesIO(eventlog), name="eventlog").events))
    return (
        f'version = 1\n[allow]\n"boot_aggregate" = ["sha256:{agg.hex()}"]\n'
        f'"/usr/bin/vllm" = ["sha256:{hashlib.sha256(ENGINE).hexdigest()}"]\n\n{boot}'
    )


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[TpmClient]:
    instance = Swtpm(tmp_path / "tpm")
    try:
        with instance.client() as client:
            client.create_or_load_ak(AK_HANDLE, "rsa")
            yield client
    finally:
        instance.stop()


def _bundle(
    tmp_path: Path, tpm: TpmClient, ima: bytes, eventlog: bytes | None, policy: str, name: str
) -> Path:
    nonce = os.urandom(20)
    q = tpm.quote(AK_HANDLE, {"sha256": list(range(11)), "sha1": list(range(10))}, nonce)
    ak = tpm.create_or_load_ak(AK_HANDLE, "rsa").tpm2b_public
    assert ak is not None
    return write_bundle(
        tmp_path / name,
        node="gpu-node-1",
        ak=ak,
        ima_log=ima,
        quotes=[
            {
                "message": q.message,
                "signature": q.signature,
                "pcrs": q.pcrs.to_json().encode(),
                "nonce": nonce,
            }
        ],
        policy_toml=policy,
        eventlog=eventlog,
    )


def _pcrs(tpm: TpmClient) -> dict[int, bytes]:
    values = tpm.pcr_read(range(10), ("sha256",))
    return {i: v for i in range(10) if (v := values.get("sha256", i)) is not None}


def test_an_honest_boot_chain_passes_and_is_shown(tmp_path: Path, tpm: TpmClient) -> None:
    eventlog = _boot(tpm)
    agg = boot_aggregate(_pcrs(tpm), "sha256")
    path = _bundle(tmp_path, tpm, _ima(tpm, agg), eventlog, _policy(agg, eventlog), "honest")
    result = audit_bundle(path)
    assert result.ok, result.report.to_list()
    assert result.boot is not None and result.boot.pcrs_replayed and result.boot.boot_aggregate
    assert result.boot.secure_boot is True and result.boot.policy_checked
    text = render_text(result)
    assert "quoted PCRs 0-9 replayed: ok" in text and "boot_aggregate = this boot's PCRs 0-9: ok" in text
    assert "ima_policy=tcb" in text
    page = render_html(result)
    assert "IMA boot_aggregate" in page and "✓ this boot's" in page and "PCRs 0-9 replayed" in page


def test_an_edited_event_log_is_caught(tmp_path: Path, tpm: TpmClient) -> None:
    eventlog = _boot(tpm)
    agg = boot_aggregate(_pcrs(tpm), "sha256")
    ima = _ima(tpm, agg)
    policy = _policy(agg, eventlog)
    # another boot's log (ima=off on its command line) presented for this quote: PCR 8 does not replay
    other = standard_boot(
        EventLogBuilder(banks=("sha1", "sha256")), cmdline="root=/dev/vda1 ro ima=off"
    ).getvalue()
    ids = {f.id for f in audit_bundle(_bundle(tmp_path, tpm, ima, other, policy, "edited")).report.errors}
    assert "eventlog.pcr_mismatch" in ids and "boot.cmdline_forbidden" in ids
    missing = audit_bundle(_bundle(tmp_path, tpm, ima, None, policy, "none"))
    assert not missing.ok and "boot.no_eventlog" in {f.id for f in missing.report.errors}


def test_the_user_space_pcr10_forgery_fails(tmp_path: Path, tpm: TpmClient) -> None:
    """A kernel without IMA: root writes an invented measurement list and extends PCR 10 to match. Its
    boot_aggregate cannot be this boot's (PCRs 0-9 cannot be rewound), so the audit names it."""
    eventlog = _boot(tpm)
    genuine = boot_aggregate(_pcrs(tpm), "sha256")
    forged = hashlib.sha256(b"the boot the forger wishes it were").digest()
    policy = _policy(forged, eventlog)  # even a policy that allowlists the forged value
    result = audit_bundle(_bundle(tmp_path, tpm, _ima(tpm, forged), eventlog, policy, "forged"))
    assert not result.ok and forged != genuine
    assert "boot.aggregate_mismatch" in {f.id for f in result.report.errors}
    assert result.boot is not None and result.boot.boot_aggregate is False
