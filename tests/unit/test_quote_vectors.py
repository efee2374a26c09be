"""Real-world quote sets among the vendored vectors (tests/data/vectors/PROVENANCE.md, section A)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from vectors import VECTORS

from tmb.attest import tpm2
from tmb.attest.quote import ak_name, load_ak, verify_quote
from tmb.attest.quote_cli import register
from tmb.attest.tpm2 import PcrValues
from tmb.errors import ParseError


@dataclass(frozen=True)
class QuoteSet:
    ak: bytes
    message: bytes
    signature: bytes
    nonce: bytes
    pcrs: PcrValues
    hash: str


def _keylime_checkquote() -> QuoteSet:
    d = VECTORS / "keylime" / "checkquote_vector"
    return QuoteSet(
        (d / "aik_pub.pem").read_bytes(),
        (d / "quote_tpms_attest.bin").read_bytes(),
        (d / "quote_tpmt_signature.bin").read_bytes(),
        (d / "nonce.txt").read_bytes(),
        tpm2.load_pcr_values((d / "pcrs_tpm2tools_serialized.bin").read_bytes()),
        "sha256",
    )


def _tpm2tools(ak: str) -> QuoteSet:
    d = VECTORS / "keylime" / "tpm2tools_quote_set"
    return QuoteSet(
        (d / ak).read_bytes(),
        (d / "quote.out").read_bytes(),
        (d / "quotesig.out").read_bytes(),
        (d / "rand.out").read_bytes(),
        tpm2.load_pcr_values((d / "quotepcr.out").read_bytes()),
        "sha256",
    )


def _go_attestation() -> QuoteSet:
    doc = json.loads((VECTORS / "go-attestation" / "windows_gcp_shielded_vm.json").read_text())
    b64 = base64.b64decode
    values = {p["Index"]: b64(p["Digest"]) for p in doc["Log"]["PCRs"]}
    return QuoteSet(
        b64(doc["AK"]["Public"]),
        b64(doc["Quote"]["Quote"]),
        b64(doc["Quote"]["Signature"]),
        b64(doc["Quote"]["Nonce"] or ""),
        PcrValues({tpm2.ALG_SHA1: values}),
        "sha1",
    )


def _trustee() -> QuoteSet:
    doc = json.loads((VECTORS / "trustee" / "tpm_evidence.json").read_text())
    b64 = base64.b64decode
    q = doc["tpm_quote"]
    message = b64(q["message"])
    extra = tpm2.parse_attest(message).extra_data
    # the trustee verifier zero-pads its report data to 64 bytes; here 48 data bytes + 16 zeros (PROVENANCE.md
    # A4 says 32 + 32, but the file's extraData ends in exactly 16 zero bytes)
    report_data = extra.rstrip(b"\0")
    assert len(extra) == 64 and len(report_data) == 48
    pcrs = PcrValues({tpm2.ALG_SHA256: {i: bytes.fromhex(v) for i, v in enumerate(q["pcrs"])}})
    return QuoteSet(
        b64(doc["ak_public"]), message, b64(q["signature"]), report_data.ljust(64, b"\0"), pcrs, "sha256"
    )


SETS = {
    "keylime-checkquote": _keylime_checkquote,
    "tpm2tools-akpub-tpm2b": lambda: _tpm2tools("ak.pub"),
    "tpm2tools-akpub-pem": lambda: _tpm2tools("akpub.pem"),
    "go-attestation-rsa-sha1": _go_attestation,
    "trustee-64-byte-nonce": _trustee,
}


@pytest.fixture(params=sorted(SETS))
def qset(request: pytest.FixtureRequest) -> QuoteSet:
    return SETS[request.param]()


def _verify(q: QuoteSet, **overrides: object) -> list[str]:
    args: dict[str, object] = {"nonce": q.nonce, "pcrs": q.pcrs, "expected_hash": q.hash}
    args.update(overrides)
    message = args.pop("message", q.message)
    signature = args.pop("signature", q.signature)
    result = verify_quote(q.ak, message, signature, **args)  # type: ignore[arg-type]
    return [f.id for f in result.report.errors]


def test_every_set_verifies(qset: QuoteSet) -> None:
    assert _verify(qset) == []


def test_flipped_quote_byte_breaks_the_signature(qset: QuoteSet) -> None:
    message = bytearray(qset.message)
    message[-40] ^= 0x01  # inside extraData/clock/selection/digest depending on the set; still parses
    ids = _verify(qset, message=bytes(message))
    assert "quote.signature_invalid" in ids


def test_keylime_flip_byte_5_of_quote() -> None:
    """keylime's own test flips byte 5 (the type's low byte): our parser still reads it, and reports both."""
    q = _keylime_checkquote()
    message = bytearray(q.message)
    message[5] ^= 0x01
    ids = _verify(q, message=bytes(message))
    assert "quote.signature_invalid" in ids and "quote.type_mismatch" in ids


def test_flipped_signature_byte(qset: QuoteSet) -> None:
    sig = bytearray(qset.signature)
    sig[-1] ^= 0x80
    assert _verify(qset, signature=bytes(sig)) == ["quote.signature_invalid"]


def test_changed_pcr_value(qset: QuoteSet) -> None:
    banks = {alg: dict(v) for alg, v in qset.pcrs.banks.items()}
    alg = next(iter(banks))
    index = max(banks[alg])
    banks[alg][index] = bytes([banks[alg][index][0] ^ 1]) + banks[alg][index][1:]
    assert _verify(qset, pcrs=PcrValues(banks)) == ["quote.pcr_digest_mismatch"]


def test_changed_nonce(qset: QuoteSet) -> None:
    assert _verify(qset, nonce=qset.nonce + b"x") == ["quote.nonce_mismatch"]


def test_wrong_expected_hash(qset: QuoteSet) -> None:
    other = "sha384" if qset.hash != "sha384" else "sha256"
    assert _verify(qset, expected_hash=other) == ["quote.hash_alg_mismatch"]


def test_keylime_pcr_blob_byte_5_flipped() -> None:
    """keylime flips byte 5 of the serialized PCR blob (the bank id's high byte): an unknown bank."""
    d = VECTORS / "keylime" / "checkquote_vector"
    blob = bytearray((d / "pcrs_tpm2tools_serialized.bin").read_bytes())
    blob[5] ^= 0x01
    with pytest.raises(ParseError, match="unsupported PCR bank"):
        tpm2.load_pcr_values(bytes(blob))


def test_expected_values_from_provenance() -> None:
    a = tpm2.parse_attest((VECTORS / "keylime" / "checkquote_vector" / "quote_tpms_attest.bin").read_bytes())
    assert (a.clock_info.clock, a.clock_info.reset_count, a.clock_info.restart_count) == (1284787942, 3, 0)
    assert a.clock_info.safe and a.quote is not None
    assert a.quote.pcr_digest.hex() == "6d4d3749132f6257172164cd5ff3135f447973d4a5c84e018901f6753705b701"
    assert [(s.hash_alg, s.pcrs) for s in a.quote.pcr_select] == [(tpm2.ALG_SHA256, (16,))]
    q = _tpm2tools("ak.pub")
    assert q.pcrs.get("sha256", 16) == bytes.fromhex(
        "9dbb22387e019c04da95477333546082ce313152c4a7f8a6e1d5f0c77f4fb6f0"
    )
    assert q.pcrs.get("sha256", 22) == b"\xff" * 32
    g = _go_attestation()
    ga = tpm2.parse_attest(g.message)
    assert ga.extra_data == b"" and ga.quote is not None
    assert ga.quote.pcr_digest.hex() == "a610f27bc687ce906243287d832706036e79f6e1"
    assert ga.quote.pcr_select[0].pcrs == tuple(range(24))
    ak = load_ak(g.ak)
    assert (
        ak.public is not None
        and ak.public.scheme == tpm2.ALG_RSASSA
        and ak.public.scheme_hash == tpm2.ALG_SHA1
    )


def test_ak_name_and_pem_agree() -> None:
    d = VECTORS / "keylime" / "tpm2tools_quote_set"
    pub = (d / "ak.pub").read_bytes()
    assert ak_name(pub) == (d / "ak.name").read_bytes()
    assert ak_name(pub[2:]) == (d / "ak.name").read_bytes()  # TPMT_PUBLIC form
    ak = load_ak(pub)
    assert ak.public is not None and ak.public.object_attributes == 0x00050072
    assert ak.pem == load_ak((d / "akpub.pem").read_bytes()).pem
    assert ak.tpm2b_public == pub


def test_rust_keylime_quote_parses() -> None:
    text = (VECTORS / "rust-keylime" / "test-quote.txt").read_text().strip()
    assert text.startswith("r")
    att_b64, sig_b64, pcr_b64 = text[1:].split(":")
    attest = tpm2.parse_attest(base64.b64decode(att_b64))
    assert attest.magic == tpm2.TPM_GENERATED_VALUE and attest.type == tpm2.TPM_ST_ATTEST_QUOTE
    assert attest.marshal() == base64.b64decode(att_b64)
    sig = tpm2.parse_signature(base64.b64decode(sig_b64))
    assert sig.marshal() == base64.b64decode(sig_b64)
    _selection, values = tpm2.parse_tools_serialized_pcrs(base64.b64decode(pcr_b64))
    assert attest.quote is not None
    concat = b"".join(values.get(alg, i) or b"" for alg, i in attest.quote.selected())
    assert tpm2.digest(sig.hash_alg, concat) == attest.quote.pcr_digest


def _cli(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_on_tpm2tools_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = VECTORS / "keylime" / "tpm2tools_quote_set"
    base = [
        "quote",
        "verify",
        "--ak",
        str(d / "ak.pub"),
        "-m",
        str(d / "quote.out"),
        "-s",
        str(d / "quotesig.out"),
    ]
    base += ["-f", str(d / "quotepcr.out"), "--hash", "sha256"]
    nonce = (d / "rand.out").read_bytes().hex()
    assert _cli(*base, "--nonce", nonce, "--require-pcr", "16") == 0
    assert "every check passed" in capsys.readouterr().out
    assert _cli(*base, "--nonce", nonce, "--require-pcr", "10", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in report["findings"]] == ["quote.pcr_missing"]
    assert _cli(*base, "--nonce-file", str(d / "rand.out")) == 0
    capsys.readouterr()
    assert _cli(*base, "--nonce", "00") == 1
    assert "quote.nonce_mismatch" in capsys.readouterr().out
