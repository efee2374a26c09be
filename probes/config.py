"""Probe configuration: one TOML file, every key overridable by ``TMB_PROBE_<KEY>`` (upper case).

Keys (all top level; units in the names; defaults in :class:`ProbeConfig`)::

    node = "gpu-node-1"                 # node id the daemon registered (required)
    daemon_url = "http://127.0.0.1:8701"  # the daemon's management listener ([management] in its config)
    daemon_ca = ""                      # PEM CA (or self-signed) certificate to pin for an https daemon_url
    tcti = "device:/dev/tpmrm0"         # swtpm:host=127.0.0.1,port=P in tests
    ak_handle = 0x81010002
    pcrs = [10]                         # quoted in pcr_bank; 0-10 are always added (boot chain, IMA)
    pcr_bank = "sha256"
    source = "nvml"                     # nvml | synthetic | replay
    source_options = {}                 # passed to tmb.telemetry.open_source (rate_hz, path, seed, ...)
    sample_rate_hz = 20.0
    batch_interval_s = 1.0
    quote_period_s = 5.0
    ima_log = "/sys/kernel/security/ima/binary_runtime_measurements"
    eventlog = "/sys/kernel/security/tpm0/binary_bios_measurements"  # UEFI event log; "" sends none
    state_dir = "/var/lib/tmb-probe"    # disk buffer and chain state
    buffer_max_bytes = 67108864         # 64 MiB of unacknowledged evidence, oldest evicted first
    buffer_max_items = 100000
    buffer_fsync = true
    bind_pids = []                      # extra pids to bind besides NVML compute processes
    tpm_timeout_s = 10.0                # a TPM call slower than this is abandoned and retried
    http_timeout_s = 10.0

Environment values are parsed as TOML values when they parse (``TMB_PROBE_PCRS="[10, 0]"``,
``TMB_PROBE_QUOTE_PERIOD_S=2``), else taken as strings.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tmb.errors import ConfigError

__all__ = ["BOOT_PCRS", "DEFAULT_EVENTLOG", "DEFAULT_IMA_LOG", "ProbeConfig", "load_config"]

DEFAULT_IMA_LOG = "/sys/kernel/security/ima/binary_runtime_measurements"
DEFAULT_EVENTLOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
BOOT_PCRS = tuple(range(10))  # what the firmware's event log and IMA's boot_aggregate are checked against
ENV_PREFIX = "TMB_PROBE_"


@dataclass(frozen=True)
class ProbeConfig:
    node: str
    daemon_url: str = "http://127.0.0.1:8701"
    daemon_ca: str = ""
    tcti: str = "device:/dev/tpmrm0"
    ak_handle: int = 0x81010002
    pcrs: tuple[int, ...] = (10,)
    pcr_bank: str = "sha256"
    source: str = "nvml"
    source_options: Mapping[str, Any] = field(default_factory=dict)
    sample_rate_hz: float = 20.0
    batch_interval_s: float = 1.0
    quote_period_s: float = 5.0
    ima_log: str = DEFAULT_IMA_LOG
    eventlog: str = DEFAULT_EVENTLOG
    state_dir: str = "/var/lib/tmb-probe"
    buffer_max_bytes: int = 64 * 1024 * 1024
    buffer_max_items: int = 100_000
    buffer_fsync: bool = True
    bind_pids: tuple[int, ...] = ()
    tpm_timeout_s: float = 10.0
    http_timeout_s: float = 10.0
    enroll: bool = True  # enrol (EK certificate, credential activation) and sign evidence; false: unsigned

    def __post_init__(self) -> None:
        if not self.node or len(self.node.encode("utf-8")) > 255:
            raise ConfigError("node must be a non-empty id of at most 255 bytes", key="node")
        if self.source not in ("nvml", "synthetic", "replay"):
            raise ConfigError(
                f"unknown source {self.source!r}", key="source", known="nvml, synthetic, replay"
            )
        for key in (
            "sample_rate_hz",
            "batch_interval_s",
            "quote_period_s",
            "tpm_timeout_s",
            "http_timeout_s",
        ):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"{key} must be positive", key=key)
        if self.buffer_max_bytes < 4096 or self.buffer_max_items < 4:
            raise ConfigError("buffer limits too small (at least 4096 bytes and 4 items)", key="buffer_max_*")
        if any(not 0 <= p < 24 for p in self.pcrs):
            raise ConfigError("pcrs must be PCR indices 0..23", key="pcrs")
        if not self.daemon_url.startswith(("http://", "https://")):
            raise ConfigError("daemon_url must be an http(s) URL", key="daemon_url")
        if self.daemon_ca and not self.daemon_url.startswith("https://"):
            raise ConfigError(
                "daemon_ca pins the daemon's TLS certificate: daemon_url must be https", key="daemon_ca"
            )
        if self.daemon_ca:
            self.tls_context()  # a daemon_ca that cannot be used is an error now, not at the first post

    def tls_context(self) -> ssl.SSLContext | None:
        """For an https ``daemon_url``: a context verifying the daemon's certificate and host name against
        ``daemon_ca`` only (the pinned CA or self-signed certificate), or against the system's CAs when
        none is pinned; never unverified. None for http. A ``daemon_ca`` that cannot be read or holds no
        certificate is a ConfigError."""
        if not self.daemon_url.startswith("https://"):
            return None
        if not self.daemon_ca:
            return ssl.create_default_context()
        try:
            context = ssl.create_default_context(cafile=self.daemon_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load daemon_ca: {getattr(exc, 'strerror', None) or exc}",
                key="daemon_ca",
                path=self.daemon_ca,
            ) from None
        if not context.cert_store_stats()["x509"]:
            raise ConfigError("daemon_ca holds no CA certificate", key="daemon_ca", path=self.daemon_ca)
        return context

    @property
    def quoted_pcrs(self) -> dict[str, list[int]]:
        """The configured PCRs (10 always among them)."""
        return {self.pcr_bank: sorted(set(self.pcrs) | {10})}

    @property
    def quote_selection(self) -> dict[str, list[int]]:
        """What each quote covers: :attr:`quoted_pcrs` and PCRs 0-9, which the daemon replays the event
        log to and recomputes IMA's boot_aggregate from."""
        return {self.pcr_bank: sorted(set(self.pcrs) | {10} | set(BOOT_PCRS))}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_TYPES: dict[str, type] = {
    "node": str,
    "daemon_url": str,
    "daemon_ca": str,
    "tcti": str,
    "ak_handle": int,
    "pcrs": tuple,
    "pcr_bank": str,
    "source": str,
    "source_options": dict,
    "sample_rate_hz": float,
    "batch_interval_s": float,
    "quote_period_s": float,
    "ima_log": str,
    "eventlog": str,
    "state_dir": str,
    "buffer_max_bytes": int,
    "buffer_max_items": int,
    "buffer_fsync": bool,
    "bind_pids": tuple,
    "tpm_timeout_s": float,
    "http_timeout_s": float,
    "enroll": bool,
}


