"""Bearer tokens of the daemon: token files are checked like the verdict key file (regular, owner, mode
0600) and must hold a strong token; an ``auto`` admin that turns itself off says why in the log;
``/metrics`` can be restricted (``[metrics] token_file``, ``enabled = false``) and an anonymous ``/healthz``
shows the overall status only, never worker names."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tmb.config import MIN_TOKEN_BITS, load_config, token_bits
from tmb.daemon.app import build_app
from tmb.errors import ConfigError

STRONG = secrets.token_hex(32)
WORKER = "gpu-secret-worker-7"


def token_file(tmp_path: Path, token: str, mode: int = 0o600, name: str = "admin.token") -> Path:
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tmb.toml"
    path.write_text(
        f'[verdicts]\nkey_file = "{tmp_path / "key.pem"}"\n[store]\npath = "{tmp_path / "store.sqlite3"}"\n'
        + text
    )
    return path


def refused(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value


# ----------------------------------------------------------------------------------------- token files


def test_the_reported_case_world_readable_three_characters_on_all_addresses(tmp_path: Path) -> None:
    """Row 11 as reported: `tmb config show` accepted it (and admin was silently off); now an error
    naming the file, printed without a traceback, exit 2."""
    tok = token_file(tmp_path, "abc", 0o644)
    cfg = config_file(
        tmp_path, f'[management]\nhost = "0.0.0.0"\n[admin]\nenabled = "auto"\ntoken_file = "{tok}"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "tmb", "config", "show", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=60,
    )
    assert out.returncode == 2, out
    assert out.stderr.startswith("error: admin token file ") and str(tok) in out.stderr.splitlines()[0]
    assert "group or others (mode 0644)" in out.stderr and f"chmod 600 {tok}" in out.stderr
    assert "Traceback" not in out.stderr and "abc" not in out.stdout


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660], ids=lambda m: f"{m:04o}")
def test_group_or_world_accessible_token_files_are_refused(tmp_path: Path, mode: int) -> None:
    tok = token_file(tmp_path, STRONG, mode)
    error = refused(config_file(tmp_path, f'[admin]\ntoken_file = "{tok}"\n'))
    assert "accessible by group or others" in error.message and str(tok) in error.message
    assert error.context["path"] == str(tok) and error.context["section"] == "admin"
    assert error.context["key"] == "token_file" and error.context["file"] == str(tmp_path / "tmb.toml")


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("abc", "too weak"),
        ("s3cret-admin", "too weak"),
        ("0123456789abcdef0123456789abcde", "too weak"),  # 31 hex digits
        ("a" * 200, "too weak"),  # long, but one character
        ("abababababababababababababababababababab", "too weak"),
        ("two words " + STRONG, "printable ASCII without spaces"),
    ],
)
def test_weak_or_unusable_tokens_in_files_are_refused(tmp_path: Path, token: str, why: str) -> None:
    tok = token_file(tmp_path, token)
    error = refused(config_file(tmp_path, f'[admin]\ntoken_file = "{tok}"\n'))
    assert why in error.message and str(tok) in error.message, error.message
    assert token not in error.diagnostics()  # the secret is never printed


def test_empty_huge_and_special_token_files_are_refused(tmp_path: Path) -> None:
    empty = token_file(tmp_path, "", name="empty")
    assert "is empty" in refused(config_file(tmp_path, f'[admin]\ntoken_file = "{empty}"\n')).message
    huge = token_file(tmp_path, STRONG * 100, name="huge")
    assert "larger than" in refused(config_file(tmp_path, f'[admin]\ntoken_file = "{huge}"\n')).message
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # reading it would block the daemon's start forever
    assert "not a regular file" in refused(config_file(tmp_path, f'[admin]\ntoken_file = "{fifo}"\n')).message
    missing = refused(config_file(tmp_path, f'[admin]\ntoken_file = "{tmp_path / "nope"}"\n'))
    assert "cannot read admin token file" in missing.message and str(tmp_path / "nope") in missing.message


def test_token_file_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = token_file(tmp_path, STRONG)
    if os.geteuid() == 0:
        os.chown(tok, 65534, 65534)  # nobody
    else:  # the file is ours and not root's: pretend the daemon runs as someone else
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    error = refused(config_file(tmp_path, f'[admin]\ntoken_file = "{tok}"\n'))
    assert "is owned by uid" in error.message and str(tok) in error.message


def test_a_good_token_file_is_read(tmp_path: Path) -> None:
    tok = token_file(tmp_path, STRONG)
    config = load_config(config_file(tmp_path, f'[admin]\ntoken_file = "{tok}"\n'), env={})
    assert config.admin.token == STRONG and config.admin_enabled()
    assert token_bits(STRONG) >= MIN_TOKEN_BITS and token_bits(secrets.token_hex(16)) >= MIN_TOKEN_BITS
    assert token_bits(secrets.token_urlsafe(16)) >= MIN_TOKEN_BITS
    # token_urlsafe(16) drawn without a digit, '-' or '_' (about 1 in 40): still 22 base64 characters
    assert token_bits("PKvlgLYXKWWycDgvBdBQFg") >= MIN_TOKEN_BITS
    assert token_bits("s3cret") < 40 and token_bits("a" * 24) < MIN_TOKEN_BITS  # one case: not base64


def test_the_environment_variable_is_named(tmp_path: Path) -> None:
    tok = token_file(tmp_path, "short", 0o600)
    error = refused(config_file(tmp_path, ""), env={"TMB_ADMIN_TOKEN_FILE": str(tok)})
    assert error.context["file"] == "environment (TMB_ADMIN_TOKEN_FILE)" and "too weak" in error.message


def test_metrics_token_files_are_checked_the_same(tmp_path: Path) -> None:
    tok = token_file(tmp_path, STRONG, 0o644, name="metrics.token")
    error = refused(config_file(tmp_path, f'[metrics]\ntoken_file = "{tok}"\n'))
    assert error.message.startswith("metrics token file") and error.context["section"] == "metrics"
    tok.chmod(0o600)
    config = load_config(config_file(tmp_path, f'[metrics]\ntoken_file = "{tok}"\n'), env={})
    assert config.metrics.token == STRONG and config.redacted()["metrics"]["token"] == "<redacted>"


def test_inline_tokens_must_be_strong_off_loopback(tmp_path: Path) -> None:
    text = '[management]\nhost = "{host}"\n[admin]\nenabled = true\ntoken = "s3cret"\n'
    error = refused(config_file(tmp_path, text.format(host="0.0.0.0")))
    assert error.message.startswith("admin.token is too weak") and error.context["key"] == "token"
    assert load_config(config_file(tmp_path, text.format(host="127.0.0.1")), env={}).admin_enabled()
    metrics = '[server]\nhost = "0.0.0.0"\n[metrics]\ntoken = "s3cret"\n'
    assert refused(config_file(tmp_path, metrics)).message.startswith("metrics.token is too weak")


# ----------------------------------------------------------------------------------------- admin log


async def test_auto_turning_admin_off_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = token_file(tmp_path, STRONG)
    cfg = config_file(
        tmp_path,
        f'[server]\nport = 0\n[management]\nhost = "0.0.0.0"\nport = 0\n[admin]\ntoken_file = "{tok}"\n',
    )
    config = load_config(cfg, env={})
    assert config.admin_status() == (
        False,
        "admin.enabled = \"auto\" and management.host '0.0.0.0' is not a loopback address "
        "(set admin.enabled = true to serve the admin endpoints there)",
    )
    caplog.set_level(logging.INFO, logger="tmb.serve")
    runner = web.AppRunner(await build_app(config))  # as `tmb serve` builds it; only management listens
    await runner.setup()
    await runner.cleanup()
    (line,) = [r for r in caplog.records if "admin endpoints are off" in r.getMessage()]
    assert line.levelno == logging.WARNING and "'0.0.0.0' is not a loopback address" in line.getMessage()


# ----------------------------------------------------------------------------------------- /metrics, /healthz


@contextmanager
def daemon(tmp_path: Path, text: str) -> Iterator[str]:
    """A real `tmb serve` on 127.0.0.1 (a free port) with one worker that is down; yields its URL."""
    cfg = config_file(
        tmp_path,
        '[server]\nhost = "127.0.0.1"\nport = 0\n[management]\nport = 0\n'
        f'[[workers]]\nname = "{WORKER}"\nurl = "http://127.0.0.1:9"\nnode = "node-7"\n' + text,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmb", "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("tmb serve: listening on "), (line, proc.stderr.read() if not line else "")
        yield line.split()[4]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.text()


async def test_metrics_behind_a_token_and_healthz_without_worker_names(tmp_path: Path) -> None:
    metrics_token, admin_token = secrets.token_hex(32), secrets.token_hex(32)
    mtok = token_file(tmp_path, metrics_token, name="metrics.token")
    atok = token_file(tmp_path, admin_token, name="admin.token")
    with daemon(tmp_path, f'[metrics]\ntoken_file = "{mtok}"\n[admin]\ntoken_file = "{atok}"\n') as url:
        for token in (None, "wrong", STRONG):
            status, body = await get(f"{url}/metrics", token)
            assert status == 401 and WORKER not in body, (status, body)
            status, body = await get(f"{url}/healthz", token)
            assert status in (200, 503) and set(json.loads(body)) == {"status"}, body
        for token in (metrics_token, admin_token):
            status, body = await get(f"{url}/metrics", token)
            assert status == 200 and f'tmb_worker_healthy{{worker="{WORKER}"}}' in body
            status, body = await get(f"{url}/healthz", token)
            assert status in (200, 503) and WORKER in json.loads(body)["workers"]
        status, body = await get(f"{url}/openapi.json")
        assert json.loads(body)["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


async def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    with daemon(tmp_path, "[metrics]\nenabled = false\n") as url:
        status, body = await get(f"{url}/metrics")
        assert status == 404 and "metrics_disabled" in body and WORKER not in body
        status, body = await get(f"{url}/healthz")
        assert status in (200, 503) and set(json.loads(body)) == {"status"}


async def test_by_default_metrics_stay_public_but_healthz_names_no_worker(tmp_path: Path) -> None:
    with daemon(tmp_path, "") as url:
        status, body = await get(f"{url}/metrics")
        assert status == 200 and WORKER in body  # documented: restrict it with [metrics]
        status, body = await get(f"{url}/healthz")
        assert status in (200, 503) and set(json.loads(body)) == {"status"} and WORKER not in body
