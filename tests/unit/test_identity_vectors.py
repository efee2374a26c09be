"""Real EK certificates among the third-party vectors (../shared/attestation-data, vendored copies under
tests/data/vectors): every certificate carrying a TCG attribute (2.23.133.2.x) must parse, and its TCG
subjectAltName must give the manufacturer, model and version. Skips, with the reason, where there are none."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tmb.attest.ekcert import OID_TPM_MANUFACTURER, load_certificates
from tmb.errors import ParseError

SHARED = Path(__file__).parents[2] / ".." / "shared" / "attestation-data"
VENDORED = Path(__file__).parents[1] / "data" / "vectors"
_TCG_ATTR = bytes.fromhex("06056781050201")  # OID 2.23.133.2.1 DER-encoded; [:-1] matches any 2.23.133.2.x

pytestmark = pytest.mark.shared


def _ek_certificates() -> list[tuple[Path, x509.Certificate]]:
    found = []
    for root in (SHARED, VENDORED):
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20):
            data = path.read_bytes()
            if _TCG_ATTR[:-1] not in data or (b"BEGIN CERTIFICATE" not in data and data[:1] != b"\x30"):
                continue
            try:
                certs = load_certificates(data)
            except ParseError:
                continue
            found += [(path, c) for c in certs]
    return found


def test_real_ek_certificates_name_their_tpm() -> None:
    if not SHARED.is_dir() and not VENDORED.is_dir():
        pytest.skip(f"shared attestation data not present at {SHARED}")
    certs = _ek_certificates()
    if not certs:
        pytest.skip(f"no EK certificate among the vectors in {SHARED} and {VENDORED} (none published there)")
    for path, cert in certs:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DirectoryName)
        assert any(n.get_attributes_for_oid(OID_TPM_MANUFACTURER) for n in names), path
