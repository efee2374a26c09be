"""The base install without its extras (tmb/extras.py): the auditor's commands run, a feature that needs an
extra says which one in one line, and ``tmb --help`` / ``tmb verify-verdict`` import nothing heavy.

Each command runs in a fresh interpreter whose import system refuses the extras' modules (a meta-path
finder installed before tmb is imported), as on a machine where ``pip install tmb`` left them out. Nothing
here measures time: the start-up figures are asserted as the modules a command imports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tmb.attest.evidence import write_bundle
from tmb.extras import EXTRAS, MissingExtraError, require
from tmb.verdict.model import Decision, Reason, Verdict, Window
from tmb.verdict.signing import load_or_create_key

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = sorted({m for modules in EXTRAS.values() for m in modules} | {"psycopg_pool"})

# Runs tmb's main() with the extras' top-level packages refusing to import.
BOOTSTRAP = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = set(sys.argv[1].split(","))

class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
from tmb.cli import main
raise SystemExit(main(sys.argv[2:]))
"""

# What `tmb --help` and `tmb verify-verdict` must not import: the scientific stack, plotting, the server,
# the TPM/NVML/PostgreSQL bindings (verify-verdict needs cryptography for Ed25519, --help nothing).
HEAVY = ("numpy", "scipy", "matplotlib", "aiohttp", "prometheus_client", "httptools", "uvloop", *BLOCKED)


