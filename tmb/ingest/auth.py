"""Authenticated evidence: the per-node key credential activation delivers, and the HMAC every evidence
request carries (shared by the daemon and the probe; no state of either).

Enrolment (:mod:`tmb.ingest.identity`) ends with both sides holding the 32-byte ``secret`` the daemon made
the credential of; it never travels after the TPM opened it. From it::

    proof key     = HKDF-SHA256(secret, salt = "", info = "tmb-enrol-proof-v1" 0x00 node)
    proof         = HMAC-SHA256(proof key,
                                "tmb-enrol-v1" 0x00 node 0x00 challenge 0x00 ek_sha256 0x00 ak_name)
    evidence key  = HKDF-SHA256(secret, salt = "", info = "tmb-evidence-key-v1" 0x00 node)

Every request to ``/v1/ingest/{node}/{route}`` then carries the header ``X-Tmb-Auth: v1 t=<unix ms>
n=<32 hex: 16 random bytes> mac=<64 hex>`` with::

    mac = HMAC-SHA256(evidence key, "tmb-evidence-v1" 0x00 METHOD 0x00 node 0x00 route 0x00 t 0x00 n 0x00
                      SHA-256(body))

(``route`` the last path segment: ``nonce``, ``batches``, ``quotes``, ``ima``, ``eventlog``, ``bindings``; t
in decimal). The daemon (:class:`ReplayGuard`, then the evidence store) takes a request only when its MAC
matches, ``t`` lies within ``skew_s`` of its clock, and ``n`` was not used for the node before: the store's
``ingest_auth_nonces`` table (both backends) records each ``n`` with one ``INSERT`` that fails on a
conflict, so the window survives a restart and is shared by every daemon on one PostgreSQL database (a
request captured on its way to one daemon and replayed to another is refused). Rows are pruned once their
``t`` is more than ``2 * skew_s`` old (a replay of them is ``auth.stale`` by then, with ``skew_s`` to spare
for daemons whose clocks disagree), a few per insert.

=================  ==================================================================================
id                 the request is refused with 401 because
=================  ==================================================================================
auth.missing       it carries no ``X-Tmb-Auth`` header
auth.malformed     the header does not follow the format above
auth.not_enrolled  the node has no evidence key (never enrolled, or not a node at all)
auth.bad_mac       the MAC is not the node key's over this request (a forged or altered request)
auth.stale         ``t`` is outside the accepted window (older than ``skew_s``, or from the future)
auth.replayed      ``n`` was already used in the window (by this daemon, before a restart, or by another
                   daemon on the same store): a replayed request
=================  ==================================================================================
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "HEADER",
    "ReplayGuard",
    "derive_key",
    "enrol_proof",
    "parse_header",
    "request_mac",
    "sign_request",
]

HEADER = "X-Tmb-Auth"
MAX_SEEN_PER_NODE = 65536  # request nonces remembered per node (a probe sends a few a second)
_HEADER_RE = re.compile(r"^v1 t=([0-9]{1,16}) n=([0-9a-f]{32}) mac=([0-9a-f]{64})$")


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def derive_key(secret: bytes, node: str) -> bytes:
    """The node's evidence key from the activated secret."""
    return _hkdf(secret, b"tmb-evidence-key-v1\x00" + node.encode())


def enrol_proof(secret: bytes, node: str, challenge: str, ek_sha256: str, ak_name: str) -> str:
    """What the probe sends to prove it opened the credential (hex); the secret itself never travels."""
    key = _hkdf(secret, b"tmb-enrol-proof-v1\x00" + node.encode())
    msg = b"\x00".join(x.encode() for x in ("tmb-enrol-v1", node, challenge, ek_sha256, ak_name))
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def request_mac(key: bytes, method: str, node: str, route: str, t_ms: int, n: str, body: bytes) -> str:
    parts = ("tmb-evidence-v1", method.upper(), node, route, str(t_ms), n)
    msg = b"\x00".join(p.encode() for p in parts) + b"\x00" + hashlib.sha256(body).digest()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign_request(key: bytes, method: str, node: str, route: str, body: bytes, t_ms: int | None = None) -> str:
    """The ``X-Tmb-Auth`` header value for a request (a fresh ``n`` each call)."""
    t_ms = int(time.time() * 1000) if t_ms is None else t_ms
    n = os.urandom(16).hex()
    return f"v1 t={t_ms} n={n} mac={request_mac(key, method, node, route, t_ms, n, body)}"


def parse_header(value: str | None) -> tuple[int, str, str] | str:
    """``(t_ms, n, mac)``, or the finding id (``auth.missing``, ``auth.malformed``)."""
    if value is None:
        return "auth.missing"
    m = _HEADER_RE.match(value.strip()) if len(value) < 256 else None
    if m is None:
        return "auth.malformed"
    return int(m.group(1)), m.group(2), m.group(3)


class ReplayGuard:
    """The daemon's check of one request's ``X-Tmb-Auth``: MAC and time window (:meth:`verify`), and a memory
    of the request nonces this process saw used (:meth:`seen`, :meth:`remember`): a cheap first filter
    before the store's persistent, shared window (:meth:`tmb.ingest.store.IngestBackend.use_request_nonce`),
    which alone decides that a nonce is fresh. It only holds nonces the store recorded as used, so it never
    refuses a request the store would take."""

    def __init__(self, skew_s: float) -> None:
        self.skew_ms = int(skew_s * 1000)
        self._seen: dict[str, OrderedDict[str, int]] = {}

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    def verify(
        self,
        key: bytes,
        header: str | None,
        method: str,
        node: str,
        route: str,
        body: bytes,
        now_ms: int,
    ) -> tuple[int, str] | str:
        """``(t_ms, n)`` when the request is authentic and within the time window, else the finding id
        (``n`` is not checked here: :meth:`seen`, then the store)."""
        parsed = parse_header(header)
        if isinstance(parsed, str):
            return parsed
        t_ms, n, mac = parsed
        want = request_mac(key, method, node, route, t_ms, n, body)
        if not hmac.compare_digest(want, mac):
            return "auth.bad_mac"
        if abs(now_ms - t_ms) > self.skew_ms:
            return "auth.stale"
        return t_ms, n

    def seen(self, node: str, n: str, now_ms: int) -> bool:
        """Whether this process already saw ``n`` used for ``node`` (forgetting what is past the window)."""
        seen = self._seen.get(node)
        if seen is None:
            return False
        while seen and next(iter(seen.values())) < now_ms - 2 * self.skew_ms:
            seen.popitem(last=False)
        return n in seen

    def remember(self, node: str, n: str, now_ms: int) -> None:
        """``n`` is used for ``node``: the store recorded it (call only after its transaction committed)."""
        seen = self._seen.setdefault(node, OrderedDict())
        seen[n] = now_ms
        seen.move_to_end(n)
        while len(seen) > MAX_SEEN_PER_NODE:  # bounded: the oldest (by arrival) is forgotten first
            seen.popitem(last=False)
