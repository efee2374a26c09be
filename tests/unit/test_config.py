"""The daemon config: TOML, TMB_<SECTION>_<KEY> overrides, validation errors naming file/section/key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tmb.config import REDACTED, Config, load_config, to_toml
from tmb.errors import ConfigError
from tmb.verdict.cli import register  # noqa: F401  (the module the CLI imports)

GOOD = """
[server]
host = "127.0.0.1"
port = 9000

[[workers]]
name = "w1"
url = "http://127.0.0.1:8001"
node = "node-1"
gpus = ["GPU-aaaa", "GPU-bbbb"]
model = "llama-3-8b"
max_concurrency = 4

[proxy]
read_timeout_s = 30

[admin]
token = "s3cret"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tmb.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, env={})
    assert config == Config(source="<defaults>")
    assert config.store.ack == "commit" and config.proxy.max_body_bytes == 16 * 1024 * 1024


def test_file_values_and_types(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.server.port == 9000
    (w,) = config.workers
    assert (w.name, w.node, w.gpus, w.model, w.max_concurrency) == (
        "w1",
        "node-1",
        ("GPU-aaaa", "GPU-bbbb"),
        "llama-3-8b",
        4,
    )
    assert config.proxy.read_timeout_s == 30.0 and isinstance(config.proxy.read_timeout_s, float)
    assert config.admin_enabled()  # token + loopback host


def test_environment_overrides_every_kind_of_key(tmp_path: Path) -> None:
    env = {
        "TMB_SERVER_PORT": "9100",
        "TMB_VERDICTS_DEMO": "yes",
        "TMB_PROXY_READ_TIMEOUT_S": "2.5",
        "TMB_WORKERS_0_GPUS": "GPU-1, GPU-2",
        "TMB_WORKERS_1_NAME": "w2",
        "TMB_WORKERS_1_URL": "http://127.0.0.1:8002",
        "TMB_WORKERS_1_NODE": "node-2",
        "TMB_SERVER_HOST": "0.0.0.0",
        "TMB_MANAGEMENT_HOST": "0.0.0.0",
        "UNRELATED": "x",
    }
    config = load_config(write(tmp_path, GOOD), env=env)
    assert config.server.port == 9100 and config.verdicts.demo is True and config.proxy.read_timeout_s == 2.5
    assert config.workers[0].gpus == ("GPU-1", "GPU-2") and config.workers[1].name == "w2"
    assert config.management.host == "0.0.0.0"
    assert not config.admin_enabled()  # non-loopback management: admin is off unless enabled = true


@pytest.mark.parametrize(
    ("text", "env", "section", "key"),
    [
        ("[server]\nport = 70000\n", {}, "server", "port"),
        ('[server]\nport = "80"\n', {}, "server", "port"),
        ("[server]\nprot = 80\n", {}, "server", "prot"),
        ("", {"TMB_SERVER_PORT": "eighty"}, "server", "port"),
        ("", {"TMB_STORE_ACK": "maybe"}, "store", "ack"),
        ('[[workers]]\nname = "w"\nurl = "http://h:1/path"\nnode = "n"\n', {}, "workers[0]", "url"),
        ('[[workers]]\nname = "w"\nurl = "http://h:1"\n', {}, "workers[0]", "node"),
        ("", {"TMB_WORKERS_3_URL": "http://h:1"}, "workers[3]", "url"),
        ("[admin]\nenabled = true\n", {}, "admin", "token"),
        ("[verdicts]\nwindow_grid_ms = -250\n", {}, "verdicts", "window_grid_ms"),
        ("", {"TMB_VERDICTS_WINDOW_GRID_MS": "3600000"}, "verdicts", "window_grid_ms"),
    ],
)
def test_errors_name_file_section_and_key(
    tmp_path: Path, text: str, env: dict[str, str], section: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    ctx = info.value.context
    assert ctx["section"] == section and ctx["key"] == key
    assert str(tmp_path) in ctx["file"] or ctx["file"].startswith("environment (TMB_")
    assert "error:" in info.value.diagnostics()


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"), env={})
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(write(tmp_path, "[serverz]\n"), env={})


def test_show_redacts_secrets_and_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    data = config.redacted()
    assert data["admin"]["token"] == REDACTED
    again = load_config(write(tmp_path, to_toml(data)), env={})
    assert again.workers == config.workers and again.server == config.server
    env = {"TMB_STORE_URL": "postgresql://tmb:pg-s3cret@db.example/tmb", "TMB_STORE_SYNC": "full"}
    with_pg = load_config(write(tmp_path, GOOD), env=env)
    assert with_pg.store.url.endswith("@db.example/tmb") and with_pg.store.sync == "full"
    assert "pg-s3cret" not in repr(with_pg.redacted())
    assert with_pg.redacted()["store"]["url"] == "postgresql://tmb:***@db.example/tmb"
    with pytest.raises(ConfigError, match="sync"):
        load_config(write(tmp_path, GOOD), env={"TMB_STORE_SYNC": "sometimes"})


def test_config_show_cli(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    env = {"PATH": "/usr/bin:/bin", "TMB_SERVER_PORT": "9200"}
    out = subprocess.run(
        [sys.executable, "-m", "tmb", "config", "show", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "port = 9200" in out and "s3cret" not in out and REDACTED in out
    bad = subprocess.run(
        [sys.executable, "-m", "tmb", "config", "show", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("error: cannot read config file")
        and "Traceback" not in bad.stderr
    )


def test_auditor_tokens_are_strong_secrets_and_redacted(tmp_path: Path) -> None:
    strong = ("5b0e8c1f7a2d4e6b9c3a1f0e8d7c6b5a", "c2e4a6b8d0f1e3a5c7b9d1f3e5a7c9b1")
    path = tmp_path / "tmb.toml"
    path.write_text(f"[auditors]\ntokens = {list(strong)!r}\n".replace("'", '"'))
    config = load_config(path, env={})
    assert config.auditors.tokens == strong
    assert config.redacted()["auditors"]["tokens"] == [REDACTED, REDACTED]
    assert strong[0] not in to_toml(config.redacted())
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"TMB_AUDITORS_TOKENS": f"{strong[0]},password1"})
    assert exc.value.context["key"] == "tokens" and "auditors.tokens[1]" in exc.value.message
    with pytest.raises(ConfigError):
        load_config(path, env={"TMB_AUDITORS_MAX_BUNDLE_BYTES": "10"})
