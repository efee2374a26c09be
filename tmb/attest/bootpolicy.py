"""Boot policy: the ``[boot]`` section of a runtime policy, checked against a firmware event log's summary.

The section (format and rules in docs/policy.md and docs/boot.md)::

    [boot]
    secure_boot = "required"              # or "optional" (the default)
    bootloaders = ["sha256:..."]          # allowed boot applications that are not the kernel
    kernels = ["sha256:..."]              # allowed kernel boot applications
    pcrs = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] # the quote must cover them and the log replay to them
    [boot.cmdline]
    require = ["ima_policy=tcb"]          # on every kernel command line
    forbid = ["ima=off", "init="]         # on none ("key=": any value; "key": the flag or any value)
    [boot.db]
    require = ["sha256:<certificate fingerprint or hash>"]
    [boot.dbx]
    require = ["sha256:<hash>"]

:func:`check_boot` reads only :class:`~tmb.attest.eventlog_events.BootSummary`, whose facts come from
events whose data match their digests; the outcome never depends on anything else. :func:`draft_policy`
writes the section from a known-good log, with a comment naming the event behind each line.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tmb.attest.eventlog import EVENT_TYPE_IDS, Event
from tmb.attest.eventlog_events import (
    EFI_IMAGE_SECURITY_DATABASE,
    BootApp,
    BootSummary,
    KernelCmdline,
    Signature,
    check_event_data,
    parse_variable,
)
from tmb.errors import ConfigError, Finding, ParseError, Report, finding

__all__ = [
    "DEFAULT_FORBID",
    "DEFAULT_PCRS",
    "BootPolicy",
    "check_boot",
    "cmdline_tokens",
    "draft_policy",
    "signature_ids",
    "token_matches",
]

DEFAULT_PCRS = tuple(range(10))
SECURE_BOOT_MODES = ("optional", "required")
DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_PREFERRED_BANKS = ("sha256", "sha384", "sha512", "sha1")
# What `tmb boot policy` forbids on the command line unless the operator edits it: switches that turn off
# IMA appraisal, EVM, module signature enforcement or dm-verity, and shells instead of init.
DEFAULT_FORBID = (
    "ima=off", "ima_appraise=off", "ima_appraise=fix", "ima_appraise=log", "evm=fix",
    "module.sig_enforce=0", "module.sig_enforce=n", "module.sig_enforce=off",
    "systemd.verity=0", "systemd.verity=no", "systemd.verity=off",
    "init=/bin/sh", "init=/bin/bash", "rd.break", "rd.shell", "systemd.debug_shell",
)  # fmt: skip
# Command-line keys (normalised: '-' as '_') whose tokens the draft requires: IMA, EVM, dm-verity, the
# root device and the other integrity switches.
_DRAFT_KEY_PREFIXES = (
    "ima", "evm", "integrity", "dm_mod.", "dm_verity.", "verity", "systemd.verity", "rd.systemd.verity",
    "roothash", "usrhash", "root", "lockdown", "module.sig_enforce",
)  # fmt: skip
_BOOT_KEYS = {"secure_boot", "bootloaders", "kernels", "pcrs", "cmdline", "db", "dbx"}
_EV_VARIABLE_DRIVER_CONFIG = EVENT_TYPE_IDS["EV_EFI_VARIABLE_DRIVER_CONFIG"]


@dataclass(frozen=True)
class BootPolicy:
    """The ``[boot]`` rules. Digests are normalised to ``alg:hex`` (lower case); an empty tuple is "not
    checked". ``cmdline_require``/``cmdline_forbid`` hold command-line rules (see :func:`token_matches`)."""

    secure_boot: str = "optional"
    bootloaders: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    pcrs: tuple[int, ...] = DEFAULT_PCRS
    cmdline_require: tuple[str, ...] = ()
    cmdline_forbid: tuple[str, ...] = ()
    db_require: tuple[str, ...] = ()
    dbx_require: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing but the PCR list: such a policy checks nothing in the log and fails closed."""
        return self.secure_boot != "required" and not (
            self.bootloaders
            or self.kernels
            or self.cmdline_require
            or self.cmdline_forbid
            or self.db_require
            or self.dbx_require
        )

    @classmethod
    def from_toml(cls, value: str | Mapping[str, Any], *, where: str = "<policy>") -> BootPolicy:
        """The rules of a parsed ``[boot]`` table, or of TOML text holding one. ConfigError names the field
        (``key``, e.g. ``boot.kernels[1]``) of anything unknown, of the wrong type or malformed."""
        if isinstance(value, str):
            try:
                doc = tomllib.loads(value)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"policy is not valid TOML: {exc}", path=where) from None
            if "boot" not in doc:
                raise ConfigError("no [boot] section", path=where, key="boot")
            value = doc["boot"]
        table = _table(value, "boot", _BOOT_KEYS, where)
        mode = table.get("secure_boot", "optional")
        if mode not in SECURE_BOOT_MODES:
            raise _error(where, "boot.secure_boot", 'must be "required" or "optional"', got=mode)
        cmdline = _table(table.get("cmdline", {}), "boot.cmdline", {"require", "forbid"}, where)
        db = _table(table.get("db", {}), "boot.db", {"require"}, where)
        dbx = _table(table.get("dbx", {}), "boot.dbx", {"require"}, where)
        return cls(
            secure_boot=mode,
            bootloaders=_digests(table.get("bootloaders", []), "boot.bootloaders", where),
            kernels=_digests(table.get("kernels", []), "boot.kernels", where),
            pcrs=_pcrs(table.get("pcrs", list(DEFAULT_PCRS)), where),
            cmdline_require=_cmdline_rules(cmdline.get("require", []), "boot.cmdline.require", where),
            cmdline_forbid=_cmdline_rules(cmdline.get("forbid", []), "boot.cmdline.forbid", where),
            db_require=_digests(db.get("require", []), "boot.db.require", where),
            dbx_require=_digests(dbx.get("require", []), "boot.dbx.require", where),
        )


# ------------------------------------------------------------------------------------------ parsing


def _error(where: str, key: str, message: str, **context: Any) -> ConfigError:
    return ConfigError(f"{key}: {message}", path=where, key=key, **context)


def _table(value: Any, key: str, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _error(where, key, "must be a table")
    unknown = set(value) - allowed
    if unknown:
        raise _error(where, key, f"unknown keys: {', '.join(sorted(unknown))}", allowed=sorted(allowed))
    return value


def _strings(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list):
        raise _error(where, key, "must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _error(where, f"{key}[{i}]", "must be a string", got=repr(item)[:80])
    return value


def _digests(value: Any, key: str, where: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for i, text in enumerate(_strings(value, key, where)):
        alg, sep, hexd = text.strip().lower().partition(":")
        field = f"{key}[{i}]"
        if not sep or alg not in DIGEST_SIZES:
            raise _error(
                where, field, f"{text[:80]!r} is not 'alg:hex' with alg one of {', '.join(DIGEST_SIZES)}"
            )
        try:
            raw = bytes.fromhex(hexd)
        except ValueError:
            raise _error(where, field, f"{text[:80]!r} is not hex") from None
        if len(raw) != DIGEST_SIZES[alg]:
            raise _error(where, field, f"a {alg} digest is {DIGEST_SIZES[alg]} bytes, got {len(raw)}")
        out[f"{alg}:{raw.hex()}"] = None
    return tuple(out)


def _pcrs(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _error(where, "boot.pcrs", "must be a non-empty list of PCR indexes (0-23)")
    for i, pcr in enumerate(value):
        if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
            raise _error(where, f"boot.pcrs[{i}]", "must be a PCR index 0-23", got=pcr)
    return tuple(sorted(set(value)))


def _one_word(rule: str) -> bool:
    return bool(rule) and not rule.startswith("=") and not any(c.isspace() or c == '"' for c in rule)


def _cmdline_rules(value: Any, key: str, where: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for i, rule in enumerate(_strings(value, key, where)):
        if not _one_word(rule):
            raise _error(
                where, f"{key}[{i}]", f"{rule!r} is not one command-line word (key, key= or key=value)"
            )
        out[rule] = None
    return tuple(out)


# ------------------------------------------------------------------------------------- command lines


def _split(text: str) -> list[str]:
    """Words as the kernel splits its command line: at whitespace outside double quotes, quotes dropped."""
    words: list[str] = []
    word: list[str] = []
    quoted = started = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            started = True
        elif ch.isspace() and not quoted:
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        words.append("".join(word))
    return words


def cmdline_tokens(line: KernelCmdline) -> tuple[list[str], list[str]]:
    """(kernel parameters, init arguments) of a measured command line. grub's ``kernel_cmdline`` starts with
    the kernel image's path, which is not a parameter; words after ``--`` go to init, not the kernel."""
    words = _split(line.text)
    if line.source == "grub" and words:
        words = words[1:]
    if "--" in words:
        cut = words.index("--")
        return words[:cut], words[cut + 1 :]
    return words, []


