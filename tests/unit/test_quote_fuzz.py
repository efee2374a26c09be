"""Parsers on random and mutated input: a value or a ParseError naming where, never another exception."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmb.attest import tpm2
from tmb.attest.quote import load_ak, verify_quote
from tmb.attest.tpm2 import Attest, ClockInfo, PcrSelection, QuoteInfo, Signature
from tmb.errors import ParseError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_SEL = (PcrSelection(tpm2.ALG_SHA256, (0, 7, 10)), PcrSelection(tpm2.ALG_SHA1, (10,)))
VALID_ATTEST = Attest(
    tpm2.TPM_GENERATED_VALUE,
    tpm2.TPM_ST_ATTEST_QUOTE,
    b"\x00\x0b" + bytes(range(32)),
    b"nonce",
    ClockInfo(123456, 7, 1, True),
    0x1122334455667788,
    QuoteInfo(_SEL, bytes(range(32))),
).marshal()
VALID_SIG_RSA = Signature(tpm2.ALG_RSASSA, tpm2.ALG_SHA256, rsa_sig=bytes(256)).marshal()
VALID_SIG_ECC = Signature(tpm2.ALG_ECDSA, tpm2.ALG_SHA256, ecc_r=b"\x01" * 32, ecc_s=b"\x02" * 32).marshal()
_EC_POINT = bytes.fromhex(  # the P-256 generator
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
VALID_TPMT_ECC = (
    struct.pack(">HHIH", tpm2.ALG_ECC, tpm2.ALG_SHA256, 0x00050072, 0)
    + struct.pack(">HHHHH", tpm2.ALG_NULL, tpm2.ALG_ECDSA, tpm2.ALG_SHA256, 0x0003, tpm2.ALG_NULL)
    + b"\x00\x20"
    + _EC_POINT[:32]
    + b"\x00\x20"
    + _EC_POINT[32:]
)
VALID_TPM2B_ECC = len(VALID_TPMT_ECC).to_bytes(2, "big") + VALID_TPMT_ECC
VALID_SERIALIZED = bytearray(132 + 4 + 532)
VALID_SERIALIZED[0:4] = (1).to_bytes(4, "little")
VALID_SERIALIZED[4:11] = bytes([0x0B, 0x00, 0x03, 0x00, 0x04, 0x00, 0x00])  # sha256: PCR 10
VALID_SERIALIZED[132:140] = (1).to_bytes(4, "little") + (1).to_bytes(4, "little")
VALID_SERIALIZED[140:142] = (32).to_bytes(2, "little")

PARSERS: dict[str, Callable[[bytes], Any]] = {
    "attest": tpm2.parse_attest,
    "signature": tpm2.parse_signature,
    "tpmt_public": tpm2.parse_public,
    "tpm2b_public": tpm2.parse_tpm2b_public,
    "pcr_selection": tpm2.parse_pcr_selection,
    "serialized_pcrs": tpm2.parse_tools_serialized_pcrs,
    "pcr_values": lambda b: tpm2.load_pcr_values(b, _SEL),
    "load_ak": load_ak,
    "object_name": tpm2.object_name,
}
SEEDS: dict[str, bytes] = {
    "attest": VALID_ATTEST,
    "signature": VALID_SIG_ECC,
    "tpmt_public": VALID_TPMT_ECC,
    "tpm2b_public": VALID_TPM2B_ECC,
    "pcr_selection": tpm2.marshal_pcr_selection(_SEL),
    "serialized_pcrs": bytes(VALID_SERIALIZED),
    "pcr_values": b'{"sha256": {"0": "' + b"00" * 32 + b'"}}',
    "load_ak": VALID_TPM2B_ECC,
    "object_name": VALID_TPMT_ECC,
}


def _call(name: str, data: bytes) -> None:
    try:
        PARSERS[name](data)
    except ParseError as exc:
        assert exc.diagnostics().startswith("error: ")


def test_seeds_are_valid() -> None:
    for name, seed in SEEDS.items():
        PARSERS[name](seed)
    assert tpm2.parse_attest(VALID_ATTEST).marshal() == VALID_ATTEST
    assert tpm2.parse_signature(VALID_SIG_RSA).marshal() == VALID_SIG_RSA
    assert tpm2.parse_public(VALID_TPMT_ECC).raw == VALID_TPMT_ECC
    selection, values = tpm2.parse_tools_serialized_pcrs(bytes(VALID_SERIALIZED))
    assert selection == (PcrSelection(tpm2.ALG_SHA256, (10,)),) and values.get("sha256", 10) == bytes(32)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.binary(max_size=800))
def test_random_bytes(name: str, data: bytes) -> None:
    _call(name, data)


@pytest.mark.parametrize("name", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_structures(name: str, data: st.DataObject) -> None:
    buf = bytearray(SEEDS[name])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif buf:
            buf[pos] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
    _call(name, bytes(buf))


@FUZZ
@given(data=st.data())
def test_verify_never_raises_other_errors(data: st.DataObject) -> None:
    """verify_quote on mutated quotes and signatures: a report or a ParseError."""
    msg = bytearray(VALID_ATTEST)
    sig = bytearray(data.draw(st.sampled_from([VALID_SIG_ECC, VALID_SIG_RSA])))
    for buf in (msg, sig):
        if data.draw(st.booleans()) and buf:
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        result = verify_quote(VALID_TPM2B_ECC, bytes(msg), bytes(sig), nonce=b"nonce", pcrs=None)
    except ParseError:
        return
    assert not result.ok  # nothing here carries a valid signature


def test_truncation_names_structure_field_and_offset() -> None:
    with pytest.raises(ParseError) as info:
        tpm2.parse_attest(VALID_ATTEST[:45])
    assert info.value.context["structure"] == "TPMS_ATTEST"
    assert info.value.context["field"] == "extraData"
    assert "offset" in info.value.context and "truncated" in info.value.message
    absurd = bytearray(VALID_ATTEST)
    absurd[6:8] = b"\xff\xff"  # qualifiedSigner.size
    with pytest.raises(ParseError, match=r"qualifiedSigner: size 65535 exceeds the maximum 66 at offset 6"):
        tpm2.parse_attest(bytes(absurd))
    with pytest.raises(ParseError, match=r"count: 4294967295 banks exceeds the maximum 16 at offset 0"):
        tpm2.parse_pcr_selection(b"\xff\xff\xff\xff")
    with pytest.raises(ParseError, match="trailing"):
        tpm2.parse_signature(VALID_SIG_ECC + b"\x00")
