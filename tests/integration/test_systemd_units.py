"""The shipped systemd units pass ``systemd-analyze verify`` and keep their hardening."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def _service(name: str) -> dict[str, list[str]]:
    """[Service] keys of a unit (repeated keys kept in order: unit files are not INI)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("unit", ["tmb.service", "tmb-probe.service"])
def test_units_verify(unit: str) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd; make test installs it)"
    done = subprocess.run([analyze, "verify", "--man=no", str(UNITS / unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Unknown" not in done.stderr and "ignoring" not in done.stderr.lower(), done.stderr


def test_daemon_is_unprivileged_and_confined() -> None:
    svc = _service("tmb.service")
    assert svc["User"] == ["tmb"] and svc["NoNewPrivileges"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"] and svc["StateDirectory"] == ["tmb"]
    assert svc["CapabilityBoundingSet"] == [""]
    assert "tmb serve --config /etc/tmb/tmb.toml" in svc["ExecStart"][0]


def test_probe_gets_only_the_tpm_ima_and_nvidia() -> None:
    svc = _service("tmb-probe.service")
    assert svc["DevicePolicy"] == ["closed"]
    devices = {d.split()[0] for d in svc["DeviceAllow"]}
    assert "/dev/tpmrm0" in devices and all("tpm" in d or "nvidia" in d for d in devices)
    assert svc["ReadOnlyPaths"] == ["/sys/kernel/security/ima"]
    assert svc["ProtectSystem"] == ["strict"] and svc["NoNewPrivileges"] == ["yes"]
    assert "tmb-probe run --config /etc/tmb/probe.toml" in svc["ExecStart"][0]


def _unit_env(name: str) -> dict[str, str]:
    return dict(v.split("=", 1) for v in _service(name).get("Environment", []))


def test_shipped_configs_load_with_the_units_environment(tmp_path: Path) -> None:
    from probes.config import load_config as load_probe_config
    from tmb.config import load_config

    token = tmp_path / "admin.token"
    token.write_text("5f2b8c0e9a7d4e3f1b6a8c2d0e4f7a9b\n")  # 128 bits, owner-only: as checked
    token.chmod(0o600)
    env = {**_unit_env("tmb.service"), "TMB_ADMIN_TOKEN_FILE": str(token)}
    config = load_config(UNITS / "tmb.toml", env=env)
    assert config.store.path == "/var/lib/tmb/tmb.sqlite3"
    assert config.verdicts.key_file == "/var/lib/tmb/verdict-signing.key" and not config.verdicts.demo
    assert config.attestation.policy == "/etc/tmb/policy.toml" and config.workers[0].node == "gpu-node-1"
    assert config.identity.ek_roots == "/etc/tmb/ek-roots" and not config.attestation.nodes  # nodes enrol
    assert not config.identity.insecure_static_nodes and config.attestation.stale_after_s > 0
    probe = load_probe_config(UNITS / "probe.toml", env=_unit_env("tmb-probe.service"))
    assert probe.node == "gpu-node-1" and probe.tcti == "device:/dev/tpmrm0" and probe.source == "nvml"
    assert probe.state_dir == "/var/lib/tmb-probe"
