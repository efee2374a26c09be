"""verify_quote on self-made quotes: software keys sign TPMS_ATTEST structures built with tmb.attest.tpm2."""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tmb.attest import tpm2
from tmb.attest.quote import QuoteResult, ak_name, load_ak, verify_quote
from tmb.attest.quote_cli import main as quote_main
from tmb.attest.quote_cli import register
from tmb.attest.tpm2 import Attest, ClockInfo, PcrSelection, PcrValues, QuoteInfo, Signature
from tmb.cli import SUBCOMMAND_MODULES
from tmb.errors import ParseError, Severity

RESTRICTED_SIGNING = 0x00050072  # fixedTPM fixedParent sensitiveDataOrigin userWithAuth restricted sign
NONCE = b"fresh-nonce-0123456789abcdef0123"
CLOCK = ClockInfo(1000, 5, 0, True)

_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def tpmt_public(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, scheme: int, hash_alg: int, attrs: int
) -> bytes:
    """Marshal a TPMT_PUBLIC for a software key (name alg sha256, empty policy, no symmetric)."""
    head = struct.pack(
        ">HHI", tpm2.ALG_RSA if isinstance(key, rsa.RSAPrivateKey) else tpm2.ALG_ECC, 0x000B, attrs
    )
    head += b"\x00\x00" + struct.pack(">H", tpm2.ALG_NULL)
    sch = struct.pack(">H", scheme) + (struct.pack(">H", hash_alg) if scheme != tpm2.ALG_NULL else b"")
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.public_key().public_numbers().n.to_bytes(key.key_size // 8, "big")
        return head + sch + struct.pack(">HI", key.key_size, 0) + len(n).to_bytes(2, "big") + n
    nums = key.public_key().public_numbers()
    curve = {"secp256r1": 0x0003, "secp384r1": 0x0004}[key.curve.name]
    size = tpm2.ECC_COORD_SIZES[curve]
    x, y = nums.x.to_bytes(size, "big"), nums.y.to_bytes(size, "big")
    return (
        head
        + sch
        + struct.pack(">HH", curve, tpm2.ALG_NULL)
        + struct.pack(">H", size)
        + x
        + struct.pack(">H", size)
        + y
    )


def make_quote(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    *,
    pcrs: dict[int, dict[int, bytes]] | None = None,
    nonce: bytes = NONCE,
    hash_alg: int = tpm2.ALG_SHA256,
    scheme: int | None = None,
    clock: ClockInfo = CLOCK,
    magic: int = tpm2.TPM_GENERATED_VALUE,
    typ: int = tpm2.TPM_ST_ATTEST_QUOTE,
) -> tuple[bytes, bytes, PcrValues]:
    """A signed (TPMS_ATTEST, TPMT_SIGNATURE, PCR values) triple over ``pcrs`` (default sha256 PCR 10)."""
    pcrs = pcrs if pcrs is not None else {tpm2.ALG_SHA256: {10: hashlib.sha256(b"ima").digest()}}
    selection = tuple(PcrSelection(alg, tuple(sorted(v))) for alg, v in pcrs.items())
    concat = b"".join(pcrs[s.hash_alg][i] for s in selection for i in s.pcrs)
    quote = QuoteInfo(selection, tpm2.digest(hash_alg, concat))
    signer = b"\x00\x0b" + bytes(32)
    message = Attest(magic, typ, signer, nonce, clock, 0x2016051100162800, quote).marshal()
    h = {4: hashes.SHA1(), 11: hashes.SHA256(), 12: hashes.SHA384(), 13: hashes.SHA512()}[hash_alg]
    if isinstance(key, rsa.RSAPrivateKey):
        scheme = scheme or tpm2.ALG_RSASSA
        pad = padding.PKCS1v15() if scheme == tpm2.ALG_RSASSA else padding.PSS(padding.MGF1(h), h.digest_size)
        sig = Signature(scheme, hash_alg, rsa_sig=key.sign(message, pad, h))
    else:
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(h)))
        size = (key.curve.key_size + 7) // 8
        sig = Signature(
            scheme or tpm2.ALG_ECDSA, hash_alg, ecc_r=r.to_bytes(size, "big"), ecc_s=s.to_bytes(size, "big")
        )
    return message, sig.marshal(), PcrValues(pcrs)


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def errors(result: QuoteResult) -> list[str]:
    return [f.id for f in result.report.errors]


