"""Bounds on what one node may send: requests per second, JSON nesting, the probe's own findings.

* **Rate** (:class:`RateLimit`): a token bucket per node, ``rate_per_s`` refilled up to ``burst``, spent by
  each *authenticated* evidence request (a forged one is refused by its MAC before, and spends nothing of
  the honest node's budget). Over it: 429 ``ingest.rate_limited``. Enrolment, unauthenticated, is counted by
  the client's address (:func:`peer_key`) as well as for all clients together.
* **Depth** (:func:`check_depth`): a request body nested deeper than :data:`MAX_DEPTH` is a 400
  ``ingest.too_deep`` (JSON that deep is never evidence; Python's parser would recurse on it).
* **Probe findings** (:func:`check_probe_findings`): a batch post's ``probe_findings`` must be at most
  :data:`MAX_PROBE_FINDINGS` findings of the ``probe.*`` id family, each at most
  :data:`MAX_PROBE_FINDING_BYTES` of JSON, with a known severity; anything else is a 400 ``ingest.malformed``
  (the probe cannot speak for the daemon's own checks, ``policy.*`` or ``quote.*``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from tmb.errors import ParseError

__all__ = [
    "MAX_DEPTH",
    "MAX_PROBE_FINDINGS",
    "MAX_PROBE_FINDING_BYTES",
    "RateLimit",
    "check_depth",
    "check_probe_findings",
    "loads_bounded",
    "peer_key",
]

MAX_DEPTH = 32
MAX_PROBE_FINDINGS = 64
MAX_PROBE_FINDING_BYTES = 4096
_PROBE_ID = re.compile(r"^probe\.[a-z0-9_.]{1,64}$")
_SEVERITIES = ("info", "warning", "error")


def check_depth(doc: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``doc`` nests at most ``limit`` containers deep (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def loads_bounded(body: bytes, limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` that refuses nesting beyond ``limit`` (:class:`ParseError` with ``too_deep``) before
    the parser can recurse on it, and any other malformed JSON (:class:`ParseError`)."""
    try:
        return _loads(body, limit)
    except RecursionError:
        raise ParseError("the request body nests too deep", too_deep=True, limit=limit) from None


def _loads(body: bytes, limit: int) -> Any:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParseError(f"the request body is not JSON: {exc}") from None
    if not check_depth(doc, limit):
        raise ParseError(f"the request body nests deeper than {limit}", too_deep=True, limit=limit)
    return doc


def check_probe_findings(findings: Any) -> None:
    """Raise :class:`ParseError` unless ``findings`` is a short list of small ``probe.*`` findings."""
    if not isinstance(findings, list):
        raise ParseError("probe_findings must be a list of findings", field="probe_findings")
    if len(findings) > MAX_PROBE_FINDINGS:
        raise ParseError(f"at most {MAX_PROBE_FINDINGS} probe findings per request", field="probe_findings")
    for i, f in enumerate(findings):
        if not isinstance(f, Mapping) or not isinstance(f.get("id"), str):
            raise ParseError("probe_findings must be a list of findings", field="probe_findings", index=i)
        if not _PROBE_ID.match(f["id"]):
            raise ParseError(
                "a probe may report only findings of the probe.* family",
                field="probe_findings",
                id=f["id"][:80],
            )
        if f.get("severity", "error") not in _SEVERITIES:
            raise ParseError("a probe finding's severity is info, warning or error", index=i)
        if len(json.dumps(f)) > MAX_PROBE_FINDING_BYTES:
            raise ParseError(
                f"a probe finding is larger than {MAX_PROBE_FINDING_BYTES} bytes",
                field="probe_findings",
                index=i,
            )


def peer_key(remote: str | None) -> str:
    """What a client's requests are counted by: its IPv4 address, or its IPv6 address's /64 (a host picks
    any address of its network's /64 at will); an IPv4-mapped IPv6 address is the IPv4 one. No address, or
    one that does not parse, is counted as it is."""
    try:
        ip = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return remote or ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RateLimit:
    """Token buckets by key (a node, a client's address): ``rate_per_s`` tokens a second up to ``burst``; 0
    turns the limit off. At most ``max_keys`` buckets are held: a new key past them evicts the one least
    recently used (long idle, so full again, unless more than ``max_keys`` keys are busy at once)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 65536,
    ) -> None:
        self.rate, self.burst, self.clock, self.max_keys = rate_per_s, burst, clock, max_keys
        # key -> (tokens, when), the least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def held(self) -> int:
        """How many buckets are held."""
        return len(self._buckets)

    def take(self, key: str) -> bool:
        """Spend one token of ``key``'s bucket; False when it is empty."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if key in self._buckets:
            self._buckets.move_to_end(key)
        elif len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        return ok
