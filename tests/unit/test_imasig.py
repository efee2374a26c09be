"""IMA file signatures: evmctl-made xattr signatures, openssl-made appended (module) signatures, the
runtime policy's keyrings and [[require_signature]] rules, measured .ima keys, Keylime verification keys,
and the real signatures of Keylime's test vectors (vendored: tests/data/vectors/PROVENANCE.md, B4)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from vectors import VECTORS

from tmb.attest.ima import ImaEntry, iter_log
from tmb.attest.ima_build import Built, LogBuilder, dng
from tmb.attest.imasig import (
    Keyring,
    append_signature,
    file_id_digest,
    load_key_file,
    spki_key_id,
    split_appended_signature,
    verify_digsig,
    verify_modsig,
)
from tmb.attest.policy import PolicyChecker, RuntimePolicy, load_keylime_policy, load_policy, policy_from_dict
from tmb.errors import ConfigError, Report, Severity

KEYLIME_IMA = VECTORS / "keylime" / "ima"
EVMCTL = shutil.which("evmctl")


# ------------------------------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Signer:
    name: str
    key: Path  # PEM private key (what evmctl and openssl take)
    cert: Path  # PEM self-signed certificate with a SubjectKeyIdentifier
    private: Any


def _make_signer(tmp: Path, name: str, private: Any, skid: bytes | None = None) -> Signer:
    key = tmp / f"{name}.key"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tmb test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    ski = (
        x509.SubjectKeyIdentifier(skid)
        if skid is not None
        else x509.SubjectKeyIdentifier.from_public_key(private.public_key())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(ski, critical=False)
        .sign(private, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Signer(name, key, path, private)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Signer]:
    tmp = tmp_path_factory.mktemp("imasig-pki")
    return {
        "rsa": _make_signer(tmp, "rsa", rsa.generate_private_key(65537, 2048)),
        "p256": _make_signer(tmp, "p256", ec.generate_private_key(ec.SECP256R1())),
        "p384": _make_signer(tmp, "p384", ec.generate_private_key(ec.SECP384R1())),
        "rogue": _make_signer(tmp, "rogue", rsa.generate_private_key(65537, 2048)),
        # a SubjectKeyIdentifier that is not the SHA-1 of the key: only the SKID names this key
        "odd_skid": _make_signer(tmp, "odd", ec.generate_private_key(ec.SECP256R1()), skid=b"\x42" * 20),
    }


def evmctl_sign(
    tmp: Path, content: bytes, signer: Signer, alg: str = "sha256", *, keyid_cert: bool = False
) -> bytes:
    """The security.ima value ``evmctl ima_sign`` makes (written to FILE.sig: tmpfs has no
    security.* xattrs for an unprivileged test)."""
    assert EVMCTL is not None, "evmctl missing: apt-get install ima-evm-utils (make deps does)"
    target = tmp / f"file-{hashlib.sha256(content).hexdigest()[:12]}-{signer.name}-{alg}"
    target.write_bytes(content)
    cmd = [EVMCTL, "ima_sign", "--sigfile", "--key", str(signer.key), "-a", alg]
    if keyid_cert:
        cmd += ["--keyid-from-cert", str(signer.cert)]
    subprocess.run([*cmd, str(target)], check=True, capture_output=True)
    return Path(f"{target}.sig").read_bytes()


def openssl_modsig(
    tmp: Path, content: bytes, signer: Signer, *, attrs: bool = False, keyid: bool = False
) -> bytes:
    """The PKCS#7 blob kernel sign-file makes (CMS, detached, binary, no certs, no attributes)."""
    src = tmp / f"mod-{hashlib.sha256(content).hexdigest()[:12]}"
    src.write_bytes(content)
    out = tmp / f"{src.name}-{signer.name}-{attrs}-{keyid}.p7"
    cmd = [
        "openssl",
        "cms",
        "-sign",
        "-binary",
        "-nocerts",
        "-nosmimecap",
        "-outform",
        "DER",
        "-md",
        "sha256",
    ]
    cmd += ["-in", str(src), "-signer", str(signer.cert), "-inkey", str(signer.key), "-out", str(out)]
    if not attrs:
        cmd.append("-noattr")
    if keyid:
        cmd.append("-keyid")
    subprocess.run(cmd, check=True, capture_output=True)
    return out.read_bytes()


