"""Runtime policy: which measurements a node may have, which it must have, which model images it mounts.

The policy is one TOML file (format documented in docs/policy.md)::

    version = 1

    [allow]                         # path -> allowed digests ("alg:hex", or bare hex: any algorithm)
    "/usr/bin/python3.11" = ["sha256:9f86d0..."]
    "boot_aggregate" = ["sha256:..."]

    [allow_any_path]
    digests = ["sha256:..."]        # allowed whatever the path (e.g. a binary installed in many places)

    [exclude]
    paths = ["^/tmp/", "^/var/log/"]  # regular expressions, matched with re.search

    [require]
    paths = ["/usr/bin/vllm", "/usr/bin/tmb-probe"]   # must be measured with an allowed digest

    [options]
    allow_violations = false        # a measurement violation is an error unless true
    allow_unknown = false           # a path neither allowed nor excluded is an error unless true

    [[verity]]                      # one per model image (see `tmb verity policy`)
    name = "llama-1b@main"
    root_digest = "..."
    verity_algorithm = "sha256"
    salt = "..."
    data_blocks = 51200

    [keyrings]
    ima = ["keys/vendor.pem"]       # X.509 certificates / public keys for IMA signatures (relative paths)
    trust_measured_keys = false     # also trust keys measured onto the kernel's .ima keyring
    accept_signed = false           # a validly signed file passes even if [allow] does not list it

    [[require_signature]]
    prefix = "/usr/bin/"            # every measured file under it must carry a valid signature

    [[import]]
    keylime = "runtime-policy.json"  # Keylime runtime policy as an allowlist source (relative path)

    [boot]                          # measured boot rules (tmb.attest.bootpolicy; see `tmb boot policy`)
    secure_boot = "required"
    kernels = ["sha256:..."]

An empty policy (nothing allowed, nothing required, no verity rule) fails closed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmb.attest.bootpolicy import BootPolicy
from tmb.attest.dm import DM_EVENTS, VerityRule
from tmb.attest.ima import DIGEST_SIZES, ImaEntry, ImaFields, parse_fields
from tmb.attest.imasig import (
    MEASURED_KEYRING,
    SignatureChecker,
    TrustedKey,
    key_from_public_key,
    load_key_file,
    load_keys,
)
from tmb.errors import ConfigError, ParseError, Report

POLICY_VERSION = 1


@dataclass(frozen=True)
class AllowedDigest:
    alg: str | None  # None: bare hex from Keylime, any algorithm of that length
    digest: bytes


@dataclass(frozen=True)
class RuntimePolicy:
    allow: Mapping[str, frozenset[AllowedDigest]] = field(default_factory=dict)
    allow_any_path: frozenset[AllowedDigest] = frozenset()
    exclude: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    verity: tuple[VerityRule, ...] = ()
    allow_violations: bool = False
    allow_unknown: bool = False
    ignored_keyrings: frozenset[str] = frozenset()
    ima_keys: tuple[TrustedKey, ...] = ()  # [keyrings] ima + Keylime verification-keys
    require_signature: tuple[str, ...] = ()  # path prefixes whose files must be validly signed
    trust_measured_keys: bool = False  # keys measured onto .ima join the keyring
    accept_signed: bool = False  # a valid signature stands in for an [allow] entry
    boot: BootPolicy | None = None  # the [boot] section: measured boot rules (None: none given)
    source: str = "<memory>"

    @property
    def empty(self) -> bool:
        signed = self.accept_signed and bool(self.ima_keys or self.trust_measured_keys)
        return not (
            self.allow or self.allow_any_path or self.require or self.verity or self.allow_unknown or signed
        )

    @property
    def checks_signatures(self) -> bool:
        """Whether IMA signatures are verified at all (policies without keys behave as before)."""
        return bool(self.ima_keys or self.require_signature or self.trust_measured_keys)


def parse_digest(text: str, where: str) -> AllowedDigest:
    alg, sep, hexd = text.strip().rpartition(":")
    try:
        raw = bytes.fromhex(hexd)
    except ValueError:
        raise ConfigError(f"digest {text[:80]!r} is not hex", where=where) from None
    if sep and alg not in DIGEST_SIZES:
        raise ConfigError(f"unknown digest algorithm {alg!r}", where=where)
    if sep and DIGEST_SIZES[alg] != len(raw):
        raise ConfigError(f"{alg} digest must be {DIGEST_SIZES[alg]} bytes, got {len(raw)}", where=where)
    if not raw:
        raise ConfigError("empty digest", where=where)
    return AllowedDigest(alg if sep else None, raw)


def _digest_list(value: Any, where: str) -> frozenset[AllowedDigest]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("expected a list of digest strings", where=where)
    return frozenset(parse_digest(v, where) for v in value)


def _compile(patterns: Iterable[str], where: str) -> tuple[str, ...]:
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError("exclude patterns must be strings", where=where)
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"bad regular expression {p!r}: {exc}", where=where) from None
        out.append(p)
    return tuple(out)


def load_keylime_policy(path: str | Path) -> RuntimePolicy:
    """Import a Keylime runtime policy (JSON, ``meta.version`` 1) as an allowlist source."""
    where = str(path)
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read Keylime policy: {exc.strerror}", path=where) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Keylime policy is not JSON: {exc}", path=where) from None
    if not isinstance(doc, dict):
        raise ConfigError("Keylime policy must be a JSON object", path=where)
    if "payload" in doc and "signatures" in doc:
        raise ConfigError(
            "this is a signed (DSSE) Keylime policy envelope",
            path=where,
            hint="verify and unwrap it with keylime_policy, then import the payload",
        )
    meta = doc.get("meta")
    if not isinstance(meta, dict) or meta.get("version") != 1:
        raise ConfigError("unsupported Keylime runtime policy version (need meta.version = 1)", path=where)
    digests = doc.get("digests", {})
    if not isinstance(digests, dict):
        raise ConfigError("'digests' must map paths to lists", path=where)
    allow = {p: _digest_list(v, f"{where}: digests[{p!r}]") for p, v in digests.items()}
    keyrings = doc.get("keyrings", {})
    if isinstance(keyrings, dict):
        for ring, values in keyrings.items():
            allow[ring] = allow.get(ring, frozenset()) | _digest_list(values, f"{where}: keyrings[{ring!r}]")
    ima = doc.get("ima", {}) if isinstance(doc.get("ima"), dict) else {}
    return RuntimePolicy(
        allow=allow,
        exclude=_compile(doc.get("excludes", []), f"{where}: excludes"),
        ignored_keyrings=frozenset(ima.get("ignored_keyrings", []) or []),
        ima_keys=keylime_verification_keys(doc.get("verification-keys", ""), where),
        source=where,
    )


def keylime_verification_keys(value: Any, where: str) -> tuple[TrustedKey, ...]:
    """Keys of a Keylime runtime policy's ``verification-keys``: a JSON *string* holding Keylime's
    ``ImaKeyring`` (``{"pubkeys": [base64 DER SubjectPublicKeyInfo, ...], "keyids": [int, ...]}``, as
    ``keylime-policy create runtime --add-ima-signature-verification-key`` writes it). PEM public keys or
    certificates in place of the base64 DER, and a plain list instead of the object, are accepted too.
    ``""`` means none."""
    what = f"{where}: verification-keys"
    doc = value
    for _ in range(2):  # Keylime sometimes stores the JSON string JSON-encoded once more
        if not isinstance(doc, str):
            break
        if not doc.strip():
            return ()
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"verification-keys is not JSON: {exc}", path=what) from None
    if isinstance(doc, list):
        doc = {"pubkeys": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("pubkeys", []), list):
        raise ConfigError("verification-keys must hold {'pubkeys': [...], 'keyids': [...]}", path=what)
    pubkeys, keyids = doc.get("pubkeys", []), doc.get("keyids", [])
    if not isinstance(keyids, list):
        raise ConfigError("verification-keys 'keyids' must be a list", path=what)
    out: list[TrustedKey] = []
    for i, text in enumerate(pubkeys):
        source = f"{what}[{i}]"
        keyid = keyids[i] if i < len(keyids) else None
        if not isinstance(text, str) or not (
            keyid is None or (isinstance(keyid, int) and 0 <= keyid < 1 << 32)
        ):
            raise ConfigError("each key must be a string, each keyid a 32-bit integer", path=source)
        try:
            if "-----BEGIN" in text:
                keys = load_keys(text.encode("ascii"), source)
            else:
                keys = load_keys(base64.b64decode(text, validate=True), source)
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(f"verification key not usable: {exc}", path=source) from None
        if keyid is not None:
            keys = [
                key_from_public_key(k.public_key, source, keyid.to_bytes(4, "big")) if k.issuer is None else k
                for k in keys
            ]
        out.extend(keys)
    return tuple(out)


def load_policy(path: str | Path) -> RuntimePolicy:
    """Load a TOML runtime policy; ConfigError names the file and the key on any problem."""
    path = Path(path)
    where = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read policy: {exc.strerror}", path=where) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy is not valid TOML: {exc}", path=where) from None
    return policy_from_dict(doc, where=where, base=path.parent)


def policy_from_dict(
    doc: Mapping[str, Any], *, where: str = "<policy>", base: Path | None = None
) -> RuntimePolicy:
    known = {"version", "allow", "allow_any_path", "exclude", "require", "options", "verity", "import"}
    known |= {"keyrings", "require_signature", "boot"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"unknown policy keys: {', '.join(sorted(unknown))}", path=where)
    if doc.get("version") != POLICY_VERSION:
        raise ConfigError(f"policy version must be {POLICY_VERSION}", path=where, got=doc.get("version"))
    allow_doc = doc.get("allow", {})
    if not isinstance(allow_doc, dict):
        raise ConfigError("[allow] must be a table of path = [digests]", path=where)
    allow = {p: _digest_list(v, f"{where}: allow[{p!r}]") for p, v in allow_doc.items()}
    any_path = _digest_list(
        _table(doc, "allow_any_path", where).get("digests", []), f"{where}: allow_any_path"
    )
    exclude = _compile(_table(doc, "exclude", where).get("paths", []), f"{where}: exclude.paths")
    require = _table(doc, "require", where).get("paths", [])
    if not isinstance(require, list) or not all(isinstance(p, str) for p in require):
        raise ConfigError("require.paths must be a list of paths", path=where)
    options = _table(doc, "options", where)
    for key in options:
        if key not in ("allow_violations", "allow_unknown"):
            raise ConfigError(f"unknown option {key!r}", path=where)
    verity = tuple(_verity_rule(r, f"{where}: verity[{i}]") for i, r in enumerate(doc.get("verity", [])))
    keyrings = _table(doc, "keyrings", where)
    extra = set(keyrings) - {"ima", "trust_measured_keys", "accept_signed"}
    if extra:
        raise ConfigError(f"unknown [keyrings] keys: {', '.join(sorted(extra))}", path=where)
    flags = {k: keyrings.get(k, False) for k in ("trust_measured_keys", "accept_signed")}
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise ConfigError(f"keyrings.{key} must be true or false", path=where)
    policy = RuntimePolicy(
        allow=allow,
        allow_any_path=any_path,
        exclude=exclude,
        require=tuple(require),
        verity=verity,
        allow_violations=bool(options.get("allow_violations", False)),
        allow_unknown=bool(options.get("allow_unknown", False)),
        ima_keys=_keyring_files(keyrings.get("ima", []), where, base),
        require_signature=_signature_rules(doc.get("require_signature", []), where),
        trust_measured_keys=flags["trust_measured_keys"],
        accept_signed=flags["accept_signed"],
        boot=BootPolicy.from_toml(doc["boot"], where=where) if "boot" in doc else None,
        source=where,
    )
    for i, imp in enumerate(doc.get("import", [])):
        if not isinstance(imp, dict) or set(imp) != {"keylime"}:
            raise ConfigError("each [[import]] needs exactly: keylime = 'file.json'", path=where, index=i)
        target = Path(imp["keylime"])
        policy = merge(
            policy, load_keylime_policy(target if target.is_absolute() else (base or Path()) / target)
        )
    if policy.require_signature and not (policy.ima_keys or policy.trust_measured_keys):
        raise ConfigError(
            "[[require_signature]] rules but no key to verify with",
            path=where,
            hint="list certificates in [keyrings] ima, import Keylime verification-keys, or set "
            "keyrings.trust_measured_keys",
        )
    return policy


MAX_POLICY_FILES = 64  # files one policy references ([keyrings] ima, [[import]] keylime)


def policy_references(text: str, *, where: str = "<policy>") -> list[str]:
    """The file names a policy's TOML text references, as written (``[keyrings] ima`` entries, then each
    ``[[import]]``'s ``keylime``), each once, in order. ConfigError when the text is not a policy's TOML
    or references more than :data:`MAX_POLICY_FILES` files."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy is not valid TOML: {exc}", path=where) from None
    names: list[str] = []
    ring = doc.get("keyrings", {})
    ima = ring.get("ima", []) if isinstance(ring, dict) else []
    if isinstance(ima, list):
        names += [v for v in ima if isinstance(v, str)]
    imports = doc.get("import", [])
    if isinstance(imports, list):
        names += [i["keylime"] for i in imports if isinstance(i, dict) and isinstance(i.get("keylime"), str)]
    out = list(dict.fromkeys(names))
    if len(out) > MAX_POLICY_FILES:
        raise ConfigError(f"the policy references more than {MAX_POLICY_FILES} files", path=where)
    return out


