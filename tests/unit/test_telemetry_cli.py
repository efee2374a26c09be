"""``tmb telemetry record`` / ``show`` through the real entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tmb.cli import main
from tmb.telemetry.replay import read_trace


def test_record_synthetic_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8.trace"
    argv = ["telemetry", "record", "--source", "synthetic", "--model", "llama-1b/int8/h100"]
    argv += ["--regime", "batched", "--seconds", "4", "--rate", "10", "--out", str(out)]
    assert main(argv) == 0
    assert "40 samples (synthetic)" in capsys.readouterr().out
    trace = read_trace(out)
    assert len(trace.batch) == 40 and trace.synthetic
    assert trace.meta["workload"]["precision"] == "int8" and trace.meta["workload"]["regime"] == "batched"
    assert main(["telemetry", "show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "samples:     40" in text and "tensor_imma" in text
    assert main(["telemetry", "show", "--json", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["synthetic"] is True and summary["rate_hz"] == pytest.approx(10.0)


def test_bad_input_exits_2_with_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.trace"
    junk.write_bytes(b"\x00" * 10)
    assert main(["telemetry", "show", str(junk)]) == 2
    assert "error: trace" in capsys.readouterr().err
    argv = ["telemetry", "record", "--model", "nope", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "unknown synthetic workload model" in capsys.readouterr().err
    assert main(["telemetry", "record", "--regime", "wild", "--out", str(tmp_path / "x")]) == 2


def test_record_nvml_without_driver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoDriver:  # TEST DOUBLE: a pynvml whose library is missing
        class NVMLError(Exception):
            pass

        def nvmlInit(self) -> None:
            raise self.NVMLError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", NoDriver())
    assert main(["telemetry", "record", "--source", "nvml", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "NVML could not be initialised" in err and "Traceback" not in err
