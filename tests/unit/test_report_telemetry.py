"""The audit report's telemetry section on the load-aware fingerprint: the window judged as the daemon judges
it (summarise + Judge), at the load the bundle records, with the plots an auditor reads."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from tmb.attest.evidence import AuditResult, load_bundle, write_bundle
from tmb.errors import InputError
from tmb.fingerprint import LoadProfile, enroll_runs, window_summaries
from tmb.report import render_html
from tmb.report.html import TelemetrySection
from tmb.report.telemetry import telemetry_section
from tmb.telemetry.load import LoadSeries
from tmb.telemetry.synthetic import generate

CLAIM = "llama-1b/bf16/h100"
SUBSTITUTE = "llama-1b/int8/h100"
RUNS = 3


def _enrol(workload: str) -> LoadProfile:
    """SYNTHETIC runs of one workload at two load levels (1 and 8 requests in flight), one run a day."""
    runs = {}
    for seed in range(RUNS):
        windows = window_summaries(
            generate(workload, "single", 60, seed=seed), LoadSeries.constant(1.0), 10.0
        )
        windows += window_summaries(
            generate(workload, "batched", 60, seed=seed), LoadSeries.constant(8.0), 10.0
        )
        runs[f"run{seed}"] = windows
    model, precision, gpu = workload.split("/")
    return enroll_runs(
        runs,
        model=model,
        precision=precision,
        gpu_type=gpu,
        window_s=10.0,
        run_days={f"run{s}": f"day{s}" for s in range(RUNS)},
        run_nodes={f"run{s}": f"node{s % 2}" for s in range(RUNS)},
        extra={"synthetic": True},
    )


@pytest.fixture(scope="module")
def profiles() -> dict[str, bytes]:
    out = {}
    for workload in (CLAIM, SUBSTITUTE):
        out[workload.replace("/", "_") + ".json"] = json.dumps(_enrol(workload).to_dict()).encode()
    return out


def _bundle(
    root: Path,
    profiles: dict[str, bytes],
    behaves_as: str = CLAIM,
    *,
    load: float | None = 8.0,
    verdict: Mapping[str, object] | None = None,
    claimed: str | None = CLAIM,
) -> Path:
    window = generate(behaves_as, "batched", 10, seed=11)  # a 10 s request window at 8 in flight
    return write_bundle(
        root,
        node="gpu-node-1",
        ak=b"not read by the telemetry section",
        ima_log=b"",
        quotes=[],
        telemetry=window.encode(),
        profiles=profiles,
        claimed=claimed,
        verdict=json.dumps(verdict).encode() if verdict is not None else None,
        load=load,
    )


def _section(root: Path) -> TelemetrySection:
    section = telemetry_section(load_bundle(root))
    assert section is not None
    return section


def test_honest_window_is_consistent_with_plots(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    section = _section(_bundle(tmp_path / "b", profiles))
    assert section.ok
    assert section.synthetic
    assert section.summary.startswith(f"consistent with {CLAIM} (profile llama-1b/bf16/-/h100/-)")
    assert "at load 8 (from the bundle manifest)" in section.summary
    assert "max |z|" in section.summary and "vs threshold 3.80" in section.summary
    assert "200 samples" in section.summary and "9.9 s" in section.summary
    assert "power" in section.summary and "nearest alternative llama-1b/int8/-/h100/-" in section.summary
    titles = [p.title for p in section.plots]
    for feature in ("power_frac", "mem_util", "tensor_active", "mem_used_frac"):
        assert f"{feature}: expected median vs load" in titles
        assert f"{feature}: the window's distribution" in titles
    assert titles[-1] == "the window over time"
    for plot in section.plots:
        assert plot.data_uri.startswith("data:image/png;base64,")
        assert base64.b64decode(plot.data_uri.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    by_title = {p.title: p.caption for p in section.plots}
    assert "fitted zero/one-inflated beta mixture" in by_title["power_frac: the window's distribution"]
    # memory is one value all window long: no beta to fit, said in the caption instead of an error
    assert "no beta mixture fitted" in by_title["mem_used_frac: the window's distribution"]
    assert "knots at load 1, 8" in by_title["power_frac: expected median vs load"]

    page = render_html(AuditResult(str(tmp_path / "b"), "gpu-node-1"), telemetry=section)
    assert page.count('<img alt="') == len(section.plots)
    assert "not a proof" in page and "Synthetic telemetry" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_text_audits_judge_the_same_without_plots(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    root = _bundle(tmp_path / "b", profiles)
    full, bare = telemetry_section(load_bundle(root)), telemetry_section(load_bundle(root), plots=False)
    assert full is not None and bare is not None
    assert bare.plots == () and full.plots
    assert (bare.summary, bare.ok, bare.decision) == (full.summary, full.ok, full.decision)


def test_substituted_window_is_inconsistent(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    section = _section(_bundle(tmp_path / "b", profiles, SUBSTITUTE))
    assert not section.ok
    assert section.summary.startswith(f"inconsistent with {CLAIM}")
    assert "closest enrolled: llama-1b/int8/-/h100/-" in section.summary
    assert any(p.title == "mem_util: expected median vs load" for p in section.plots)
    page = render_html(AuditResult(str(tmp_path / "b"), "gpu-node-1"), telemetry=section)
    assert f'<span class="st fail">inconsistent with {CLAIM}' in page


def test_load_from_the_verdict_when_the_manifest_has_none(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    verdict = {"format": "tmb-verdict/1", "fingerprint": {"load": "8", "decision": "consistent"}}
    section = _section(_bundle(tmp_path / "b", profiles, load=None, verdict=verdict))
    assert "at load 8 (from the signed verdict)" in section.summary
    assert section.ok


def test_default_load_when_nothing_records_one(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    for name, verdict in (("none", None), ("no-fingerprint", {"fingerprint": None})):
        section = _section(_bundle(tmp_path / name, profiles, load=None, verdict=verdict))
        assert "at load 1 (not recorded: assumed 1 request in flight)" in section.summary


@pytest.mark.parametrize("bad", [-1, "8", True, float("nan"), [8]])
def test_invalid_manifest_load_names_the_key(tmp_path: Path, profiles: dict[str, bytes], bad: object) -> None:
    root = _bundle(tmp_path / "b", profiles)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["load"] = bad
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="'load'") as info:
        load_bundle(root)
    assert info.value.context["key"] == "load"


def test_invalid_verdict_load_names_the_file(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    root = _bundle(tmp_path / "b", profiles, load=None, verdict={"fingerprint": {"load": "lots"}})
    with pytest.raises(InputError, match=r"fingerprint\.load") as info:
        telemetry_section(load_bundle(root))
    assert info.value.context["path"] == str(root / "verdict.json")
    (root / "verdict.json").write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        telemetry_section(load_bundle(root))


def test_unreadable_inputs_are_input_errors_naming_the_file(
    tmp_path: Path, profiles: dict[str, bytes]
) -> None:
    root = _bundle(tmp_path / "b", profiles)
    bundle = load_bundle(root)
    (root / "telemetry.bin").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError) as info:
        telemetry_section(bundle)
    assert info.value.context["path"] == str(root / "telemetry.bin")

    root = _bundle(tmp_path / "c", profiles)
    profile = root / "profiles" / next(iter(profiles))
    profile.write_text('{"format": "tmb.fingerprint.profile", "version": 2}')
    with pytest.raises(InputError) as info:
        telemetry_section(load_bundle(root))
    assert info.value.context["path"] == str(profile)


def test_nothing_to_judge_against(tmp_path: Path, profiles: dict[str, bytes]) -> None:
    section = _section(_bundle(tmp_path / "unclaimed", profiles, claimed=None))
    assert not section.ok and "no claimed model" in section.summary
    assert any(p.title == "power_frac: the window's distribution" for p in section.plots)
    section = _section(_bundle(tmp_path / "unknown", profiles, claimed="llama-70b/bf16/h100"))
    assert not section.ok
    assert section.summary.startswith("inconclusive for llama-70b/bf16/h100")
    assert "no enrolled profile matches" in section.summary


def test_no_telemetry_no_section(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", node="n", ak=b"k", ima_log=b"", quotes=[])
    assert telemetry_section(load_bundle(root)) is None


def test_an_inconclusive_window_passes_the_audit_and_says_why(
    tmp_path: Path, profiles: dict[str, bytes]
) -> None:
    """As in a verdict: a load the profiles never saw cannot decide; that does not fail a chain that held,
    and the page says the fingerprint was inconclusive instead of claiming a fit or a misfit."""

    section = _section(_bundle(tmp_path / "far", profiles, "llama-1b/int8/h100", load=200.0))
    assert section.ok and section.decision == "inconclusive"
    assert (
        section.summary.startswith("inconclusive") and "outside every enrolled load range" in section.summary
    )
    result = AuditResult(str(tmp_path / "far"), "gpu-node-1")
    page = render_html(result, telemetry=section)
    assert "inconclusive" in page and "does not fit the claimed model" not in page