def _light(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, ",".join(BLOCKED), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _imported(*args: str | Path) -> set[str]:
    """Every module ``tmb ARGS`` imports (from ``python -X importtime``'s report), after checking it ran."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tmb", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.MULTILINE)
    assert names, "no -X importtime report"
    return set(names)


def _heavy(modules: set[str], also: tuple[str, ...] = ()) -> list[str]:
    return sorted(m for m in modules if m.partition(".")[0] in (*HEAVY, *also))


@pytest.fixture
def signed_verdict(tmp_path: Path) -> tuple[Path, Path]:
    signer = load_or_create_key(tmp_path / "k.pem")
    key = tmp_path / "pub.pem"
    key.write_text(signer.public.to_dict()["pem"])
    verdict = Verdict(
        request_id="0123456789abcdef0123456789abcdef",
        correlation_id="client-7",
        worker="w1",
        node="node-1",
        gpus=("GPU-1",),
        claimed_model="llama",
        requested_model="llama",
        window=Window(10, 20, True),
        attestation={"pcr10": "ab" * 32, "policy_ok": True, "quote_time_ns": 15},
        fingerprint={"p_value": "0.31"},
        decision=Decision.VERIFIED,
        reasons=(Reason("fingerprint.ok", "consistent with the profile"),),
        telemetry_source="nvml",
        issued_ns=1_700_000_000_000_000_000,
    )
    path = tmp_path / "verdict.json"
    path.write_bytes(signer.sign(verdict).encode())
    return path, key


def test_the_bootstrap_really_refuses_the_extras() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BOOTSTRAP.replace("from tmb.cli", "import matplotlib\nfrom tmb.cli"),
            "matplotlib",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "refused by the test" in proc.stderr


def test_help_and_audit_help_run_without_the_extras() -> None:
    top = _light("--help")
    assert top.returncode == 0, top.stderr
    assert "verify-verdict" in top.stdout and "audit" in top.stdout
    audit = _light("audit", "--help")
    assert audit.returncode == 0, audit.stderr
    assert "--html" in audit.stdout


def test_verify_verdict_runs_without_the_extras(signed_verdict: tuple[Path, Path]) -> None:
    verdict, key = signed_verdict
    proc = _light("verify-verdict", verdict, "--key", key)
    assert proc.returncode == 0, proc.stderr
    assert "signature OK" in proc.stdout and "decision: verified" in proc.stdout
    tampered = verdict.with_name("tampered.json")
    tampered.write_bytes(verdict.read_bytes().replace(b'"node-1"', b'"node-2"'))
    assert _light("verify-verdict", tampered, "--key", key).returncode == 1


def test_serve_with_sqlite_starts_without_the_extras(tmp_path: Path) -> None:
    config = tmp_path / "tmb.toml"
    config.write_text(
        f'[server]\nport = 0\n[store]\npath = "{tmp_path / "tmb.sqlite3"}"\n'
        f'[verdicts]\nkey_file = "{tmp_path / "key.pem"}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOTSTRAP, ",".join(BLOCKED), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the daemon prints its address once it listens
        assert line.startswith("tmb serve: listening on http://127.0.0.1:"), line or proc.stderr.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def _fails_naming(proc: subprocess.CompletedProcess[str], extra: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'tmb[{extra}]'" in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_nvml_recording_names_the_probe_extra(tmp_path: Path) -> None:
    proc = _light("telemetry", "record", "--source", "nvml", "--seconds", "1", "--out", tmp_path / "t.bin")
    _fails_naming(proc, "probe")
    assert not (tmp_path / "t.bin").exists()


def test_a_postgresql_store_names_the_pg_extra(tmp_path: Path) -> None:
    config = tmp_path / "tmb.toml"
    config.write_text('[store]\nurl = "postgresql://tmb:secret@127.0.0.1/tmb"\n')
    proc = _light("keys", "list", "--config", config)  # opens the store
    _fails_naming(proc, "pg")
    assert "secret" not in proc.stderr + proc.stdout


def test_config_show_redacts_a_postgresql_password_without_psycopg(tmp_path: Path) -> None:
    config = tmp_path / "tmb.toml"
    config.write_text('[store]\nurl = "postgresql://tmb:secret@127.0.0.1/tmb"\n')
    proc = _light("config", "show", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert "secret" not in proc.stderr + proc.stdout and "postgresql://tmb:" in proc.stdout


def test_an_html_audit_with_telemetry_names_the_report_extra(tmp_path: Path) -> None:
    bundle = write_bundle(
        tmp_path / "bundle", node="n1", ak=b"x", ima_log=b"", quotes=[], telemetry=b"x", claimed="m"
    )
    _fails_naming(_light("audit", bundle, "--html", tmp_path / "report.html"), "report")
    assert not (tmp_path / "report.html").exists()


def test_the_demo_names_the_probe_extra(tmp_path: Path) -> None:
    _fails_naming(_light("demo", "--out", tmp_path / "demo"), "probe")
    assert not (tmp_path / "demo").exists()


def test_require_names_the_missing_module() -> None:
    with pytest.raises(MissingExtraError) as info:
        require("report", "the picture", modules=("tmb_no_such_module",))
    text = info.value.diagnostics()
    assert text.startswith("error: the picture needs `pip install 'tmb[report]'`")
    assert "tmb_no_such_module" in text
    require("pg", "a PostgreSQL store")  # the test environment has every extra (make venv: .[all,dev])


def test_help_imports_no_subcommand_module() -> None:
    modules = _imported("--help")
    assert _heavy(modules, also=("cryptography",)) == []
    assert sorted(m for m in modules if m.startswith(("tmb.", "sample_infra"))) == [
        "tmb.cli",
        "tmb.errors",
    ]


def test_verify_verdict_imports_only_what_it_needs(signed_verdict: tuple[Path, Path]) -> None:
    verdict, key = signed_verdict
    assert _heavy(_imported("verify-verdict", "--help")) == []
    modules = _imported("verify-verdict", verdict, "--key", key)
    assert _heavy(modules) == []
    assert {"tmb.verdict.model", "tmb.verdict.signing"} <= modules
    assert not any(
        m.startswith(("tmb.daemon", "tmb.proxy", "tmb.verdict.store", "tmb.config")) for m in modules
    )


def test_extras_in_pyproject_match_the_table() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    distributions = {"probe": {"tpm2-pytss", "nvidia-ml-py"}, "pg": {"psycopg"}, "report": {"matplotlib"}}
    for extra in EXTRAS:
        names = {re.split(r"[\[<>=;! ]", r, maxsplit=1)[0] for r in optional[extra]}
        assert names == distributions[extra], extra
        assert not names & {re.split(r"[\[<>=;! ]", r, maxsplit=1)[0] for r in project["dependencies"]}
    assert set(EXTRAS) == set(distributions)
    assert optional["all"] == ["tmb[probe,pg,report]"]


def test_the_probe_names_the_probe_extra(tmp_path: Path) -> None:
    bootstrap = BOOTSTRAP.replace("from tmb.cli import main", "from probes.cli import main")
    proc = subprocess.run(
        [sys.executable, "-c", bootstrap, ",".join(BLOCKED), "enroll", "--tcti", "swtpm:port=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    _fails_naming(proc, "probe")
    help_proc = subprocess.run(
        [sys.executable, "-c", bootstrap, ",".join(BLOCKED), "enroll", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert help_proc.returncode == 0 and "--handle" in help_proc.stdout
