"""A real quote and the real event log it attests (go-attestation's Windows GCP shielded VM, vendored with
its licence): the quote verifies with its AK, and the event log replays to the PCRs the quote signed. This
is the chain the daemon checks per node: quote -> PCRs 0-9 -> firmware event log."""

from __future__ import annotations

import base64
import io
import json

from vectors import VECTORS

from tmb.attest.eventlog import read_eventlog, replay
from tmb.attest.quote import load_ak, verify_quote
from tmb.attest.tpm2 import PcrValues

VECTOR = VECTORS / "go-attestation" / "windows_gcp_shielded_vm.json"
REPLAYED = (0, 4, 5, 7, 11, 12, 13, 14)  # the PCRs this log measures (PROVENANCE.md, A1)


def _doc() -> dict:  # type: ignore[type-arg]
    return json.loads(VECTOR.read_text())


def _pcrs(doc: dict) -> dict[int, bytes]:  # type: ignore[type-arg]
    return {p["Index"]: base64.b64decode(p["Digest"]) for p in doc["Log"]["PCRs"]}


def test_the_quote_verifies_and_the_event_log_replays_to_its_pcrs() -> None:
    doc = _doc()
    pcrs = _pcrs(doc)
    values = PcrValues.from_dict({"sha1": {str(i): v.hex() for i, v in pcrs.items()}})
    result = verify_quote(
        load_ak(base64.b64decode(doc["AK"]["Public"])),
        base64.b64decode(doc["Quote"]["Quote"]),
        base64.b64decode(doc["Quote"]["Signature"]),
        nonce=base64.b64decode(doc["Quote"]["Nonce"]),
        pcrs=values,
    )
    assert result.ok, result.report.to_list()
    log = read_eventlog(io.BytesIO(base64.b64decode(doc["Log"]["Raw"])), name="windows")
    replayed = replay(log.events)
    assert log.fmt == "sha1" and replayed.events == 21
    for i in REPLAYED:
        assert replayed.pcrs["sha1"][i] == pcrs[i], i
    assert replayed.pcrs["sha1"][0].hex() == "51c323de0c0c694f4601cdd02beb58ff13629f74"


def test_one_changed_event_breaks_the_chain() -> None:
    doc = _doc()
    raw = bytearray(base64.b64decode(doc["Log"]["Raw"]))
    log = read_eventlog(io.BytesIO(bytes(raw)), name="windows")
    target = next(e for e in log.events if e.pcr == 7 and e.type_name != "EV_NO_ACTION")
    # the event's SHA-1 digest sits right after its pcr and type fields in the legacy format
    raw[target.offset + 8] ^= 0x01
    broken = replay(read_eventlog(io.BytesIO(bytes(raw)), name="windows").events)
    assert broken.pcrs["sha1"][7] != _pcrs(doc)[7]
