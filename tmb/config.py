"""The daemon's configuration: one TOML file, every key overridable from the environment.

Sections (all optional; defaults and units are documented in docs/config.md)::

    [server]    host, port, api_prefix, tls_cert, tls_key
    [management] host, port, tls_cert, tls_key
    [[workers]] name, url, node, gpus, model, max_concurrency
    [proxy]     max_body_bytes, inspect_body_bytes, connect_timeout_s, read_timeout_s, total_timeout_s,
                health_path, health_interval_s, health_timeout_s, max_response_inspect_bytes, engine,
                header_timeout_s, keepalive_timeout_s, max_connections
    [verdicts]  key_file, demo, min_window_ms, window_grid_ms, max_wait_s, log_origin, checkpoint_s
    [store]     path, retention_days, ack, sync, url
    [admin]     enabled, token, token_file
    [metrics]   enabled, token, token_file
    [attestation] policy, nodes, db, nonce_ttl_s, pcr_bank, wait_s, require_eventlog, commitments
    [auditors]  tokens, max_bundle_bytes
    [fingerprint] profiles, target_far
    [notify]    urls, kinds, db, timeout_s, max_attempts, max_age_s, backoff_s, max_backoff_s, max_queued

Environment overrides follow keylime's single rule: ``TMB_<SECTION>_<KEY>`` (upper case), e.g.
``TMB_SERVER_PORT=9000`` or ``TMB_ADMIN_TOKEN=...``. For workers the index is part of the section:
``TMB_WORKERS_0_URL=http://10.0.0.5:8000`` overrides (or, for the next free index, adds) worker 0's key.
Values are parsed by the key's type: integers, decimals, booleans (``true/false/1/0/yes/no``), lists
(comma-separated). Every error is a :class:`~tmb.errors.ConfigError` naming file, section and key.

Bearer tokens (``[admin]``, ``[metrics]``) read from a ``token_file`` are checked like the verdict key file:
a regular file, owned by the daemon's user (or root), not accessible by group or others, holding a token of
at least :data:`MIN_TOKEN_BITS` bits (estimated from its length and character classes). A token given inline
(or by ``TMB_*_TOKEN``) must be that strong too when it guards endpoints on a non-loopback address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tmb.errors import ConfigError
from tmb.events import KINDS

log = logging.getLogger("tmb.config")

ENV_PREFIX = "TMB_"
REDACTED = "<redacted>"
MIN_TOKEN_BITS = 128  # e.g. 32 hex digits, 22 URL-safe base64 characters (see token_bits)
MIN_TOKEN_DISTINCT = 8  # "aaaa..." or "abab..." are not tokens, however long
MAX_TOKEN_FILE_BYTES = 4096


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_prefix: str = ""  # prepended to the daemon's own routes (/v1/verdicts, /metrics, ...)
    tls_cert: str = ""  # PEM certificate (chain) of the proxy listener; empty: plain HTTP
    tls_key: str = ""  # PEM private key of tls_cert


@dataclass(frozen=True)
class ManagementConfig:
    """The management listener: evidence ingest (/v1/ingest/...) and admin (/admin/...) are served only
    here, beside the public reads; the proxy listener answers 404 for them."""

    host: str = "127.0.0.1"  # loopback, or an address on a management network
    port: int = 8701  # 0: a free port (tests)
    tls_cert: str = ""  # PEM certificate (chain); empty: plain HTTP
    tls_key: str = ""  # PEM private key of tls_cert


@dataclass(frozen=True)
class WorkerConfig:
    name: str = ""
    url: str = ""  # http://host:port, no path
    node: str = ""  # node id the probe reports for this worker's machine
    gpus: tuple[str, ...] = ()  # GPU UUIDs the worker runs on
    model: str = ""  # model id the worker is configured to serve
    max_concurrency: int = 64  # requests in flight at once; the next one gets 503


@dataclass(frozen=True)
class ProxyConfig:
    max_body_bytes: int = 16 * 1024 * 1024  # request body limit -> 413
    inspect_body_bytes: int = 65536  # JSON bodies up to this size are read whole (model, failover)
    max_response_inspect_bytes: int = 1048576  # JSON responses up to this size are scanned for usage
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0  # longest silence from a worker, headers included -> 504 / timeout
    total_timeout_s: float = 0.0  # whole exchange; 0 = unlimited
    health_path: str = "/health"
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    engine: str = "fast"  # "fast": own HTTP/1.1 relay (aiohttp for what it does not handle); "aiohttp"
    header_timeout_s: float = 10.0  # a request head (and a JSON body read whole) must arrive within this
    keepalive_timeout_s: float = 60.0  # an idle client connection is closed after this
    max_connections: int = 4096  # client connections held at once; the next one gets 503 and is closed


@dataclass(frozen=True)
class VerdictsConfig:
    key_file: str = "tmb-verdict-key.pem"  # Ed25519 private key (PKCS#8 PEM), created 0600 if absent
    demo: bool = False  # a synthetic telemetry source may yield `demo` (never `verified`)
    min_window_ms: int = 1000  # windows shorter than this are widened (and say so)
    window_grid_ms: int = 250  # window ends moved out to this grid: concurrent requests share scoring
    max_wait_s: float = 30.0  # longest ?wait= accepted by GET /v1/verdicts/{id}
    log_origin: str = ""  # the verdict log's name in its checkpoints; empty: "tmb-verdicts/<host name>"
    checkpoint_s: float = 1.0  # sign a log checkpoint this often when the log grew


@dataclass(frozen=True)
class AttestationConfig:
    policy: str = ""  # runtime policy TOML (docs/policy.md); empty: no evidence ingest, verdicts `unattested`
    nodes: tuple[str, ...] = ()  # "node-id=/path/to/ak" (PEM or TPM2B_PUBLIC), registered at start
    db: str = ""  # ingest state (SQLite); empty: the store's file
    nonce_ttl_s: float = 120.0  # a quote nonce expires after this
    pcr_bank: str = "sha256"  # bank whose PCR 10 the IMA log is replayed against
    wait_s: float = 20.0  # how long a verdict waits for telemetry and a quote covering its window
    require_eventlog: bool = False  # true: a node without a firmware event log is unattested (boot chain)
    commitments: tuple[str, ...] = ()  # model commitment files (tmb commit) in force: exported in bundles
    stale_after_s: float = 30.0  # no verified quote for this long: the node is stale (0: never)


@dataclass(frozen=True)
class IdentityConfig:
    ek_roots: str = ""  # directory of TPM manufacturer root (and intermediate) certificates; empty: none
    ek_pins: tuple[str, ...] = ()  # EK pins (tmb.attest.ekcert.ek_pin) of vTPMs without a certificate
    challenge_ttl_s: float = 60.0  # an enrolment challenge must be answered within this
    auth_skew_s: float = 300.0  # an evidence request's signed time may differ from the daemon's by this
    rate_per_s: float = 50.0  # evidence requests a node may make a second (sustained); 0: unlimited
    burst: int = 200  # ... and at once
    insecure_static_nodes: bool = False  # true (tests, development): AK-registered nodes post unsigned


@dataclass(frozen=True)
class FingerprintConfig:
    profiles: tuple[str, ...] = ()  # profile files, or directories of *.json profiles (tmb enroll)
    target_far: float = 0.0  # false-alarm rate to test at; 0: each profile's calibrated rate


@dataclass(frozen=True)
class NotifyConfig:
    """Signed webhook notifications (tmb.daemon.notify; docs/verdict.md "Notifications")."""

    urls: tuple[str, ...] = ()  # http(s)://host[:port]/path receivers; empty: no notifications
    kinds: tuple[str, ...] = ()  # event kinds sent (tmb.events.KINDS); empty: all
    db: str = ""  # the durable outbox (SQLite); empty: beside [store] path (<stem>.notify.sqlite3)
    timeout_s: float = 10.0  # one POST, connect to response headers
    max_attempts: int = 12  # then the delivery is dead
    max_age_s: float = 86400.0  # a delivery not made this long after the event is dead
    backoff_s: float = 1.0  # first retry delay; doubled each attempt, with jitter
    max_backoff_s: float = 600.0  # longest retry delay
    max_queued: int = 10000  # events held in the outbox; beyond it the oldest dead ones go first


@dataclass(frozen=True)
class StoreConfig:
    path: str = "tmb.sqlite3"
    retention_days: int = 30  # spans/verdicts older than this are deleted; 0 keeps everything
    ack: str = "commit"  # "commit": a response completes only after its span is durable; "async"
    sync: str = "normal"  # "normal": commits survive a daemon crash (kill -9); "full": also power loss
    url: str = ""  # postgresql://user:pw@host/db instead of the SQLite file (daemons sharing verdicts)


@dataclass(frozen=True)
class AdminConfig:
    enabled: str = "auto"  # "auto": on only with a token and a loopback host; "true"; "false"
    token: str = ""  # bearer token (secret)
    token_file: str = ""  # read the token from this file instead


@dataclass(frozen=True)
class AuditorsConfig:
    """Who may fetch evidence bundles (GET /v1/evidence/{id}/bundle, /v1/nodes/{node}/evidence) on the
    management listener: a client with one of ``tokens`` (bearer); with none set, loopback clients only."""

    tokens: tuple[str, ...] = ()  # auditor bearer tokens (secret), each at least 128 bits
    max_bundle_bytes: int = 256 * 1024 * 1024  # a larger bundle is refused (413)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True  # false: GET /metrics answers 404
    token: str = ""  # when set, /metrics needs "Authorization: Bearer <token>" (secret)
    token_file: str = ""  # read the token from this file instead


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    management: ManagementConfig = field(default_factory=ManagementConfig)
    workers: tuple[WorkerConfig, ...] = ()
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    verdicts: VerdictsConfig = field(default_factory=VerdictsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    attestation: AttestationConfig = field(default_factory=AttestationConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    auditors: AuditorsConfig = field(default_factory=AuditorsConfig)
    source: str = "<defaults>"  # the file it came from

    def admin_enabled(self) -> bool:
        """Whether admin endpoints are served (see :class:`AdminConfig`)."""
        return self.admin_status()[0]

    def admin_status(self) -> tuple[bool, str]:
        """``(served, why)``: whether the admin endpoints are served and the reason, for the start-up log."""
        if self.admin.enabled == "false":
            return False, "admin.enabled = false"
        if not self.admin.token:
            return False, "no admin token is set (admin.token or admin.token_file)"
        if self.admin.enabled == "true":
            return True, "admin.enabled = true"
        m = self.management.host
        if not _is_loopback(m):
            return False, (
                f'admin.enabled = "auto" and management.host {m!r} is not a loopback address '
                "(set admin.enabled = true to serve the admin endpoints there)"
            )
        return True, f'admin.enabled = "auto" with a token on the loopback address {m!r}'

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets replaced by ``<redacted>``."""
        data: dict[str, Any] = {}
        for name in _SECTIONS:
            data[name] = dataclasses.asdict(getattr(self, name))
        data["workers"] = [dataclasses.asdict(w) for w in self.workers]
        for name in ("admin", "metrics"):
            if data[name]["token"]:
                data[name]["token"] = REDACTED
        data["auditors"]["tokens"] = [REDACTED for _ in data["auditors"]["tokens"]]
        if data["store"]["url"]:
            from tmb.pgurl import redact

            data["store"]["url"] = redact(data["store"]["url"])
        data["notify"]["urls"] = [notify_url_label(u) for u in self.notify.urls]
        return data


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "management": ManagementConfig,
    "proxy": ProxyConfig,
    "verdicts": VerdictsConfig,
    "store": StoreConfig,
    "admin": AdminConfig,
    "metrics": MetricsConfig,
    "attestation": AttestationConfig,
    "identity": IdentityConfig,
    "fingerprint": FingerprintConfig,
    "notify": NotifyConfig,
    "auditors": AuditorsConfig,
}
_CHOICES = {
    ("store", "ack"): ("commit", "async"),
    ("store", "sync"): ("normal", "full"),
    ("proxy", "engine"): ("fast", "aiohttp"),
    ("admin", "enabled"): ("auto", "true", "false"),
    ("attestation", "pcr_bank"): ("sha1", "sha256", "sha384", "sha512"),
}
WORKER_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
WORKER_URL_PATTERN = rf"^https?://[A-Za-z0-9.-]+(:{_PORT})?/?$"  # host name or IPv4 literal, optional port
_NAME_RE = re.compile(WORKER_NAME_PATTERN)
_URL_RE = re.compile(WORKER_URL_PATTERN)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def token_bits(token: str) -> float:
    """A strength estimate: length × log2(alphabet), the alphabet being 16 for hex digits, else the
    character classes used (26 lower case, 26 upper case, 10 digits) plus each other character seen; a
    token of both cases drawn from URL-safe base64 counts that whole alphabet (64), so a
    ``secrets.token_urlsafe(16)`` that happens to hold no digit or ``-``/``_`` is not refused.
    32 hex digits are 128 bits, 22 URL-safe base64 characters 132, ``s3cret`` 31."""
    chars = set(token)
    if not chars:
        return 0.0
    if chars <= set("0123456789abcdef") or chars <= set("0123456789ABCDEF"):
        pool = 16
    else:
        lower, upper = any(c.islower() for c in chars), any(c.isupper() for c in chars)
        pool = (
            26 * lower
            + 26 * upper
            + 10 * any(c.isdigit() for c in chars)
            + sum(not c.isalnum() for c in chars)
        )
        if lower and upper and chars <= _URLSAFE:
            pool = max(pool, 64)
    return len(token) * math.log2(pool)


