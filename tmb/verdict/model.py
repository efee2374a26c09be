"""The verdict record and its one canonical encoding (docs/verdict.md has a worked example).

Canonical encoding (``tmb-verdict/1``): the verdict as a JSON object (:meth:`Verdict.to_dict`), keys sorted
by Unicode code point at every level, no whitespace (separators ``,`` and ``:``), strings UTF-8 (non-ASCII
written as itself, not ``\\u`` escaped), numbers only as integers (times are nanoseconds since the Unix
epoch; any non-integer quantity, like a p-value, is a decimal string). The signature is Ed25519 over the
canonical encoding of the object *without* its ``signature`` member; ``signature`` is the 64-byte
signature in lowercase hex. ``key_id`` (inside the signed bytes) is the lowercase hex SHA-256 of the
daemon's raw 32-byte public key.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tmb.errors import InputError
from tmb.verdict.merkle import leaf_hash

VERDICT_FORMAT = "tmb-verdict/1"


class Decision(enum.StrEnum):
    VERIFIED = "verified"  # attested node, committed model, fingerprint consistent, real telemetry
    MODEL_MISMATCH = "model_mismatch"  # the evidence points at another model than the one claimed
    UNATTESTED = "unattested"  # no valid quote/policy result covers the node for the window
    INSUFFICIENT_TELEMETRY = "insufficient_telemetry"  # too few samples to judge the window
    DEMO = "demo"  # everything checked out on a synthetic telemetry source (demo deployments only)


@dataclass(frozen=True)
class Window:
    """The telemetry window judged, in wall-clock ns; ``widened`` when stretched to the minimum length."""

    t0_ns: int
    t1_ns: int
    widened: bool = False


@dataclass(frozen=True)
class Reason:
    """One reason behind the decision: a stable dotted id (like a Finding's) and a message."""

    id: str
    message: str


@dataclass(frozen=True)
class BatchProof:
    """Where a verdict sits in a batch signed once (docs/verdict.md, "Batch signatures"): its leaf index,
    the batch size and the RFC 9162 inclusion path (sibling hashes, lowercase hex, leaf level first)."""

    index: int
    size: int
    path: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "size": self.size, "path": list(self.path)}