@pytest.mark.parametrize("key", [_RSA_KEY, _EC_KEY], ids=["rsa", "ecc"])
def test_good_quote_all_ak_forms(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    message, sig, pcrs = make_quote(key)
    scheme = tpm2.ALG_RSASSA if isinstance(key, rsa.RSAPrivateKey) else tpm2.ALG_ECDSA
    tpmt = tpmt_public(key, scheme, tpm2.ALG_SHA256, RESTRICTED_SIGNING)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for ak in (pem(key), der, tpmt, len(tpmt).to_bytes(2, "big") + tpmt):
        result = verify_quote(
            ak, message, sig, nonce=NONCE, pcrs=pcrs, require_pcrs=[10], expected_hash="sha256"
        )
        assert result.ok and result.report.ids() == [], result.report.ids()
    assert load_ak(tpmt).pem == pem(key)
    assert ak_name(tpmt) == b"\x00\x0b" + hashlib.sha256(tpmt).digest()


def test_rsapss_and_p384_sha384() -> None:
    message, sig, pcrs = make_quote(_RSA_KEY, scheme=tpm2.ALG_RSAPSS)
    assert verify_quote(pem(_RSA_KEY), message, sig, nonce=NONCE, pcrs=pcrs).ok
    key = ec.generate_private_key(ec.SECP384R1())
    message, sig, pcrs = make_quote(key, hash_alg=tpm2.ALG_SHA384)
    tpmt = tpmt_public(key, tpm2.ALG_ECDSA, tpm2.ALG_SHA384, RESTRICTED_SIGNING)
    assert verify_quote(tpmt, message, sig, nonce=NONCE, pcrs=pcrs, expected_hash="sha384").ok


def test_every_finding_is_reported_at_once() -> None:
    message, sig, _pcrs = make_quote(_EC_KEY, magic=0xDEADBEEF)
    other = {tpm2.ALG_SHA256: {10: bytes(32)}}
    result = verify_quote(
        pem(_RSA_KEY),
        message,
        sig,
        nonce=b"stale",
        pcrs=PcrValues(other),
        require_pcrs=[0, 10],
        expected_hash="sha1",
    )
    assert set(errors(result)) == {
        "quote.magic_mismatch",
        "quote.hash_alg_mismatch",
        "quote.signature_scheme_unsupported",  # ECDSA signature, RSA AK
        "quote.nonce_mismatch",
        "quote.pcr_missing",
        "quote.pcr_digest_mismatch",
    }
    missing = next(f for f in result.report if f.id == "quote.pcr_missing")
    assert missing.context["pcr"] == 0


def test_forged_by_other_key() -> None:
    message, sig, pcrs = make_quote(ec.generate_private_key(ec.SECP256R1()))
    assert errors(verify_quote(pem(_EC_KEY), message, sig, nonce=NONCE, pcrs=pcrs)) == [
        "quote.signature_invalid"
    ]


def test_type_and_scheme_checks() -> None:
    message, sig, pcrs = make_quote(_RSA_KEY, typ=0x8017)  # TPM_ST_ATTEST_CERTIFY, signed by the key
    result = verify_quote(pem(_RSA_KEY), message, sig, nonce=NONCE, pcrs=pcrs)
    assert errors(result) == ["quote.type_mismatch"] and result.attest.quote is None
    message, sig, pcrs = make_quote(_RSA_KEY, scheme=tpm2.ALG_RSAPSS)
    tpmt = tpmt_public(_RSA_KEY, tpm2.ALG_RSASSA, tpm2.ALG_SHA256, RESTRICTED_SIGNING)
    assert errors(verify_quote(tpmt, message, sig, nonce=NONCE, pcrs=pcrs)) == [
        "quote.signature_scheme_mismatch"
    ]
    message, sig, pcrs = make_quote(_RSA_KEY, hash_alg=tpm2.ALG_SHA384)
    assert errors(verify_quote(tpmt, message, sig, nonce=NONCE, pcrs=pcrs)) == ["quote.hash_alg_mismatch"]


def test_unrestricted_ak_is_an_error() -> None:
    message, sig, pcrs = make_quote(_EC_KEY)
    tpmt = tpmt_public(_EC_KEY, tpm2.ALG_ECDSA, tpm2.ALG_SHA256, 0x00040072)  # sign, not restricted
    assert errors(verify_quote(tpmt, message, sig, nonce=NONCE, pcrs=pcrs)) == ["quote.ak_not_restricted"]


def test_sha1_is_weak_but_valid() -> None:
    message, sig, pcrs = make_quote(_EC_KEY, hash_alg=tpm2.ALG_SHA1)
    result = verify_quote(pem(_EC_KEY), message, sig, nonce=NONCE, pcrs=pcrs)
    assert result.ok and result.report.ids() == ["quote.hash_alg_weak"]


def test_unchecked_nonce_and_pcrs_are_warnings() -> None:
    message, sig, _pcrs = make_quote(_EC_KEY)
    result = verify_quote(pem(_EC_KEY), message, sig, nonce=None, pcrs=None)
    assert result.ok
    assert result.report.ids() == ["quote.nonce_unchecked", "quote.pcr_digest_unchecked"]
    assert all(f.severity is Severity.WARNING for f in result.report)


def test_pcr_values_missing_and_multi_bank_order() -> None:
    banks = {
        tpm2.ALG_SHA256: {10: b"\x0a" * 32, 0: b"\x00" * 32},
        tpm2.ALG_SHA1: {10: b"\x01" * 20},
    }
    message, sig, pcrs = make_quote(_EC_KEY, pcrs=banks)
    assert verify_quote(pem(_EC_KEY), message, sig, nonce=NONCE, pcrs=pcrs, require_pcrs=[0, 10]).ok
    partial = PcrValues({tpm2.ALG_SHA256: dict(banks[tpm2.ALG_SHA256])})
    result = verify_quote(pem(_EC_KEY), message, sig, nonce=NONCE, pcrs=partial)
    assert errors(result) == ["quote.pcr_values_missing"]
    assert next(iter(result.report)).context["missing"] == ["sha1:10"]
    swapped = PcrValues(
        {tpm2.ALG_SHA256: {10: banks[tpm2.ALG_SHA256][0], 0: banks[tpm2.ALG_SHA256][10]}, 4: banks[4]}
    )
    assert errors(verify_quote(pem(_EC_KEY), message, sig, nonce=NONCE, pcrs=swapped)) == [
        "quote.pcr_digest_mismatch"
    ]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 5, 0, True), []),
        (ClockInfo(3000, 5, 0, True), ClockInfo(2000, 5, 0, True), ["quote.clock_not_monotonic"]),
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 6, 0, True), ["quote.reset"]),
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 5, 1, True), ["quote.restart"]),
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 4, 0, True), ["quote.reset_count_decreased"]),
        (ClockInfo(1000, 5, 3, True), ClockInfo(2000, 5, 2, True), ["quote.restart_count_decreased"]),
        (
            ClockInfo(1000, 0xFFFFFFFF, 0, True),
            ClockInfo(2000, 0, 0, True),
            ["quote.reset"],
        ),  # obfuscated wrap
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 6, 0, False), ["quote.safe_clear", "quote.reset"]),
    ],
)
def test_clock_and_counters(before: ClockInfo, after: ClockInfo, expected: list[str]) -> None:
    m1, s1, pcrs = make_quote(_EC_KEY, clock=before)
    m2, s2, _ = make_quote(_EC_KEY, clock=after)
    first = verify_quote(pem(_EC_KEY), m1, s1, nonce=NONCE, pcrs=pcrs)
    for previous in (first, first.attest, before):
        result = verify_quote(pem(_EC_KEY), m2, s2, nonce=NONCE, pcrs=pcrs, previous=previous)
        assert result.report.ids() == expected
    firmware = replace(tpm2.parse_attest(m1), firmware_version=1)
    result = verify_quote(pem(_EC_KEY), m2, s2, nonce=NONCE, pcrs=pcrs, previous=firmware)
    assert "quote.firmware_changed" in result.report.ids()


