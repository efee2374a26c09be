"""The evidence export (tmb/ingest/export.py) from a real ingest (swtpm quotes, SQLite file) to a bundle
that ``audit_bundle`` re-checks offline; one byte edited in each part fails the audit naming the part."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import struct
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from swtpm import SwtpmFactory
from test_probe_support import ENGINE_EXE, NODE, NodeEnv, make_node

from probes.chain import Chain
from tmb.attest.evidence import audit_bundle, load_bundle
from tmb.attest.imakeys import spki_key_id
from tmb.attest.imasig import file_id_digest
from tmb.attest.policy import policy_files
from tmb.errors import InputError, Severity
from tmb.ingest.export import ExportError, RequestContext, export_window
from tmb.ingest.service import Ingest
from tmb.ingest.wire import TelemetryBatch, bindings_bytes
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.signing import Signer, load_or_create_key

T0 = time.time_ns() - 10**9 * 600


def payload(k: int) -> bytes:
    t = T0 + 10**9 * k
    return SampleBatch.from_columns(
        [t, t + 500_000_000], ["GPU-x"], source="synthetic", power_w=[100.0 + k, 101.0]
    ).encode()


@pytest.fixture
def node(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Any:
    env = make_node(tmp_path, swtpm_factory)
    yield env
    env.close()


def policy_toml(doc: dict[str, Any]) -> str:
    """The test node's policy document as TOML (docs/policy.md)."""
    lines = [f"version = {doc['version']}", "[allow]"]
    lines += [f"{json.dumps(path)} = {json.dumps(d)}" for path, d in doc["allow"].items()]
    lines += ["[require]", f"paths = {json.dumps(doc['require']['paths'])}"]
    for rule in doc["verity"]:
        lines.append("[[verity]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def signer_of(tmp: Path) -> Signer:
    return load_or_create_key(tmp / "verdict.key")


def attested(node: NodeEnv, ingest: Ingest, chain: Chain, first: int, last: int) -> list[TelemetryBatch]:
    bs = [chain.seal(payload(k)) for k in range(first, last + 1)]
    assert ingest.add_batches(NODE, {"batches": [b.to_wire() for b in bs]}).accepted
    assert ingest.add_ima(NODE, node.ima_doc(ingest.store.node(NODE).ima_end)).accepted
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    out = ingest.add_quote(NODE, node.quote_doc(nonce, bs[-1].head))
    assert out.accepted and out.data["ok"], out.findings
    return bs


def export(node: NodeEnv, ingest: Ingest, signer: Signer, dest: Path, t0: int, t1: int) -> Path:
    def sign(message: bytes) -> tuple[bytes, bytes]:
        return signer.public.raw, signer.sign_bytes(message)

    context = RequestContext(policy_toml=policy_toml(node.policy_doc), claimed="m/bf16/H100")
    return export_window(
        ingest.store, dest, NODE, t0, t1, sign=sign, nonce_ttl_s=ingest.nonce_ttl_s, context=context
    )


def errors(bundle: Path, signer: Signer) -> list[str]:
    result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    return [f.id for f in result.report.errors]


def test_export_audits_offline_and_each_edit_is_named(node: NodeEnv, tmp_path: Path) -> None:
    ingest = node.ingest()
    chain = Chain(NODE)
    assert ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]}).accepted
    attested(node, ingest, chain, 1, 3)
    node.measure("/usr/bin/tmb-probe", b"tmb-probe binary v1")  # the log grows between quotes
    attested(node, ingest, chain, 4, 6)
    signer = signer_of(tmp_path)
    t0, t1 = T0 + 10**9 * 2, T0 + 10**9 * 5 + 1  # batches 2..5: both quotes attest the window
    bundle = export(node, ingest, signer, tmp_path / "bundle", t0, t1)

    result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    assert result.ok, [(f.id, f.context) for f in result.report.errors]
    assert [q.ok for q in result.quotes] == [True, True]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(manifest["ima_segments"]) == 2 and manifest["window"] == [t0, t1]
    b = load_bundle(bundle)
    assert b.telemetry is not None and len(SampleBatch.decode(b.telemetry.read_bytes())) == 7
    nonces = json.loads((bundle / "nonces.json").read_text())
    assert [e["quote"] for e in nonces["entries"]] == [q["sha256"] for q in manifest["quotes"]]
    # Unpinned: a warning says the nonce log's key was not checked against the daemon's.
    unpinned = audit_bundle(bundle)
    assert unpinned.ok and "nonces.key_unpinned" in [f.id for f in unpinned.report]
    other = load_or_create_key(tmp_path / "other.key")
    assert "nonces.key_not_pinned" in errors(bundle, other)

    def edited(name: str, rel: str, at: int = -20, fix_digest: bool = True) -> list[str]:
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        data = bytearray((copy / rel).read_bytes())
        if chr(data[at]) in "0123456789abcdef":  # text stays hex (a flip to '`' or 'g' is unparsable)
            data[at] = ord("1") if data[at] == ord("0") else ord("0")
        else:
            data[at] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        if fix_digest:  # a forger rewrites the manifest's digests too: the cryptographic checks remain
            m = json.loads((copy / "manifest.json").read_text())
            m["sha256"].pop(rel, None)
            (copy / "manifest.json").write_text(json.dumps(m))
        return errors(copy, signer)

    assert "quote.signature_invalid" in edited("q", "quotes/1.attest", at=-3)
    seg = manifest["ima_segments"][1]["file"]
    assert "ima.segment_mismatch" in edited("ima", seg, at=30)
    assert "nonces.signature_invalid" in edited("n", "nonces.json", at=-40)
    chain_errors = edited("t", "telemetry/batches.jsonl", at=-90)
    assert "chain.digest_mismatch" in chain_errors, chain_errors
    assert "bundle.file_digest_mismatch" in edited("p", "policy.toml", fix_digest=False)