@dataclass(frozen=True)
class Verdict:
    """A signed statement about one request. ``signature`` is empty until signed."""

    request_id: str
    correlation_id: str | None
    worker: str
    node: str
    gpus: tuple[str, ...]
    claimed_model: str | None  # the model the worker is configured to serve
    requested_model: str | None  # the request body's "model"
    window: Window
    attestation: Mapping[str, Any]  # quote_time_ns, pcr10, policy_ok, verity_root, commitment, ...
    fingerprint: Mapping[str, Any]  # statistic, p_value (decimal string), samples, profile_id, ...
    decision: Decision
    reasons: tuple[Reason, ...]
    telemetry_source: str  # "nvml", "synthetic", "replay", "none"
    issued_ns: int
    key_id: str = ""
    signature: str = ""
    format: str = VERDICT_FORMAT
    attestation_evidence: tuple[str, ...] = field(default=())  # digests of the evidence records relied on
    batch: BatchProof | None = None  # set when the signature covers a batch root, not this verdict alone

    def to_dict(self, *, signed: bool = True) -> dict[str, Any]:
        """Plain JSON data; ``signed=False`` leaves out ``signature`` and ``signature_batch`` (the bytes
        that get signed, or for a batch-signed verdict the bytes its leaf hash covers)."""
        data: dict[str, Any] = {
            "format": self.format,
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "worker": self.worker,
            "node": self.node,
            "gpus": list(self.gpus),
            "claimed_model": self.claimed_model,
            "requested_model": self.requested_model,
            "window": {
                "t0_ns": self.window.t0_ns,
                "t1_ns": self.window.t1_ns,
                "widened": self.window.widened,
            },
            "attestation": _plain(self.attestation),
            "fingerprint": _plain(self.fingerprint),
            "decision": self.decision.value,
            "reasons": [{"id": r.id, "message": r.message} for r in self.reasons],
            "telemetry_source": self.telemetry_source,
            "issued_ns": self.issued_ns,
            "key_id": self.key_id,
            "attestation_evidence": list(self.attestation_evidence),
        }
        if signed:
            data["signature"] = self.signature
            if self.batch is not None:
                data["signature_batch"] = self.batch.to_dict()
        return data

    def signing_bytes(self) -> bytes:
        """What the signature covers: the canonical encoding without ``signature``."""
        return canonical_bytes(self.to_dict(signed=False))

    def encode(self) -> bytes:
        """The canonical encoding of the whole verdict, signature included (what the API serves)."""
        cached: bytes | None = self.__dict__.get("_encoded")  # set by the signer; replace()/evolve() drop it
        return cached if cached is not None else canonical_bytes(self.to_dict())

    def evolve(self, **changes: Any) -> Verdict:
        """:func:`dataclasses.replace` for the signer's hot path: the same new object, without running
        the generated ``__init__`` again (a tenth of the cost); the encoding cache is not carried over."""
        unknown = changes.keys() - _VERDICT_FIELDS
        if unknown:
            raise TypeError(f"Verdict has no field(s) {sorted(unknown)}")
        new = object.__new__(Verdict)
        state = self.__dict__.copy()
        state.pop("_encoded", None)
        state.pop("_leaf", None)
        state.update(changes)
        new.__dict__.update(state)  # frozen blocks __setattr__, not the instance dict
        return new

    def signed_from(
        self,
        signing_bytes: bytes,
        signature: bytes,
        batch: BatchProof | None = None,
        *,
        leaf: bytes | None = None,
    ) -> Verdict:
        """The verdict with this signature (and batch proof), keeping its encoding.

        ``signing_bytes`` is :meth:`signing_bytes` of this verdict (already checked by
        :func:`canonical_bytes`). The whole document differs from it only by ``signature`` and
        ``signature_batch``, which sort together right before ``telemetry_source``; that key is the last
        ``,"telemetry_source":`` in the bytes (only ``window``, whose keys are fixed, and a string follow
        it, and a string cannot hold an unescaped quote), so they are spliced in there instead of encoding
        the document a second time. ``tests/unit/test_verdict_signing.py`` checks the result equals
        :func:`canonical_bytes` of :meth:`to_dict`. ``leaf``: the log leaf of ``signing_bytes`` when the
        caller has it already (a batch signer hashed it for the batch tree)."""
        signed = self.evolve(signature=signature.hex(), batch=batch)
        at = signing_bytes.rfind(b',"telemetry_source":')
        extra = b',"signature":"%s"' % signed.signature.encode()
        if batch is not None:  # {"index","path","size"}: sorted keys, ints and hex strings need no escaping
            path = b",".join(b'"%s"' % h.encode() for h in batch.path)
            extra += b',"signature_batch":{"index":%d,"path":[%s],"size":%d}' % (
                batch.index,
                path,
                batch.size,
            )
        object.__setattr__(signed, "_encoded", signing_bytes[:at] + extra + signing_bytes[at:])
        # its leaf in the transparency log
        object.__setattr__(signed, "_leaf", leaf_hash(signing_bytes) if leaf is None else leaf)
        return signed

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """Parse a verdict document; raises :class:`InputError` naming the bad member."""
        try:
            if data.get("format") != VERDICT_FORMAT:
                raise InputError("not a tmb verdict", expected=VERDICT_FORMAT, got=data.get("format"))
            w = data["window"]
            return cls(
                request_id=_str(data, "request_id"),
                correlation_id=data.get("correlation_id"),
                worker=_str(data, "worker"),
                node=_str(data, "node"),
                gpus=tuple(str(g) for g in data["gpus"]),
                claimed_model=data.get("claimed_model"),
                requested_model=data.get("requested_model"),
                window=Window(int(w["t0_ns"]), int(w["t1_ns"]), bool(w["widened"])),
                attestation=dict(data["attestation"]),
                fingerprint=dict(data["fingerprint"]),
                decision=Decision(data["decision"]),
                reasons=tuple(Reason(str(r["id"]), str(r["message"])) for r in data["reasons"]),
                telemetry_source=_str(data, "telemetry_source"),
                issued_ns=int(data["issued_ns"]),
                key_id=_str(data, "key_id"),
                signature=_str(data, "signature"),
                attestation_evidence=tuple(str(d) for d in data.get("attestation_evidence", ())),
                batch=_batch(data.get("signature_batch")),
            )
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"malformed verdict: {type(exc).__name__}: {exc}") from exc


_VERDICT_FIELDS = frozenset(f.name for f in fields(Verdict))


def _batch(value: Any) -> BatchProof | None:
    if value is None:
        return None
    index, size, path = value["index"], value["size"], value["path"]
    if not (isinstance(index, int) and isinstance(size, int) and isinstance(path, list)):
        raise InputError("verdict member 'signature_batch' must hold integers index and size and a list path")
    if any(not isinstance(p, str) for p in path):
        raise InputError("verdict member 'signature_batch.path' must be a list of hex strings")
    return BatchProof(index, size, tuple(path))


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise InputError(f"verdict member {key!r} must be a string", got=value)
    return value


def _plain(value: Any) -> Any:
    t = type(value)
    if t is str or t is int or t is bool or value is None:  # most values (isinstance(Mapping) is slow)
        return value
    if t is dict or isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _check(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise ValueError(f"{path}: floats are not allowed in a canonical verdict (use a decimal string)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: object keys must be strings")
            _check(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]")
    elif not (value is None or isinstance(value, str | int | bool)):
        raise ValueError(f"{path}: {type(value).__name__} cannot be encoded")


def _ok(value: Any) -> bool:
    """:func:`_check` without building paths (the common case: nothing to report); iterative, with exact
    type tests first (this runs over every verdict the daemon signs)."""
    stack = [value]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        v = pop()
        t = type(v)
        if t is str or t is int or t is bool or v is None:
            continue
        if t is dict:
            for k, item in v.items():
                if not isinstance(k, str):
                    return False
                push(item)
        elif t is list:
            extend(v)
        elif not isinstance(v, str | int) or isinstance(v, float):  # str/int subclasses (enums) are fine
            return False
    return True


def canonical_bytes(data: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8, integers only; raises ValueError on floats or other types."""
    doc = data if type(data) is dict else dict(data)  # _ok walks exact dicts
    if not _ok(doc):
        _check(doc, "$")  # walks again, naming where the bad value is
    return _encode(doc)


def _encode(doc: Mapping[str, Any]) -> bytes:
    return _CANONICAL(doc).encode()


_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode
