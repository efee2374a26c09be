"""Evidence bundles and the offline audit (``tmb audit``).

A bundle is a directory (format documented in docs/evidence-bundle.md)::

    manifest.json            {"format": "tmb-evidence/1", "node": "...", "ak": "ak.pem",
                              "ima_log": "ima.log", "pcr_bank": "sha256", "sha256_mode": "auto",
                              "quotes": [{"message": "quotes/0.attest", "signature": "quotes/0.sig",
                                          "pcrs": "quotes/0.pcrs", "nonce": "<hex>"}, ...],
                              "policy": "policy.toml", "commitments": ["model.commitment.json"]}

``ak`` is PEM/DER SubjectPublicKeyInfo or TPM2B_PUBLIC; quote files are what ``tpm2_quote -m/-s/-o``
write (the PCR file may also be JSON ``{"sha256": {"10": "hex"}}``); ``ima_log`` is a binary or ascii
measurement list; ``policy`` and ``commitments`` are optional (``--policy`` overrides the first).

The audit verifies every quote (signature, nonce, pcrDigest, PCR 10 selected, clock monotonic across
quotes), replays the IMA log incrementally to each quoted PCR 10 (the quote may lag the log), then
evaluates the runtime policy and the dm-verity rules over the entries the last quote covers. Entries
after it are reported as unattested, not evaluated as proof.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmb.attest.bindings import DEFAULT_MODEL_PATTERNS, check_processes, measured_ok, verity_devices
from tmb.attest.boot_audit import BootAudit, audit_boot, boot_lines
from tmb.attest.dm import DM_EVENTS, VerityRule, check_verity, dm_events
from tmb.attest.ekcert import TrustStore
from tmb.attest.ima import ImaEntry, ImaFields, parse_fields
from tmb.attest.pcr import BANK_SIZES, ReplayState, replay_file
from tmb.attest.policy import PolicyChecker, RuntimePolicy, load_policy, policy_references
from tmb.attest.quote import AkPublic, QuoteResult, load_ak, verify_quote
from tmb.attest.tpm2 import load_pcr_values, parse_attest
from tmb.attest.trail import (
    IdentityFiles,
    QuoteNonce,
    check_chain,
    check_identity,
    check_nonce_log,
    identity_files,
    qualifying_data,
    read_batches,
)
from tmb.errors import Finding, InputError, ParseError, Report, Severity, TmbError
from tmb.verity.commitment import load_commitment, policy_rule_from_commitment

BUNDLE_FORMAT = "tmb-evidence/1"


@dataclass(frozen=True)
class QuoteFiles:
    message: bytes
    signature: bytes
    pcrs: bytes
    nonce: bytes | None  # the extraData the quote must carry
    label: str
    daemon_nonce: bytes | None = None  # the daemon's nonce (nonce = H(daemon_nonce ‖ head digest))
    head: bytes | None = None  # the digest of the telemetry chain head the quote names
    bindings: bytes | None = None  # the digest of the process bindings document the quote covers
    bindings_file: str | None = None  # that document in the bundle (None: the bundle lacks it)


@dataclass(frozen=True)
class Bundle:
    root: Path
    node: str
    ak: bytes
    ima_log: Path
    pcr_bank: str
    sha256_mode: str
    quotes: tuple[QuoteFiles, ...]
    policy: Path | None
    commitments: tuple[Path, ...]
    # Optional request context (docs/evidence-bundle.md): the request window's telemetry (SampleBatch
    # canonical encoding), the enrolled profiles, the claimed model, the daemon's signed verdict, and the
    # window's load (requests in flight, as the daemon measured it).
    telemetry: Path | None = None
    profiles: tuple[Path, ...] = ()
    claimed: str | None = None
    verdict: Path | None = None
    load: float | None = None
    eventlog: Path | None = None  # the firmware's TCG event log (binary_bios_measurements)
    # The daemon's export (docs/evidence-bundle.md, "The daemon's export"): the telemetry chain as sealed,
    # the signed nonce log, the IMA log's segments as received, the window, the files' SHA-256.
    batches: Path | None = None
    nonce_log: Path | None = None
    ima_segments: tuple[tuple[int, Path], ...] = ()
    window: tuple[int, int] | None = None
    sha256: Mapping[str, str] = field(default_factory=dict)
    identity: Path | None = None  # the EK material and the daemon's identity decision (identity.json)


def _read(root: Path, rel: Any, what: str) -> bytes:
    if not isinstance(rel, str) or not rel:
        raise InputError(f"manifest: {what} must be a relative file name", bundle=str(root))
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InputError(f"manifest: {what} points outside the bundle", bundle=str(root), path=rel)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", path=str(path)) from None


def _quote_bindings(root: Path, doc: Any, i: int) -> tuple[bytes | None, str | None]:
    """A quote's ``bindings`` entry: ``{"sha256": hex, "file": name (absent when the daemon lacked it)}``."""
    if doc is None:
        return None, None
    where = f"manifest: quotes[{i}].bindings"
    digest = doc.get("sha256") if isinstance(doc, dict) else None
    try:
        raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise InputError(f"{where} must be {{sha256: 32 bytes of hex, file}}", bundle=str(root))
    rel = doc.get("file")
    if rel is not None:
        _read(root, rel, f"quotes[{i}].bindings.file")[:0]  # a relative name inside the bundle
    return raw, rel if isinstance(rel, str) else None


