"""The node's EK in the evidence trail and the bundle: a node enrolled with a real swtpm's certified EK
(``swtpm_setup --create-ek-cert``) has its EK public area, its EK certificates and the daemon's decision
recorded (append-only: a re-keying adds, the old stays); the export carries them (``ek/``,
``identity.json``, signed) and ``tmb audit`` checks them offline: against the quotes' AK, the recorded
ek_sha256 and, with ``--ek-roots``, the manufacturer roots; an edited byte fails the audit naming the file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from identity_support import Ca, swtpm_store
from swtpm import SwtpmFactory
from test_evidence_export import T0, attested, policy_toml, signer_of
from test_probe_support import NODE, NodeEnv, make_node

from probes.chain import Chain
from probes.enrol import EnrolError, enrol
from probes.tpm import AK_HANDLE
from tmb.attest.ekcert import TrustStore, ek_pin
from tmb.attest.evidence import AuditResult, audit_bundle
from tmb.cli import main
from tmb.ingest.export import export_window
from tmb.ingest.identity import IdentityPolicy
from tmb.ingest.service import Ingest
from tmb.ingest.store_pg import PgIngestStore
from tmb.verdict.signing import Signer

OTHER_HANDLE = 0x81010003


class Enrolled:
    def __init__(self, node: NodeEnv, ingest: Ingest, roots: Path, trust: TrustStore) -> None:
        self.node, self.ingest, self.roots, self.trust = node, ingest, roots, trust

    def enrol(self, handle: int = AK_HANDLE) -> dict[str, Any]:
        async def post(route: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
            r = self.ingest.enroll(NODE, doc) if route == "enroll" else self.ingest.activate(NODE, doc)
            if r.accepted:
                return 200, dict(r.data)
            return 409, {"error": {"type": r.refusal.id if r.refusal else "?"}}

        async def tpm(fn: Any) -> Any:
            return fn(self.node.tpm)

        return asyncio.run(enrol(NODE, handle, post, tpm))[1]


@pytest.fixture(params=["sqlite", "postgres"])
def enrolled(request: pytest.FixtureRequest, tmp_path: Path, swtpm_factory: SwtpmFactory) -> Any:
    """A node with a certified EK and an ingest trusting its manufacturer, on a SQLite file or a real
    PostgreSQL database (the trail's records and blobs on both backends)."""
    node = make_node(tmp_path, lambda: swtpm_factory(ek_cert=True))
    roots = tmp_path / "roots"
    trust = swtpm_store(node.swtpm.state_dir, roots)
    store: Any = tmp_path / "ingest.db"
    if request.param == "postgres":
        store = PgIngestStore(request.getfixturevalue("pg_url"))
    ingest = Ingest(store, policy=node.policy, identity=IdentityPolicy(trust=trust))
    ingest.keep_policy(policy_toml(node.policy_doc).encode(), {})  # as the daemon does at start
    env = Enrolled(node, ingest, roots, trust)
    yield env
    ingest.close()
    node.close()


def bundle_of(env: Enrolled, signer: Signer, dest: Path) -> Path:
    chain = Chain(NODE)
    env.ingest.add_batches(NODE, {"batches": [chain.genesis("synthetic").to_wire()]})
    attested(env.node, env.ingest, chain, 1, 2)
    return export_window(
        env.ingest.store,
        dest,
        NODE,
        T0,
        T0 + 10**9 * 3,
        sign=lambda m: (signer.public.raw, signer.sign_bytes(m)),
        nonce_ttl_s=env.ingest.nonce_ttl_s,
        context=None,
    )


def ids(result: AuditResult) -> list[str]:
    return [f.id for f in result.report]


def edited(src: Path, dest: Path, rel: str, at: int) -> Path:
    """A copy of the bundle with one byte of ``rel`` flipped and the manifest's digest of it dropped (a
    forger rewrites the manifest too: the signed identity record remains)."""
    shutil.copytree(src, dest)
    data = bytearray((dest / rel).read_bytes())
    data[at] ^= 0x01
    (dest / rel).write_bytes(bytes(data))
    m = json.loads((dest / "manifest.json").read_text())
    m["sha256"].pop(rel, None)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_enrolment_records_the_ek_and_the_bundle_audits_it(
    enrolled: Enrolled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = enrolled
    answer = env.enrol()
    assert answer["ek_trust"] == "certified"
    ek_public = env.node.tpm.ek_public("rsa")
    certs = list(env.node.tpm.ek_certificates().values())
    assert certs
    [record] = env.ingest.store.records(NODE, "ek")
    assert env.ingest.store.blob(record.digest) == ek_public  # as received
    assert [env.ingest.store.blob(bytes.fromhex(d)) for d in record.meta["certificates"]] == certs
    assert record.meta["ek_trust"] == "certified" and record.meta["ek_sha256"] == ek_pin(ek_public)
    assert record.meta["pin"] is None and record.meta["chain"] and record.meta["checked_ns"] > 0
    [ak] = env.ingest.store.records(NODE, "ak")  # the enrolled AK, in the trail
    assert ak.meta == {} and env.ingest.store.blob(ak.digest) == env.node.ak.tpm2b_public

    signer = signer_of(tmp_path)
    bundle = bundle_of(env, signer, tmp_path / "bundle")
    assert (bundle / "ek" / "public.bin").read_bytes() == ek_public
    assert [(bundle / "ek" / "certs" / f"{i}.der").read_bytes() for i in range(len(certs))] == certs
    identity = json.loads((bundle / "identity.json").read_text())
    assert identity["ek_trust"] == "certified" and identity["ek_sha256"] == ek_pin(ek_public)
    assert json.loads((bundle / "manifest.json").read_text())["identity"] == "identity.json"

    # Without roots the daemon's decision is reported, never passed silently.
    plain = audit_bundle(bundle, daemon_keys=[signer.public.raw])
    assert plain.ok, [(f.id, f.context) for f in plain.report.errors]
    [note] = [f for f in plain.report if f.id == "audit.ek_not_rechecked"]
    assert note.context["ek_trust"] == "certified" and note.context["ek_sha256"] == ek_pin(ek_public)
    # With the manufacturer's roots the certificates are verified again.
    rechecked = audit_bundle(bundle, daemon_keys=[signer.public.raw], ek_roots=env.trust)
    assert rechecked.ok, [(f.id, f.context) for f in rechecked.report.errors]
    assert "audit.ek_not_rechecked" not in ids(rechecked)
    assert any(f.id == "identity.ek_tpm_info" and f.context.get("recheck") for f in rechecked.report)
    # Another manufacturer's roots do not certify it.
    other = tmp_path / "other-roots"
    other.mkdir()
    (other / "root.pem").write_bytes(Ca("another TPM vendor").pem)
    foreign = audit_bundle(bundle, daemon_keys=[signer.public.raw], ek_roots=TrustStore.from_directory(other))
    assert "audit.ek_recheck_failed" in [f.id for f in foreign.report.errors]
    assert "identity.ek_untrusted_chain" in [f.id for f in foreign.report.errors]
    # The CLI's --ek-roots.
    for roots, want in ((env.roots, False), (other, True)):
        main(["audit", str(bundle), "--ek-roots", str(roots), "--json"])
        found = [f["id"] for f in json.loads(capsys.readouterr().out)["findings"]]
        assert ("audit.ek_recheck_failed" in found) is want and "audit.ek_not_rechecked" not in found


def test_one_edited_byte_of_the_ek_material_fails_the_audit_naming_it(
    enrolled: Enrolled, tmp_path: Path
) -> None:
    env = enrolled
    env.enrol()
    signer = signer_of(tmp_path)
    bundle = bundle_of(env, signer, tmp_path / "bundle")
    keys = [signer.public.raw]

    def errors(copy: Path, **kw: Any) -> list[tuple[str, Any]]:
        result = audit_bundle(copy, daemon_keys=keys, **kw)
        assert not result.ok
        return [(f.id, f.context.get("file")) for f in result.report.errors]

    cert = edited(bundle, tmp_path / "cert", "ek/certs/0.der", at=-40)
    assert ("identity.ek_cert_mismatch", "ek/certs/0.der") in errors(cert)
    found = errors(cert, ek_roots=env.trust)
    assert ("identity.ek_cert_mismatch", "ek/certs/0.der") in found
    public = edited(bundle, tmp_path / "public", "ek/public.bin", at=-30)
    assert ("identity.ek_public_mismatch", "ek/public.bin") in errors(public)
    assert ("identity.ek_public_mismatch", "ek/public.bin") in errors(public, ek_roots=env.trust)
    # A forger who also rewrites the recorded digest breaks the daemon's signature over the record.
    forged = tmp_path / "forged"
    shutil.copytree(cert, forged)
    doc = json.loads((forged / "identity.json").read_text())
    doc["certificates"][0]["sha256"] = hashlib.sha256((forged / "ek/certs/0.der").read_bytes()).hexdigest()
    (forged / "identity.json").write_text(json.dumps(doc))
    found = errors(forged, ek_roots=env.trust)
    assert ("identity.signature_invalid", "identity.json") in found
    # Signed by another key than the auditor's daemon key.
    (tmp_path / "x").mkdir()
    other = signer_of(tmp_path / "x")
    assert "identity.key_not_pinned" in [
        f.id for f in audit_bundle(bundle, daemon_keys=[other.public.raw]).report.errors
    ]
    # Another AK in ak.key than the one enrolled with the EK (the quotes fail too).
    with env.node.swtpm.client() as client:
        other_ak = client.create_or_load_ak(OTHER_HANDLE, "rsa").tpm2b_public
    assert other_ak is not None
    swapped = tmp_path / "ak"
    shutil.copytree(bundle, swapped)
    (swapped / "ak.key").write_bytes(other_ak)
    assert ("identity.ak_mismatch", None) in errors(swapped)
    # The record moved into another node's bundle (the manifest says another node).
    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["node"] = "another-node"
    (moved / "manifest.json").write_text(json.dumps(m))
    assert ("identity.node_mismatch", "identity.json") in errors(moved)
    # Hostile records: not JSON; a file name leaving the bundle (never read; the signature fails).
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "identity.json").write_text("[")
    assert ("identity.malformed", "identity.json") in errors(broken)
    (tmp_path / "secret.bin").write_bytes(b"the auditor's own file")
    escape = tmp_path / "escape"
    shutil.copytree(bundle, escape)
    doc = json.loads((escape / "identity.json").read_text())
    doc["public"]["file"] = "../secret.bin"
    (escape / "identity.json").write_text(json.dumps(doc))
    assert ("identity.signature_invalid", "identity.json") in errors(escape)


def test_rekeying_records_the_new_material_and_keeps_the_old(enrolled: Enrolled, tmp_path: Path) -> None:
    env = enrolled
    env.enrol()
    with pytest.raises(EnrolError):  # another AK: refused until an admin approves exactly it
        env.enrol(OTHER_HANDLE)
    assert len(env.ingest.store.records(NODE, "ek")) == 1  # a refused enrolment records nothing
    with env.node.swtpm.client() as client:
        other_ak = client.create_or_load_ak(OTHER_HANDLE, "rsa")
    request = env.ingest.status(NODE)["identity"]["rekey_request"]
    assert env.ingest.approve_rekey(NODE, {k: request[k] for k in ("ek_sha256", "ak_name")}).accepted
    answer = env.enrol(OTHER_HANDLE)
    assert answer["enrolled"] is True
    first, second = env.ingest.store.records(NODE, "ek")
    assert first.meta["rekey"] is False and second.meta["rekey"] is True
    assert first.meta["ak_name"] != second.meta["ak_name"] == answer["ak_name"]
    assert [env.ingest.store.blob(r.digest) for r in env.ingest.store.records(NODE, "ak")] == [
        env.node.ak.tpm2b_public,
        other_ak.tpm2b_public,
    ]
