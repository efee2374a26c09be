"""``tmb enroll``, ``tmb fingerprint score`` and ``tmb fingerprint show`` end to end on trace files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmb.cli import main
from tmb.telemetry import simulate, write_trace


def _traces(tmp: Path, name: str, seeds: range, seconds: float = 60.0) -> list[str]:
    out = []
    for seed in seeds:
        run = simulate(name, "batched", seconds, seed=seed)
        path = tmp / f"{name.replace('/', '_')}.{seed}.trace"
        write_trace(path, run.batch, {"workload": run.workload})
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fp")
    pdir = tmp / "profiles"
    pdir.mkdir()
    for name in ("llama-1b/bf16/h100", "llama-3b/bf16/h100"):
        model = name.split("/")[0]
        out = pdir / f"{name.replace('/', '_')}.json"
        assert main(["enroll", "--model", model, *_traces(tmp, name, range(1, 7)), "--out", str(out)]) == 0
    return pdir


def test_enroll_takes_labels_from_trace_metadata(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads((profiles / "llama-1b_bf16_h100.json").read_text())
    assert (data["model"], data["precision"], data["gpu_type"], data["regime"]) == (
        "llama-1b",
        "bf16",
        "h100",
        "batched",
    )
    assert data["enrolment"]["synthetic"] is True
    assert "energy_per_token_j" in data  # token counts came with the traces


def test_score_genuine_and_substituted(
    profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    genuine = _traces(tmp_path, "llama-1b/bf16/h100", range(90, 91), 20.0)[0]
    fake = _traces(tmp_path, "llama-3b/bf16/h100", range(90, 91), 20.0)[0]
    args = ["fingerprint", "score", "--profiles", str(profiles), "--claimed", "llama-1b/bf16/h100"]
    assert main([*args, "--window", "10", genuine]) == 0
    out = capsys.readouterr().out
    assert "fingerprint: consistent" in out and "not a proof" in out and "synthetic" in out
    assert main([*args, "--window", "10", fake]) == 1
    out = capsys.readouterr().out
    assert "fingerprint: inconsistent" in out and "llama-3b/bf16/-/h100/batched" in out
    assert main([*args, "--json", fake]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["decision"] == "inconsistent"
    assert report["windows"][0]["false_alarm_rate"] == 1e-3


def test_show(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fingerprint", "show", str(profiles / "llama-1b_bf16_h100.json")]) == 0
    out = capsys.readouterr().out
    assert "llama-1b/bf16/-/h100/batched" in out and "power_frac" in out and "false-alarm rate 0.001" in out
    assert main(["fingerprint", "show", "--json", str(profiles / "llama-1b_bf16_h100.json")]) == 0
    assert json.loads(capsys.readouterr().out)["heldout"] == {"segments": 2}


def test_bad_files_give_diagnostics_not_tracebacks(
    profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "tmb.fingerprint.profile", "version": 99}')
    assert main(["fingerprint", "show", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "broken.json" in err and "version" in err and "Traceback" not in err
    trace = _traces(tmp_path, "llama-1b/bf16/h100", range(1, 2), 5.0)[0]
    assert main(["fingerprint", "score", "--profiles", str(broken), "--claimed", "x", trace]) == 2
    assert main(["fingerprint", "score", "--profiles", str(tmp_path / "none"), "--claimed", "x", trace]) == 2
    notrace = tmp_path / "not-a-trace"
    notrace.write_bytes(b"garbage")
    assert main(["enroll", "--model", "m", str(notrace), "--out", str(tmp_path / "o.json")]) == 2
    assert "Traceback" not in capsys.readouterr().err