def _norm(key: str) -> str:
    return key.replace("-", "_")


def token_matches(rule: str, token: str) -> bool:
    """A rule against one command-line word. ``key=value``: that word; ``key=``: ``key`` with any value;
    ``key`` alone: the flag ``key`` or ``key`` with any value. Keys compare with ``-`` and ``_`` alike,
    as the kernel and systemd read them; values compare exactly."""
    rkey, rsep, rvalue = rule.partition("=")
    tkey, tsep, tvalue = token.partition("=")
    if _norm(rkey) != _norm(tkey):
        return False
    if not rsep:
        return True
    if not rvalue:
        return bool(tsep)
    return bool(tsep) and tvalue == rvalue


# ------------------------------------------------------------------------------------------ checking


def _app_digest(app: BootApp) -> str:
    bank = next((b for b in _PREFERRED_BANKS if b in app.digests), None)
    return f"{bank}:{app.digests[bank]}" if bank else ""


def _app_allowed(app: BootApp, allowed: Sequence[str]) -> bool:
    for rule in allowed:
        alg, _, hexd = rule.partition(":")
        if app.digests.get(alg, "").lower() == hexd:
            return True
    return False


def _app_where(app: BootApp) -> dict[str, Any]:
    return {
        "event": app.event,
        "pcr": app.pcr,
        "path": app.path,
        "role": app.role,
        "digest": _app_digest(app),
        "digests": dict(app.digests),
    }