def test_bad_inputs_raise_parse_error() -> None:
    message, sig, pcrs = make_quote(_EC_KEY)
    with pytest.raises(ParseError, match="TPMS_ATTEST"):
        verify_quote(pem(_EC_KEY), message[:-3], sig, nonce=NONCE, pcrs=pcrs)
    with pytest.raises(ParseError, match="TPMT_SIGNATURE"):
        verify_quote(pem(_EC_KEY), message, sig + b"\x00", nonce=NONCE, pcrs=pcrs)
    with pytest.raises(ParseError, match="AK"):
        load_ak(b"not a key")
    with pytest.raises(ParseError, match="unsupported hash"):
        verify_quote(pem(_EC_KEY), message, sig, nonce=NONCE, pcrs=pcrs, expected_hash="md5")


# ----------------------------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message, sig, pcrs = make_quote(_RSA_KEY, pcrs={tpm2.ALG_SHA256: {10: b"\x11" * 32, 11: b"\x22" * 32}})
    files = {"ak": pem(_RSA_KEY), "msg": message, "sig": sig, "pcrs.json": pcrs.to_json().encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # tpm2_quote -F values: the raw selected values, read with the quote's selection
    (tmp_path / "values").write_bytes(b"\x11" * 32 + b"\x22" * 32)
    (tmp_path / "tpm2b").write_bytes(len(message).to_bytes(2, "big") + message)
    base = [
        "quote",
        "verify",
        "--ak",
        str(tmp_path / "ak"),
        "-s",
        str(tmp_path / "sig"),
        "--nonce",
        NONCE.hex(),
    ]
    for msg in ("msg", "tpm2b"):
        for pfile in ("pcrs.json", "values"):
            assert (
                _cli(*base, "-m", str(tmp_path / msg), "--pcrs", str(tmp_path / pfile), "--require-pcr", "10")
                == 0
            )
    capsys.readouterr()
    assert _cli(*base, "-m", str(tmp_path / "msg"), "--require-pcr", "0", "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "quote.pcr_missing" in [f["id"] for f in out["findings"]]
    assert out["pcr_select"] == {"sha256": [10, 11]} and out["reset_count"] == 5
    # unreadable input: exit 2 with a diagnostic on stderr, no traceback
    (tmp_path / "garbage").write_bytes(b"\xff" * 7)
    assert quote_main([*base, "-m", str(tmp_path / "garbage")]) == 2
    assert "TPMS_ATTEST" in capsys.readouterr().err
    assert quote_main([*base[:-2], "--nonce", "zz", "-m", str(tmp_path / "msg")]) == 2
    assert "--nonce is not hex" in capsys.readouterr().err
    assert quote_main([*base, "-m", str(tmp_path / "missing")]) == 2
    assert "cannot read the message file" in capsys.readouterr().err
    assert quote_main([*base, "-m", str(tmp_path / "msg"), "--hash", "md5"]) == 2
    assert "tmb.attest.quote_cli" in SUBCOMMAND_MODULES
    from tmb.errors import TmbError

    with pytest.raises(TmbError, match="TPMS_ATTEST"):
        _cli(*base, "-m", str(tmp_path / "garbage"))
    with pytest.raises(TmbError, match="cannot read"):
        _cli(*base, "-m", str(tmp_path / "missing"))
