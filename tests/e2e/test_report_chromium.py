"""The auditor's HTML report, opened in a real headless Chromium (Debian ``chromium``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sample_infra.demo_setup import demo_trace, enrol_profiles
from sample_infra.evidence_demo import run

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    run(out)
    profiles = enrol_profiles(["llama-1b/bf16/h100", "llama-1b/int8/h100"], out / "profiles")
    for name, behaves in (("bundle-telemetry-honest", "bf16"), ("bundle-telemetry-impostor", "int8")):
        _with_telemetry(out / "bundle-honest", out / name, f"llama-1b/{behaves}/h100", profiles)
    return out


def _with_telemetry(src: Path, dest: Path, behaves_as: str, profiles: list[Path]) -> None:
    """The honest bundle plus a request window (5 s of SYNTHETIC telemetry of ``behaves_as``) claimed as
    llama-1b/bf16/h100, and the enrolled profiles (docs/evidence-bundle.md, optional members)."""
    shutil.copytree(src, dest)
    window = demo_trace(behaves_as, 5.0, seed=4242)
    window = window.slice_time(int(window.t_ns[0]), int(window.t_ns[0]) + 5 * 10**9)
    (dest / "telemetry.bin").write_bytes(window.encode())
    (dest / "profiles").mkdir()
    for p in profiles:
        shutil.copy(p, dest / "profiles" / p.name)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(
        telemetry="telemetry.bin",
        profiles=[f"profiles/{p.name}" for p in profiles],
        claimed="llama-1b/bf16/h100",
    )
    (dest / "manifest.json").write_text(json.dumps(manifest))


def _dump_dom(page: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is missing (Debian package chromium; make test installs it)"
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.parametrize(
    ("bundle", "verdict"),
    [
        ("bundle-honest", "PASS"),
        ("bundle-other-model", "FAIL"),
        ("bundle-telemetry-honest", "PASS"),
        ("bundle-telemetry-impostor", "FAIL"),
    ],
)
def test_report_loads_and_shows_the_verdict(demo: Path, tmp_path: Path, bundle: str, verdict: str) -> None:
    page = tmp_path / "report.html"
    cli = subprocess.run(
        [sys.executable, "-m", "tmb", "audit", str(demo / bundle), "--html", str(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == (0 if verdict == "PASS" else 1), cli.stderr
    done = _dump_dom(page, tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert '<div id="verdict" class="verdict' in dom
    assert f">{verdict}:" in dom
    assert "Attestation chain" in dom and "IMA measurement list" in dom
    # A page error or a blocked resource shows up in Chromium's console log.
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # self-contained
    if bundle == "bundle-other-model":
        assert "dm.verity_root_mismatch" in dom
    if "telemetry" in bundle:  # the window against the enrolled profiles, as embedded PNG plots
        assert dom.count('<img alt="') >= 5 and 'src="data:image/png;base64,' in dom
        assert "Synthetic telemetry" in dom
        want = "inconsistent with" if verdict == "FAIL" else "consistent with llama-1b/bf16/h100"
        if verdict == "FAIL":  # the chain held: the page says what failed instead of pointing at no findings
            assert "the telemetry does not fit the claimed model" in dom
        assert want in dom
    else:
        assert "carries no telemetry window" in dom
