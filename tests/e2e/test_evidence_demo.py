"""The demo (``tmb demo``) run as a test: every scenario gets the audit result it is meant to get."""

from __future__ import annotations

from pathlib import Path

from sample_infra.evidence_demo import render, run


def test_demo_scenarios(tmp_path: Path) -> None:
    scenarios = run(tmp_path)
    outcomes = {s.name: (s.result.ok, {f.id for f in s.result.report.errors}) for s in scenarios}
    assert outcomes["honest node"] == (True, set())
    assert "ima.template_hash_mismatch" in outcomes["IMA log edited after the quote"][1]
    assert "quote.nonce_mismatch" in outcomes["old quote replayed for a new challenge"][1]
    assert "policy.path_not_allowed" in outcomes["unlisted binary loaded"][1]
    assert "dm.verity_root_mismatch" in outcomes["node mounted another model image"][1]
    table = render(scenarios, tmp_path)
    assert "UNEXPECTED" not in table
    assert (tmp_path / "bundle-honest" / "manifest.json").is_file()
    assert (tmp_path / "commitment" / "commitment.json").is_file()
