"""Verdict canonical encoding, Ed25519 sign/verify, tamper detection, key files, verify-verdict CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tmb.cli import main
from tmb.errors import InputError
from tmb.verdict.model import Decision, Reason, Verdict, Window, canonical_bytes
from tmb.verdict.signing import KeyFileError, load_or_create_key, load_public_keys, verify_verdict


def verdict(decision: Decision = Decision.VERIFIED, **over: object) -> Verdict:
    base: dict[str, object] = dict(
        request_id="0123456789abcdef0123456789abcdef",
        correlation_id="client-7",
        worker="w1",
        node="node-1",
        gpus=("GPU-1",),
        claimed_model="llama",
        requested_model="llama",
        window=Window(10, 20, True),
        attestation={"pcr10": "ab" * 32, "policy_ok": True, "quote_time_ns": 15},
        fingerprint={"p_value": "0.31"},
        decision=decision,
        reasons=(Reason("fingerprint.ok", "consistent with profile ünï"),),
        telemetry_source="nvml",
        issued_ns=1_700_000_000_000_000_000,
    )
    base.update(over)
    return Verdict(**base)  # type: ignore[arg-type]


def test_canonical_encoding_is_sorted_compact_utf8_and_integers_only() -> None:
    assert (
        canonical_bytes({"b": 1, "a": {"d": [True, None], "c": "é"}})
        == '{"a":{"c":"é","d":[true,null]},"b":1}'.encode()
    )
    with pytest.raises(ValueError, match="floats"):
        canonical_bytes({"p": 0.5})
    v = verdict()
    assert v.signing_bytes() == canonical_bytes(json.loads(v.signing_bytes()))
    assert (
        b"signature" not in v.signing_bytes()
        and b", " not in v.signing_bytes()
        and b'": ' not in v.signing_bytes()
    )
    assert "ünï".encode() in v.signing_bytes()  # UTF-8, not \u escapes


def test_sign_verify_round_trip_and_independent_check(tmp_path: Path) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    signed = signer.sign(verdict())
    assert signed.key_id == hashlib.sha256(signer.public.raw).hexdigest()
    doc = json.loads(signed.encode())
    assert verify_verdict(doc, [signer.public]).ok
    # What another language does: drop "signature", canonicalise, Ed25519-verify with the raw key.
    message = json.dumps(
        {k: v for k, v in doc.items() if k != "signature"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    Ed25519PublicKey.from_public_bytes(signer.public.raw).verify(bytes.fromhex(doc["signature"]), message)
    assert Verdict.from_dict(doc) == signed


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("decision", "model_mismatch"),
        ("issued_ns", 1),
        ("gpus", ["GPU-2"]),
        ("window", {"t0_ns": 10, "t1_ns": 21, "widened": True}),
        ("correlation_id", None),
        ("extra", "added"),
    ],
)
def test_any_tampering_breaks_the_signature(tmp_path: Path, path: str, value: object) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    doc = json.loads(signer.sign(verdict()).encode())
    doc[path] = value
    assert verify_verdict(doc, [signer.public]).ids() == ["verdict.signature_invalid"]


def test_wrong_key_and_malformed_documents(tmp_path: Path) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    other = load_or_create_key(tmp_path / "other.pem")
    doc = json.loads(signer.sign(verdict()).encode())
    assert verify_verdict(doc, [other.public]).ids() == ["verdict.unknown_key"]
    forged = json.loads(other.sign(verdict()).encode()) | {"key_id": signer.key_id}
    assert verify_verdict(forged, [signer.public]).ids() == ["verdict.signature_invalid"]
    assert verify_verdict({"format": "nope"}, [signer.public]).ids() == ["verdict.malformed"]
    assert verify_verdict(doc | {"signature": "zz"}, [signer.public]).ids() == ["verdict.malformed"]


def test_key_created_0600_reused_and_loose_permissions_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    first = load_or_create_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(path).key_id == first.key_id
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="group or others") as info:
        load_or_create_key(path)
    assert f"chmod 600 {path}" in info.value.diagnostics()
    os.chmod(path, 0o600)
    path.write_bytes(b"garbage")
    with pytest.raises(KeyFileError, match="PKCS#8"):
        load_or_create_key(path)


def _key_id_of_new_key(path: str) -> str:
    return load_or_create_key(path).key_id


def test_daemons_starting_together_share_one_complete_key(tmp_path: Path) -> None:
    # Two daemons pointed at the same absent key file: each must load a whole key, and the same one
    # (a half-written file read by the second daemon was a real failure).
    from concurrent.futures import ProcessPoolExecutor

    for round_ in range(3):
        path = tmp_path / f"key{round_}.pem"
        with ProcessPoolExecutor(4) as pool:
            ids = list(pool.map(_key_id_of_new_key, [str(path)] * 8))
        assert len(set(ids)) == 1
        assert load_or_create_key(path).key_id == ids[0]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_public_key_formats(tmp_path: Path) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    pub = signer.public.to_dict()
    for data in (pub["pem"].encode(), pub["public_key_hex"].encode(), json.dumps({"keys": [pub]}).encode()):
        assert [k.key_id for k in load_public_keys(data, "x")] == [signer.key_id]
    with pytest.raises(InputError):
        load_public_keys(b"nonsense", "x")


def test_verify_verdict_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    key = tmp_path / "pub.pem"
    key.write_text(signer.public.to_dict()["pem"])
    cases = {
        "ok.json": (signer.sign(verdict()).encode(), 0),
        "batch.json": (signer.sign_batch([verdict(request_id=f"{i:032x}") for i in range(3)])[1].encode(), 0),
        "demo.json": (signer.sign(verdict(Decision.DEMO, telemetry_source="synthetic")).encode(), 0),
        "mismatch.json": (signer.sign(verdict(Decision.MODEL_MISMATCH)).encode(), 1),
        "tampered.json": (signer.sign(verdict()).encode().replace(b'"node-1"', b'"node-2"'), 1),
        "notjson.json": (b"{", 2),
    }
    for name, (data, code) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert main(["verify-verdict", str(tmp_path / name), "--key", str(key)]) == code, name
        out = capsys.readouterr()
        if name == "demo.json":
            assert "synthetic telemetry" in out.out
        assert "Traceback" not in out.err
    assert main(["verify-verdict", str(tmp_path / "missing.json"), "--key", str(key)]) == 2
    assert main(["verify-verdict", str(tmp_path / "ok.json"), "--key", str(tmp_path / "nokey")]) == 2


def test_worked_example_in_docs_verdict_md_is_pinned() -> None:
    """The docs/verdict.md example: seed 00..1f; Ed25519 is deterministic, so the bytes are fixed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tmb.verdict.signing import Signer

    signer = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    v = Verdict(
        "5f1c0b6a9e2d4c8b7a6f5e4d3c2b1a09",
        "client-7",
        "w1",
        "node-1",
        ("GPU-1",),
        "llama-3-8b",
        "llama-3-8b",
        Window(1700000000000000000, 1700000001000000000, True),
        {"pcr10": "00" * 32, "policy_ok": True},
        {"p_value": "0.42", "samples": 40},
        Decision.DEMO,
        (Reason("telemetry.synthetic", "synthetic telemetry (demo)"),),
        "synthetic",
        1700000002000000000,
    )
    signed = signer.sign(v)
    assert signer.public.raw.hex() == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    assert signer.key_id == "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
    assert (
        hashlib.sha256(signed.signing_bytes()).hexdigest()
        == hashlib.sha256(EXAMPLE_MESSAGE.encode()).hexdigest()
    )
    assert signed.signature == (
        "6d6e896f2eb09c8183652e0f0955dfa22449ca0c36462a31e23b51fee01fa64f"
        "5389458abaa70fb003be3a18091b0f5b085d872705db6f7a9a6c4912bf04ca02"
    )
    doc = Path(__file__).parents[2] / "docs" / "verdict.md"
    assert EXAMPLE_MESSAGE in doc.read_text() and signed.signature[:64] in doc.read_text()


