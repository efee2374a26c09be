"""The auditor's HTML report, opened in a real headless Chromium (Debian ``chromium``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    return out


def _dump_dom(page: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is missing (Debian package chromium; make test installs it)"
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.parametrize(("bundle", "verdict"), [("bundle-honest", "PASS"), ("bundle-other-model", "FAIL")])
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
    if verdict == "FAIL":
        assert "dm.verity_root_mismatch" in dom