def signature_ids(sig: Signature) -> set[str]:
    """How a policy names a db/dbx entry: ``sha256:<fingerprint>`` for a certificate, ``alg:<hex>`` for a
    hash entry; nothing for the kinds a policy cannot name (rsa2048, x509_sha256, ...)."""
    if sig.kind == "x509":
        return {f"sha256:{sig.sha256}"}
    if sig.kind in DIGEST_SIZES:
        return {f"{sig.kind}:{sig.data.hex()}"}
    return set()


def _variable_events(events: Iterable[Event]) -> dict[str, int]:
    """db and dbx: the index of the event each was last read from (as :func:`summarize` reads them)."""
    out: dict[str, int] = {}
    for event in events:
        if event.type != _EV_VARIABLE_DRIVER_CONFIG or event.pcr != 7:
            continue
        try:
            var = parse_variable(event)
        except ParseError:
            continue
        named = var.name in ("db", "dbx") and var.guid == EFI_IMAGE_SECURITY_DATABASE
        if named and check_event_data(event, Report()):
            out[var.name] = event.index
    return out


def check_boot(summary: BootSummary, policy: BootPolicy, *, events: Iterable[Event] = ()) -> list[Finding]:
    """Every way the summarised boot breaks the policy (empty: it holds). Each finding names the event
    (``event``, its index) and what it concerns (path, digest, command-line word, db/dbx entry).

    ``events``: the log's events, only to name the event that db/dbx were read from in their findings.
    """
    out: list[Finding] = []
    if policy.empty:
        out.append(
            finding(
                "boot.empty",
                "the [boot] policy requires nothing (no Secure Boot, digests, command-line or db/dbx rule):"
                " failing closed",
            )
        )
    out += _check_secure_boot(summary, policy)
    out += _check_apps(summary, policy)
    out += _check_cmdlines(summary, policy)
    if policy.db_require or policy.dbx_require:
        where = _variable_events(events)
        out += _check_variable(summary, "db", policy.db_require, where.get("db"))
        out += _check_variable(summary, "dbx", policy.dbx_require, where.get("dbx"))
    return out


def _check_secure_boot(summary: BootSummary, policy: BootPolicy) -> list[Finding]:
    if policy.secure_boot != "required":
        return []
    conflict = "eventlog.secure_boot_conflict" in summary.report.ids()
    if summary.secure_boot and not conflict:
        return []
    state = "conflicting" if conflict else {False: "disabled", None: "not measured"}[summary.secure_boot]
    return [
        finding(
            "boot.secure_boot_off",
            f"the policy requires Secure Boot and the log shows it {state}",
            event=summary.secure_boot_event,
            state=state,
        )
    ]