def _check_token(token: str, what: str, where: dict[str, str]) -> None:
    """Raise when ``token`` cannot be a bearer token or is weaker than :data:`MIN_TOKEN_BITS`."""
    if not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(
            f"{what} must be printable ASCII without spaces (it is sent in an Authorization header)",
            **where,
        )
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS or len(set(token)) < MIN_TOKEN_DISTINCT:
        raise ConfigError(
            f"{what} is too weak: {len(token)} characters ({len(set(token))} distinct), about {bits:.0f} "
            f"bits (at least {MIN_TOKEN_BITS} bits and {MIN_TOKEN_DISTINCT} distinct characters needed)",
            hint="use a random one, e.g. `openssl rand -hex 32`",
            **where,
        )


def _read_token_file(path: str, section: str, where: dict[str, str]) -> str:
    """The token in ``path``, after the checks the verdict key file gets (regular file, owner, mode)."""
    what = f"{section} token file {path}"
    where = {**where, "path": path}
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", **where) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} is not a regular file", **where)
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{what} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod 600 {path}",
            **where,
        )
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise ConfigError(
            f"{what} is owned by uid {st.st_uid}, not by the daemon's user (uid {euid}) or root",
            hint=f"chown {euid} {path}",
            **where,
        )
    if st.st_size > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token", **where)
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read(MAX_TOKEN_FILE_BYTES + 1).strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {what}: {reason}", **where) from exc
    if not token:
        raise ConfigError(f"{what} is empty", **where)
    _check_token(token, f"the token in {what}", where)
    return token


