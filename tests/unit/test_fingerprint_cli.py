"""``tmb enroll`` and ``tmb fingerprint score|show|evaluate`` end to end on trace files (synthetic runs
with load series and run labels, written by ``synthetic_corpus``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmb.cli import main
from tmb.telemetry import read_trace, write_trace
from tmb.telemetry.synthetic_corpus import synthetic_corpus

CLAIMS = ("llama-1b/bf16/h100", "llama-1b/int8/h100")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    synthetic_corpus(
        out, models=list(CLAIMS), runs_per_model=4, loads=(1, 2, 4, 8), seconds_per_load=15, seed=3
    )
    return out


@pytest.fixture(scope="module")
def profiles(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pdir = tmp_path_factory.mktemp("profiles")
    for claim in CLAIMS:
        model, precision, _gpu = claim.split("/")
        runs = sorted(str(p) for p in corpus.glob(f"llama-1b-{precision}-h100-r*.trace"))
        out = pdir / f"{model}_{precision}.json"
        assert main(["enroll", "--model", model, "--window", "10", *runs, "--out", str(out)]) == 0
    return pdir


def test_enroll_takes_labels_and_runs_from_trace_metadata(profiles: Path) -> None:
    data = json.loads((profiles / "llama-1b_bf16.json").read_text())
    assert (data["version"], data["model"], data["precision"], data["gpu_type"]) == (
        2,
        "llama-1b",
        "bf16",
        "h100",
    )
    assert data["enrolment"]["synthetic"] is True and data["enrolment"]["n_runs"] == 4
    loads = [k["load"] for k in data["knots"]]
    assert loads[0] == 1.0 and loads[-1] == 8.0 and {2.0, 4.0} <= set(loads) and loads == sorted(loads)
    assert data["calibration"]["mem_used_frac"]["runs"] == 4  # every run left out once


def _fresh_run(tmp: Path, claim: str, seed: int) -> str:
    (path,) = synthetic_corpus(
        tmp / f"fresh-{seed}", models=[claim], runs_per_model=1, loads=(2, 4), seconds_per_load=20, seed=seed
    )
    return str(path)


def test_score_genuine_substituted_and_out_of_range(
    profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    genuine = _fresh_run(tmp_path, "llama-1b/bf16/h100", 90)
    fake = _fresh_run(tmp_path, "llama-1b/int8/h100", 91)
    args = ["fingerprint", "score", "--profiles", str(profiles), "--claimed", "llama-1b/bf16/h100"]
    assert main([*args, "--window", "10", genuine]) == 0
    out = capsys.readouterr().out
    assert "fingerprint: consistent" in out and "not a proof" in out and "synthetic" in out
    assert main([*args, "--window", "10", fake]) == 1
    out = capsys.readouterr().out
    assert "fingerprint: inconsistent" in out and "closest alternative llama-1b/int8" in out
    assert main([*args, "--json", fake]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["decision"] == "inconsistent" and report["windows"][0]["false_alarm_rate"] == 1e-3
    # a load far outside the enrolled 1-8 requests in flight: inconclusive (exit 3), never inconsistent
    assert main([*args, "--load", "64", fake]) == 3
    out = capsys.readouterr().out
    assert "fingerprint: inconclusive" in out and "fingerprint.load_out_of_range" in out


def test_a_trace_without_load_is_idle_and_cannot_enrol(
    profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = read_trace(_fresh_run(tmp_path, "llama-1b/bf16/h100", 92))
    bare = tmp_path / "bare.trace"
    write_trace(bare, src.batch, {k: v for k, v in src.meta.items() if k != "load"})
    assert (
        main(["fingerprint", "score", "--profiles", str(profiles), "--claimed", "llama-1b", str(bare)]) == 3
    )
    assert "fingerprint.idle_window" in capsys.readouterr().out
    assert main(["enroll", "--model", "llama-1b", str(bare), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "without a load series" in err and "--load" in err


def test_too_few_runs_cannot_decide(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = sorted(str(p) for p in corpus.glob("llama-1b-bf16-h100-r*.trace"))[:2]
    out = tmp_path / "thin.json"
    assert main(["enroll", "--model", "llama-1b", "--window", "10", *runs, "--out", str(out)]) == 0
    assert "answers `inconclusive` until it has 3" in capsys.readouterr().out
    fake = _fresh_run(tmp_path, "llama-1b/int8/h100", 93)
    assert main(["fingerprint", "score", "--profiles", str(out), "--claimed", "llama-1b", fake]) == 3
    assert "fingerprint.too_few_runs" in capsys.readouterr().out


def test_show(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fingerprint", "show", str(profiles / "llama-1b_bf16.json")]) == 0
    out = capsys.readouterr().out
    assert "llama-1b/bf16/vllm/h100" in out and "mem_used_frac" in out and "4 run(s) left out" in out
    assert main(["fingerprint", "show", "--json", str(profiles / "llama-1b_bf16.json")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "tmb.fingerprint.profile"


def test_evaluate_leaves_runs_out(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js, png = tmp_path / "ev.json", tmp_path / "ev.png"
    args = ["fingerprint", "evaluate", str(corpus), "--window", "20", "--step", "5"]
    assert main([*args, "--json", str(js), "--png", str(png)]) == 0  # 0: no honest false alarm
    out = capsys.readouterr().out
    assert "leave-one-run-out over 8 run(s) (8 synthetic)" in out and "ms per window" in out
    pairs = {(p["claimed"], p["actual"]): p for p in json.loads(js.read_text())["pairs"]}
    honest = pairs[("llama-1b/bf16/vllm/h100", "llama-1b/bf16/vllm/h100")]
    assert honest["honest"] and honest["inconsistent"] == 0 and honest["consistent"] > 0
    swap = pairs[("llama-1b/bf16/vllm/h100", "llama-1b/int8/vllm/h100")]
    assert not swap["honest"] and swap["detection_rate"] >= 0.95
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_recording_stored_twice_is_one_run(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = read_trace(next(corpus.glob("llama-1b-bf16-h100-r0.trace")))
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("a", "b"):
        meta = {**src.meta, "run": {**src.meta["run"], "id": f"copy-{name}"}}
        write_trace(twin / f"{name}.trace", src.batch, meta)
    out = tmp_path / "p.json"
    assert main(["enroll", "--model", "llama-1b", str(twin), "--out", str(out)]) == 0
    assert "fingerprint.duplicate_run" in capsys.readouterr().out
    assert json.loads(out.read_text())["enrolment"]["n_runs"] == 1


def test_bad_files_give_diagnostics_not_tracebacks(
    profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "tmb.fingerprint.profile", "version": 1}')
    assert main(["fingerprint", "show", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "broken.json" in err and "re-enrol" in err and "Traceback" not in err
    trace = _fresh_run(tmp_path, "llama-1b/bf16/h100", 94)
    assert main(["fingerprint", "score", "--profiles", str(broken), "--claimed", "x", trace]) == 2
    assert main(["fingerprint", "score", "--profiles", str(tmp_path / "none"), "--claimed", "x", trace]) == 2
    notrace = tmp_path / "not-a-trace"
    notrace.write_bytes(b"garbage")
    assert main(["enroll", "--model", "m", str(notrace), "--out", str(tmp_path / "o.json")]) == 2
    assert main(["fingerprint", "evaluate", str(tmp_path / "missing")]) == 2
    assert "Traceback" not in capsys.readouterr().err