def test_forged_batch_with_recomputed_digests_breaks_the_quote(node: NodeEnv, tmp_path: Path) -> None:
    """A forger who rewrites a batch and recomputes its digest changes the quoted head: the head is no
    longer the one the TPM signed over (qualifying data), nor a batch of the bundle."""
    ingest = node.ingest()
    chain = Chain(NODE)
    ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]})
    bs = attested(node, ingest, chain, 1, 2)
    signer = signer_of(tmp_path)
    bundle = export(node, ingest, signer, tmp_path / "b", T0, T0 + 10**9 * 3)
    forged = Chain(NODE, segment=chain.segment, previous_head=bs[0].digest)
    forged._next_seq = 2
    fake = forged.seal(payload(7))
    lines = (bundle / "telemetry/batches.jsonl").read_text().splitlines()
    lines[-1] = json.dumps(fake.to_wire(), sort_keys=True)
    (bundle / "telemetry/batches.jsonl").write_text("\n".join(lines) + "\n")
    found = errors(bundle, signer)
    assert "chain.head_missing" in found, found


def test_export_refuses_bad_requests(node: NodeEnv, tmp_path: Path) -> None:
    ingest = node.ingest()
    signer = signer_of(tmp_path)
    with pytest.raises(ExportError):
        export_window(
            ingest.store,
            tmp_path / "x",
            "no-such-node",
            1,
            2,
            sign=lambda m: (signer.public.raw, signer.sign_bytes(m)),
            nonce_ttl_s=120,
        )
    with pytest.raises(InputError):  # more than a week
        export(node, ingest, signer, tmp_path / "y", 0, 8 * 24 * 3600 * 10**9)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "keep").write_text("x")
    with pytest.raises(InputError):  # never writes into a directory that holds something
        export(node, ingest, signer, tmp_path / "z", T0, T0 + 1)
    assert (tmp_path / "z" / "keep").read_text() == "x"