def _coerce(value: Any, kind: Any, where: dict[str, str], from_env: bool) -> Any:
    """Convert a TOML or environment value to the field's type, or raise naming where it came from."""
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if (
                from_env
                and isinstance(value, str)
                and value.lower() in ("true", "1", "yes", "false", "0", "no")
            ):
                return value.lower() in ("true", "1", "yes")
        elif kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if from_env and isinstance(value, str):
                return int(value)
        elif kind == "float":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if from_env and isinstance(value, str):
                return float(value)
        elif kind == "str":
            if isinstance(value, str):
                return value
            if isinstance(value, bool) and (where["section"], where["key"]) in _CHOICES:  # `enabled = true`
                return "true" if value else "false"
        elif kind.startswith("tuple"):
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            if from_env and isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        pass
    raise ConfigError(
        f"invalid value for {where['section']}.{where['key']}: expected {kind.split('[')[0]}",
        got=value,
        **where,
    )


_DEPRECATED = {  # (section, key) -> why it is ignored; still accepted so existing configs load
    ("attestation", "settle_ms"): "the ingest wakes the verdict engine when a quote attests new telemetry",
}


def _build(cls: type[Any], raw: Mapping[str, Any], section: str, origin: str, env_keys: set[str]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = {"file": origin, "section": section, "key": key}
        if (section, key) in _DEPRECATED:
            log.warning(
                "%s.%s is deprecated and ignored: %s (%s)", section, key, _DEPRECATED[section, key], origin
            )
            continue
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}", hint=f"known keys: {', '.join(known)}", **where)
        from_env = key in env_keys
        if from_env:
            where["file"] = f"environment ({_env_name(section, key)})"
        values[key] = _coerce(value, known[key].type, where, from_env)
        choices = _CHOICES.get((section.split(".")[0].rstrip("0123456789[]"), key))
        if choices and values[key] not in choices:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}", got=value, **where)
    return cls(**values)


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.replace('[', '_').replace(']', '').replace('.', '_')}_{key}".upper()


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (TOML; ``None`` = defaults only), apply ``TMB_*`` overrides from ``env``, validate."""
    env = os.environ if env is None else env
    origin = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", file=origin) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file is not valid TOML: {exc}", file=origin) from exc
    for name in raw:
        if name not in _SECTIONS and name != "workers":
            raise ConfigError(
                f"unknown section [{name}]",
                file=origin,
                hint=f"sections: {', '.join([*_SECTIONS, 'workers'])}",
            )
    sections: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        sect = raw.get(name, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"[{name}] must be a table", file=origin, section=name)
        sections[name] = dict(sect)
    workers_raw = raw.get("workers", [])
    if not isinstance(workers_raw, list) or not all(isinstance(w, dict) for w in workers_raw):
        raise ConfigError("workers must be an array of tables ([[workers]])", file=origin, section="workers")
    workers = [dict(w) for w in workers_raw]
    env_keys: dict[str, set[str]] = {}
    worker_env_re = re.compile(r"^TMB_WORKERS_(\d+)_([A-Z_]+)$")
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        if m := worker_env_re.match(var):
            index, key = int(m[1]), m[2].lower()
            if index > len(workers):
                raise ConfigError(
                    f"{var}: worker index {index} leaves a gap (there are {len(workers)} workers)",
                    file=f"environment ({var})",
                    section=f"workers[{index}]",
                    key=key,
                )
            if index == len(workers):
                workers.append({})
            workers[index][key] = env[var]
            env_keys.setdefault(f"workers[{index}]", set()).add(key)
            continue
        for name in _SECTIONS:
            prefix = f"{ENV_PREFIX}{name.upper()}_"
            if var.startswith(prefix):
                key = var[len(prefix) :].lower()
                sections[name][key] = env[var]
                env_keys.setdefault(name, set()).add(key)
                break
    built = {
        name: _build(cls, sections[name], name, origin, env_keys.get(name, set()))
        for name, cls in _SECTIONS.items()
    }
    worker_cfgs = tuple(
        _build(WorkerConfig, w, f"workers[{i}]", origin, env_keys.get(f"workers[{i}]", set()))
        for i, w in enumerate(workers)
    )
    for name in ("admin", "metrics"):
        guarded: AdminConfig | MetricsConfig = built[name]
        if guarded.token_file and not guarded.token:
            from_env = "token_file" in env_keys.get(name, set())
            where = {
                "file": f"environment ({_env_name(name, 'token_file')})" if from_env else origin,
                "section": name,
                "key": "token_file",
            }
            token = _read_token_file(guarded.token_file, name, where)
            built[name] = dataclasses.replace(guarded, token=token)
    config = Config(workers=worker_cfgs, source=origin, **built)
    _validate(config)
    return config


def _url_ok(url: str) -> bool:
    if not _URL_RE.match(url):
        return False
    try:
        urlsplit(url).port  # noqa: B018  (raises for a port out of range)
    except ValueError:
        return False
    return True


def _validate(config: Config) -> None:
    origin = config.source

    def fail(message: str, section: str, key: str, got: Any) -> None:
        raise ConfigError(message, file=origin, section=section, key=key, got=got)

    s = config.server
    if not 0 <= s.port <= 65535:
        fail("server.port must be 0..65535", "server", "port", s.port)
    if s.api_prefix and (not s.api_prefix.startswith("/") or s.api_prefix.endswith("/")):
        fail(
            "server.api_prefix must start with '/' and not end with one", "server", "api_prefix", s.api_prefix
        )
    names: set[str] = set()
    for i, w in enumerate(config.workers):
        sect = f"workers[{i}]"
        if not _NAME_RE.match(w.name):
            fail("worker name must be 1-64 of [A-Za-z0-9_.:-]", sect, "name", w.name)
        if w.name in names:
            fail(f"duplicate worker name {w.name!r}", sect, "name", w.name)
        names.add(w.name)
        if not _url_ok(w.url):
            fail("worker url must be http(s)://host:port with no path", sect, "url", w.url)
        if not w.node:
            fail("worker node id is required", sect, "node", w.node)
        if w.max_concurrency < 1:
            fail("max_concurrency must be at least 1", sect, "max_concurrency", w.max_concurrency)
    p = config.proxy
    for key in ("max_body_bytes", "inspect_body_bytes", "max_response_inspect_bytes"):
        if getattr(p, key) < 0:
            fail(f"proxy.{key} must not be negative", "proxy", key, getattr(p, key))
    for key in (
        "connect_timeout_s",
        "read_timeout_s",
        "health_interval_s",
        "health_timeout_s",
        "header_timeout_s",
        "keepalive_timeout_s",
    ):
        if getattr(p, key) <= 0:
            fail(f"proxy.{key} must be positive", "proxy", key, getattr(p, key))
    if p.total_timeout_s < 0:
        fail(
            "proxy.total_timeout_s must not be negative (0 = unlimited)",
            "proxy",
            "total_timeout_s",
            p.total_timeout_s,
        )
    if p.max_connections < 1:
        fail("proxy.max_connections must be at least 1", "proxy", "max_connections", p.max_connections)
    if not p.health_path.startswith("/"):
        fail("proxy.health_path must start with '/'", "proxy", "health_path", p.health_path)
    v = config.verdicts
    if v.min_window_ms < 0 or v.max_wait_s < 0:
        fail("verdicts durations must not be negative", "verdicts", "min_window_ms", v.min_window_ms)
    if not 0 <= v.window_grid_ms <= 60_000:
        fail(
            "verdicts.window_grid_ms must be 0..60000 (0: no grid)",
            "verdicts",
            "window_grid_ms",
            v.window_grid_ms,
        )
    if not 0.05 <= v.checkpoint_s <= 3600:
        fail("verdicts.checkpoint_s must be 0.05..3600 seconds", "verdicts", "checkpoint_s", v.checkpoint_s)
    if v.log_origin and (any(c.isspace() or c == "+" for c in v.log_origin) or len(v.log_origin) > 200):
        fail(
            "verdicts.log_origin must have no spaces or '+' (a note key name)",
            "verdicts",
            "log_origin",
            v.log_origin,
        )
    if config.store.retention_days < 0:
        fail(
            "store.retention_days must not be negative",
            "store",
            "retention_days",
            config.store.retention_days,
        )
    for i, token in enumerate(config.auditors.tokens):
        _check_token(token, f"auditors.tokens[{i}]", {"file": origin, "section": "auditors", "key": "tokens"})
    if config.auditors.max_bundle_bytes < 1024:
        fail(
            "auditors.max_bundle_bytes must be at least 1024",
            "auditors",
            "max_bundle_bytes",
            config.auditors.max_bundle_bytes,
        )
    if config.admin.enabled == "true" and not config.admin.token:
        fail("admin.enabled = true needs admin.token (or admin.token_file)", "admin", "token", "")
    m = config.management
    if not 0 <= m.port <= 65535:
        fail("management.port must be 0..65535", "management", "port", m.port)
    if m.port and m.port == s.port and m.host == s.host:
        fail("management.port must differ from server.port on the same host", "management", "port", m.port)
    for section, listener in (("server", s), ("management", m)):
        if bool(listener.tls_cert) != bool(listener.tls_key):
            missing = "tls_key" if listener.tls_cert else "tls_cert"
            fail(f"{section}.tls_cert and {section}.tls_key go together", section, missing, "")
    if not (_is_loopback(s.host) and _is_loopback(m.host)):
        # inline tokens guarding endpoints others can reach must be strong (either token opens /metrics,
        # served on both listeners)
        where = {"file": origin, "key": "token"}
        if config.admin.token and config.admin_enabled():
            _check_token(config.admin.token, "admin.token", {**where, "section": "admin"})
        if config.metrics.token and config.metrics.enabled:
            _check_token(config.metrics.token, "metrics.token", {**where, "section": "metrics"})
    a = config.attestation
    for entry in a.nodes:
        node, sep, ak = entry.partition("=")
        if not sep or not _NAME_RE.match(node) or not ak:
            fail("attestation.nodes entries are 'node-id=/path/to/ak'", "attestation", "nodes", entry)
    if a.stale_after_s < 0:
        fail(
            "attestation.stale_after_s must not be negative", "attestation", "stale_after_s", a.stale_after_s
        )
    if a.nonce_ttl_s <= 0 or a.wait_s < 0:
        fail("attestation durations must be positive", "attestation", "wait_s", a.wait_s)
    if a.nodes and not a.policy:
        fail("attestation.nodes needs attestation.policy (the runtime policy)", "attestation", "policy", "")
    ident = config.identity
    if ident.challenge_ttl_s <= 0 or ident.auth_skew_s <= 0:
        fail("identity durations must be positive", "identity", "auth_skew_s", ident.auth_skew_s)
    if ident.rate_per_s < 0 or ident.burst < 1:
        fail("identity.rate_per_s must not be negative, burst at least 1", "identity", "burst", ident.burst)
    if not 0.0 <= config.fingerprint.target_far < 0.5:
        fail(
            "fingerprint.target_far must be in [0, 0.5)",
            "fingerprint",
            "target_far",
            config.fingerprint.target_far,
        )
    _validate_notify(config.notify, fail)


MAX_NOTIFY_URLS = 16
MAX_NOTIFY_URL_LEN = 2048


def notify_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook receiver (None when it can): http or https, a host, no user or
    password (receivers authenticate the daemon by its signature; a secret in the URL would end up in logs),
    no fragment, a valid port, printable ASCII."""
    if len(url) > MAX_NOTIFY_URL_LEN or not all(33 <= ord(c) < 127 for c in url):
        return f"a URL of at most {MAX_NOTIFY_URL_LEN} printable ASCII characters without spaces"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises for a port out of range)
    except ValueError:
        return "not a URL (or a port out of range)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "no user or password in the URL (receivers check the daemon's signature instead)"
    if parts.fragment or url.endswith("#"):
        return "no #fragment"
    return None


def notify_url_label(url: str) -> str:
    """A receiver URL as logs and ``tmb config show`` print it: scheme, host and port, the rest (where
    webhook URLs often carry a secret) redacted."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    rest = url[len(f"{parts.scheme}://{parts.netloc}") :]
    return f"{parts.scheme}://{parts.netloc}" + ("/" + REDACTED if rest not in ("", "/") else rest)


def _validate_notify(n: NotifyConfig, fail: Any) -> None:
    if len(n.urls) > MAX_NOTIFY_URLS:
        fail(f"notify.urls holds at most {MAX_NOTIFY_URLS} URLs", "notify", "urls", len(n.urls))
    if len(set(n.urls)) != len(n.urls):
        fail("notify.urls has a duplicate", "notify", "urls", list(n.urls))
    for url in n.urls:
        if (problem := notify_url_problem(url)) is not None:
            fail(f"notify.urls entries must be {problem}", "notify", "urls", url)
    for kind in n.kinds:
        if kind not in KINDS:
            fail(f"notify.kinds: unknown kind (known: {', '.join(sorted(KINDS))})", "notify", "kinds", kind)
    if not 0 < n.timeout_s <= 300:
        fail("notify.timeout_s must be in (0, 300] seconds", "notify", "timeout_s", n.timeout_s)
    if not 1 <= n.max_attempts <= 1000:
        fail("notify.max_attempts must be 1..1000", "notify", "max_attempts", n.max_attempts)
    if not 0 < n.max_age_s <= 30 * 86400:
        fail("notify.max_age_s must be in (0, 30 days]", "notify", "max_age_s", n.max_age_s)
    if not 0 < n.backoff_s <= n.max_backoff_s:
        fail(
            "notify.backoff_s must be positive and at most max_backoff_s", "notify", "backoff_s", n.backoff_s
        )
    if n.max_backoff_s > 86400:
        fail("notify.max_backoff_s must be at most a day", "notify", "max_backoff_s", n.max_backoff_s)
    if not 1 <= n.max_queued <= 10_000_000:
        fail("notify.max_queued must be 1..10000000", "notify", "max_queued", n.max_queued)


def to_toml(data: Mapping[str, Any]) -> str:
    """Render :meth:`Config.redacted` output as TOML (strings, numbers, booleans, string lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    lines: list[str] = []
    for name, sect in data.items():
        if name == "workers":
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in sect.items())
        lines.append("")
    for worker in data.get("workers", []):
        lines.append("[[workers]]")
        lines.extend(f"{k} = {value(v)}" for k, v in worker.items())
        lines.append("")
    return "\n".join(lines)


def parse_worker(raw: Mapping[str, Any], origin: str) -> WorkerConfig:
    """One ``[[workers]]`` entry from a mapping (e.g. a JSON body), checked as the config file's are.

    Raises :class:`ConfigError` naming ``origin`` for an unknown key, a wrong type or an invalid value.
    """
    worker: WorkerConfig = _build(WorkerConfig, raw, "workers[new]", origin, set())
    _validate(Config(workers=(worker,), source=origin))
    return worker