MAX_POLICY_FILE_BYTES = 64 * 1024 * 1024  # one referenced file (a Keylime allowlist can be large)


def policy_files(path: str | Path, text: str | None = None) -> dict[str, bytes]:
    """The files the policy at ``path`` references (name as written -> content), read as
    :func:`load_policy` reads them (relative to the policy's directory). ConfigError names an unreadable
    or oversized file."""
    path = Path(path)
    where = str(path)
    if text is None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read policy: {exc}", path=where) from None
    out: dict[str, bytes] = {}
    for name in policy_references(text, where=where):
        target = Path(name)
        target = target if target.is_absolute() else path.parent / target
        try:
            with target.open("rb") as fh:
                data = fh.read(MAX_POLICY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(
                f"cannot read a file the policy references: {exc.strerror}", path=where, file=name
            ) from None
        if len(data) > MAX_POLICY_FILE_BYTES:
            raise ConfigError(
                "a file the policy references is too large",
                path=where,
                file=name,
                limit=MAX_POLICY_FILE_BYTES,
            )
        out[name] = data
    return out


def rewrite_references(text: str, names: Mapping[str, str], *, where: str = "<policy>") -> str:
    """The policy's TOML with each referenced file name (:func:`policy_references`) replaced by
    ``names[name]``: the same document otherwise, written anew (comments and layout are not kept; the
    result parses to the original document but for the names). ConfigError when a reference has no new
    name or the document holds a value TOML cannot be written back from here (a date)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy is not valid TOML: {exc}", path=where) from None
    missing = [n for n in policy_references(text, where=where) if n not in names]
    if missing:
        raise ConfigError("no new name for a file the policy references", path=where, files=missing)
    ring = doc.get("keyrings")
    if isinstance(ring, dict) and isinstance(ring.get("ima"), list):
        ring["ima"] = [names.get(v, v) if isinstance(v, str) else v for v in ring["ima"]]
    for imp in doc.get("import", []) if isinstance(doc.get("import"), list) else []:
        if isinstance(imp, dict) and isinstance(imp.get("keylime"), str):
            imp["keylime"] = names[imp["keylime"]]
    out = "".join(f"{_toml_key(k)} = {_toml_value(v, where)}\n" for k, v in doc.items())
    if tomllib.loads(out) != doc:  # the writer below is small: never hand back another policy
        raise ConfigError("the policy cannot be written back with its files renamed", path=where)
    return out


def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=True)


def _toml_value(value: Any, where: str) -> str:
    """One value as inline TOML (strings as JSON strings, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v, where)}" for k, v in value.items()) + "}"
    raise ConfigError(f"a {type(value).__name__} value cannot be written back into the policy", path=where)