def test_the_policy_each_quote_was_checked_against_is_exported(node: NodeEnv, tmp_path: Path) -> None:
    """The daemon records the policy and commitments in force (keep_policy, once per change); each quote
    names the policy it was checked against, and a window's bundle carries the one of its last quote,
    whatever the caller passes."""
    ingest = node.ingest()
    v1 = policy_toml(node.policy_doc)
    v2 = v1 + "# edited after the first quote\n"
    ref1 = ingest.keep_policy(v1.encode(), {"m.commitment.json": b'{"v": 1}'})
    assert ingest.keep_policy(v1.encode(), {"m.commitment.json": b'{"v": 1}'}) == ref1
    assert len(ingest.store.records("", "policy")) == 1  # unchanged: not recorded again
    chain = Chain(NODE)
    ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]})
    attested(node, ingest, chain, 1, 2)
    ingest.keep_policy(v2.encode(), {"m.commitment.json": b'{"v": 2}'})
    attested(node, ingest, chain, 3, 4)
    assert len(ingest.store.records("", "policy")) == 2
    signer = signer_of(tmp_path)
    early = export(node, ingest, signer, tmp_path / "early", T0, T0 + 10**9 * 2)
    late = export(node, ingest, signer, tmp_path / "late", T0 + 10**9 * 3, T0 + 10**9 * 5)
    assert (early / "policy.toml").read_text() == v1
    assert (early / "m.commitment.json").read_bytes() == b'{"v": 1}'
    assert (late / "policy.toml").read_text() == v2
    assert (late / "m.commitment.json").read_bytes() == b'{"v": 2}'
    assert audit_bundle(early, daemon_keys=[signer.public.raw]).quotes[0].ok


def _ima_signer(tmp: Path, name: str) -> tuple[rsa.RSAPrivateKey, Path]:
    """An IMA signing key and its self-signed certificate (PEM, SubjectKeyIdentifier from the key)."""
    private = rsa.generate_private_key(65537, 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tmb test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return private, path


def _sigv3(private: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """A sigv3 IMA signature (security.ima) over a SHA-256 file digest, as the kernel checks it."""
    body = private.sign(
        file_id_digest(0x03, "sha256", digest), padding.PKCS1v15(), Prehashed(hashes.SHA256())
    )
    key_id = spki_key_id(private.public_key())[-4:]
    return struct.pack(">BBBIH", 0x03, 3, 4, int.from_bytes(key_id, "big"), len(body)) + body


def test_a_policy_with_a_keyring_is_audited_offline_with_its_files(node: NodeEnv, tmp_path: Path) -> None:
    """The daemon keeps the files its policy references (here a [keyrings] ima certificate) with the policy
    in the trail; the bundle carries them beside policy.toml with the references rewritten, and the offline
    audit checks the signed file's IMA signature with that keyring, and only that one."""
    private, cert = _ima_signer(tmp_path, "vendor")
    _, rogue = _ima_signer(tmp_path, "rogue")
    conf = tmp_path / "etc"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "vendor.pem").write_bytes(cert.read_bytes())
    content = b"#!/bin/sh\necho signed tool\n"
    digest = hashlib.sha256(content).digest()
    node.policy_doc["allow"]["/opt/signed/tool"] = ["sha256:" + digest.hex()]  # the ingest's policy too
    text = (
        policy_toml(node.policy_doc)
        + '[keyrings]\nima = ["keys/vendor.pem"]\n[[require_signature]]\nprefix = "/opt/signed/"\n'
    )
    (conf / "policy.toml").write_text(text)
    files = policy_files(conf / "policy.toml")
    assert files == {"keys/vendor.pem": cert.read_bytes()}

    built = node.builder.add(
        "ima-sig", "/opt/signed/tool", digest=digest, alg="sha256", sig=_sigv3(private, digest)
    )
    node.tpm.pcr_extend(10, {b: built.extends[b] for b in ("sha1", "sha256")})
    ingest = node.ingest()
    ingest.keep_policy(text.encode(), {}, files)
    assert ingest.keep_policy(text.encode(), {}, files) == hashlib.sha256(text.encode()).hexdigest()
    assert len(ingest.store.records("", "policy")) == 1
    chain = Chain(NODE)
    ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]})
    attested(node, ingest, chain, 1, 2)
    signer = signer_of(tmp_path)
    bundle = export(node, ingest, signer, tmp_path / "bundle", T0, T0 + 10**9 * 3)

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["policy_files"] == ["policy-files/0-vendor.pem"]
    assert (bundle / "policy-files/0-vendor.pem").read_bytes() == cert.read_bytes()
    assert manifest["policy_recorded"]["files"] == {"keys/vendor.pem": "policy-files/0-vendor.pem"}
    assert (bundle / "policy.recorded.toml").read_text() == text
    assert tomllib.loads((bundle / "policy.toml").read_text())["keyrings"]["ima"] == [
        "policy-files/0-vendor.pem"
    ]
    result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    assert result.ok, [(f.id, f.context) for f in result.report.errors]
    assert not [f for f in result.report if f.id.startswith("imasig.")]

    # The keyring swapped for another key (and the manifest's digest fixed): the signature is unknown.
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    (swapped / "policy-files/0-vendor.pem").write_bytes(rogue.read_bytes())
    m = json.loads((swapped / "manifest.json").read_text())
    del m["sha256"]["policy-files/0-vendor.pem"]
    (swapped / "manifest.json").write_text(json.dumps(m))
    assert "imasig.unknown_key" in errors(swapped, signer)

    # A bundle's policy naming a file outside the bundle is refused, never read.
    outside = tmp_path / "outside"
    shutil.copytree(bundle, outside)
    (outside / "policy.toml").write_text(text.replace("keys/vendor.pem", str(conf / "keys" / "vendor.pem")))
    with pytest.raises(InputError, match="outside the bundle"):
        audit_bundle(outside, daemon_keys=[signer.public.raw])


