"""Where the tests find the third-party attestation vectors: vendored under tests/data/vectors, laid out as
../shared/attestation-data is (one folder a source repository, each with its LICENSE; sources and expected
values in tests/data/vectors/PROVENANCE.md), so a lone clone runs every test that reads them. A missing
file fails the test that reads it; nothing here skips."""

from pathlib import Path

VECTORS = Path(__file__).resolve().parent / "data" / "vectors"