def _coerce(key: str, value: Any, where: str) -> Any:
    want = _TYPES[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    if want is tuple and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    if want is dict and isinstance(value, dict):
        return dict(value)
    if isinstance(value, want) and not (want is not bool and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {want.__name__}, got {type(value).__name__}", key=key, where=where)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ProbeConfig:
    """The effective config: TOML file (optional), then ``TMB_PROBE_*`` variables, then ``overrides``."""
    doc: dict[str, Any] = {}
    where = str(path) if path is not None else "<defaults>"
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read probe config: {exc.strerror}", path=where) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"probe config is not valid TOML: {exc}", path=where) from None
    unknown = sorted(set(doc) - set(_TYPES))
    if unknown:
        raise ConfigError(f"unknown probe config keys: {', '.join(unknown)}", path=where)
    values = {k: _coerce(k, v, where) for k, v in doc.items()}
    for name, text in (os.environ if env is None else env).items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _TYPES:
            raise ConfigError(f"unknown probe config variable {name}", known=sorted(_TYPES))
        values[key] = _coerce(key, _env_value(text), name)
    for key, value in (overrides or {}).items():
        if key not in _TYPES:
            raise ConfigError(f"unknown probe config key {key!r}")
        values[key] = _coerce(key, value, "<overrides>")
    if "node" not in values:
        raise ConfigError(
            "the probe config needs a node id", key="node", hint="set node = '...' or TMB_PROBE_NODE"
        )
    cfg = ProbeConfig(**values)
    return replace(cfg)