def _field(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def modsig_entry(num: int, path: str, signed_file: bytes, pkcs7_blob: bytes, *, sig: bytes = b"") -> ImaEntry:
    """An ima-modsig entry as the kernel records it: d-ng over the whole file, d-modsig over the file
    without its appended signature, the PKCS#7 blob in modsig."""
    content, blob = split_appended_signature(signed_file)
    assert blob == pkcs7_blob
    data = _field(dng("sha256", hashlib.sha256(signed_file).digest())) + _field(path.encode() + b"\0")
    data += _field(sig) + _field(dng("sha256", hashlib.sha256(content).digest())) + _field(blob)
    return ImaEntry(num, 0, 0, 0, 10, hashlib.sha1(data).digest(), "ima-modsig", data, data)


def _log(build: Any) -> list[ImaEntry]:
    out = io.BytesIO()
    build(LogBuilder(out))
    return list(iter_log(io.BytesIO(out.getvalue())))


def _check(policy: RuntimePolicy, entries: list[ImaEntry]) -> Report:
    report = Report()
    checker = PolicyChecker(policy, report)
    for entry in entries:
        checker.check(entry)
    checker.finish()
    return report


def _signed(b: LogBuilder, path: str, content: bytes, sig: bytes, alg: str = "sha256") -> Built:
    return b.add("ima-sig", path, digest=hashlib.new(alg, content).digest(), alg=alg, sig=sig)


def _policy(
    pki: dict[str, Signer], *names: str, require: tuple[str, ...] = ("/usr/bin/",), **kw: Any
) -> RuntimePolicy:
    keys = tuple(k for n in names for k in load_key_file(pki[n].cert))
    return RuntimePolicy(ima_keys=keys, require_signature=require, allow_unknown=True, **kw)


def _sigs(report: Report) -> list[tuple[str, Severity, Any]]:
    return [(f.id, f.severity, f.context.get("path")) for f in report if f.id.startswith("imasig.")]


# ------------------------------------------------------------------------------ xattr (evmctl) signatures


@pytest.mark.parametrize(
    ("name", "alg"), [("rsa", "sha256"), ("rsa", "sha512"), ("p256", "sha256"), ("p384", "sha384")]
)
def test_evmctl_signature_verifies(pki: dict[str, Signer], tmp_path: Path, name: str, alg: str) -> None:
    content = b"#!/bin/sh\necho vllm\n"
    sig = evmctl_sign(tmp_path, content, pki[name], alg)
    assert sig[:3] == bytes([0x03, 0x02, {"sha256": 4, "sha384": 5, "sha512": 6}[alg]])
    entries = _log(lambda b: _signed(b, "/usr/bin/vllm", content, sig, alg))
    report = _check(_policy(pki, name, "rogue"), entries)
    assert report.ok and not _sigs(report), report.to_list()
    result = verify_digsig(
        sig, alg, hashlib.new(alg, content).digest(), Keyring(load_key_file(pki[name].cert))
    )
    assert result.ok and result.key_id == spki_key_id(pki[name].private.public_key())[-4:].hex()


def test_key_id_comes_from_the_certificate_skid(pki: dict[str, Signer], tmp_path: Path) -> None:
    signer, content = pki["odd_skid"], b"odd"
    by_cert = evmctl_sign(tmp_path, content, signer, keyid_cert=True)
    assert by_cert[3:7] == b"\x42" * 4
    ring = Keyring(load_key_file(signer.cert))
    assert verify_digsig(by_cert, "sha256", hashlib.sha256(content).digest(), ring).ok
    # evmctl without the certificate uses SHA-1 of the key: the kernel would not find it by that id
    by_key = evmctl_sign(tmp_path, content + b"!", signer)
    assert (
        verify_digsig(by_key, "sha256", hashlib.sha256(content + b"!").digest(), ring).status == "unknown_key"
    )


def test_unlisted_key_is_unknown_key(pki: dict[str, Signer], tmp_path: Path) -> None:
    content = b"rogue binary"
    sig = evmctl_sign(tmp_path, content, pki["rogue"])
    entries = _log(lambda b: (_signed(b, "/usr/bin/rogue", content, sig), _signed(b, "/opt/x", content, sig)))
    report = _check(_policy(pki, "rsa", "p256"), entries)
    # under the required prefix: an error; elsewhere the allowlist decides (allow_unknown here)
    assert _sigs(report) == [("imasig.unknown_key", Severity.ERROR, "/usr/bin/rogue")]
    f = report.findings[0]
    assert f.context["entry"] == 0 and f.context["key_id"] == sig[3:7].hex()


@pytest.mark.parametrize("name", ["rsa", "p256"])
def test_flipped_signature_byte_is_bad_signature(pki: dict[str, Signer], tmp_path: Path, name: str) -> None:
    content = b"model server"
    sig = bytearray(evmctl_sign(tmp_path, content, pki[name]))
    sig[-5] ^= 0x01
    entries = _log(
        lambda b: (_signed(b, "/usr/bin/a", content, bytes(sig)), _signed(b, "/opt/b", content, bytes(sig)))
    )
    report = _check(_policy(pki, name), entries)
    # a known key's signature that fails is an error wherever the file is
    assert _sigs(report) == [
        ("imasig.bad_signature", Severity.ERROR, "/usr/bin/a"),
        ("imasig.bad_signature", Severity.ERROR, "/opt/b"),
    ]


def test_signature_of_other_content_is_bad(pki: dict[str, Signer], tmp_path: Path) -> None:
    sig = evmctl_sign(tmp_path, b"original", pki["rsa"])
    entries = _log(lambda b: _signed(b, "/usr/bin/x", b"modified", sig))
    assert [f.id for f in _check(_policy(pki, "rsa"), entries)] == ["imasig.bad_signature"]


def test_required_prefix_without_signature_is_missing(pki: dict[str, Signer]) -> None:
    def build(b: LogBuilder) -> None:
        b.file("/usr/bin/unsigned-ng", b"a")  # ima-ng: no signature field at all
        b.add("ima-sig", "/usr/bin/unsigned-sig", digest=hashlib.sha256(b"b").digest())  # empty sig
        b.file("/usr/lib/libfoo.so", b"c")  # not under a required prefix
        b.add("ima-sig", "boot_aggregate", digest=bytes(32))

    report = _check(_policy(pki, "rsa"), _log(build))
    assert _sigs(report) == [
        ("imasig.missing", Severity.ERROR, "/usr/bin/unsigned-ng"),
        ("imasig.missing", Severity.ERROR, "/usr/bin/unsigned-sig"),
    ]
    assert report.findings[0].context["prefix"] == "/usr/bin/"
    assert report.findings[0].context["template"] == "ima-ng"


def test_digest_algorithm_mismatch_is_bad(pki: dict[str, Signer], tmp_path: Path) -> None:
    content = b"x"
    sig = evmctl_sign(tmp_path, content, pki["rsa"], "sha512")
    ring = Keyring(load_key_file(pki["rsa"].cert))
    r = verify_digsig(sig, "sha256", hashlib.sha256(content).digest(), ring)
    assert r.status == "bad_signature" and "sha512" in r.reason


def _v3(private: Any, alg: str, digest: bytes, key_id: bytes) -> bytes:
    """A sigv3 signature made exactly as the kernel checks it (evmctl 1.4 cannot make v3)."""
    h = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[alg]
    signed = file_id_digest(0x03, alg, digest)
    if isinstance(private, rsa.RSAPrivateKey):
        body = private.sign(signed, padding.PKCS1v15(), Prehashed(h))
    else:
        body = private.sign(signed, ec.ECDSA(Prehashed(h)))
    algo_id = {"sha256": 4, "sha384": 5}[alg]
    return struct.pack(">BBBIH", 0x03, 3, algo_id, int.from_bytes(key_id, "big"), len(body)) + body


@pytest.mark.parametrize(("name", "alg"), [("rsa", "sha256"), ("p384", "sha384")])
def test_sigv3_over_ima_file_id(pki: dict[str, Signer], name: str, alg: str) -> None:
    digest = hashlib.new(alg, b"v3 file").digest()
    private = pki[name].private
    sig = _v3(private, alg, digest, spki_key_id(private.public_key())[-4:])
    ring = Keyring(load_key_file(pki[name].cert))
    assert verify_digsig(sig, alg, digest, ring).ok
    assert verify_digsig(sig, alg, hashlib.new(alg, b"other").digest(), ring).status == "bad_signature"
    # the same bytes labelled v2 (signature over the bare digest) do not verify
    assert verify_digsig(sig[:1] + b"\x02" + sig[2:], alg, digest, ring).status == "bad_signature"


def test_unsupported_formats(pki: dict[str, Signer], tmp_path: Path) -> None:
    content = b"y"
    good = evmctl_sign(tmp_path, content, pki["rsa"])
    verity = bytes([0x06, 0x03]) + good[2:]  # fs-verity signature: over a digest ima-sig does not carry
    v1 = bytes([0x03, 0x01]) + good[2:]
    sm3 = good[:2] + bytes([17]) + good[3:]
    entries = _log(
        lambda b: [
            _signed(b, path, content, sig)
            for path, sig in (
                ("/usr/bin/verity", verity),
                ("/usr/bin/v1", v1),
                ("/usr/bin/sm3", sm3),
                ("/opt/v1", v1),
            )
        ]
    )
    report = _check(_policy(pki, "rsa"), entries)
    assert _sigs(report) == [
        ("imasig.unsupported", Severity.ERROR, "/usr/bin/verity"),
        ("imasig.unsupported", Severity.ERROR, "/usr/bin/v1"),
        ("imasig.unsupported", Severity.ERROR, "/usr/bin/sm3"),
    ]


def test_policy_without_keys_reports_nothing_new(pki: dict[str, Signer], tmp_path: Path) -> None:
    content = b"z"
    bad = bytearray(evmctl_sign(tmp_path, content, pki["rsa"]))
    bad[-1] ^= 0xFF
    entries = _log(lambda b: (_signed(b, "/usr/bin/z", content, bytes(bad)), b.file("/usr/bin/q", b"q")))
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    plain = policy_from_dict({"version": 1, "allow": {"/usr/bin/z": [digest]}})
    assert not plain.checks_signatures and PolicyChecker(plain, Report()).signatures is None
    assert [f.id for f in _check(plain, entries)] == ["policy.path_not_allowed"]


def test_ascii_log_round_trip(pki: dict[str, Signer], tmp_path: Path) -> None:
    content = b"ascii"
    sig = evmctl_sign(tmp_path, content, pki["p256"])
    text = io.BytesIO()
    LogBuilder(None, text).add("ima-sig", "/usr/bin/ascii", digest=hashlib.sha256(content).digest(), sig=sig)
    assert sig.hex() in text.getvalue().decode()
    entries = list(iter_log(io.BytesIO(text.getvalue())))
    assert _check(_policy(pki, "p256"), entries).ok


# --------------------------------------------------------------------------- appended (module) signatures


@pytest.mark.parametrize(
    ("name", "attrs", "keyid"),
    [("rsa", False, False), ("p256", False, True), ("rsa", True, False), ("p384", True, True)],
)
def test_openssl_module_signature(
    pki: dict[str, Signer], tmp_path: Path, name: str, attrs: bool, keyid: bool
) -> None:
    content = b"\x7fELF module body" * 50
    blob = openssl_modsig(tmp_path, content, pki[name], attrs=attrs, keyid=keyid)
    signed = append_signature(content, blob)
    assert signed.endswith(b"~Module signature appended~\n")
    assert split_appended_signature(signed) == (content, blob)
    entry = modsig_entry(0, "/usr/lib/modules/nvidia.ko", signed, blob)
    policy = _policy(pki, "rogue", name, require=("/usr/lib/modules/",))
    report = _check(policy, [entry])
    assert report.ok and not _sigs(report), report.to_list()
    # signed by a key the keyring does not hold
    report = _check(_policy(pki, "rogue", require=("/usr/lib/modules/",)), [entry])
    assert _sigs(report) == [("imasig.unknown_key", Severity.ERROR, "/usr/lib/modules/nvidia.ko")]


def test_module_signature_over_other_content_is_bad(pki: dict[str, Signer], tmp_path: Path) -> None:
    blob = openssl_modsig(tmp_path, b"original module", pki["rsa"])
    entry = modsig_entry(0, "/usr/lib/modules/x.ko", append_signature(b"patched module!", blob), blob)
    report = _check(_policy(pki, "rsa", require=("/usr/lib/modules/",)), [entry])
    assert _sigs(report) == [("imasig.bad_signature", Severity.ERROR, "/usr/lib/modules/x.ko")]
    flipped = bytearray(blob)
    flipped[-3] ^= 0x10
    good = b"original module"
    entry = modsig_entry(1, "/usr/lib/modules/y.ko", append_signature(good, bytes(flipped)), bytes(flipped))
    assert [f.id for f in _check(_policy(pki, "rsa"), [entry])] == ["imasig.bad_signature"]


def test_cryptography_pkcs7_builder_signature(pki: dict[str, Signer]) -> None:
    content = b"built with cryptography"
    signer = pki["p256"]
    cert = x509.load_pem_x509_certificate(signer.cert.read_bytes())
    opts = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts]
    blob = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(cert, signer.private, hashes.SHA256())
        .sign(serialization.Encoding.DER, [*opts, pkcs7.PKCS7Options.NoAttributes])
    )
    ring = Keyring(load_key_file(signer.cert))
    assert verify_modsig(blob, "sha256", hashlib.sha256(content).digest(), ring).ok
    assert verify_modsig(blob, "sha256", hashlib.sha256(b"other").digest(), ring).status == "bad_signature"
    assert (
        verify_modsig(blob[:-10], "sha256", hashlib.sha256(content).digest(), ring).status == "bad_signature"
    )