def _check_apps(summary: BootSummary, policy: BootPolicy) -> list[Finding]:
    out: list[Finding] = []
    loaders = [a for a in summary.boot_apps if a.role != "kernel"]
    kernels = [a for a in summary.boot_apps if a.role == "kernel"]
    for kind, allowed, apps in (
        ("bootloader", policy.bootloaders, loaders),
        ("kernel", policy.kernels, kernels),
    ):
        if not allowed:
            continue
        if not apps:
            why = (
                " (grub loading the kernel with its own loader, usual with Secure Boot off, measures it only"
                " into PCR 9: not a boot application)"
                if kind == "kernel"
                else ""
            )
            out.append(
                finding(
                    f"boot.no_{kind}_measured",
                    f"the policy lists allowed {kind}s but the log has no {kind} boot application{why}",
                    boot_apps=[{"event": a.event, "role": a.role, "path": a.path} for a in summary.boot_apps],
                )
            )
        for app in apps:
            if not _app_allowed(app, allowed):
                out.append(
                    finding(
                        f"boot.{kind}_not_allowed",
                        f"{app.role} {app.path or '(no file path)'} was loaded with a digest the policy does"
                        f" not list in boot.{kind}s",
                        **_app_where(app),
                    )
                )
    return out


def _check_cmdlines(summary: BootSummary, policy: BootPolicy) -> list[Finding]:
    if not (policy.cmdline_require or policy.cmdline_forbid):
        return []
    if not summary.kernel_cmdlines:
        return [
            finding(
                "boot.no_cmdline_measured",
                "the policy has [boot.cmdline] rules but the log measures no kernel command line",
                require=list(policy.cmdline_require),
                forbid=list(policy.cmdline_forbid),
            )
        ]
    out: list[Finding] = []
    for line in summary.kernel_cmdlines:
        params, init_args = cmdline_tokens(line)
        where: dict[str, Any] = {"event": line.event, "pcr": line.pcr, "source": line.source}
        for rule in policy.cmdline_require:
            if not any(token_matches(rule, t) for t in params):
                out.append(
                    finding(
                        "boot.cmdline_missing",
                        f"the kernel command line lacks {rule!r}",
                        **where,
                        rule=rule,
                        cmdline=line.text,
                    )
                )
        for rule in policy.cmdline_forbid:
            for token in params + init_args:
                if token_matches(rule, token):
                    out.append(
                        finding(
                            "boot.cmdline_forbidden",
                            f"the kernel command line has {token!r}, forbidden by {rule!r}",
                            **where,
                            rule=rule,
                            token=token,
                        )
                    )
    return out


def _check_variable(
    summary: BootSummary, name: str, required: Sequence[str], event: int | None
) -> list[Finding]:
    if not required:
        return []
    where: dict[str, Any] = {"variable": name, "pcr": 7, "event": event}
    sigs = summary.variables.get(name)
    if sigs is None:
        return [
            finding(
                f"boot.{name}_missing",
                f"{name} is not measured into PCR 7 (or its event data do not match the digest): the"
                f" {len(required)} entries the policy requires cannot be found",
                **where,
                missing=list(required),
            )
        ]
    present: set[str] = set()
    for sig in sigs:
        present |= signature_ids(sig)
    missing = [r for r in required if r not in present]
    if not missing:
        return []
    return [
        finding(
            f"boot.{name}_missing",
            f"{name} lacks {len(missing)} of the {len(required)} entries the policy requires",
            **where,
            missing=missing,
            entries=len(sigs),
        )
    ]


# -------------------------------------------------------------------------------------------- draft