def test_the_callers_policy_brings_its_files_when_the_trail_names_none(node: NodeEnv, tmp_path: Path) -> None:
    """A quote checked before the daemon recorded its policy: the bundle takes the caller's policy (the
    daemon's configured one) and the files it references, renamed as the trail's would be."""
    _, cert = _ima_signer(tmp_path, "vendor")
    text = policy_toml(node.policy_doc) + '[keyrings]\nima = ["vendor.pem"]\n'
    ingest = node.ingest()
    chain = Chain(NODE)
    ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]})
    attested(node, ingest, chain, 1, 2)
    signer = signer_of(tmp_path)
    context = RequestContext(policy_toml=text, policy_files={"vendor.pem": cert.read_bytes()})
    bundle = export_window(
        ingest.store,
        tmp_path / "bundle",
        NODE,
        T0,
        T0 + 10**9 * 3,
        sign=lambda m: (signer.public.raw, signer.sign_bytes(m)),
        nonce_ttl_s=ingest.nonce_ttl_s,
        context=context,
    )
    assert (bundle / "policy-files/0-vendor.pem").read_bytes() == cert.read_bytes()
    result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    assert result.ok, [(f.id, f.context) for f in result.report.errors]


def test_quoted_bindings_are_exported_and_an_edited_file_is_named(node: NodeEnv, tmp_path: Path) -> None:
    """The process bindings document a quote covers is in the bundle as the daemon kept it
    (``bindings/<sha256>.json``); the audit checks it against the digest the quote's qualifying data
    covers, and names an edited file even when the forger rewrote the manifest's digests."""
    ingest = node.ingest()
    chain = Chain(NODE)
    assert ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]}).accepted
    doc = {
        "t_ns": 1,
        "processes": [
            {
                "pid": 42,
                "exe": ENGINE_EXE,
                "maps": [{"path": "/models/m/model.safetensors", "dev": "253:0"}],
                "error": None,
            }
        ],
    }
    raw = bindings_bytes(doc)
    digest = hashlib.sha256(raw).digest()
    assert ingest.add_bindings(NODE, doc).data["sha256"] == digest.hex()
    bs = [chain.seal(payload(k)) for k in range(1, 4)]
    assert ingest.add_batches(NODE, {"batches": [b.to_wire() for b in bs]}).accepted
    assert ingest.add_ima(NODE, node.ima_doc()).accepted
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    out = ingest.add_quote(NODE, node.quote_doc(nonce, bs[-1].head, digest))
    assert out.accepted and out.data["ok"], out.findings
    signer = signer_of(tmp_path)
    bundle = export(node, ingest, signer, tmp_path / "bundle", T0, T0 + 10**9 * 4)
    rel = f"bindings/{digest.hex()}.json"
    assert (bundle / rel).read_bytes() == raw
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quotes"][0]["bindings"] == {"sha256": digest.hex(), "file": rel}
    result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    assert result.ok, [(f.id, f.context) for f in result.report.errors]
    assert result.bindings == [{"quote": "0", "file": rel, "processes": [{"pid": 42, "exe": ENGINE_EXE}]}]

    copy = tmp_path / "edited"
    shutil.copytree(bundle, copy)
    edited = json.loads(raw)
    edited["processes"][0]["maps"][0]["dev"] = "7:1"  # hide that the model was read past dm-verity
    (copy / rel).write_bytes(bindings_bytes(edited))
    m = json.loads((copy / "manifest.json").read_text())
    m["sha256"].pop(rel)  # the forger rewrites the manifest's digests too
    (copy / "manifest.json").write_text(json.dumps(m))
    found = audit_bundle(copy, daemon_keys=[signer.public.raw]).report.errors
    named = [f for f in found if f.id == "bindings.digest_mismatch"]
    assert named and named[0].context["file"] == rel, [(f.id, f.context) for f in found]
    # naming the edited document's digest in the manifest instead breaks the quote's qualifying data
    m["quotes"][0]["bindings"]["sha256"] = hashlib.sha256((copy / rel).read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(m))
    found_ids = errors(copy, signer)
    assert "quote.nonce_mismatch" in found_ids and "bindings.digest_mismatch" not in found_ids, found_ids


