"""Enrolment and the versioned profile file: round trip, corruption, other versions, bad data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tmb.errors import ConfigError, InputError, ParseError
from tmb.fingerprint import FORMAT, VERSION, CalibrationError, Profile, enroll, load_profile
from tmb.telemetry import features, generate


@pytest.fixture(scope="module")
def profile() -> Profile:
    traces = [generate("llama-1b/bf16/h100", "batched", 60.0, seed=s) for s in range(1, 7)]
    prof, found = enroll("llama-1b", traces, precision="bf16", gpu_type="h100", regime="batched")
    assert not [f for f in found if f.severity.value == "error"]
    return prof


def test_enrol_fits_every_feature_and_calibrates(profile: Profile) -> None:
    assert set(profile.features) == {"power_frac", "gpu_util", "mem_util", "sm_active", "tensor_active"}
    assert profile.key == "llama-1b/bf16/-/h100/batched"
    assert profile.matches("llama-1b/bf16/h100") and profile.matches("llama-1b")
    assert not profile.matches("llama-1b/int8/h100") and not profile.matches("llama-1b/bf16/a100")
    assert not profile.matches("llama-1b/bf16/h100/batched")  # unknown extra parts never match silently
    cal = profile.calibration
    assert cal.target_far == 1e-3 and cal.window_s == 10.0
    assert cal.gof.n_windows >= 8 and cal.gof.window_n == 200
    assert cal.gof_threshold_z < cal.gof.z_mean  # a lower-tail threshold from the held-out windows
    assert profile.enrolment["heldout_split"] == "whole traces" and len(profile.heldout) == 2
    assert profile.enrolment["synthetic"] is True
    assert profile.copula is not None and len(profile.copula.names) == 5
    # Power mean lands where the synthetic batched workload puts it (fraction of the 700 W limit).
    assert 0.35 < profile.enrolment["features"]["power_frac"]["mean"] < 0.55


def test_round_trip_is_exact(profile: Profile, tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    profile.save(path)
    again = load_profile(path)
    assert again.key == profile.key and again.calibration == profile.calibration
    assert again.features == profile.features and again.copula == profile.copula
    for a, b in zip(again.heldout, profile.heldout, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    window = features(generate("llama-1b/bf16/h100", "batched", 10.0, seed=50))
    np.testing.assert_array_equal(again.series(window), profile.series(window))
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_corrupt_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"format": "tmb.fingerprint.profile",\n "version": 1,\n "model": ')
    with pytest.raises(ParseError) as info:
        load_profile(path)
    assert str(path) in info.value.message and info.value.context["line"] == 3
    assert "bad.json" in info.value.diagnostics()


def test_other_version_is_refused(profile: Profile, tmp_path: Path) -> None:
    path = _write(tmp_path, {**profile.to_dict(), "version": 2})
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.context["field"] == "version" and str(path) in info.value.message
    assert info.value.hint


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.pop("model"), "model"),
        (lambda d: d.update(model=7), "model"),
        (lambda d: d["features"]["power_frac"]["components"][0].update(a=-1.0), "features.power_frac"),
        (lambda d: d["features"]["gpu_util"].update(weights=[0.2]), "features.gpu_util"),
        (lambda d: d["features"].clear(), "features"),
        (lambda d: d["calibration"]["gof"].update(sd=0.0), "calibration"),
        (lambda d: d["calibration"].update(target_far=2.0), "calibration"),
        (lambda d: d["heldout"]["segments"][0].update(power_frac="!!notbase64"), "heldout.segments[0]"),
        (lambda d: d["heldout"]["segments"][1].update(mem_util="AAAA"), "heldout.segments[1]"),
        (lambda d: d["copula"]["covs"][0][0].__setitem__(0, -5.0), "copula"),
        (lambda d: d["copula"].update(names=["a", "b", "c", "d", "e"]), "copula"),
    ],
)
def test_invalid_fields_are_named(profile: Profile, tmp_path: Path, mutate: Any, field: str) -> None:
    data = json.loads(json.dumps(profile.to_dict()))
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.context["field"] == field
    assert str(path) in info.value.message


def test_not_an_object_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_profile(_write(tmp_path, "[1, 2]"))
    with pytest.raises(InputError, match="cannot read"):
        load_profile(tmp_path / "absent.json")


def test_enrol_cleans_bad_values_with_findings() -> None:
    rng = np.random.default_rng(0)
    traces = []
    for _ in range(3):
        power = rng.beta(20, 30, 2_000)
        power[::97] = np.nan
        power[5] = -0.3
        power[7] = np.inf
        power[9] = 1.08  # overshoot above the limit: counted at the limit
        traces.append({"power_frac": power, "gpu_util": rng.beta(30, 3, 2_000)})
    prof, found = enroll("m", traces, rate_hz=20.0, window_s=5.0)
    ids = {f.id for f in found}
    assert {
        "fingerprint.nonfinite_dropped",
        "fingerprint.negative_dropped",
        "fingerprint.folded_to_one",
    } <= ids
    assert all("trace" in f.context for f in found)
    assert prof.features["power_frac"].components[0].n1 >= 2  # one folded value per trace
    assert prof.features["power_frac"].components[0].p0 == 0.0


def test_enrol_refuses_too_little_data() -> None:
    with pytest.raises(InputError):
        enroll("m", [])
    with pytest.raises(InputError):
        enroll("", [{"power_frac": np.full(100, 0.3)}])
    short = [generate("llama-1b/bf16/h100", "batched", 4.0, seed=1)]
    with pytest.raises(InputError):  # 80 samples: too few to hold out 8 windows of 10 s
        enroll("m", short)
    with pytest.raises(CalibrationError, match="window"):
        enroll("m", [generate("llama-1b/bf16/h100", "batched", 20.0, seed=1)], window_s=10.0)


def test_feature_with_one_repeated_value_is_left_out_with_a_finding() -> None:
    rng = np.random.default_rng(1)
    traces = [
        {"power_frac": rng.beta(20, 30, 1_500), "mem_util": np.where(rng.random(1_500) < 0.5, 0.0, 0.01)}
        for _ in range(3)
    ]
    prof, found = enroll("m", traces, rate_hz=20.0, window_s=5.0)
    assert set(prof.features) == {"power_frac"}
    assert [f.context["feature"] for f in found if f.id == "fingerprint.feature_not_fitted"] == ["mem_util"]
    with pytest.raises(InputError, match="no usable feature"):
        enroll("m", [{"mem_util": np.full(1_500, 0.01)}] * 3, rate_hz=20.0, window_s=5.0)