def test_split_appended_signature_rejects_malformed() -> None:
    good = append_signature(b"body", b"\x30\x03\x02\x01\x01")
    assert split_appended_signature(good) == (b"body", b"\x30\x03\x02\x01\x01")
    with pytest.raises(ValueError, match="marker"):
        split_appended_signature(b"no signature here")
    with pytest.raises(ValueError, match="id_type"):
        split_appended_signature(good.replace(b"\x00\x00\x02\x00", b"\x00\x00\x01\x00"))
    too_long = good[: -28 - 4] + struct.pack(">I", 999) + good[-28:]
    with pytest.raises(ValueError, match="does not fit"):
        split_appended_signature(too_long)


# ------------------------------------------------------------------------------------- measured keys


def _ima_key(b: LogBuilder, signer: Signer) -> bytes:
    der = x509.load_pem_x509_certificate(signer.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    b.buffer(".ima", der)
    return der


@pytest.mark.parametrize("trust", [False, True])
def test_keys_measured_onto_the_ima_keyring(pki: dict[str, Signer], tmp_path: Path, trust: bool) -> None:
    content = b"signed by a key the kernel loaded"
    sig = evmctl_sign(tmp_path, content, pki["p256"])
    der = b""

    def build(b: LogBuilder) -> None:
        nonlocal der
        _signed(b, "/usr/bin/before", content, sig)  # before the key was loaded: not yet trusted
        der = _ima_key(b, pki["p256"])
        _signed(b, "/usr/bin/after", content, sig)

    entries = _log(build)
    pin = {".ima": ["sha256:" + hashlib.sha256(der).hexdigest()]}
    policy = policy_from_dict(
        {
            "version": 1,
            "allow": pin,
            "options": {"allow_unknown": True},
            "keyrings": {"ima": [str(pki["rsa"].cert)], "trust_measured_keys": trust},
            "require_signature": [{"prefix": "/usr/bin/"}],
        }
    )
    got = _sigs(_check(policy, entries))
    before = ("imasig.unknown_key", Severity.ERROR, "/usr/bin/before")
    after = ("imasig.unknown_key", Severity.ERROR, "/usr/bin/after")
    assert got == ([before] if trust else [before, after])


def test_measured_key_must_pass_the_allowlist(pki: dict[str, Signer], tmp_path: Path) -> None:
    content = b"rogue key loaded at runtime"
    sig = evmctl_sign(tmp_path, content, pki["rogue"])

    def build(b: LogBuilder) -> None:
        _ima_key(b, pki["rogue"])
        _signed(b, "/usr/bin/evil", content, sig)

    policy = policy_from_dict(
        {
            "version": 1,
            "allow": {
                ".ima": ["sha256:" + "00" * 32],
                "/usr/bin/evil": ["sha256:" + hashlib.sha256(content).hexdigest()],
            },
            "keyrings": {"ima": [str(pki["rsa"].cert)], "trust_measured_keys": True},
            "require_signature": [{"prefix": "/usr/bin/"}],
        }
    )
    report = _check(policy, _log(build))
    assert report.ids() == ["policy.digest_not_allowed", "imasig.unknown_key"]


# --------------------------------------------------------------------------------- policy file syntax


def test_toml_policy_with_keyrings_and_rules(pki: dict[str, Signer], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(pki["rsa"].cert, keys / "vendor.pem")
    der = x509.load_pem_x509_certificate(pki["p256"].cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    (keys / "ops.der").write_bytes(der)
    (tmp_path / "policy.toml").write_text(
        "version = 1\n[options]\nallow_unknown = true\n"
        '[keyrings]\nima = ["keys/vendor.pem", "keys/ops.der"]\n'
        '[[require_signature]]\nprefix = "/usr/bin/"\n[[require_signature]]\nprefix = "/opt/tmb/"\n'
    )
    policy = load_policy(tmp_path / "policy.toml")
    assert policy.require_signature == ("/usr/bin/", "/opt/tmb/") and len(policy.ima_keys) == 2
    rsa_sig = evmctl_sign(tmp_path, b"a", pki["rsa"])
    ec_sig = evmctl_sign(tmp_path, b"b", pki["p256"])
    entries = _log(
        lambda b: (
            _signed(b, "/usr/bin/a", b"a", rsa_sig),
            _signed(b, "/opt/tmb/b", b"b", ec_sig),
            b.file("/opt/tmb/c", b"c"),
        )
    )
    assert [(f.id, f.context["path"]) for f in _check(policy, entries)] == [("imasig.missing", "/opt/tmb/c")]


def test_accept_signed_allows_unlisted_paths_only(pki: dict[str, Signer], tmp_path: Path) -> None:
    sig = evmctl_sign(tmp_path, b"new build", pki["rsa"])
    doc: dict[str, Any] = {
        "version": 1,
        "allow": {"/usr/bin/pinned": ["sha256:" + "11" * 32]},
        "keyrings": {"ima": [str(pki["rsa"].cert)], "accept_signed": True},
    }
    entries = _log(
        lambda b: (
            _signed(b, "/usr/bin/new", b"new build", sig),
            _signed(b, "/usr/bin/pinned", b"new build", sig),
        )
    )
    assert _check(policy_from_dict(doc), entries).ids() == ["policy.digest_not_allowed"]
    doc["keyrings"]["accept_signed"] = False
    assert _check(policy_from_dict(doc), entries).ids() == [
        "policy.path_not_allowed",
        "policy.digest_not_allowed",
    ]
    # a signed-only policy is not empty
    signed_only = policy_from_dict({"version": 1, "keyrings": doc["keyrings"] | {"accept_signed": True}})
    assert not signed_only.empty


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"keyrings": {"ima": ["missing.pem"]}}, "cannot read keyring file"),
        ({"keyrings": {"ima": "x.pem"}}, "must be a list"),
        ({"keyrings": {"trust_measured_keys": "yes"}}, "true or false"),
        ({"keyrings": {"imaa": []}}, "unknown \\[keyrings\\] keys"),
        ({"require_signature": [{"prefix": "/usr/bin/"}]}, "no key to verify with"),
        (
            {"require_signature": [{"prefix": "usr/bin"}], "keyrings": {"trust_measured_keys": True}},
            "absolute",
        ),
        ({"require_signature": [{"path": "/usr/bin/"}]}, "exactly: prefix"),
    ],
)
def test_policy_errors(tmp_path: Path, doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        policy_from_dict({"version": 1, **doc}, base=tmp_path)


def test_keyring_file_without_a_key(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key\n")
    with pytest.raises(ConfigError, match="no usable key"):
        policy_from_dict({"version": 1, "keyrings": {"ima": ["junk.pem"]}}, base=tmp_path)


# ------------------------------------------------------------------------ Keylime verification-keys


def _keylime_keyring(*pems: bytes) -> str:
    """verification-keys as keylime-policy writes it: ImaKeyring.to_string() (base64 DER SPKI + ids)."""
    keys = [serialization.load_pem_public_key(p) for p in pems]
    spki = [
        k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for k in keys
    ]
    ids = [int.from_bytes(spki_key_id(k)[-4:], "big") for k in keys]  # type: ignore[arg-type]
    return json.dumps({"pubkeys": [base64.b64encode(d).decode() for d in spki], "keyids": ids})


def _keylime_doc(keys: str, digests: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {
        "meta": {"version": 1},
        "digests": digests or {},
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": keys,
    }


def test_keylime_verification_keys_are_imported_and_used(pki: dict[str, Signer], tmp_path: Path) -> None:
    pem = (
        x509.load_pem_x509_certificate(pki["p384"].cert.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "runtime-policy.json").write_text(json.dumps(_keylime_doc(_keylime_keyring(pem))))
    (tmp_path / "policy.toml").write_text(
        'version = 1\n[keyrings]\naccept_signed = true\n[[require_signature]]\nprefix = "/usr/bin/"\n'
        '[[import]]\nkeylime = "runtime-policy.json"\n'
    )
    policy = load_policy(tmp_path / "policy.toml")
    assert len(policy.ima_keys) == 1 and policy.ima_keys[0].source.endswith("verification-keys[0]")
    good = evmctl_sign(tmp_path, b"k", pki["p384"], "sha384")
    rogue = evmctl_sign(tmp_path, b"r", pki["rogue"])
    entries = _log(
        lambda b: (_signed(b, "/usr/bin/k", b"k", good, "sha384"), _signed(b, "/usr/bin/r", b"r", rogue))
    )
    report = _check(policy, entries)
    assert [(f.id, f.context["path"]) for f in report] == [
        ("imasig.unknown_key", "/usr/bin/r"),
        ("policy.path_not_allowed", "/usr/bin/r"),
    ]


def test_keylime_verification_keys_formats(pki: dict[str, Signer], tmp_path: Path) -> None:
    pem = pki["rsa"].cert.read_text()
    for keys in (json.dumps(json.dumps([pem])), json.dumps({"pubkeys": [pem]}), ""):
        path = tmp_path / "p.json"
        path.write_text(json.dumps(_keylime_doc(keys)))
        assert len(load_keylime_policy(path).ima_keys) == (1 if keys else 0)
    for bad, match in (("{", "not JSON"), (json.dumps({"pubkeys": ["@@"]}), "not usable"), ("[1]", "string")):
        path.write_text(json.dumps(_keylime_doc(bad)))
        with pytest.raises(ConfigError, match=match):
            load_keylime_policy(path)


# ------------------------------------------------------------------------- Keylime's real test vectors


def _vector(path: Path) -> list[ImaEntry]:
    with open(path, "rb") as f:
        return list(iter_log(f))


def test_keylime_vector_signatures() -> None:
    """signatures.ascii: /usr/bin/dd signed with rsa2048, /usr/bin/zmore with the secp256k1 key."""
    entries = _vector(KEYLIME_IMA / "signatures.ascii")
    both = RuntimePolicy(
        ima_keys=(
            *load_key_file(KEYLIME_IMA / "rsa2048pub.pem"),
            *load_key_file(KEYLIME_IMA / "secp256k1pub.pem"),
        ),
        require_signature=("/usr/bin/",),
        allow_unknown=True,
    )
    assert _check(both, entries).ok
    rsa_only = RuntimePolicy(
        ima_keys=tuple(load_key_file(KEYLIME_IMA / "rsa2048pub.pem")),
        require_signature=("/usr/bin/",),
        allow_unknown=True,
    )
    assert _sigs(_check(rsa_only, entries)) == [("imasig.unknown_key", Severity.ERROR, "/usr/bin/zmore")]


def test_keylime_vector_bad_signature() -> None:
    """bad_signatures.ascii: the signature-size field of the zmore signature is corrupted."""
    entries = _vector(KEYLIME_IMA / "bad_signatures.ascii")
    policy = RuntimePolicy(
        ima_keys=tuple(load_key_file(KEYLIME_IMA / "secp256k1pub.pem")), allow_unknown=True
    )
    report = _check(policy, entries)
    assert _sigs(report) == [("imasig.bad_signature", Severity.ERROR, "/usr/bin/zmore")]
    assert "signature bytes" in report.findings[0].context["reason"]


def test_keylime_vector_policy_with_verification_keys(tmp_path: Path) -> None:
    """Keylime's own runtime policy for these vectors, its verification-keys filled the way
    keylime-policy does, evaluated over the signed entries and the measured .ima key."""
    doc = json.loads((KEYLIME_IMA / "runtime_policy_test.json").read_text())
    doc["verification-keys"] = _keylime_keyring(
        (KEYLIME_IMA / "rsa2048pub.pem").read_bytes(), (KEYLIME_IMA / "secp256k1pub.pem").read_bytes()
    )
    (tmp_path / "kl.json").write_text(json.dumps(doc))
    policy = policy_from_dict(
        {"version": 1, "import": [{"keylime": "kl.json"}], "require_signature": [{"prefix": "/usr/bin/"}]},
        base=tmp_path,
    )
    entries = [
        *_vector(KEYLIME_IMA / "keyrings.ascii"),
        *_vector(KEYLIME_IMA / "signatures.ascii"),
    ]
    assert _check(policy, entries).ok
    # the measured .ima certificate (an EC P-256 key) is parsed and, when trusted, joins the keyring
    trusting = policy_from_dict(
        {
            "version": 1,
            "import": [{"keylime": "kl.json"}],
            "keyrings": {"trust_measured_keys": True},
        },
        base=tmp_path,
    )
    checker = PolicyChecker(trusting, Report())
    for entry in entries:
        checker.check(entry)
    assert checker.signatures is not None and len(checker.signatures.keyring) == 3
    assert any(".ima key measured at entry 0" in k.source for k in checker.signatures.keyring)