@pytest.mark.parametrize(
    ("exe", "dev", "want"),
    [
        (ENGINE_EXE, "253:0", []),  # the model read through dm-verity: nothing to say
        (ENGINE_EXE, "7:1", ["binding.model_bypasses_verity"]),  # from the verity device's data device
        (ENGINE_EXE, "8:1", ["binding.model_not_from_verity"]),  # from another device
        ("/usr/bin/evil", "253:0", ["binding.exe_not_allowlisted"]),  # not allowed by the policy
    ],
)
def test_the_audit_reapplies_the_bindings_rules_and_finds_what_the_daemon_found(
    node: NodeEnv, tmp_path: Path, exe: str, dev: str, want: list[str]
) -> None:
    """The bindings rules are re-applied offline, against what the quote's IMA replay established in the
    bundle: the audit finds exactly the daemon's binding findings, so a verdict left unattested by them is
    re-derived as such (and a daemon that skipped them is caught)."""
    ingest = node.ingest()
    chain = Chain(NODE)
    assert ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]}).accepted
    maps = [{"path": "/models/m/model.safetensors", "dev": dev}, {"path": "/usr/lib/x.so", "dev": "8:1"}]
    doc = {"t_ns": 1, "processes": [{"pid": 42, "exe": exe, "maps": maps, "error": None}]}
    digest = hashlib.sha256(bindings_bytes(doc)).digest()
    assert ingest.add_bindings(NODE, doc).accepted
    bs = [chain.seal(payload(k)) for k in range(1, 4)]
    assert ingest.add_batches(NODE, {"batches": [b.to_wire() for b in bs]}).accepted
    assert ingest.add_ima(NODE, node.ima_doc()).accepted
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    out = ingest.add_quote(NODE, node.quote_doc(nonce, bs[-1].head, digest))
    assert out.accepted
    daemon = sorted(
        f.id for f in out.findings if f.id.startswith("binding.") and f.severity is Severity.ERROR
    )
    assert daemon == want and out.data["ok"] is (not want), out.findings
    signer = signer_of(tmp_path)
    bundle = export(node, ingest, signer, tmp_path / "bundle", T0, T0 + 10**9 * 4)
    result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    found = [f for f in result.report.errors if f.id.startswith("binding.")]
    assert sorted(f.id for f in found) == daemon, [(f.id, f.context) for f in result.report.errors]
    assert all(f.context["quote"] == "0" for f in found)
    assert result.ok is (not want)