def _keyring_files(value: Any, where: str, base: Path | None) -> tuple[TrustedKey, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("keyrings.ima must be a list of certificate/key file paths", path=where)
    out: list[TrustedKey] = []
    for i, name in enumerate(value):
        target = Path(name)
        target = target if target.is_absolute() else (base or Path()) / target
        try:
            out.extend(load_key_file(target))
        except OSError as exc:
            raise ConfigError(
                f"cannot read keyring file: {exc.strerror}",
                path=where,
                key=f"keyrings.ima[{i}]",
                file=str(target),
            ) from None
        except ValueError as exc:
            raise ConfigError(
                f"keyring file holds no usable key: {exc}", path=where, key=f"keyrings.ima[{i}]"
            ) from None
    return tuple(out)


def _signature_rules(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("[[require_signature]] must be an array of tables", path=where)
    out = []
    for i, rule in enumerate(value):
        if not isinstance(rule, dict) or set(rule) != {"prefix"}:
            raise ConfigError(
                "each [[require_signature]] needs exactly: prefix = '/path/'", path=where, index=i
            )
        prefix = rule["prefix"]
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ConfigError("require_signature prefix must be an absolute path", path=where, index=i)
        out.append(prefix)
    return tuple(out)


def _table(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table", path=where)
    return value


def _verity_rule(doc: Any, where: str) -> VerityRule:
    if not isinstance(doc, dict):
        raise ConfigError("a [[verity]] entry must be a table", where=where)
    allowed = {"name", "root_digest", "verity_algorithm", "salt", "data_blocks", "data_block_size", "device"}
    allowed |= {"required", "hash_block_size"}
    extra = set(doc) - allowed
    if extra:
        raise ConfigError(f"unknown verity keys: {', '.join(sorted(extra))}", where=where)
    for key in ("name", "root_digest"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ConfigError(f"verity rule needs a non-empty {key}", where=where)
    try:
        bytes.fromhex(doc["root_digest"])
    except ValueError:
        raise ConfigError("root_digest is not hex", where=where) from None
    blocks = doc.get("data_blocks")
    if blocks is not None and (not isinstance(blocks, int) or blocks <= 0):
        raise ConfigError("data_blocks must be a positive integer", where=where)
    return VerityRule(
        name=doc["name"],
        root_digest=doc["root_digest"].lower(),
        verity_algorithm=str(doc.get("verity_algorithm", "sha256")),
        salt=str(doc.get("salt", "-")).lower(),
        data_blocks=blocks,
        data_block_size=int(doc.get("data_block_size", 4096)),
        device=doc.get("device"),
        required=bool(doc.get("required", True)),
    )


def merge(a: RuntimePolicy, b: RuntimePolicy) -> RuntimePolicy:
    allow = dict(a.allow)
    for path, digests in b.allow.items():
        allow[path] = allow.get(path, frozenset()) | digests
    return RuntimePolicy(
        allow=allow,
        allow_any_path=a.allow_any_path | b.allow_any_path,
        exclude=a.exclude + b.exclude,
        require=a.require + b.require,
        verity=a.verity + b.verity,
        allow_violations=a.allow_violations or b.allow_violations,
        allow_unknown=a.allow_unknown or b.allow_unknown,
        ignored_keyrings=a.ignored_keyrings | b.ignored_keyrings,
        ima_keys=a.ima_keys + b.ima_keys,
        require_signature=a.require_signature + b.require_signature,
        trust_measured_keys=a.trust_measured_keys or b.trust_measured_keys,
        accept_signed=a.accept_signed or b.accept_signed,
        boot=a.boot if a.boot is not None else b.boot,
        source=a.source,
    )


def _allowed(digests: Iterable[AllowedDigest], alg: str, digest: bytes) -> bool:
    return any(d.digest == digest and (d.alg is None or d.alg == alg) for d in digests)


class PolicyChecker:
    """Evaluates entries one at a time (so it can ride along a replay); ``finish`` adds the findings
    that need the whole log (required measurements, empty policy)."""

    def __init__(self, policy: RuntimePolicy, report: Report) -> None:
        self.policy = policy
        self.report = report
        self._exclude = [re.compile(p) for p in policy.exclude]
        self._seen_required: set[str] = set()
        self.entries: list[ImaEntry] = []  # dm events, kept for the verity rules
        self.signatures = (
            SignatureChecker(policy.ima_keys, policy.require_signature, report)
            if policy.checks_signatures
            else None
        )

    def __call__(self, entry: ImaEntry) -> None:
        self.check(entry)

    def check(self, entry: ImaEntry) -> None:
        policy, report = self.policy, self.report
        try:
            fields = parse_fields(entry)
        except ParseError as exc:
            report.add(
                "ima.unknown_template" if "unknown IMA template" in exc.message else "ima.malformed_entry",
                exc.message,
                **entry.where(),
            )
            return
        name = fields.name
        if entry.template_name == "ima-buf" and name in DM_EVENTS:
            self.entries.append(entry)
            return
        if entry.is_violation:
            if not policy.allow_violations:
                report.add(
                    "policy.violation",
                    "measurement violation not allowed by policy",
                    **entry.where(),
                    path=name,
                )
            return
        if entry.template_name == "ima-buf" and name in policy.ignored_keyrings:
            return
        if any(rx.search(name) for rx in self._exclude):
            return
        signed = self.signatures is not None and self.signatures.check(entry, fields)
        allowed = policy.allow.get(name)
        if allowed is not None and _allowed(allowed, fields.digest_alg, fields.digest):
            self._seen_required.add(name)
            self._passed(entry, fields)
            return
        if _allowed(policy.allow_any_path, fields.digest_alg, fields.digest):
            self._seen_required.add(name)
            self._passed(entry, fields)
            return
        if signed and policy.accept_signed and allowed is None:
            return  # a path the allowlist does not name; a pinned path keeps its pinned digests
        got = f"{fields.digest_alg}:{fields.digest.hex()}"
        if allowed is not None:
            report.add(
                "policy.digest_not_allowed",
                "file measured with a digest the policy does not allow for its path",
                **entry.where(),
                path=name,
                got=got,
                expected=sorted(f"{d.alg or '*'}:{d.digest.hex()}" for d in allowed),
            )
        elif not policy.allow_unknown:
            report.add(
                "policy.path_not_allowed",
                "measured file is not in the allowlist",
                **entry.where(),
                path=name,
                got=got,
            )
        else:
            self._passed(entry, fields)

    def _passed(self, entry: ImaEntry, fields: ImaFields) -> None:
        """An entry that passed the allowlist: a key measured onto ``.ima`` joins the keyring when the
        policy trusts measured keys."""
        if (
            self.signatures is not None
            and self.policy.trust_measured_keys
            and entry.template_name == "ima-buf"
            and fields.name == MEASURED_KEYRING
        ):
            self.signatures.add_measured_key(entry, fields)

    def finish(self) -> None:
        if self.policy.empty:
            self.report.add(
                "policy.empty",
                "the policy allows and requires nothing: failing closed",
                source=self.policy.source,
            )
        for path in self.policy.require:
            if path not in self._seen_required:
                self.report.add(
                    "policy.required_missing",
                    "a required measurement is absent (or only present with a disallowed digest)",
                    path=path,
                )
