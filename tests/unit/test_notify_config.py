"""The ``[notify]`` section: values, environment overrides, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmb.config import load_config
from tmb.daemon.notify import backoff_s, classify, notify_db_path, retry_after_s
from tmb.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tmb.toml"
    path.write_text(text)
    return path


def test_values_defaults_and_environment(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            '[store]\npath = "/var/lib/tmb/tmb.sqlite3"\n[notify]\n'
            'urls = ["https://alerts.example.com/tmb", "http://10.0.0.9:9000/hook?x=1"]\n'
            'kinds = ["node.stale"]\nmax_attempts = 5\n',
        ),
        env={"TMB_NOTIFY_BACKOFF_S": "0.5", "TMB_NOTIFY_KINDS": "node.stale,verdict.model_mismatch"},
    )
    n = cfg.notify
    assert n.urls == ("https://alerts.example.com/tmb", "http://10.0.0.9:9000/hook?x=1")
    assert n.kinds == ("node.stale", "verdict.model_mismatch") and n.max_attempts == 5 and n.backoff_s == 0.5
    assert notify_db_path(cfg) == Path("/var/lib/tmb/tmb.notify.sqlite3")  # beside the store's file
    cfg = load_config(write(tmp_path, '[notify]\ndb = "/x/outbox.db"\n'), env={})
    assert notify_db_path(cfg) == Path("/x/outbox.db")
    assert load_config(None, env={}).notify.urls == ()  # off by default


def test_config_show_hides_what_follows_the_host(tmp_path: Path) -> None:
    """Webhook URLs often carry a secret in their path or query: shown (and logged) without it."""
    urls = '["https://hooks.example.com/services/T0/B0/secret", "http://10.0.0.9:9000/", "http://h:1?k=s"]'
    cfg = load_config(write(tmp_path, f"[notify]\nurls = {urls}\n"), env={})
    assert cfg.redacted()["notify"]["urls"] == [
        "https://hooks.example.com/<redacted>",
        "http://10.0.0.9:9000/",
        "http://h:1/<redacted>",
    ]
    assert cfg.notify.urls[0].endswith("/secret")  # the daemon itself uses the whole URL


@pytest.mark.parametrize(
    ("body", "key", "says"),
    [
        ('urls = ["ftp://h/x"]', "urls", "http:// or https://"),
        ('urls = ["http:///nohost"]', "urls", "with a host"),
        ('urls = ["https://user:pw@h/x"]', "urls", "no user or password"),
        ('urls = ["https://h/x#frag"]', "urls", "fragment"),
        ('urls = ["https://h:99999/x"]', "urls", "port out of range"),
        ('urls = ["https://h/a b"]', "urls", "printable ASCII"),
        ('urls = ["https://h/x", "https://h/x"]', "urls", "duplicate"),
        ("urls = [" + ", ".join(f'"https://h/{i}"' for i in range(17)) + "]", "urls", "at most 16"),
        ('urls = "https://h/x"', "urls", "expected tuple"),
        ('kinds = ["node.sad"]', "kinds", "unknown kind"),
        ("timeout_s = 0", "timeout_s", "timeout_s"),
        ("max_attempts = 0", "max_attempts", "max_attempts"),
        ("max_age_s = -1", "max_age_s", "max_age_s"),
        ("backoff_s = 0", "backoff_s", "backoff_s"),
        ("backoff_s = 20.0\nmax_backoff_s = 10.0", "backoff_s", "at most max_backoff_s"),
        ("max_backoff_s = 100000.0", "max_backoff_s", "at most a day"),
        ("max_queued = 0", "max_queued", "max_queued"),
        ("retries = 3", "retries", "unknown key notify.retries"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, body: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[notify]\n{body}\n"), env={})
    assert info.value.context["section"] == "notify" and info.value.context["key"] == key
    assert says in info.value.message
    assert "notify" in info.value.diagnostics()


def test_an_environment_error_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"TMB_NOTIFY_MAX_ATTEMPTS": "many"})
    assert info.value.context["file"] == "environment (TMB_NOTIFY_MAX_ATTEMPTS)"


def test_backoff_is_exponential_capped_and_jittered() -> None:
    cfg = load_config(None, env={"TMB_NOTIFY_BACKOFF_S": "1", "TMB_NOTIFY_MAX_BACKOFF_S": "10"}).notify
    assert [backoff_s(cfg, n, 1.0 - 1e-12) for n in (1, 2, 3, 4, 5, 50)] == pytest.approx(
        [1, 2, 4, 8, 10, 10]
    )
    assert backoff_s(cfg, 3, 0.0) == 2.0  # the jitter takes off up to half
    assert backoff_s(cfg, 10**6, 0.5) == 7.5  # no overflow however many attempts


def test_what_is_retried() -> None:
    assert [classify(s) for s in (200, 202, 204)] == ["delivered"] * 3
    assert [classify(s) for s in (400, 401, 403, 404, 410, 413, 422)] == ["rejected"] * 7
    assert [classify(s) for s in (408, 429, 301, 500, 502, 503, 504, 100)] == ["retry"] * 8


def test_retry_after_delta_seconds_only() -> None:
    assert [retry_after_s(v) for v in ("0", " 7 ", "120")] == [0.0, 7.0, 120.0]
    assert [retry_after_s(v) for v in ("", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT", "9" * 12)] == [
        None
    ] * 5
