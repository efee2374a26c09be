"""``tmb telemetry import``: real tool outputs (tests/data/formats, copied with their licences) and the
shared real inference recordings (../shared/real-gpu-traces, read in place, skipped where absent)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tmb.cli import main
from tmb.errors import ConfigError, InputError, ParseError
from tmb.telemetry.importers import (
    FORMATS,
    ImportOptions,
    Labels,
    detect_format,
    import_recording,
    parse_utc_offset,
)
from tmb.telemetry.load import load_from_meta
from tmb.telemetry.replay import read_trace

MIB = 1 << 20
DATA = Path(__file__).resolve().parents[1] / "data" / "formats"
CSV_DIR = DATA / "nvidia-smi-query-gpu-csv"
H200_CSV = CSV_DIR / "nvgpuexp__linux-x86_64__nvidia-h200__590.48.01__load-query-gpu.txt"
T4_CSV = CSV_DIR / "virtualclient__query-gpu-4xT4.csv"
H100X4_CSV = CSV_DIR / "virtualclient__query-gpu-8xH100.csv"
H200_DMON = DATA / "nvidia-smi-dmon" / "nvgpuexp__linux-x86_64__nvidia-h200__590.48.01__load-dmon.txt"
DCGMI = DATA / "dcgmi-dmon" / "virtualclient__DCGMIDmonResults.txt"
PROM = DATA / "dcgm-exporter-prometheus" / "datadog__metrics"
PMON = DATA / "nvidia-smi-pmon" / "nvgpuexp__linux-x86_64__nvidia-h200__590.48.01__idle-pmon.txt"

REAL = Path(__file__).resolve().parents[3] / "shared" / "real-gpu-traces"
HF = REAL / "hf-transformers-7b" / "stats" / "e2dc-raw-stats"
TRT = REAL / "trtllm-llama2-v100s" / "llama"
_absent = pytest.mark.skipif(not REAL.is_dir(), reason=f"shared real GPU recordings not present at {REAL}")


def needs_real(test: Callable[[], None]) -> Callable[[], None]:
    """Reads ../shared/real-gpu-traces in place (no licence: never copied into the repository)."""
    marked: Callable[[], None] = pytest.mark.shared(_absent(test))
    return marked


def first(batch_col: np.ndarray) -> float:
    return float(batch_col[0])


# -- nvidia-smi --query-gpu CSV --------------------------------------------------------------------------


def test_query_gpu_csv_with_units_in_cells() -> None:
    imp = import_recording(H200_CSV)
    b, meta = imp.batch, imp.meta
    assert len(b) == 1 and b.gpus == ("GPU-00000000-0000-0000-0000-000000000000",)
    assert b.source == "import" and b.synthetic is False and meta["synthetic"] is False
    # power.draw.instant is preferred (like the NVML source); 626.26 W in the file
    assert b.power_field == "instant" and first(b.power_w) == pytest.approx(626.26)
    assert first(b.mem_used_bytes) == 32362 * MIB and first(b.mem_total_bytes) == 143771 * MIB
    assert first(b.power_limit_w) == 700.0 and first(b.gpu_util) == 100.0 and first(b.mem_util) == 7.0
    assert first(b.sm_clock_mhz) == 1980.0 and first(b.mem_clock_mhz) == 3201.0 and first(b.temp_c) == 52.0
    assert meta["gpu_name"] == "NVIDIA H200" and meta["driver_version"] == "590.48.01"
    assert (
        meta["import"]["format"] == "nvidia-smi-csv"
        and meta["import"]["power"]["source"] == "power.draw.instant"
    )
    # 2026/07/03 22:11:09.763 local, taken as UTC and said so
    assert int(b.t_ns[0]) == 1783116669_763_000_000
    assert meta["import"]["timestamps"]["assumed_utc"] is True
    assert meta["run"] == {
        "id": hashlib.sha256(H200_CSV.read_bytes()).hexdigest()[:16],
        "node": "GPU-00000000-0000-0000-0000-000000000000",
        "day": "2026-07-03",
    }
    average = import_recording(H200_CSV, ImportOptions(power="average")).batch
    assert average.power_field == "average" and first(average.power_w) == pytest.approx(627.40)


def test_query_gpu_csv_nounits_multi_gpu_told_apart_by_bus_id() -> None:
    imp = import_recording(T4_CSV)
    b, meta = imp.batch, imp.meta
    assert b.gpus == ("GPU-import-0", "GPU-import-1", "GPU-import-2", "GPU-import-3") and len(b) == 4
    assert "synthesized" in meta["import"]["uuids"] and meta["run"]["node"] == "unknown-node"
    assert meta["devices"][0]["bus_id"] == "00000001:00:00.0"
    # no power column: absent (NaN), never 0
    assert "power_w" not in b.present_fields() and bool(np.all(np.isnan(b.power_w)))
    assert b.power_field == "none"
    assert b.mem_used_bytes.tolist() == [257 * MIB, 14 * MIB, 14 * MIB, 14 * MIB]
    assert first(b.mem_total_bytes) == 16384 * MIB and b.temp_c.tolist() == [48.0, 51.0, 53.0, 53.0]
    one = import_recording(T4_CSV, ImportOptions(gpu="0003:00:00.0")).batch
    assert one.gpus == ("GPU-import-2",) and one.mem_used_bytes.tolist() == [14 * MIB]
    assert meta["gpu_name"] == "Tesla T4"
    with pytest.raises(InputError, match="no GPU '9'") as err:
        import_recording(T4_CSV, ImportOptions(gpu="9"))
    assert "GPU-import-3" in str(err.value.context["available"])


def test_query_gpu_csv_instant_and_average_power_columns() -> None:
    b = import_recording(H100X4_CSV).batch
    assert len(b.gpus) == 4 and b.power_field == "instant"
    assert b.power_w.tolist() == pytest.approx([70.68, 72.05, 70.97, 71.44])
    avg = import_recording(H100X4_CSV, ImportOptions(power="average")).batch
    assert avg.power_w.tolist() == pytest.approx([70.89, 71.71, 70.78, 72.17])
    assert first(b.mem_total_bytes) == 81559 * MIB and first(b.sm_clock_mhz) == 345.0


def test_utc_offset_converts_local_times(tmp_path: Path) -> None:
    f = tmp_path / "smi.csv"
    f.write_text("timestamp, index, power.draw [W]\n2024/03/29 08:43:09.805, 0, 25.09 W\n")
    imp = import_recording(f, ImportOptions(utc_offset_s=2 * 3600))
    assert int(imp.batch.t_ns[0]) == 1711694589_805_000_000  # 06:43:09.805 UTC
    ts = imp.meta["import"]["timestamps"]
    assert ts["utc_offset"] == "+02:00" and ts["assumed_utc"] is False and ts["absolute"] is True
    assert [parse_utc_offset(t) for t in ("UTC-04:00", "-0400", "+5:30", "Z")] == [-14400, -14400, 19800, 0]
    out = tmp_path / "t"
    assert main(["telemetry", "import", str(f), "--out", str(out), "--utc-offset=-04:00"]) == 0
    assert int(read_trace(out).batch.t_ns[0]) == 1711716189_805_000_000  # 12:43:09.805 UTC


# -- nvidia-smi dmon -------------------------------------------------------------------------------------


def test_dmon_real_output() -> None:
    imp = import_recording(H200_DMON)
    b = imp.batch
    assert len(b) == 5 and b.gpus == ("GPU-import-0",) and b.power_field == "average"
    assert b.power_w.tolist() == [630.0, 628.0, 629.0, 632.0, 630.0]
    assert first(b.gpu_util) == 100.0 and first(b.temp_c) == 53.0 and first(b.mem_clock_mhz) == 3201.0
    assert np.diff(b.t_ns).tolist() == [1_000_000_000] * 4
    ts = imp.meta["import"]["timestamps"]
    assert (
        ts["source"] == "sample order" and ts["absolute"] is False and imp.meta["run"]["day"] == "unknown-day"
    )
    placed = import_recording(H200_DMON, ImportOptions(start="2024-03-29T08:00:00Z", interval_s=2.0))
    assert int(placed.batch.t_ns[0]) == 1711699200_000_000_000 and placed.meta["run"]["day"] == "2024-03-29"
    assert int(placed.batch.t_ns[-1] - placed.batch.t_ns[0]) == 8_000_000_000


def test_dmon_with_date_time_multi_gpu_and_dashes(tmp_path: Path) -> None:
    f = tmp_path / "dmon.txt"
    f.write_text(
        "#Date       Time        gpu    pwr  gtemp  mtemp     sm    mem    enc    dec   mclk   pclk    fb \n"
        "#YYYYMMDD   HH:MM:SS    Idx      W      C      C      %      %      %      %    MHz    MHz    MB \n"
        " 20240329   08:43:09      0     62     37      -      0      0      0      0    877    210  1024 \n"
        " 20240329   08:43:09      1      -     35      -      -      0      0      0    877    210     0 \n"
        " 20240329   08:43:10      0    250     40      -     98     40      0      0    877   1410  9000 \n"
        " 20240329   08:43:10      1     60     35      -      0      0      0      0    877    210     0 \n"
    )
    imp = import_recording(f)
    b = imp.batch
    assert imp.meta["import"]["format"] == "nvidia-smi-dmon" and b.gpus == ("GPU-import-0", "GPU-import-1")
    g0 = b.for_gpu("GPU-import-0")
    assert g0.power_w.tolist() == [62.0, 250.0] and g0.mem_used_bytes.tolist() == [1024 * MIB, 9000 * MIB]
    g1 = b.for_gpu("GPU-import-1")
    assert math.isnan(g1.power_w[0]) and math.isnan(g1.gpu_util[0]) and g1.power_w[1] == 60.0
    assert int(g0.t_ns[0]) == 1711701789_000_000_000 and imp.meta["import"]["timestamps"]["source"] == "file"
    assert "mtemp" in imp.meta["import"]["ignored_columns"]


# -- dcgmi dmon ------------------------------------------------------------------------------------------


def test_dcgmi_dmon_real_output() -> None:
    imp = import_recording(DCGMI)
    b = imp.batch
    assert len(b) == 15 and b.gpus == ("GPU-import-0",)
    assert b.present_fields() == ("tensor_active", "dram_active")
    assert b.tensor_active[2] == pytest.approx(0.885) and b.dram_active[2] == pytest.approx(0.305)
    assert imp.meta["import"]["ignored_columns"] == ["GRACT"] and b.power_field == "none"


def test_dcgmi_dmon_power_na_and_other_entities(tmp_path: Path) -> None:
    f = tmp_path / "dcgmi.txt"
    f.write_text(
        "#Entity   POWER        TMPTR        FBUSD        SMACT\n"
        "ID        W            C\n"
        "GPU 0     71.350       34           1024         0.250\n"
        "GPU 1     N/A          33           0            0.000\n"
        "GPU-I 3   N/A          N/A          N/A          0.100\n"
        "#Entity   POWER        TMPTR        FBUSD        SMACT\n"
        "ID        W            C\n"
        "GPU 0     300.5        40           20000        0.900\n"
        "GPU 1     60.0         33           0            0.000\n"
    )
    imp = import_recording(f)
    b = imp.batch
    assert imp.meta["import"]["format"] == "dcgmi-dmon" and b.power_field == "average"
    g0 = b.for_gpu("GPU-import-0")
    assert g0.power_w.tolist() == [71.35, 300.5] and g0.mem_used_bytes.tolist() == [1024 * MIB, 20000 * MIB]
    assert g0.sm_active.tolist() == [0.25, 0.9]
    assert math.isnan(b.for_gpu("GPU-import-1").power_w[0])
    assert imp.meta["import"]["ignored"] == {"entity GPU-I (not a whole GPU)": 1}


# -- dcgm-exporter Prometheus ----------------------------------------------------------------------------


def test_prometheus_single_scrape() -> None:
    imp = import_recording(PROM, ImportOptions(start="1712840249"))
    b = imp.batch
    uuid = "GPU-20c56d28-0da5-6d26-a36a-e7af1ce2586e"
    assert len(b) == 1 and b.gpus == (uuid,) and b.power_field == "average"
    assert first(b.power_w) == pytest.approx(8.969) and first(b.energy_mj) == 128996013.0
    assert first(b.mem_used_bytes) == 0.0 and first(b.mem_total_bytes) == 15109 * MIB
    assert first(b.sm_clock_mhz) == 300.0 and first(b.mem_clock_mhz) == 405.0 and first(b.temp_c) == 25.0
    assert int(b.t_ns[0]) == 1712840249_000_000_000 and imp.meta["run"]["day"] == "2024-04-11"
    assert imp.meta["gpu_name"] == "Tesla T4" and imp.meta["driver_version"] == "460.106.00"
    assert imp.meta["run"]["node"] == uuid
    assert "DCGM_FI_DEV_XID_ERRORS" in imp.meta["import"]["ignored_columns"]


def test_prometheus_scrapes_with_markers_and_concatenated(tmp_path: Path) -> None:
    scrape = PROM.read_text()
    hotter = scrape.replace("} 8.969000", "} 70.5")
    marked = tmp_path / "marked.prom"
    marked.write_text(f"# scrape 2024-04-11T12:00:00Z\n{scrape}# scrape 2024-04-11T12:00:05.5Z\n{hotter}")
    b = import_recording(marked).batch
    assert b.power_w.tolist() == [8.969, 70.5]
    assert b.t_ns.tolist() == [1712836800_000_000_000, 1712836805_500_000_000]
    plain = tmp_path / "plain.prom"
    plain.write_text(scrape + hotter + scrape)
    imp = import_recording(plain, ImportOptions(interval_s=15.0))
    assert imp.batch.power_w.tolist() == [8.969, 70.5, 8.969]
    assert np.diff(imp.batch.t_ns).tolist() == [15_000_000_000] * 2
    assert imp.meta["rate_hz"] == pytest.approx(1 / 15)


# -- the nvsmi scrape format (shared real recordings) ----------------------------------------------------


@needs_real
def test_nvsmi_single_gpu_layout() -> None:
    f = TRT / "13B/fp16/1-gpu-1-batch/nvsmi_numreqsample0_iter100_max1000_v10032gb__blob3e33b491.out"
    imp = import_recording(f)
    b = imp.batch
    assert imp.meta["import"]["format"] == "nvsmi-scrape" and b.gpus == ("GPU-import-0",)
    assert len(b) == 1098 and imp.meta["import"]["timestamps"]["source"] == "file"
    assert set(b.power_limit_w.tolist()) == {250.0} and set(b.mem_total_bytes.tolist()) == {32768 * MIB}
    assert first(b.power_w) == 24.0 and int(b.t_ns[0]) == 1712840249_000_000_000
    assert float(np.max(b.mem_used_bytes)) > 20_000 * MIB  # the 13B weights resident
    assert imp.meta["gpu_name"] == "V100S_PCIE_32GB"


@needs_real
def test_nvsmi_every_gpu_layout_with_constant_timestamps() -> None:
    f = TRT / "7B/fp16_wq4/1-gpu-1-batch/nvsmi_numreqsample0_iter100_max1000_v10032gb.out"
    imp = import_recording(f)
    b = imp.batch
    assert b.gpus == ("GPU-import-0", "GPU-import-1") and len(b) == 2 * 210
    ts = imp.meta["import"]["timestamps"]
    assert ts["source"] == "sample order" and ts["interval_s"] == 1.1 and ts["absolute"] is True
    assert any("constant" in n for n in imp.meta["import"]["notes"])
    g0 = b.for_gpu("GPU-import-0")
    assert np.diff(g0.t_ns).tolist() == [1_100_000_000] * 209
    assert set(g0.power_limit_w.tolist()) == {250.0} and set(g0.mem_total_bytes.tolist()) == {32768 * MIB}
    assert first(g0.temp_c) == 22.0 and float(np.max(g0.mem_used_bytes)) == 29748 * MIB
    only0 = import_recording(f, ImportOptions(gpu="0", interval_s=1.0)).batch
    assert only0.gpus == ("GPU-import-0",) and int(only0.t_ns[1] - only0.t_ns[0]) == 1_000_000_000


@needs_real
def test_nvsmi_every_gpu_layout_drops_the_all_na_gpu() -> None:
    single = TRT / "13B/fp16/1-gpu-1-batch/nvsmi_numreqsample0_iter100_max1000_v10032gb__blob3e33b491.out"
    every = TRT / "13B/fp16/1-gpu-1-batch/nvsmi_numreqsample0_iter100_max1000_v10032gb__blobfc833ba3.out"
    imp = import_recording(every)
    assert imp.batch.gpus == ("GPU-import-0",) and imp.meta["import"]["readings_without_values"] == 1098
    assert imp.meta["import"]["gpu_selection"]["without_values"] == ["GPU-import-1"]
    assert imp.batch.power_w.tolist() == import_recording(single).batch.power_w.tolist()


# -- 10 Hz nvidia-smi recordings (shared) ----------------------------------------------------------------


@needs_real
def test_hf_nvidia_smi_csv_imports_at_10_hz() -> None:
    f = HF / "llama2-7b/2024-03-29/08-43-09/nvidia-smi.csv"
    with f.open(newline="") as fh:
        rows = list(csv.reader(fh, skipinitialspace=True))[1:]
    expected = [float(r[1].removesuffix(" W")) for r in rows]
    imp = import_recording(f)
    b = imp.batch
    assert b.power_w.tolist() == expected and len(b) == 16076
    assert 9.0 < b.summary()["rate_hz"] < 10.5 and b.power_field == "average"
    assert imp.meta["run"]["day"] == "2024-03-29" and imp.meta["import"]["skipped"]["count"] == 0


@needs_real
def test_hf_recording_cut_mid_line_is_reported_not_fatal() -> None:
    f = HF / "llama2-7b/2024-03-28/11-15-46/nvidia-smi.csv"
    imp = import_recording(f)
    skipped = imp.meta["import"]["skipped"]
    assert skipped["truncated_final_line"] is True and skipped["count"] == 1 and skipped["bad_rows"] == 0
    assert skipped["first"][0]["line"] == 2197 and len(imp.batch) == 2195


# -- detection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (H200_CSV, "nvidia-smi-csv"),
        (T4_CSV, "nvidia-smi-csv"),
        (H100X4_CSV, "nvidia-smi-csv"),
        (H200_DMON, "nvidia-smi-dmon"),
        (DCGMI, "dcgmi-dmon"),
        (PROM, "dcgm-prometheus"),
    ],
)
def test_detection(path: Path, fmt: str) -> None:
    assert detect_format(path.read_text().splitlines()) == fmt
    assert fmt in FORMATS


def test_detection_refuses_what_it_cannot_import(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="pmon"):
        import_recording(PMON, ImportOptions())
    junk = tmp_path / "junk.txt"
    junk.write_text("hello world\n1 2 3\n")
    with pytest.raises(InputError, match="cannot tell what tool") as err:
        import_recording(junk)
    assert "--format" in (err.value.hint or "")
    with pytest.raises(InputError, match="empty"):
        (tmp_path / "empty.csv").write_text("")
        import_recording(tmp_path / "empty.csv")
    header_only = tmp_path / "header.csv"
    header_only.write_text("timestamp, power.draw [W]\n")
    with pytest.raises(InputError, match="no data rows"):
        import_recording(header_only)


# -- bad input -------------------------------------------------------------------------------------------

BAD_CSV = (
    "timestamp, index, power.draw [W], utilization.gpu [%]\n"
    "2024/03/29 08:43:09.805, 0, 25.09 W, 0 %\n"
    "2024/03/29 08:43:09.905, 0, 26.00 W, 1 %\n"
    "2024/03/29 08:43:10.005, 0, 2x.00 W, 2 %\n"
    "2024/03/29 08:43:10.105, 0, 27.00 W, 3 %\n"
)


def test_bad_number_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(BAD_CSV)
    with pytest.raises(ParseError) as err:
        import_recording(f)
    assert err.value.context["line"] == 4 and err.value.context["path"] == str(f)
    assert "line 4" in err.value.message and "2x.00" in err.value.message
    assert main(["telemetry", "import", str(f), "--out", str(tmp_path / "t")]) == 2
    text = capsys.readouterr().err
    assert "line 4" in text and "--skip-bad-rows" in text and "Traceback" not in text
    assert not (tmp_path / "t").exists()
    argv = ["telemetry", "import", str(f), "--skip-bad-rows", "--out", str(tmp_path / "t")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "skipped 1 row" in out.err and "line 4" in out.err and "3 samples" in out.out
    skipped = read_trace(tmp_path / "t").meta["import"]["skipped"]
    assert skipped["bad_rows"] == 1 and skipped["first"][0]["line"] == 4


@pytest.mark.parametrize(
    ("cell", "what"),
    [("-5 W", "outside the plausible range"), ("12000 W", "outside the plausible range"), ("25 kJ", "unit")],
)
def test_absurd_values_are_errors_naming_the_line(tmp_path: Path, cell: str, what: str) -> None:
    f = tmp_path / "absurd.csv"
    f.write_text(BAD_CSV.replace("2x.00 W", cell))
    with pytest.raises(ParseError, match=what) as err:
        import_recording(f)
    assert err.value.context["line"] == 4


def test_wrong_cell_count_and_bad_time(tmp_path: Path) -> None:
    f = tmp_path / "short.csv"
    f.write_text(BAD_CSV.replace("0, 26.00 W, 1 %", "0, 26.00 W"))
    with pytest.raises(ParseError, match="3 cells where the header has 4") as err:
        import_recording(f)
    assert err.value.context["line"] == 3
    f.write_text(BAD_CSV.replace("2x.00", "28.00").replace("2024/03/29 08:43:10.105", "yesterday"))
    with pytest.raises(ParseError, match="not a date and time") as err:
        import_recording(f)
    assert err.value.context["line"] == 5


def test_time_going_backwards_is_an_error_or_sorted(tmp_path: Path) -> None:
    f = tmp_path / "back.csv"
    f.write_text(BAD_CSV.replace("2x.00", "28.00").replace("08:43:10.005", "08:43:09.000"))
    with pytest.raises(ParseError, match="time goes backwards") as err:
        import_recording(f)
    assert err.value.context["line"] == 4
    imp = import_recording(f, ImportOptions(sort=True))
    assert imp.batch.power_w.tolist() == [28.0, 25.09, 26.0, 27.0]
    assert imp.meta["import"]["timestamps"]["sorted"] == 1


def test_bad_rows_in_other_formats(tmp_path: Path) -> None:
    dmon = tmp_path / "dmon.txt"
    dmon.write_text(H200_DMON.read_text().replace("  632  ", "  abc  ", 1))
    with pytest.raises(ParseError, match="not a number") as err:
        import_recording(dmon)
    assert err.value.context["line"] == 6
    prom = tmp_path / "prom.txt"
    prom.write_text(PROM.read_text().replace("} 8.969000", "} -3"))
    with pytest.raises(ParseError, match="power_w") as err:
        import_recording(prom)
    assert err.value.context["line"] == 12
    nvsmi = tmp_path / "nvsmi.out"
    nvsmi.write_text(
        "nvsmi profiling: V100S\n"
        "{'timestamp_raw': 1712840249.0, 'power_usage': '24W / 250W', 'memory_usage': '0MiB / 32768MiB'}\n"
        "{'timestamp_raw': 1712840250.0, 'power_usage': '24W / 250W', '__import__': os.system('x')}\n"
    )
    with pytest.raises(ParseError, match="not an nvsmi record") as err:
        import_recording(nvsmi)
    assert err.value.context["line"] == 3
    imp = import_recording(nvsmi, ImportOptions(skip_bad_rows=True))
    assert len(imp.batch) == 1 and first(imp.batch.mem_total_bytes) == 32768 * MIB


# -- labels, load, run, trim, round trip -----------------------------------------------------------------


def test_cli_labels_sidecar_load_run_and_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    side = tmp_path / "labels.toml"
    side.write_text(
        'model = "llama-2-7b"\nprecision = "fp16"\nengine = "trtllm"\nregime = "batched"\nload = 4\n'
    )
    out = tmp_path / "h100.tmbtrace"
    argv = ["telemetry", "import", str(H100X4_CSV), "--out", str(out), "--labels", str(side)]
    argv += ["--precision", "int4", "--gpu-type", "h100", "--gpu", "00000000:11:00.0", "--node", "node-7"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "1 samples, 1 GPU(s)" in line and "power_w" in line
    trace = read_trace(out)
    assert trace.meta["workload"] == {
        "model": "llama-2-7b",
        "precision": "int4",  # the flag wins over the sidecar
        "engine": "trtllm",
        "gpu_type": "h100",
        "regime": "batched",
    }
    load = load_from_meta(trace.meta)
    assert load is not None and load.values == (4.0,) and load.t_ns == (int(trace.batch.t_ns[0]),)
    assert trace.meta["run"]["node"] == "node-7" and trace.meta["run"]["day"] == "2024-03-15"
    assert trace.batch.source == "import" and trace.synthetic is False
    assert first(trace.batch.power_w) == pytest.approx(72.05)
    imp = trace.meta["import"]
    assert (
        imp["file"] == H100X4_CSV.name
        and imp["sha256"] == hashlib.sha256(H100X4_CSV.read_bytes()).hexdigest()
    )
    assert imp["rows_read"] == 4 and imp["gpu_selection"]["requested"] == "00000000:11:00.0"
    assert imp["gpu_selection"]["selected"] == ["GPU-import-1"] and imp["format_detected"] is True
    direct = import_recording(H100X4_CSV, ImportOptions(gpu="1"))
    assert direct.batch == trace.batch
    json.dumps(trace.meta)  # plain JSON throughout


def test_labels_file_json_and_errors(tmp_path: Path) -> None:
    side = tmp_path / "labels.json"
    side.write_text(json.dumps({"model": "m", "run_id": "r1", "day": "2024-01-02"}))
    labels = Labels(model="flag").over(Labels.from_file(side))
    assert labels.model == "flag" and labels.run_id == "r1"
    imp = import_recording(DCGMI, labels=labels)
    assert imp.meta["run"] == {"id": "r1", "node": "unknown-node", "day": "2024-01-02"}
    side.write_text(json.dumps({"model": "m", "colour": "blue"}))
    with pytest.raises(ConfigError, match="colour"):
        Labels.from_file(side)
    side.write_text(json.dumps({"load": "many"}))
    with pytest.raises(ConfigError, match="load must be a number"):
        Labels.from_file(side)
    with pytest.raises(InputError, match="--day"):
        Labels(day="29/03/2024")
    with pytest.raises(InputError, match="--load"):
        Labels(load=-1.0)


def test_trim_idle(tmp_path: Path) -> None:
    f = tmp_path / "idle.csv"
    utils = [0, 0, 5, 100, 0, 90, 0, 0, 0]
    rows = [f"2024/03/29 08:43:{10 + i:02d}.000, {30 + u} W, {u} %" for i, u in enumerate(utils)]
    f.write_text("timestamp, power.draw [W], utilization.gpu [%]\n" + "\n".join(rows) + "\n")
    imp = import_recording(f, ImportOptions(trim_idle=True))
    assert imp.batch.gpu_util.tolist() == [5.0, 100.0, 0.0, 90.0]
    assert imp.meta["import"]["trim_idle"] == {"head": 2, "tail": 3}
    with pytest.raises(InputError, match="utilisation"):
        import_recording(DCGMI, ImportOptions(trim_idle=True))


def test_cli_bad_flags_are_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "t")
    assert main(["telemetry", "import", str(H200_DMON), "--out", out, "--utc-offset", "+25:00"]) == 2
    assert "--utc-offset" in capsys.readouterr().err
    assert main(["telemetry", "import", str(H200_DMON), "--out", out, "--start", "soon"]) == 2
    assert "--start" in capsys.readouterr().err
    assert main(["telemetry", "import", str(tmp_path / "missing.csv"), "--out", out]) == 2
    assert "cannot read recording" in capsys.readouterr().err
    assert main(["telemetry", "import", str(H200_DMON), "--out", out, "--format", "dcgmi-dmon"]) == 2
    assert "not dcgmi dmon output" in capsys.readouterr().err