EXAMPLE_MESSAGE = (
    '{"attestation":{"pcr10":"0000000000000000000000000000000000000000000000000000000000000000","policy_ok":true},'
    '"attestation_evidence":[],"claimed_model":"llama-3-8b","correlation_id":"client-7","decision":"demo",'
    '"fingerprint":{"p_value":"0.42","samples":40},"format":"tmb-verdict/1","gpus":["GPU-1"],'
    '"issued_ns":1700000002000000000,"key_id":"56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c",'
    '"node":"node-1","reasons":[{"id":"telemetry.synthetic","message":"synthetic telemetry (demo)"}],'
    '"request_id":"5f1c0b6a9e2d4c8b7a6f5e4d3c2b1a09","requested_model":"llama-3-8b","telemetry_source":"synthetic",'
    '"window":{"t0_ns":1700000000000000000,"t1_ns":1700000001000000000,"widened":true},"worker":"w1"}'
)


def _spec_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1, written from the definition (independent of tmb's tree builder)."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _spec_mth(leaves[:k]) + _spec_mth(leaves[k:])).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_batch_signature_verifies_each_verdict_and_matches_rfc9162(tmp_path: Path, n: int) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    batch = signer.sign_batch([verdict(request_id=f"{i:032x}") for i in range(n)])
    docs = [json.loads(v.encode()) for v in batch]
    assert all(verify_verdict(d, [signer.public]).ok for d in docs)
    assert all(Verdict.from_dict(d) == v for d, v in zip(docs, batch, strict=True))
    if n == 1:
        assert "signature_batch" not in docs[0]  # a batch of one is an ordinary single signature
        return
    assert len({d["signature"] for d in docs}) == 1  # one Ed25519 signature for the whole batch
    # What another language does: leaf = SHA-256(0x00 || canonical bytes without signature and batch),
    # root = RFC 9162 Merkle tree hash, Ed25519 over "tmb-verdict-batch/1:<root hex>:<size>".
    leaves = [
        hashlib.sha256(
            b"\x00"
            + json.dumps(
                {k: v for k, v in d.items() if k not in ("signature", "signature_batch")},
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
        ).digest()
        for d in docs
    ]
    root = _spec_mth(leaves)
    message = f"tmb-verdict-batch/1:{root.hex()}:{n}".encode()
    Ed25519PublicKey.from_public_bytes(signer.public.raw).verify(bytes.fromhex(docs[0]["signature"]), message)
    assert [d["signature_batch"]["index"] for d in docs] == list(range(n))
    assert all(d["signature_batch"]["size"] == n for d in docs)


def test_batch_proofs_resist_tampering_and_transplanting(tmp_path: Path) -> None:
    signer = load_or_create_key(tmp_path / "k.pem")
    first = [
        json.loads(v.encode()) for v in signer.sign_batch([verdict(request_id=f"{i:032x}") for i in range(5)])
    ]
    second = [
        json.loads(v.encode())
        for v in signer.sign_batch([verdict(request_id=f"{i:032x}") for i in range(5, 9)])
    ]
    keys = [signer.public]
    doc = first[2]
    assert verify_verdict(doc | {"decision": "model_mismatch"}, keys).ids() == ["verdict.signature_invalid"]
    for change in ({"index": 3}, {"size": 6}, {"path": list(reversed(doc["signature_batch"]["path"]))}):
        assert not verify_verdict(doc | {"signature_batch": doc["signature_batch"] | change}, keys).ok, change
    assert verify_verdict(doc | {"signature_batch": doc["signature_batch"] | {"index": 9}}, keys).ids() == [
        "verdict.malformed"
    ]
    # another batch's signature and proof on this verdict
    moved = doc | {"signature": second[1]["signature"], "signature_batch": second[1]["signature_batch"]}
    assert verify_verdict(moved, keys).ids() == ["verdict.signature_invalid"]
    # dropping the proof turns it into a single-signature claim the signature does not make
    single = {k: v for k, v in doc.items() if k != "signature_batch"}
    assert verify_verdict(single, keys).ids() == ["verdict.signature_invalid"]
    assert verify_verdict(doc | {"signature_batch": {"index": "0", "size": 5, "path": []}}, keys).ids() == [
        "verdict.malformed"
    ]


def test_batch_signer_shares_one_signature_per_loop_iteration(tmp_path: Path) -> None:
    import asyncio

    from tmb.verdict.signing import BatchSigner

    signer = load_or_create_key(tmp_path / "k.pem")

    async def run() -> tuple[list[Verdict], Verdict]:
        batcher = BatchSigner(signer, max_batch=4)
        together = await asyncio.gather(*(batcher.sign(verdict(request_id=f"{i:032x}")) for i in range(6)))
        alone = await batcher.sign(verdict(request_id="f" * 32))
        return list(together), alone

    together, alone = asyncio.run(run())
    assert [v.request_id for v in together] == [f"{i:032x}" for i in range(6)]
    assert [v.batch.size if v.batch else 1 for v in together] == [4, 4, 4, 4, 2, 2]  # max_batch per signature
    assert len({v.signature for v in together}) == 2
    assert alone.batch is None
    assert all(verify_verdict(json.loads(v.encode()), [signer.public]).ok for v in [*together, alone])


_nasty = st.lists(
    st.sampled_from(['"', "\\", ",", ":", "{", "}", ',"telemetry_source":', "ü", "\n", "a"]), max_size=8
).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    worker=_nasty,
    correlation=st.none() | _nasty,
    attestation=st.dictionaries(_nasty | st.just("telemetry_source"), _nasty | st.integers(), max_size=4),
    source=_nasty,
    size=st.integers(1, 6),
)
def test_signed_encoding_splice_equals_canonical_encoding(
    worker: str, correlation: str | None, attestation: dict[str, object], source: str, size: int
) -> None:
    """The signer splices signature (and signature_batch) into the signing bytes instead of encoding the
    document again: the result must be exactly canonical_bytes(to_dict()), whatever the strings hold."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tmb.verdict.signing import Signer

    signer = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    base = verdict(
        worker=worker, correlation_id=correlation, attestation=attestation, telemetry_source=source
    )
    from tmb.verdict.merkle import leaf_hash
    from tmb.verdict.tlog import verdict_leaf

    for signed in signer.sign_batch([base] * size):
        assert signed.encode() == canonical_bytes(signed.to_dict())
        assert verify_verdict(json.loads(signed.encode()), [signer.public]).ok
        # the log leaf the signer keeps is the leaf of the signed bytes
        assert verdict_leaf(signed) == leaf_hash(canonical_bytes(signed.to_dict(signed=False)))


def test_evolve_is_replace_without_the_encoding_cache(tmp_path: Path) -> None:
    import dataclasses

    signed = load_or_create_key(tmp_path / "k.pem").sign(verdict())
    for changes in ({"decision": Decision.DEMO}, {"request_id": "f" * 32, "gpus": ("G",)}, {}):
        evolved = signed.evolve(**changes)
        assert evolved == dataclasses.replace(signed, **changes) and evolved is not signed
        assert evolved.encode() == canonical_bytes(evolved.to_dict())  # recomputed, not the cached bytes
    with pytest.raises(TypeError, match="no field"):
        signed.evolve(decisoin=Decision.DEMO)