def _toml(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's; DEL must be escaped too)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _comment(text: str, limit: int = 100) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _events(indexes: Sequence[int]) -> str:
    return ("event " if len(indexes) == 1 else "events ") + ", ".join(map(str, indexes))


def _app_lines(key: str, apps: Sequence[BootApp], none: str) -> list[str]:
    if not apps:
        return [f"{key} = []  # {none}: not checked"]
    seen: dict[str, list[BootApp]] = {}
    for app in apps:
        digest = _app_digest(app)
        if digest:
            seen.setdefault(digest, []).append(app)
    lines = [f"{key} = ["]
    for digest, group in seen.items():
        what = "; ".join(dict.fromkeys(f"{a.role} {a.path or '(no file path)'}" for a in group))
        lines.append(f"    {_toml(digest)},  # {_events([a.event for a in group])}: {_comment(what)}")
    return [*lines, "]"]


def _draft_key(token: str) -> bool:
    return _norm(token.partition("=")[0]).startswith(_DRAFT_KEY_PREFIXES)


def _cmdline_lines(summary: BootSummary) -> list[str]:
    lines = summary.kernel_cmdlines
    if not lines:
        return [
            "",
            "# no kernel command line in this log: [boot.cmdline] left out (its rules would fail closed)",
        ]
    params = [cmdline_tokens(line)[0] for line in lines]
    common = [t for t in dict.fromkeys(params[0]) if all(t in p for p in params[1:])]
    forbidden = [t for t in common if any(token_matches(r, t) for r in DEFAULT_FORBID)]
    required = [t for t in common if _draft_key(t) and _one_word(t) and t not in forbidden]
    sources = ", ".join(sorted({line.source for line in lines}))
    out = ["", "[boot.cmdline]"]
    if required:
        out.append("require = [")
        where = f"{_events([line.event for line in lines])} ({sources})"
        out += [f"    {_toml(t)},  # {where}" for t in required]
        out.append("]")
    else:
        out.append(f"require = []  # no IMA, dm-verity or root word on the command line ({sources})")
    for token in forbidden:
        out.append(f"# WARNING: this log's command line has {_toml(token)}, which the list below forbids")
    out.append("forbid = [")
    out += [f"    {_toml(rule)}," for rule in DEFAULT_FORBID]
    return [*out, "]"]


def _signature_comment(sig: Signature) -> str:
    return f"x509 {_comment(sig.subject or '', 80)}" if sig.kind == "x509" else f"{sig.kind} hash"


def _variable_lines(summary: BootSummary, name: str, event: int | None) -> list[str]:
    sigs = summary.variables.get(name)
    where = f"event {event}" if event is not None else "PCR 7"
    if sigs is None:
        return ["", f"# {name} is not measured in this log: [boot.{name}] left out"]
    entries: dict[str, Signature] = {}
    for sig in sigs:
        for ident in sorted(signature_ids(sig)):
            entries.setdefault(ident, sig)
    if not entries:
        return ["", f"# {name} ({where}) has no entry a policy can name: [boot.{name}] left out"]
    kinds = ", ".join(f"{sum(s.kind == k for s in sigs)} {k}" for k in sorted({s.kind for s in sigs}))
    out = [
        "",
        f"[boot.{name}]",
        f"# {name} as measured at {where}: {len(sigs)} entries ({kinds})",
        "require = [",
    ]
    for ident, sig in entries.items():
        note = f"  # {_signature_comment(sig)}" if sig.kind == "x509" or name == "db" else ""
        out.append(f"    {_toml(ident)},{note}")
    return [*out, "]"]


def draft_policy(summary: BootSummary, *, events: Iterable[Event] = (), source: str | None = None) -> str:
    """A ``[boot]`` section that the summarised (known-good) boot meets, as commented TOML: Secure Boot as
    observed, its boot loaders and kernels, the IMA/dm-verity/root words common to its command lines as
    ``require`` and :data:`DEFAULT_FORBID`, its db and dbx entries. ``events`` (optional) name the events
    db and dbx were read from in the comments."""
    where = _variable_events(events)
    head = f" from {_comment(source, 200)}" if source else ""
    if summary.secure_boot:
        sb = f'secure_boot = "required"  # SecureBoot=1 at event {summary.secure_boot_event} (PCR 7)'
    elif summary.secure_boot is False:
        sb = f'secure_boot = "optional"  # SecureBoot=0 at event {summary.secure_boot_event}: it was off'
    else:
        sb = 'secure_boot = "optional"  # no SecureBoot variable measured in this log'
    pcrs = ", ".join(map(str, DEFAULT_PCRS))
    lines = [
        f"# [boot] policy drafted by `tmb boot policy`{head}.",
        "# It describes this log as known-good: review every line before use (docs/boot.md).",
        "[boot]",
        sb,
        f"pcrs = [{pcrs}]  # the quote must cover these; the log must replay to them",
    ]
    lines += _app_lines(
        "bootloaders", [a for a in summary.boot_apps if a.role != "kernel"], "no boot loader in this log"
    )
    lines += _app_lines(
        "kernels",
        [a for a in summary.boot_apps if a.role == "kernel"],
        "no kernel boot application in this log (grub's own loader measures the kernel only into PCR 9)",
    )
    lines += _cmdline_lines(summary)
    lines += _variable_lines(summary, "db", where.get("db"))
    lines += _variable_lines(summary, "dbx", where.get("dbx"))
    return "\n".join(lines) + "\n"