def load_bundle(root: str | Path) -> Bundle:
    """Read and validate a bundle's manifest; InputError names the bundle and the bad key."""
    root = Path(root)
    raw = _read(root, "manifest.json", "manifest.json")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest.json is not JSON: {exc}", bundle=str(root)) from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise InputError(
            f"not a tmb evidence bundle (manifest format must be {BUNDLE_FORMAT!r})",
            bundle=str(root),
            got=doc.get("format") if isinstance(doc, dict) else type(doc).__name__,
        )
    quotes_doc = doc.get("quotes")
    if not isinstance(quotes_doc, list):
        raise InputError("manifest: 'quotes' must be a list", bundle=str(root))
    quotes = []
    for i, q in enumerate(quotes_doc):
        if not isinstance(q, dict):
            raise InputError(f"manifest: quotes[{i}] must be an object", bundle=str(root))
        nonce = q.get("nonce")
        head = q.get("head")
        daemon_nonce = q.get("daemon_nonce")
        try:
            nonce_b = bytes.fromhex(nonce) if isinstance(nonce, str) else None
            dn = bytes.fromhex(daemon_nonce) if isinstance(daemon_nonce, str) else None
            hd = bytes.fromhex(head["digest"]) if isinstance(head, dict) and "digest" in head else None
        except (ValueError, TypeError):
            raise InputError(
                f"manifest: quotes[{i}] nonce, daemon_nonce or head.digest is not hex", bundle=str(root)
            ) from None
        bindings, bindings_file = _quote_bindings(root, q.get("bindings"), i)
        if dn is not None and hd is not None:  # the audit derives the extraData itself
            nonce_b = qualifying_data(dn, hd, bindings)
        quotes.append(
            QuoteFiles(
                _read(root, q.get("message"), f"quotes[{i}].message"),
                _read(root, q.get("signature"), f"quotes[{i}].signature"),
                _read(root, q.get("pcrs"), f"quotes[{i}].pcrs"),
                nonce_b,
                str(q.get("label", i)),
                dn,
                hd,
                bindings,
                bindings_file,
            )
        )
    bank = doc.get("pcr_bank", "sha256")
    if bank not in BANK_SIZES:
        raise InputError(f"manifest: unsupported pcr_bank {bank!r}", bundle=str(root))
    log_rel = doc.get("ima_log")
    _read(root, log_rel, "ima_log")[:0]  # existence and containment check
    policy = doc.get("policy")
    commitments = doc.get("commitments", [])
    if not isinstance(commitments, list):
        raise InputError("manifest: 'commitments' must be a list", bundle=str(root))
    optional: dict[str, Path | None] = {}
    for key in ("telemetry", "verdict", "eventlog", "batches", "nonce_log", "identity"):
        rel = doc.get(key)
        if rel is not None:
            _read(root, rel, key)[:0]
            optional[key] = root / str(rel)
    profiles = doc.get("profiles", [])
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise InputError("manifest: 'profiles' must be a list of file names", bundle=str(root))
    for i, rel in enumerate(profiles):
        _read(root, rel, f"profiles[{i}]")[:0]
    claimed = doc.get("claimed")
    if claimed is not None and not isinstance(claimed, str):
        raise InputError("manifest: 'claimed' must be a string (model/precision/gpu)", bundle=str(root))
    load = doc.get("load")
    if load is not None and (
        isinstance(load, bool) or not isinstance(load, int | float) or not math.isfinite(load) or load < 0
    ):
        raise InputError(
            "manifest: 'load' must be a number >= 0 (requests in flight over the window)",
            bundle=str(root),
            key="load",
            got=load,
        )
    segments = []
    for i, seg in enumerate(doc.get("ima_segments") or []):
        if not isinstance(seg, dict) or isinstance(seg.get("offset"), bool):
            raise InputError(f"manifest: ima_segments[{i}] must be {{offset, file}}", bundle=str(root))
        offset = seg.get("offset")
        if not isinstance(offset, int) or offset < 0:
            raise InputError(f"manifest: ima_segments[{i}].offset must be >= 0", bundle=str(root))
        _read(root, seg.get("file"), f"ima_segments[{i}]")[:0]
        segments.append((offset, root / str(seg["file"])))
    window = doc.get("window")
    if window is not None and not (
        isinstance(window, list)
        and len(window) == 2
        and all(isinstance(t, int) and not isinstance(t, bool) for t in window)
    ):
        raise InputError("manifest: 'window' must be [t0_ns, t1_ns]", bundle=str(root), key="window")
    digests = doc.get("sha256", {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise InputError("manifest: 'sha256' must map file names to hex digests", bundle=str(root))
    return Bundle(
        root=root,
        node=str(doc.get("node", "")),
        ak=_read(root, doc.get("ak"), "ak"),
        ima_log=root / str(log_rel),
        pcr_bank=bank,
        sha256_mode=str(doc.get("sha256_mode", "auto")),
        quotes=tuple(quotes),
        policy=root / policy if isinstance(policy, str) else None,
        commitments=tuple(root / c for c in commitments if isinstance(c, str)),
        telemetry=optional.get("telemetry"),
        profiles=tuple(root / p for p in profiles),
        claimed=claimed,
        verdict=optional.get("verdict"),
        load=float(load) if load is not None else None,
        eventlog=optional.get("eventlog"),
        batches=optional.get("batches"),
        nonce_log=optional.get("nonce_log"),
        ima_segments=tuple(segments),
        window=(int(window[0]), int(window[1])) if window is not None else None,
        sha256=dict(digests),
        identity=optional.get("identity"),
    )


def write_bundle(
    root: str | Path,
    *,
    node: str,
    ak: bytes,
    ima_log: bytes,
    quotes: Sequence[Mapping[str, bytes | str | None]],
    pcr_bank: str = "sha256",
    policy_toml: str | None = None,
    commitments: Mapping[str, bytes] | None = None,
    policy_files: Mapping[str, bytes] | None = None,
    telemetry: bytes | None = None,
    profiles: Mapping[str, bytes] | None = None,
    claimed: str | None = None,
    verdict: bytes | None = None,
    load: float | None = None,
    eventlog: bytes | None = None,
) -> Path:
    """Write a bundle. Each quote mapping has ``message``, ``signature``, ``pcrs`` (bytes) and
    ``nonce`` (bytes or None). ``policy_files``: the files ``policy_toml`` references, by the bundle-relative
    names it references them by. The request context is optional: ``telemetry`` (the window's
    ``SampleBatch.encode()``), ``profiles`` (file name -> profile JSON), ``claimed``, ``verdict``, ``load``
    (requests in flight over the window, as the daemon measured it)."""
    root = Path(root)
    (root / "quotes").mkdir(parents=True, exist_ok=True)
    (root / "ak.key").write_bytes(ak)
    (root / "ima.log").write_bytes(ima_log)
    entries = []
    for i, q in enumerate(quotes):
        for part, ext in (("message", "attest"), ("signature", "sig"), ("pcrs", "pcrs")):
            value = q[part]
            assert isinstance(value, bytes)  # noqa: S101
            (root / "quotes" / f"{i}.{ext}").write_bytes(value)
        nonce = q.get("nonce")
        entries.append(
            {
                "message": f"quotes/{i}.attest",
                "signature": f"quotes/{i}.sig",
                "pcrs": f"quotes/{i}.pcrs",
                "nonce": nonce.hex() if isinstance(nonce, bytes) else None,
            }
        )
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "node": node,
        "ak": "ak.key",
        "ima_log": "ima.log",
        "pcr_bank": pcr_bank,
        "sha256_mode": "auto",
        "quotes": entries,
    }
    if policy_toml is not None:
        (root / "policy.toml").write_text(policy_toml)
        manifest["policy"] = "policy.toml"
    if policy_files:  # the files policy.toml references, under the names it references them by
        manifest["policy_files"] = []
        for rel, data in policy_files.items():
            target = root / rel
            if not target.resolve().is_relative_to(root.resolve()):
                raise InputError("a policy file's name points outside the bundle", path=rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            manifest["policy_files"].append(rel)
    if commitments:
        manifest["commitments"] = []
        for name, data in commitments.items():
            (root / name).write_bytes(data)
            manifest["commitments"].append(name)
    if telemetry is not None:
        (root / "telemetry.bin").write_bytes(telemetry)
        manifest["telemetry"] = "telemetry.bin"
    if profiles:
        (root / "profiles").mkdir(exist_ok=True)
        manifest["profiles"] = []
        for name, data in profiles.items():
            (root / "profiles" / name).write_bytes(data)
            manifest["profiles"].append(f"profiles/{name}")
    if claimed is not None:
        manifest["claimed"] = claimed
    if verdict is not None:
        (root / "verdict.json").write_bytes(verdict)
        manifest["verdict"] = "verdict.json"
    if load is not None:
        manifest["load"] = load
    if eventlog is not None:
        (root / "eventlog.bin").write_bytes(eventlog)
        manifest["eventlog"] = "eventlog.bin"
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return root


@dataclass(frozen=True)
class QuoteSummary:
    label: str
    ok: bool
    clock: int
    reset_count: int
    restart_count: int
    pcr10: str | None
    matched_entry: int | None  # entries covered by this quote (count), None if PCR 10 never matched


MAX_ENTRY_ROWS = 2000


@dataclass(frozen=True)
class EntryRow:
    """One IMA entry as a report shows it."""

    num: int
    template: str
    name: str
    digest: str
    attested: bool


@dataclass
class AuditResult:
    bundle: str
    node: str
    quotes: list[QuoteSummary] = field(default_factory=list)
    entries_total: int = 0
    entries_attested: int = 0
    mode: str | None = None
    verity: dict[str, int] = field(default_factory=dict)
    report: Report = field(default_factory=Report)
    rules: list[VerityRule] = field(default_factory=list)
    policy_source: str = ""
    entries: list[EntryRow] = field(default_factory=list)  # the first MAX_ENTRY_ROWS, for reports
    boot: BootAudit | None = None  # the boot chain: event log -> PCRs 0-9 -> boot policy -> boot_aggregate
    bindings: list[dict[str, Any]] = field(default_factory=list)  # quoted process bindings that held

    @property
    def ok(self) -> bool:
        return self.report.ok and bool(self.quotes)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "node": self.node,
            "ok": self.ok,
            "quotes": [q.__dict__ for q in self.quotes],
            "entries_total": self.entries_total,
            "entries_attested": self.entries_attested,
            "sha256_mode": self.mode,
            "verity_satisfied": self.verity,
            "boot": self.boot.to_dict() if self.boot is not None else None,
            "bindings": self.bindings,
            "findings": self.report.to_list(),
        }


def _tag(findings: Sequence[Finding], **ctx: Any) -> Iterator[Finding]:
    for f in findings:
        yield Finding(f.id, f.message, f.severity, {**ctx, **f.context})


def _verity_rules(bundle: Bundle, policy: RuntimePolicy) -> list[VerityRule]:
    """The policy's rules plus one per bundled commitment (a commitment the policy already pins once)."""
    rules = list(policy.verity)
    for path in bundle.commitments:
        spec = policy_rule_from_commitment(load_commitment(path))
        rules.append(
            VerityRule(
                name=str(spec["name"]),
                root_digest=str(spec["root_digest"]),
                verity_algorithm=str(spec["verity_algorithm"]),
                salt=str(spec["salt"]),
                data_blocks=int(spec["data_blocks"]),
                data_block_size=int(spec["data_block_size"]),
            )
        )
    unique: dict[tuple[str, str], VerityRule] = {}
    for rule in rules:
        unique.setdefault((rule.root_digest, rule.name), rule)
    return list(unique.values())


def audit_bundle(
    root: str | Path,
    *,
    policy_path: str | Path | None = None,
    daemon_keys: Sequence[bytes] = (),
    ek_roots: TrustStore | None = None,
) -> AuditResult:
    """Re-check everything in a bundle; every finding lands in ``result.report``. ``daemon_keys``: the
    daemon's Ed25519 public keys (raw) the auditor trusts for the nonce log's signature; ``ek_roots``: TPM
    manufacturer roots to re-check the node's EK certificates with (else the daemon's decision is
    reported, ``audit.ek_not_rechecked``)."""
    bundle = load_bundle(root)
    result = AuditResult(str(bundle.root), bundle.node)
    report = result.report
    _audit_export(bundle, report, daemon_keys)
    result.bindings, documents = _audit_bindings(bundle, report)
    ak = load_ak(bundle.ak)
    _audit_identity(bundle, ak, report, daemon_keys, ek_roots)
    ppath = Path(policy_path) if policy_path is not None else bundle.policy
    if ppath is None:
        raise InputError(
            "no runtime policy: the bundle names none and --policy was not given", bundle=str(root)
        )
    if policy_path is None:
        _policy_inside(bundle.root, ppath)
    policy = load_policy(ppath)
    if not bundle.quotes:
        report.add("audit.no_quotes", "the bundle holds no quote: nothing is attested", bundle=str(root))

    state = ReplayState()
    previous: QuoteResult | None = None
    boot_pcrs: dict[str, dict[int, bytes]] | None = None  # PCRs 0-9 of the last verified quote with them
    banks = ["sha1", bundle.pcr_bank] if bundle.pcr_bank != "sha1" else ["sha1"]
    mode = bundle.sha256_mode
    bound: list[tuple[str, int, list[Any]]] = []  # (quote, IMA entries its replay covers, its processes)
    for q in bundle.quotes:
        label = q.label
        try:
            selection = parse_attest(q.message).quote
            pcrs = load_pcr_values(q.pcrs, selection.pcr_select if selection else None)
            qr = verify_quote(
                ak, q.message, q.signature, nonce=q.nonce, pcrs=pcrs, require_pcrs=[10], previous=previous
            )
        except ParseError as exc:
            report.add("quote.malformed", exc.message, quote=label, **exc.context)
            continue
        report.extend(_tag(qr.report.findings, quote=label))
        previous = qr
        if qr.ok:
            quoted = {
                b: {i: v for i in range(10) if (v := pcrs.get(b, i)) is not None} for b in ("sha1", "sha256")
            }
            quoted = {b: v for b, v in quoted.items() if len(v) == 10}
            if quoted:
                boot_pcrs = quoted
        pcr10 = pcrs.get(bundle.pcr_bank, 10)
        matched: int | None = None
        if qr.ok and pcr10 is not None:
            rr = replay_file(
                bundle.ima_log, banks=banks, mode=mode, state=state, expected={bundle.pcr_bank: pcr10}
            )
            report.extend(_tag([f for f in rr.report if not f.id.startswith("ima.")], quote=label))
            if rr.matched is not None:
                state = rr.matched
                mode = rr.mode
                matched = rr.matched.index
            result.mode = rr.mode
            if q.label in documents:
                bound.append((q.label, state.index, documents[q.label]))
        elif not qr.ok:
            report.add(
                "audit.quote_rejected",
                "quote failed verification; its PCR 10 is not used",
                quote=label,
                severity=Severity.WARNING,
            )
        ci = qr.attest.clock_info
        result.quotes.append(
            QuoteSummary(
                label,
                qr.ok,
                ci.clock,
                ci.reset_count,
                ci.restart_count,
                pcr10.hex() if pcr10 else None,
                matched,
            )
        )

    # One full pass for template hashes, violations and structure; the policy sees only quoted entries.
    result.entries_attested = state.index
    checker = PolicyChecker(policy, report)
    first: list[ImaEntry] = []
    measured: list[tuple[int, str, bool]] = []  # (entry, path, measured with an allowed digest): bindings

    def on_entry(entry: ImaEntry) -> None:
        if not first:
            first.append(entry)
        attested = entry.num < state.index
        if attested:
            checker(entry)
        row = len(result.entries) < MAX_ENTRY_ROWS
        if not row and not (attested and bound):
            return
        try:
            f: ImaFields | None = parse_fields(entry)
        except ParseError:
            f = None
        dm = f is not None and entry.template_name == "ima-buf" and f.name in DM_EVENTS  # checker.entries
        if attested and bound and f is not None and not dm:
            measured.append((entry.num, f.name, measured_ok(policy, entry, f)))
        if row:
            name, digest = (f.name, f"{f.digest_alg}:{f.digest.hex()}") if f else ("(unparsable)", "")
            result.entries.append(EntryRow(entry.num, entry.template_name, name, digest, attested))

    full = replay_file(bundle.ima_log, banks=["sha1"], on_entry=on_entry)
    report.extend(full.report)
    result.entries_total = full.entries
    if full.entries > state.index:
        report.add(
            "ima.unattested_entries",
            "entries after the last verified quote are not covered by any quote",
            severity=Severity.WARNING,
            first_entry=state.index,
            count=full.entries - state.index,
        )
    result.policy_source = policy.source
    try:
        result.rules = _verity_rules(bundle, policy)
        result.verity = check_verity(dm_events(checker.entries, report), result.rules, report)
    except TmbError as exc:
        report.add("audit.commitment_unreadable", exc.message, **exc.context)
    checker.finish()
    for label, covered, processes in bound:
        _recheck_bindings(policy, result.rules, checker.entries, measured, label, covered, processes, report)
    result.boot = audit_boot(
        bundle.eventlog, boot_pcrs, first[0] if first else None, getattr(policy, "boot", None), report
    )
    return result


def _audit_identity(
    bundle: Bundle, ak: AkPublic, report: Report, daemon_keys: Sequence[bytes], roots: TrustStore | None
) -> None:
    """The identity record of a daemon's export (:func:`tmb.attest.trail.check_identity`); a daemon's
    export without one says so (``audit.ek_absent``, info: a node registered by its AK alone)."""
    if bundle.identity is None:
        if bundle.nonce_log is not None:
            report.add(
                "audit.ek_absent",
                "the bundle holds no EK record: the node's identity (registered by AK alone, or enrolled "
                "before the daemon kept EKs) is not checked",
                severity=Severity.INFO,
            )
        return
    rel = bundle.identity.name
    try:
        doc = json.loads(bundle.identity.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    pub, certs = identity_files(doc)

    def read(name: str | None) -> tuple[str, bytes | None]:
        try:
            return str(name), _read(bundle.root, name, str(name))
        except InputError:
            return str(name), None

    files = IdentityFiles(
        read(pub), tuple(read(c) for c in certs), ak.name.hex() if ak.name is not None else None, bundle.node
    )
    check_identity(doc, files, rel, report, pinned=daemon_keys, roots=roots)


def _policy_inside(root: Path, policy: Path) -> None:
    """The bundle's policy may reference only files of the bundle (``policy-files/``, as the daemon's
    export writes them): an audit never reads the auditor's own files on a bundle's word."""
    try:
        text = policy.read_text()
    except (OSError, UnicodeDecodeError):
        return  # load_policy names the problem
    for name in policy_references(text, where=str(policy)):
        target = Path(name)
        if target.is_absolute() or not (policy.parent / target).resolve().is_relative_to(root.resolve()):
            raise InputError(
                "the bundle's policy references a file outside the bundle",
                hint="audit with --policy, or export the bundle again from a daemon that keeps the "
                "policy's files",
                bundle=str(root),
                file=name,
            )


def _audit_export(bundle: Bundle, report: Report, daemon_keys: Sequence[bytes]) -> None:
    """The daemon export's members (docs/evidence-bundle.md): the files' SHA-256, the IMA segments against
    the IMA log, the telemetry chain and each quote's head in it, the signed nonce log."""
    root = bundle.root
    for rel, want in sorted(bundle.sha256.items()):
        try:
            got = hashlib.sha256(_read(root, rel, rel)).hexdigest()
        except InputError:
            got = None
        if got != want:
            report.add(
                "bundle.file_digest_mismatch",
                "a file's SHA-256 is not the one the manifest names: edited or replaced",
                file=rel,
            )
    if bundle.ima_segments:
        log = bundle.ima_log.read_bytes()
        for offset, path in bundle.ima_segments:
            data = path.read_bytes()
            if log[offset : offset + len(data)] != data:
                report.add(
                    "ima.segment_mismatch",
                    "an IMA segment as the daemon received it differs from the IMA log",
                    file=path.name,
                    offset=offset,
                )
    heads: set[bytes] | None = None
    if bundle.batches is not None:
        rel = bundle.batches.name
        heads = check_chain(read_batches(bundle.batches.read_bytes(), rel), bundle.node, rel, report)
    for q in bundle.quotes:
        if (bundle.batches is not None or bundle.nonce_log is not None) and (
            q.head is None or q.daemon_nonce is None
        ):
            report.add(
                "bundle.quote_unbound",
                "the quote names no daemon nonce and chain head: its freshness and telemetry are unchecked",
                quote=q.label,
            )
        if heads is not None and q.head is not None and q.head not in heads:
            report.add(
                "chain.head_missing",
                "the quote names a chain head that is not an intact batch of the bundle",
                quote=q.label,
                head=q.head.hex(),
            )
    if bundle.nonce_log is not None:
        rel = bundle.nonce_log.name
        try:
            doc = json.loads(bundle.nonce_log.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        quotes = [
            QuoteNonce(q.label, q.daemon_nonce, hashlib.sha256(q.message).digest())
            for q in bundle.quotes
            if q.daemon_nonce is not None
        ]
        check_nonce_log(doc, quotes, rel, report, pinned=daemon_keys)


def _recheck_bindings(
    policy: RuntimePolicy,
    rules: Sequence[VerityRule],
    dm_entries: Sequence[ImaEntry],
    measured: Sequence[tuple[int, str, bool]],
    label: str,
    covered: int,
    processes: list[Any],
    report: Report,
) -> None:
    """The daemon's bindings rules (:func:`tmb.attest.bindings.check_processes`) re-applied to a quote's
    bindings document, against what the IMA entries its replay covers (the first ``covered``) established:
    the executables measured with an allowed digest and the dm-verity devices activated."""
    paths: dict[str, bool] = {}
    for num, name, ok in measured:
        if num < covered:
            paths[name] = paths.get(name, False) or ok
    local = Report()  # the dm events' own findings are the whole log's, reported once already
    events = dm_events([e for e in dm_entries if e.num < covered], local)
    devices = verity_devices(events, check_verity(events, rules, local))
    found = Report()
    check_processes(policy, paths, devices.values(), processes, DEFAULT_MODEL_PATTERNS, found)
    report.extend(_tag(found.findings, quote=label))


def _audit_bindings(bundle: Bundle, report: Report) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """Each process bindings document a quote covers (its digest is in the quote's qualifying data, which
    the quote's check verified): the bundle's file must hash to it (``bindings.digest_mismatch``, naming the
    file: edited or replaced) and be present (``bindings.missing``). Returns, per quote with a document
    that holds, the quote, the file and its processes (pid, executable): the bindings the audit vouches
    for; and each such quote's processes (wire form) by quote label, for :func:`_recheck_bindings`."""
    out: list[dict[str, Any]] = []
    documents: dict[str, list[Any]] = {}
    for q in bundle.quotes:
        if q.bindings is None:
            continue
        ctx: dict[str, Any] = {"quote": q.label, "sha256": q.bindings.hex()}
        if q.bindings_file is None:
            report.add(
                "bindings.missing",
                "the quote covers a process bindings document the bundle does not hold",
                **ctx,
            )
            continue
        try:
            data = _read(bundle.root, q.bindings_file, q.bindings_file)
        except InputError:
            data = None
        if data is None or hashlib.sha256(data).digest() != q.bindings:
            report.add(
                "bindings.digest_mismatch",
                "the process bindings file is not the document the quote covers: edited or replaced",
                file=q.bindings_file,
                **ctx,
            )
            continue
        try:
            doc = json.loads(data)
            procs = doc.get("processes") if isinstance(doc, dict) else None
        except (ValueError, UnicodeDecodeError):
            procs = None
        if not isinstance(procs, list):
            report.add("bindings.malformed", "the process bindings document is not {processes: [...]}", **ctx)
            continue
        shown = [
            {"pid": p.get("pid"), "exe": p.get("exe")} for p in procs[:MAX_ENTRY_ROWS] if isinstance(p, dict)
        ]
        out.append({"quote": q.label, "file": q.bindings_file, "processes": shown})
        documents[q.label] = procs
    return out, documents


def render_text(result: AuditResult) -> str:
    """The human report ``tmb audit`` prints."""
    lines = [f"evidence bundle: {result.bundle}", f"node: {result.node or '(unnamed)'}", ""]
    lines.append("quotes (TPM signature, nonce, PCR digest, clock):")
    if not result.quotes:
        lines.append("  (none)")
    for q in result.quotes:
        covered = f"covers IMA entries 0..{q.matched_entry - 1}" if q.matched_entry else "PCR 10 NOT reached"
        lines.append(
            f"  [{'ok' if q.ok else 'FAIL'}] quote {q.label}: clock {q.clock} reset {q.reset_count} "
            f"restart {q.restart_count}; {covered}"
        )
    lines.append("")
    lines.append(
        f"IMA log: {result.entries_total} entries, {result.entries_attested} covered by a verified quote"
        + (f" (non-SHA-1 banks: {result.mode})" if result.mode else "")
    )
    if result.boot is not None:
        lines.extend(boot_lines(result.boot))
    for b in result.bindings:
        procs = ", ".join(f"{p['pid']} {p['exe']}" for p in b["processes"]) or "none"
        lines.append(f"process bindings covered by quote {b['quote']} ({b['file']}): {procs}")
    lines.append(
        "dm-verity model images: "
        + (
            ", ".join(f"{name} (activated at entry {idx})" for name, idx in result.verity.items())
            or "none satisfied"
        )
    )
    lines.append("")
    errors = result.report.errors
    notes = [f for f in result.report if f.severity is not Severity.ERROR]
    lines.append(f"findings: {len(errors)} errors, {len(notes)} warnings/notes")
    for f in result.report:
        lines.append(f"  {f}")
    lines.append("")
    lines.append("RESULT: PASS" if result.ok else "RESULT: FAIL")
    return "\n".join(lines)
