"""Quotes from a real swtpm through probes.tpm.TpmClient, verified by tmb.attest.quote (and by tpm2-tools)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from swtpm import Swtpm, SwtpmFactory

from probes.tpm import Quote, TpmClient
from tmb.attest import tpm2
from tmb.attest.quote import AkPublic, QuoteResult, load_ak, verify_quote
from tmb.attest.tpm2 import PcrValues
from tmb.errors import TpmError

# handles of their own, so other tests sharing the session swtpm keep theirs
HANDLES = {"rsa": 0x81010012, "ecc": 0x81010013}
OTHER_AK = 0x81010014
SELECTION = {"sha256": [0, 10], "sha1": [10]}


@pytest.fixture(scope="module")
def aks(swtpm: Swtpm) -> dict[str, AkPublic]:
    with swtpm.client() as tpm:
        return {alg: tpm.create_or_load_ak(handle, alg) for alg, handle in HANDLES.items()}


@pytest.fixture(params=["rsa", "ecc"])
def alg(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _extend_ima(tpm: TpmClient, what: bytes) -> None:
    tpm.pcr_extend(10, {"sha256": hashlib.sha256(what).digest(), "sha1": hashlib.sha1(what).digest()})


def _verify(ak: AkPublic | bytes, q: Quote, nonce: bytes, **kw: object) -> QuoteResult:
    args: dict[str, object] = {
        "nonce": nonce,
        "pcrs": q.pcrs,
        "require_pcrs": [10],
        "expected_hash": "sha256",
    }
    args.update(kw)
    return verify_quote(ak, q.message, q.signature, **args)  # type: ignore[arg-type]


def test_fixture_is_a_private_ready_tpm(swtpm: Swtpm, tpm: TpmClient) -> None:
    assert swtpm.tcti == f"swtpm:host=127.0.0.1,port={swtpm.port}"
    assert swtpm.proc is not None and swtpm.proc.poll() is None
    a, b = tpm.get_random(40), tpm.get_random(40)
    assert len(a) == len(b) == 40 and a != b


def test_quote_verifies(tpm: TpmClient, aks: dict[str, AkPublic], alg: str) -> None:
    _extend_ima(tpm, b"/usr/bin/inference-engine")
    nonce = tpm.get_random(32)
    q = tpm.quote(HANDLES[alg], SELECTION, nonce)
    ak = aks[alg]
    for form in (ak.tpm2b_public, ak.pem):
        assert form is not None
        result = _verify(form, q, nonce)
        assert result.ok and result.report.ids() == [], result.report.ids()
    assert result.attest.extra_data == nonce
    assert result.attest.qualified_signer[:2] == b"\x00\x0b"
    assert q.pcrs.get("sha256", 10) == tpm.pcr_read([10], ["sha256"]).get("sha256", 10)
    assert load_ak(tpm.read_public(HANDLES[alg]).pem).pem == ak.pem  # persisted at its handle


def test_pcr_extend_is_tpm_arithmetic(tpm: TpmClient) -> None:
    before = tpm.pcr_read([10], ["sha256", "sha1"])
    _extend_ima(tpm, b"entry")
    after = tpm.pcr_read([10], ["sha256", "sha1"])
    assert (
        after.get("sha256", 10)
        == hashlib.sha256((before.get("sha256", 10) or b"") + hashlib.sha256(b"entry").digest()).digest()
    )
    assert (
        after.get("sha1", 10)
        == hashlib.sha1((before.get("sha1", 10) or b"") + hashlib.sha1(b"entry").digest()).digest()
    )


def test_forged_quote_signed_by_another_ak(tpm: TpmClient, aks: dict[str, AkPublic]) -> None:
    tpm.create_or_load_ak(OTHER_AK, "rsa")
    nonce = tpm.get_random(32)
    forged = tpm.quote(OTHER_AK, SELECTION, nonce)
    result = _verify(aks["rsa"], forged, nonce)
    assert [f.id for f in result.report.errors] == ["quote.signature_invalid"]


def test_replayed_quote_has_a_stale_nonce(tpm: TpmClient, aks: dict[str, AkPublic], alg: str) -> None:
    old_nonce = tpm.get_random(32)
    old = tpm.quote(HANDLES[alg], SELECTION, old_nonce)
    new_nonce = tpm.get_random(32)
    result = _verify(aks[alg], old, new_nonce)
    assert [f.id for f in result.report.errors] == ["quote.nonce_mismatch"]


def test_quote_without_pcr_10(tpm: TpmClient, aks: dict[str, AkPublic]) -> None:
    nonce = tpm.get_random(16)
    q = tpm.quote(HANDLES["ecc"], {"sha256": [0, 1, 2]}, nonce)
    result = _verify(aks["ecc"], q, nonce)
    assert [f.id for f in result.report.errors] == ["quote.pcr_missing"]


def test_edited_pcr_values(tpm: TpmClient, aks: dict[str, AkPublic], alg: str) -> None:
    _extend_ima(tpm, b"before quote")
    nonce = tpm.get_random(32)
    q = tpm.quote(HANDLES[alg], SELECTION, nonce)
    banks = {a: dict(v) for a, v in q.pcrs.banks.items()}
    banks[tpm2.ALG_SHA256][10] = hashlib.sha256(b"what the provider wishes PCR 10 were").digest()
    assert [f.id for f in _verify(aks[alg], q, nonce, pcrs=PcrValues(banks)).report.errors] == [
        "quote.pcr_digest_mismatch"
    ]
    _extend_ima(tpm, b"after quote")  # values read later no longer match what was quoted
    later = tpm.pcr_read([0, 10], ["sha256", "sha1"])
    assert [f.id for f in _verify(aks[alg], q, nonce, pcrs=later).report.errors] == [
        "quote.pcr_digest_mismatch"
    ]


def test_clock_is_monotonic_across_quotes(tpm: TpmClient, aks: dict[str, AkPublic]) -> None:
    nonce = b"n"
    first = _verify(aks["ecc"], tpm.quote(HANDLES["ecc"], SELECTION, nonce), nonce)
    for _ in range(200):  # the TPM clock counts milliseconds; quote until it moved
        second = _verify(aks["ecc"], tpm.quote(HANDLES["ecc"], SELECTION, nonce), nonce, previous=first)
        if second.clock_info.clock > first.clock_info.clock:
            break
    assert second.clock_info.clock > first.clock_info.clock
    assert second.ok and second.report.ids() == []
    assert second.clock_info.reset_count == first.clock_info.reset_count
    third = _verify(aks["ecc"], tpm.quote(HANDLES["ecc"], SELECTION, nonce), nonce, previous=second.attest)
    assert third.report.ids() == []
    replay_order = verify_quote(
        aks["ecc"], first.attest.marshal(), first.signature, nonce=nonce, pcrs=None, previous=second
    )
    assert "quote.clock_not_monotonic" in replay_order.report.ids()


def test_reboot_restart_and_ek_certificate(swtpm_factory: SwtpmFactory) -> None:
    machine = swtpm_factory(ek_cert=True)
    with machine.client() as tpm:
        ak = tpm.create_or_load_ak(alg="rsa")
        cert_der = tpm.ek_certificate()
        ek = load_ak(tpm.ek_public())
        ecc_cert = tpm.ek_certificate("ecc384")
        ecc_ek = load_ak(tpm.ek_public("ecc384"))
        first = _verify(ak, tpm.quote(0x81010002, SELECTION, b"boot1"), b"boot1")
    assert first.ok
    assert cert_der is not None
    cert_key = x509.load_der_x509_certificate(cert_der).public_key()
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert_key.public_bytes(*spki) == ek.pem
    assert ecc_cert is not None  # swtpm_setup also certifies a P-384 EK (high range, NV 0x01c00016)
    assert x509.load_der_x509_certificate(ecc_cert).public_key().public_bytes(*spki) == ecc_ek.pem

    machine.reboot()
    with machine.client() as tpm:
        assert tpm.create_or_load_ak(alg="rsa").pem == ak.pem  # the persistent AK survived
        rebooted = _verify(ak, tpm.quote(0x81010002, SELECTION, b"boot2"), b"boot2", previous=first)
    assert rebooted.ok and rebooted.report.ids() == ["quote.reset"]
    assert rebooted.clock_info.reset_count == first.clock_info.reset_count + 1

    machine.hibernate_resume()
    with machine.client() as tpm:
        resumed = _verify(ak, tpm.quote(0x81010002, SELECTION, b"resume"), b"resume", previous=rebooted)
    assert resumed.report.ids() == ["quote.restart"]

    machine.reboot(orderly=False)
    with machine.client() as tpm:
        crashed = _verify(ak, tpm.quote(0x81010002, SELECTION, b"crash"), b"crash", previous=resumed)
    assert "quote.reset" in crashed.report.ids() and "quote.safe_clear" in crashed.report.ids()


def test_fresh_tpm_has_no_ek_certificate(swtpm_factory: SwtpmFactory) -> None:
    with swtpm_factory().client() as tpm:
        assert tpm.ek_certificate() is None
        assert load_ak(tpm.ek_public()).algorithm == "rsa"
        first = tpm.create_or_load_ak(alg="ecc")
        tpm.evict(0x81010002)
        with pytest.raises(TpmError, match="ReadPublic"):
            tpm.read_public(0x81010002)
        assert tpm.create_or_load_ak(alg="ecc").pem != first.pem  # a new key, not the evicted one


def test_tpm_errors_carry_diagnostics(tpm: TpmClient, aks: dict[str, AkPublic]) -> None:
    with pytest.raises(TpmError) as info:
        tpm.quote(
            HANDLES["rsa"], {"sha256": [10]}, b"x", hash_alg="sha384"
        )  # restricted key: own scheme only
    assert "Quote" in info.value.message and "rc" in info.value.context
    with pytest.raises(TpmError, match="holds another key"):
        tpm.create_or_load_ak(HANDLES["rsa"], "ecc")
    with pytest.raises(TpmError, match="at most 64"):
        tpm.quote(HANDLES["rsa"], {"sha256": [10]}, bytes(65))


def test_unreachable_tpm_is_a_tpm_error(tmp_path: Path) -> None:
    machine = Swtpm(tmp_path / "gone")
    tcti = machine.tcti
    machine.stop()
    with pytest.raises(TpmError) as info:
        TpmClient(tcti).get_random(1)
    assert "hint: " in info.value.diagnostics()


@pytest.fixture
def quote_files(tpm: TpmClient, aks: dict[str, AkPublic], tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    nonce = tpm.get_random(20)
    q = tpm.quote(HANDLES["rsa"], SELECTION, nonce)
    attest = tpm2.parse_attest(q.message)
    assert attest.quote is not None
    (tmp_path / "ak.pem").write_bytes(aks["rsa"].pem)
    (tmp_path / "quote.msg").write_bytes(q.message)
    (tmp_path / "quote.sig").write_bytes(q.signature)
    (tmp_path / "quote.pcrs").write_bytes(tpm2.marshal_tools_serialized_pcrs(attest.quote.pcr_select, q.pcrs))
    yield tmp_path, nonce


def test_tpm2_checkquote_agrees(quote_files: tuple[Path, bytes]) -> None:
    """The peer verifier accepts our quote + serialized PCR file, and rejects the same edit we reject."""
    d, nonce = quote_files
    checkquote = shutil.which("tpm2_checkquote")
    assert checkquote, "tpm2-tools is not installed"
    cmd = [checkquote, "-u", str(d / "ak.pem"), "-m", str(d / "quote.msg"), "-s", str(d / "quote.sig")]
    cmd += ["-f", str(d / "quote.pcrs"), "-g", "sha256"]
    assert subprocess.run([*cmd, "-q", nonce.hex()], capture_output=True, timeout=30).returncode == 0
    assert subprocess.run([*cmd, "-q", bytes(20).hex()], capture_output=True, timeout=30).returncode != 0


def test_tpm2_quote_files_verify_with_tmb_cli(swtpm: Swtpm, aks: dict[str, AkPublic], tmp_path: Path) -> None:
    """Files written by tpm2-tools' own tpm2_quote (persistent AK, serialized PCRs) pass tmb quote verify."""
    import argparse

    from tmb.attest.quote_cli import register

    tool = shutil.which("tpm2_quote")
    assert tool, "tpm2-tools is not installed"
    cmd = [tool, "-T", swtpm.tcti, "-c", hex(HANDLES["ecc"]), "-l", "sha256:0,10+sha1:10", "-q", "c0ffee"]
    cmd += ["-m", str(tmp_path / "m"), "-s", str(tmp_path / "s"), "-o", str(tmp_path / "o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    (tmp_path / "ak.pub").write_bytes(aks["ecc"].tpm2b_public or b"")
    argv = ["quote", "verify", "--ak", str(tmp_path / "ak.pub"), "-m", str(tmp_path / "m")]
    argv += ["-s", str(tmp_path / "s"), "-f", str(tmp_path / "o"), "-q", "c0ffee", "--require-pcr", "10"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([*argv, "--hash", "sha256"])
    assert args.func(args) == 0
