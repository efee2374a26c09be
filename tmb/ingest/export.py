"""The daemon's evidence export: a node's evidence over a time window, from the ingest store to a bundle
directory ``tmb audit`` reads (docs/evidence-bundle.md, "The daemon's export"). Pure store -> files: no
HTTP, nothing of the verdicts (the caller hands in the verdict document, the policy, the commitments and
profiles in force, and the function that signs the nonce log).

What a window's bundle holds, each part as the daemon received it:

* the verified quotes that attest the window's telemetry batches (TPMS_ATTEST, TPMT_SIGNATURE, PCR values
  as received), each with its daemon nonce and chain head;
* the IMA log from byte 0 up to the last of them, written as received: ``ima/<offset>.bin`` segments and
  their concatenation ``ima.log``;
* the process bindings documents those quotes cover (``bindings/<sha256>.json``, the canonical bytes the
  daemon kept; each quote's manifest entry names its document's digest, which its qualifying data covers);
* the telemetry chain: every batch those quotes attested, from the batch after the previous quote's head
  up to each quoted head (``telemetry/batches.jsonl``, wire form), and the window's samples
  (``telemetry.bin``);
* the node's AK, its firmware event log at the last quote, the nonce log entries those quotes consumed,
  signed by the daemon (``nonces.json``);
* the EK material the node was pinned by at the last quote (``ek/public.bin``, ``ek/certs/N.der``) and the
  daemon's identity decision, signed by the daemon (``identity.json``);
* the policy, the files it references (``policy-files/``, policy.toml's references rewritten to them) and
  the commitments the last quote was checked against (as the daemon recorded them at start), else the
  caller's;
* the request context when given: profiles, claimed model, load, signed verdict.

Every size is bounded (:data:`MAX_EXPORT_BYTES`, :data:`MAX_EXPORT_BATCHES`, :data:`MAX_EXPORT_QUOTES`);
a larger export is an :class:`ExportError`, never a partial bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from tmb.attest.evidence import write_bundle
from tmb.attest.policy import rewrite_references
from tmb.attest.trail import IDENTITY_FORMAT, NONCE_LOG_FORMAT, nonce_log_message, signed_message
from tmb.errors import ConfigError, InputError, TmbError
from tmb.ingest.store import IngestBackend
from tmb.ingest.trail import RecordRow
from tmb.telemetry.sample import SampleBatch

__all__ = [
    "MAX_EXPORT_BATCHES",
    "MAX_EXPORT_BYTES",
    "MAX_EXPORT_QUOTES",
    "ExportError",
    "NonceSigner",
    "RequestContext",
    "export_window",
]

MAX_EXPORT_BYTES = 256 * 1024 * 1024  # IMA log + batches + blobs of one bundle
MAX_EXPORT_BATCHES = 100_000
MAX_EXPORT_QUOTES = 1_000
MAX_EXPORT_SEGMENTS = 100_000  # IMA segments of one log
MAX_WINDOW_NS = 7 * 24 * 3600 * 10**9  # a node range export covers at most a week

# sign(message) -> (Ed25519 public key raw, signature): the daemon's verdict key (tmb.verdict.signing).
NonceSigner = Callable[[bytes], tuple[bytes, bytes]]


class ExportError(TmbError):
    """The store cannot give a complete bundle for the window (too large, unknown node, no trail)."""


@dataclass(frozen=True)
class RequestContext:
    """What a request's bundle carries besides the node's evidence (docs/evidence-bundle.md)."""

    verdict: bytes | None = None  # the signed verdict document
    claimed: str | None = None
    load: float | None = None
    policy_toml: str | None = None
    policy_files: Mapping[str, bytes] = field(default_factory=dict)  # name as the policy writes it -> bytes
    commitments: Mapping[str, bytes] = field(default_factory=dict)
    profiles: Mapping[str, bytes] = field(default_factory=dict)


def export_window(
    store: IngestBackend,
    out: str | Path,
    node: str,
    t0_ns: int,
    t1_ns: int,
    *,
    sign: NonceSigner,
    nonce_ttl_s: float,
    pcr_bank: str = "sha256",
    context: RequestContext | None = None,
) -> Path:
    """Write the bundle of ``node``'s evidence over ``[t0_ns, t1_ns)`` to ``out`` (a new directory).
    The caller holds the ingest's database lock (the store is not thread-safe)."""
    if not 0 <= t0_ns < t1_ns or t1_ns - t0_ns > MAX_WINDOW_NS:
        raise InputError("the window must be 0 <= from < to, at most 7 days", t0_ns=t0_ns, t1_ns=t1_ns)
    row = store.node(node)
    if row is None:
        raise ExportError(f"no evidence of node {node!r} is known here", node=node)
    ctx = context or RequestContext()
    budget = _Budget()
    batches = store.batches_overlapping(node, t0_ns, t1_ns)
    if len(batches) > MAX_EXPORT_BATCHES:
        raise ExportError("the window holds too many telemetry batches", limit=MAX_EXPORT_BATCHES)
    quote_ids = sorted({b.quote_id for b in batches if b.quote_id is not None})
    quotes = _quotes(store, node, quote_ids)
    last_ns = quotes[-1].received_ns if quotes else None
    ima = _ima(store, node, last_ns, budget)
    chain = _chain(store, node, quotes, budget)
    telemetry = _window_samples(batches, t0_ns, t1_ns)
    eventlog = _latest(store, node, "eventlog", last_ns, budget)
    ak = _latest(store, node, "ak", last_ns, budget) or row.ak
    policy, commitments, files = _in_force(store, quotes[-1] if quotes else None, ctx, budget)
    recorded_policy = policy
    policy, policy_files, renamed = _policy_files(policy, files)
    quote_files = []
    for q in quotes:
        message = _blob(store, q.digest, budget)
        quote_files.append(
            {
                "message": message,
                "signature": _blob(store, bytes.fromhex(q.meta["signature"]), budget),
                "pcrs": _blob(store, bytes.fromhex(q.meta["pcrs"]), budget),
                "nonce": None,
            }
        )
    ek = store.last_record(node, "ek", until_ns=last_ns)
    ek_material = (
        (
            _blob(store, ek.digest, budget),
            [_blob(store, bytes.fromhex(d), budget) for d in ek.meta["certificates"]],
        )
        if ek is not None
        else None
    )
    nonces = store.consumed_nonces(node, [q.digest for q in quotes])
    public, _ = sign(b"")
    doc: dict[str, Any] = {
        "format": NONCE_LOG_FORMAT,
        "node": node,
        "ttl_s": nonce_ttl_s,
        "entries": [n.to_dict() for n in nonces],
        "key": {
            "algorithm": "Ed25519",
            "public_key_hex": public.hex(),
            "key_id": hashlib.sha256(public).hexdigest(),
        },
    }
    doc["signature"] = sign(nonce_log_message(doc))[1].hex()

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise InputError("the export directory exists and is not empty", path=str(root))
    try:
        write_bundle(
            root,
            node=node,
            ak=ak,
            ima_log=b"".join(data for _, data in ima),
            quotes=quote_files,
            pcr_bank=pcr_bank,
            policy_toml=policy,
            policy_files=policy_files,
            commitments=commitments,
            telemetry=telemetry,
            profiles=ctx.profiles,
            claimed=ctx.claimed,
            verdict=ctx.verdict,
            load=ctx.load,
            eventlog=eventlog,
        )
        manifest = json.loads((root / "manifest.json").read_bytes())
        for entry, q in zip(manifest["quotes"], quotes, strict=True):
            entry.pop("nonce", None)  # tmb audit derives it: H(daemon_nonce ‖ head digest)
            entry.update(
                daemon_nonce=q.meta["nonce"], head=q.meta["head"], sha256=q.digest.hex(), quote_id=q.ref
            )
            if isinstance(q.meta.get("bindings"), str):  # the process bindings document the quote covers
                entry["bindings"] = _write_bindings(root, store, q.meta["bindings"], budget)
        (root / "ima").mkdir()
        manifest["ima_segments"] = []
        for offset, data in ima:
            name = f"ima/{offset:012d}.bin"
            (root / name).write_bytes(data)
            manifest["ima_segments"].append({"offset": offset, "file": name})
        (root / "telemetry").mkdir()
        (root / "telemetry" / "batches.jsonl").write_bytes(b"".join(chain))
        manifest["batches"] = "telemetry/batches.jsonl"
        (root / "nonces.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        manifest["nonce_log"] = "nonces.json"
        manifest["window"] = [t0_ns, t1_ns]
        if ek is not None and ek_material is not None:
            manifest["identity"] = _write_identity(root, node, ek, *ek_material, sign)
        if renamed and recorded_policy is not None:
            (root / "policy.recorded.toml").write_text(recorded_policy)
            manifest["policy_recorded"] = {"file": "policy.recorded.toml", "files": renamed}
        manifest["sha256"] = {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        }
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _write_bindings(root: Path, store: IngestBackend, digest: str, budget: _Budget) -> dict[str, Any]:
    """``bindings/<sha256>.json``: the canonical bytes of a bindings document a quote covers, as the daemon
    kept them; ``{"sha256"}`` alone when the daemon never received it (``binding.missing``)."""
    entry: dict[str, Any] = {"sha256": digest}
    try:
        data = store.blob(bytes.fromhex(digest))
    except ValueError:
        data = None
    if data is None:
        return entry
    rel = f"bindings/{digest}.json"
    if not (root / rel).exists():
        budget.take(len(data))
        (root / "bindings").mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
    entry["file"] = rel
    return entry


def _write_identity(
    root: Path, node: str, ek: RecordRow, public: bytes, certs: list[bytes], sign: NonceSigner
) -> str:
    """``ek/public.bin``, ``ek/certs/N.der`` and ``identity.json``: the EK material the node was pinned by
    (the trail's ``ek`` record in force at the window's last quote) and the daemon's decision, signed like
    the nonce log (:data:`~tmb.attest.trail.IDENTITY_FORMAT`)."""
    (root / "ek" / "certs").mkdir(parents=True)
    (root / "ek" / "public.bin").write_bytes(public)
    files = []
    for i, der in enumerate(certs):
        rel = f"ek/certs/{i}.der"
        (root / rel).write_bytes(der)
        files.append({"file": rel, "sha256": hashlib.sha256(der).hexdigest()})
    meta = ek.meta
    key, _ = sign(b"")
    doc: dict[str, Any] = {
        "format": IDENTITY_FORMAT,
        "node": node,
        "ek_trust": meta.get("ek_trust"),
        "ek_sha256": meta.get("ek_sha256"),
        "pin": meta.get("pin"),
        "chain": meta.get("chain", []),
        "tpm": meta.get("tpm"),
        "checked_ns": meta.get("checked_ns"),
        "enrolled_ns": ek.received_ns,
        "rekey": bool(meta.get("rekey")),
        "ak_name": meta.get("ak_name"),
        "public": {"file": "ek/public.bin", "sha256": hashlib.sha256(public).hexdigest()},
        "certificates": files,
        "key": {
            "algorithm": "Ed25519",
            "public_key_hex": key.hex(),
            "key_id": hashlib.sha256(key).hexdigest(),
        },
    }
    doc["signature"] = sign(signed_message(doc))[1].hex()
    (root / "identity.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return "identity.json"


class _Budget:
    def __init__(self) -> None:
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > MAX_EXPORT_BYTES:
            raise ExportError("the evidence bundle would be too large", limit=MAX_EXPORT_BYTES)


def _blob(store: IngestBackend, digest: bytes, budget: _Budget) -> bytes:
    data = store.blob(digest)
    if data is None:
        raise ExportError("the evidence trail lacks a blob it references", digest=digest.hex())
    budget.take(len(data))
    return data


def _quotes(store: IngestBackend, node: str, quote_ids: list[int]) -> list[RecordRow]:
    """The verified quotes with ids from the first to the last attesting the window, in order."""
    if not quote_ids:
        return []
    lo, hi = quote_ids[0], quote_ids[-1]
    rows = store.quote_records(node, lo, hi, 4 * MAX_EXPORT_QUOTES + 1)  # failed ones are among them
    out = [r for r in rows if r.meta.get("ok")]
    if len(out) > MAX_EXPORT_QUOTES or len(rows) > 4 * MAX_EXPORT_QUOTES:
        raise ExportError("the window rests on too many quotes", limit=MAX_EXPORT_QUOTES)
    if not out or out[-1].ref != hi:
        raise ExportError(
            "the evidence trail lacks the quote attesting the window (kept before the trail existed?)",
            node=node,
            quote_id=hi,
        )
    return out


def _ima(store: IngestBackend, node: str, until_ns: int | None, budget: _Budget) -> list[tuple[int, bytes]]:
    """The IMA segments received up to ``until_ns``, of the node's current log (from its last offset 0)."""
    if until_ns is None:
        return []
    segments = store.ima_since_reset(node, until_ns, MAX_EXPORT_SEGMENTS + 1)
    if len(segments) > MAX_EXPORT_SEGMENTS:
        raise ExportError("the IMA log is in too many segments", limit=MAX_EXPORT_SEGMENTS)
    out, end = [], 0
    for r in segments:
        if r.ref != end:
            raise ExportError("the IMA segments of the trail are not contiguous", node=node, offset=end)
        data = _blob(store, r.digest, budget)
        out.append((end, data))
        end += len(data)
    return out


def _in_force(
    store: IngestBackend, quote: RecordRow | None, ctx: RequestContext, budget: _Budget
) -> tuple[str | None, Mapping[str, bytes], dict[str, bytes]]:
    """The policy text, commitments and referenced files (name as written -> content) the last quote was
    checked against, from the trail (the daemon records them at start: ``Ingest.keep_policy``); the
    caller's when the quote names none."""
    ref = quote.meta.get("policy") if quote is not None else None
    r = store.last_record("", "policy", digest=bytes.fromhex(ref)) if ref else None
    if r is not None:
        text = _blob(store, r.digest, budget)
        commitments = {
            str(c["name"]): _blob(store, bytes.fromhex(c["sha256"]), budget)
            for c in r.meta.get("commitments", [])
        }
        files = {
            str(f["name"]): _blob(store, bytes.fromhex(f["sha256"]), budget) for f in r.meta.get("files", [])
        }
        try:
            return text.decode(), commitments, files
        except UnicodeDecodeError:
            pass
    return ctx.policy_toml, ctx.commitments, dict(ctx.policy_files)


def _policy_files(
    text: str | None, files: dict[str, bytes]
) -> tuple[str | None, dict[str, bytes], dict[str, str]]:
    """The policy text with its referenced files renamed into the bundle (``policy-files/N-<name>``), the
    files by their bundle names, and original name -> bundle name."""
    if text is None or not files:
        return text, {}, {}
    names: dict[str, str] = {}
    for i, name in enumerate(sorted(files)):
        base = re.sub(r"[^A-Za-z0-9._-]", "_", PurePath(name).name)[-64:].lstrip(".") or "file"
        names[name] = f"policy-files/{i}-{base}"
    try:
        rewritten = rewrite_references(text, names)
    except ConfigError as exc:
        raise ExportError(
            f"the policy's files cannot be renamed into the bundle: {exc.message}", **exc.context
        ) from None
    return rewritten, {names[n]: data for n, data in files.items()}, names


def _latest(
    store: IngestBackend, node: str, kind: str, until_ns: int | None, budget: _Budget
) -> bytes | None:
    row = store.last_record(node, kind, until_ns=until_ns)
    return _blob(store, row.digest, budget) if row is not None else None


def _chain(store: IngestBackend, node: str, quotes: list[RecordRow], budget: _Budget) -> list[bytes]:
    """JSON lines of the batches each quote attested (from the batch after the previous quote's head up to
    its own, across linked segments): every batch of the window is among them, and the auditor walks
    back from each quoted head through ``prev`` to it."""
    lines: list[bytes] = []
    for q in quotes:
        assert q.ref is not None  # noqa: S101
        rows = store.batches_of_quote(node, q.ref, MAX_EXPORT_BATCHES + 1)
        if len(lines) + len(rows) > MAX_EXPORT_BATCHES:
            raise ExportError("the chain holds too many telemetry batches", limit=MAX_EXPORT_BATCHES)
        for segment, seq, prev, digest, payload in rows:
            budget.take(len(payload))
            doc = {
                "node": node,
                "segment": segment.hex(),
                "seq": seq,
                "prev": prev.hex(),
                "payload": base64.b64encode(payload).decode(),
                "digest": digest.hex(),
            }
            lines.append(json.dumps(doc, sort_keys=True).encode() + b"\n")
    return lines


def _window_samples(batches: list[Any], t0_ns: int, t1_ns: int) -> bytes | None:
    """The window's samples as the verdict engine cuts them (``SampleBatch.encode()``)."""
    parts = [p for p in (SampleBatch.decode(b.payload).slice_time(t0_ns, t1_ns) for b in batches) if len(p)]
    if not parts:
        return None
    try:
        return SampleBatch.concat(parts).encode()
    except Exception:  # mixed sources: the engine keeps the first source's
        return SampleBatch.concat([p for p in parts if p.source == parts[0].source]).encode()
