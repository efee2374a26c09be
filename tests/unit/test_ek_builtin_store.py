"""The curated EK trust store shipped with tmb (tmb/data/ek_roots): every file loads through ``TrustStore``
with the ``builtin`` keyword, every intermediate chains to a shipped root, ORIGINS.md describes exactly the
shipped files, an swtpm's EK (certified by its own local CA) is refused by it, and the ``ek_roots``
config forms (``builtin``, a directory, ``builtin:DIR``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from identity_support import NOW, Ca, software_ek, swtpm_store
from swtpm import SwtpmFactory

from tmb.attest import ekcert
from tmb.attest.ekcert import BUILTIN, TrustStore, builtin_roots_dir, verify_ek
from tmb.cli import main
from tmb.config import load_config
from tmb.errors import ConfigError, Severity
from tmb.ingest.identity import IdentityPolicy

DIR = builtin_roots_dir()
# The day the store was copied (ORIGINS.md): chains are checked as of then, so the test does not start
# failing the day a shipped certificate expires (tmb identity roots shows expiry as of now).
SNAPSHOT = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)


def _files() -> dict[str, x509.Certificate]:
    return {p.name: x509.load_pem_x509_certificate(p.read_bytes()) for p in sorted(DIR.glob("*.pem"))}


def _sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_the_builtin_keyword_loads_every_shipped_certificate() -> None:
    files = _files()
    assert len(files) >= 20
    # only PEM files, nothing below: a subfolder (a cloud provider's CA, say) would be loaded recursively
    assert {p.suffix for p in DIR.iterdir()} == {".pem", ".md"}
    store = TrustStore.load(BUILTIN)
    assert len(store.roots) + len(store.intermediates) == len(files)
    by_origin = {origin: fp for fp, origin in store.origins.items()}
    for name, cert in files.items():
        assert by_origin[f"builtin/{name}"].hex() == _sha256(cert), name
    assert {store.origins[r.fingerprint(hashes.SHA256())] for r in store.roots} == {
        "builtin/GS_TPM_RT.pem",
        "builtin/INF_ECC_010RT.pem",
        "builtin/INF_RSA_010RT.pem",
        "builtin/INTEL_RT.pem",
    }


def test_every_certificate_is_a_ca_and_every_intermediate_chains_to_a_shipped_root() -> None:
    store = TrustStore.load(BUILTIN)
    for cert in (*store.roots, *store.intermediates):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert bc.ca and ku.key_cert_sign, cert.subject
        assert cert.not_valid_before_utc <= SNAPSHOT <= cert.not_valid_after_utc, cert.subject
    for root in store.roots:
        root.verify_directly_issued_by(root)  # the self-signature: the copy is intact
    for inter in store.intermediates:
        paths, problems = ekcert._paths(inter, store, ())
        assert paths, (inter.subject, problems)
        for path in paths:  # every link's signature verified; names, CA flags and path lengths hold
            assert store.is_root(path[-1])
            found = ekcert._check_path(path, SNAPSHOT)
            assert [f.id for f in found if f.severity is Severity.ERROR] == [], found


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    return [_cells(line) for line in lines]


def _expected_row(name: str, cert: x509.Certificate, files: dict[str, x509.Certificate]) -> list[str]:
    if cert.subject == cert.issuer:
        kind = "root"
    else:
        issuer = next(
            n for n, c in files.items() if c.subject == cert.issuer and _verifies(cert, c) and c is not cert
        )
        kind = f"intermediate under {issuer}"
    return [
        f"`{name}`",
        kind,
        cert.subject.rfc4514_string(),
        cert.issuer.rfc4514_string(),
        f"`{cert.serial_number:x}`",
        f"{cert.not_valid_before_utc:%Y-%m-%d}",
        f"{cert.not_valid_after_utc:%Y-%m-%d}",
        f"`{_sha256(cert)}`",
    ]


def _verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_origins_lists_exactly_the_shipped_files_with_their_fingerprints() -> None:
    text = (DIR / "ORIGINS.md").read_text()
    rows = {row[0]: row for row in _table(text, "Shipped")}
    files = _files()
    assert sorted(rows) == sorted(f"`{n}`" for n in files), "ORIGINS.md rows and shipped files differ"
    for name, cert in files.items():
        row = rows[f"`{name}`"]
        # columns: file, manufacturer, kind, subject, issuer, serial, not before, not after, SHA-256, commit
        got = [row[0], *row[2:9]]
        want = _expected_row(name, cert, files)
        assert got == want, f"ORIGINS.md row of {name} should read: " + " | ".join(want)
        assert re.fullmatch(r"`[0-9a-f]{40}`", row[9]), row[9]
    left_out = {row[0].strip("`") for row in _table(text, "Collected by Keylime, not shipped")}
    assert left_out and not left_out & set(files)


def test_an_swtpm_ek_is_refused_by_the_builtin_store(swtpm_factory: SwtpmFactory, tmp_path: Path) -> None:
    tpm = swtpm_factory(ek_cert=True)
    with tpm.client() as client:
        certs = list(client.ek_certificates().values())
        ek = client.ek_public("rsa")
    builtin = verify_ek(ek, certs, TrustStore.load(BUILTIN))
    assert builtin.ek_trust is None and not builtin.ok
    assert "identity.ek_untrusted_chain" in [f.id for f in builtin.report.errors]
    # the same certificate is good under the swtpm's own CA: the refusal is the store's, nothing else
    own = verify_ek(ek, certs, swtpm_store(tpm.state_dir, tmp_path / "own"))
    assert own.ek_trust == "certified", own.report.to_list()
    both = verify_ek(ek, certs, TrustStore.load(f"builtin:{tmp_path / 'own'}"))
    assert both.ek_trust == "certified", both.report.to_list()


def test_config_builtin_keyword_and_env_override(tmp_path: Path) -> None:
    toml = tmp_path / "tmb.toml"
    toml.write_text('[identity]\nek_roots = "builtin"\n')
    config = load_config(toml, env={})
    assert config.identity.ek_roots == "builtin"
    policy = IdentityPolicy.load(config.identity.ek_roots)
    assert policy.trust is not None and len(policy.trust.roots) == len(TrustStore.load(BUILTIN).roots)
    assert load_config(None, env={"TMB_IDENTITY_EK_ROOTS": "builtin"}).identity.ek_roots == "builtin"
    assert IdentityPolicy.load("").trust is None  # the default stays: no EK is certified


def test_builtin_with_a_directory_of_ones_own(tmp_path: Path) -> None:
    root = Ca("own root")
    inter = Ca("own intermediate", root)
    own = tmp_path / "own"
    own.mkdir()
    (own / "root.pem").write_bytes(root.pem)
    (own / "inter.pem").write_bytes(inter.pem)
    builtin = TrustStore.load(BUILTIN)
    both = TrustStore.load(f"builtin:{own}")
    assert len(both.roots) == len(builtin.roots) + 1
    assert len(both.intermediates) == len(builtin.intermediates) + 1
    assert "root.pem" in both.origins.values() and "builtin/GS_TPM_RT.pem" in both.origins.values()
    key, ek = software_ek("rsa")
    cert = inter.issue_ek(key.public_key())
    assert verify_ek(ek, [cert], both).ek_trust == "certified"
    assert verify_ek(ek, [cert], builtin).ek_trust is None
    # a directory of intermediates only: alone no store, beside the builtin roots one (whose roots it needs)
    only = tmp_path / "only"
    only.mkdir()
    (only / "inter.pem").write_bytes(inter.pem)
    with pytest.raises(ConfigError, match="no self-signed root"):
        TrustStore.load(only)
    assert len(TrustStore.load(f"builtin:{only}").intermediates) == len(builtin.intermediates) + 1
    # the builtin directory named again adds nothing twice
    again = TrustStore.load(f"builtin:{DIR}")
    assert len(again.roots) == len(builtin.roots) and len(again.intermediates) == len(builtin.intermediates)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("builtin:", "names no directory"),
        ("builtin:/nonexistent/roots", "is not a directory"),
        ("/nonexistent/roots", "is not a directory"),
        ("  ", "no EK trust store named"),
    ],
)
def test_bad_specs_are_config_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrustStore.load(spec)


def test_a_missing_builtin_directory_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ekcert, "builtin_roots_dir", lambda: tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"builtin EK trust store .* is missing") as err:
        TrustStore.load(BUILTIN)
    assert "package data" in err.value.diagnostics()


def test_tmb_identity_roots(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["identity", "roots"]) == 0
    out = capsys.readouterr().out
    store = TrustStore.load(BUILTIN)
    assert f"{len(store.roots)} root(s), {len(store.intermediates)} intermediate(s)" in out
    assert "CN=STM TPM EK Intermediate CA 01" in out and "[builtin/STM_RSA_01I.pem]" in out
    assert main(["identity", "roots", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["certificates"]) == len(_files())
    assert {c["kind"] for c in doc["certificates"]} == {"root", "intermediate"}
    expired = Ca("old root", not_before=NOW - dt.timedelta(days=20), not_after=NOW - dt.timedelta(days=1))
    (tmp_path / "old.pem").write_bytes(expired.pem)
    assert main(["identity", "roots", "--ek-roots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "EXPIRED" in out and "identity.ek_issuer_expired" in out
    assert main(["identity", "roots", "--ek-roots", str(tmp_path / "none")]) == 2
    assert "is not a directory" in capsys.readouterr().err
