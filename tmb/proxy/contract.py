"""The proxy contract, once for both engines (:mod:`tmb.proxy.app` and :mod:`tmb.proxy.fast`).

The engines only do I/O; what they promise is here:

* **Request ids.** Every request gets a tmb id of 32 lowercase hex digits: the wall-clock millisecond it
  started (12 digits), then 80 bits from the OS CSPRNG (:func:`new_request_id`). It is sent to the client
  as ``X-TMB-Request-Id`` with the response head and to the worker as a request header. The client's
  ``X-Request-Id`` is kept only as the span's correlation id; an ``X-TMB-Request-Id`` from the client is
  not forwarded, nor one from the worker relayed.
* **Headers.** Hop-by-hop fields (RFC 9110 section 7.6.1: ``Connection`` and the fields it names,
  ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``) are dropped both
  ways; ``Host`` and ``Expect`` are not forwarded (the worker's own host is sent);
  ``X-Forwarded-For`` is forwarded with the client's address appended.
* **Failover.** After a failed attempt the next candidate worker is tried only before the first response
  byte and while the request body can still be sent again (:func:`may_try_next`); a worker that could not
  be connected to is marked down (:meth:`RequestRecord.attempt_failed`).
* **Failures.** Every refusal answers with the daemon's error envelope (:mod:`tmb.envelope`) carrying the
  ``request_id``; :data:`FAILURES` is the table of status, error type, span outcome and whether the
  connection closes. Failures after the response head went out end the client connection without a
  complete response (the span says why: :meth:`RequestRecord.broke_off`, :meth:`RequestRecord.silent`,
  :meth:`RequestRecord.client_gone`).
* **The record.** An engine fills a :class:`RequestRecord` while it relays and turns it into one
  :class:`tmb.spans.Span` (:meth:`RequestRecord.emit`), once per request.
* **The daemon's own paths.** :data:`DAEMON_PATHS` are never relayed by the fast engine; the route setup
  (:func:`own_prefixes`) checks that every route of the daemon lies under one of them.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from time import time_ns
from typing import TYPE_CHECKING
from urllib.parse import unquote

from tmb.envelope import error_body
from tmb.spans import Outcome, Span

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from tmb.proxy.upstream import Worker

__all__ = [
    "BAD_REQUEST",
    "BODY_LATE",
    "BODY_TOO_LARGE",
    "DAEMON_PATHS",
    "FAILURES",
    "HOP_BY_HOP",
    "MANAGEMENT_PATHS",
    "NOT_FORWARDED",
    "NO_WORKERS",
    "REQUEST_ID_HEADER",
    "RESPONSE_DROP",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_UNAVAILABLE",
    "WORKERS_BUSY",
    "WORKERS_FILLED",
    "Failure",
    "RequestRecord",
    "SpanCallback",
    "forwarded_for",
    "gave_up",
    "may_try_next",
    "new_request_id",
    "no_candidates",
    "normal_form",
    "own_prefixes",
    "strip_hop_by_hop",
]

SpanCallback = Callable[[Span], Awaitable[None] | None]
REQUEST_ID_HEADER = "X-TMB-Request-Id"

# The daemon's own path prefixes: its API (under ``server.api_prefix``) and the evidence ingest. A request
# under one of them is the daemon's, never relayed by the fast engine (aiohttp's router decides).
DAEMON_PATHS: tuple[str, ...] = (
    "/v1/verdicts",
    "/v1/keys",
    "/v1/evidence",
    "/v1/log",
    "/v1/ingest",
    "/metrics",
    "/healthz",
    "/openapi.json",
    "/admin",
)
# Of those, served only on the daemon's management listener (``/admin`` under ``server.api_prefix``): the
# proxy listener answers 404 for them in any spelling whose :func:`normal_form` lies under one, and never
# relays them to a worker.
MANAGEMENT_PATHS: tuple[str, ...] = ("/v1/ingest", "/admin")

# -- headers (lower-case names) ------------------------------------------------------------------------
HOP_BY_HOP = frozenset(
    ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"]
)
NOT_FORWARDED = HOP_BY_HOP | {"host", "expect", "x-forwarded-for", REQUEST_ID_HEADER.lower()}
RESPONSE_DROP = HOP_BY_HOP | {REQUEST_ID_HEADER.lower()}  # tmb's own id is the one the client sees


def strip_hop_by_hop(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> list[tuple[str, str]]:
    """The end-to-end fields of ``headers`` (a multidict), in order, repeats kept: ``drop`` (lower-case
    names), the fields ``Connection`` names and ``Proxy-*`` left out."""
    conn = headers.get("Connection")
    if conn:
        drop = drop | {t.strip().lower() for t in conn.split(",")}
    return [
        (k, v) for k, v in headers.items() if (lk := k.lower()) not in drop and not lk.startswith("proxy-")
    ]


def forwarded_for(prior: str | None, peer: str) -> str | None:
    """The ``X-Forwarded-For`` sent to the worker: the client's (all its fields joined), then its address."""
    if not peer:
        return prior
    return f"{prior}, {peer}" if prior else peer


# -- request ids ---------------------------------------------------------------------------------------
_ID_POOL: list[str] = []


def new_request_id() -> str:
    """The wall-clock millisecond (12 hex digits), then 80 bits from the OS CSPRNG (20 hex digits; fetched
    for 256 ids per system call).

    The time first makes ids of one daemon sort in the order requests started, so the store's indexes on
    request ids (spans, verdicts, the log's leaves) grow at their right edge: a group commit rewrites a few
    pages instead of one per id, and the pages it touches stay in the cache however large the store grows.
    80 random bits stay unguessable (an id names a verdict, which holds the request's times anyway)."""
    if not _ID_POOL:
        raw = os.urandom(10 * 256).hex()
        _ID_POOL.extend(raw[i : i + 20] for i in range(0, len(raw), 20))
    return f"{time_ns() // 1_000_000:012x}{_ID_POOL.pop()}"


# -- the failure table ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Failure:
    """A request tmb answers itself: the status, the error ``type``, the span's outcome, and whether the
    client connection is closed after the answer (the rest of the request is not read)."""

    status: int
    kind: str
    outcome: Outcome
    message: str = ""  # the message when the answer names nothing variable
    close: bool = False


BAD_REQUEST = Failure(400, "bad_request", Outcome.REJECTED, close=True)  # not HTTP/1.x, target not a path
BODY_LATE = Failure(408, "request_timeout", Outcome.REJECTED, close=True)  # JSON body read whole, too slow
BODY_TOO_LARGE = Failure(413, "body_too_large", Outcome.REJECTED)
NO_WORKERS = Failure(502, "no_workers", Outcome.UPSTREAM_ERROR, "no worker is configured")
UPSTREAM_UNAVAILABLE = Failure(502, "upstream_unavailable", Outcome.UPSTREAM_ERROR)  # every try failed
_BUSY = "every worker serving this request is at its concurrency limit"
WORKERS_BUSY = Failure(503, "workers_busy", Outcome.REJECTED, _BUSY)  # no candidate at all
WORKERS_FILLED = Failure(503, "workers_busy", Outcome.UPSTREAM_ERROR, _BUSY)  # the candidates filled up
UPSTREAM_TIMEOUT = Failure(504, "upstream_timeout", Outcome.TIMEOUT)  # worker silent before its head

FAILURES: tuple[Failure, ...] = (
    BAD_REQUEST,
    BODY_LATE,
    BODY_TOO_LARGE,
    NO_WORKERS,
    UPSTREAM_UNAVAILABLE,
    WORKERS_BUSY,
    WORKERS_FILLED,
    UPSTREAM_TIMEOUT,
)

BAD_VERSION = "only HTTP/1.1 and HTTP/1.0 are proxied"
BAD_TARGET = "the request target must be a path (origin form): no absolute URL, authority or '*'"


def body_too_large(limit: int, length: int | None = None) -> str:
    """The 413 message: with the announced ``Content-Length`` when there was one."""
    if length is None:
        return f"request body exceeds {limit} bytes"
    return f"request body of {length} bytes exceeds {limit}"


def body_late(seconds: float) -> str:
    return f"request body not received within {seconds:g} s"


def upstream_timeout(worker: str) -> str:
    return f"worker {worker} sent no response in time"


# -- the failover rule ---------------------------------------------------------------------------------
def no_candidates(has_workers: bool) -> Failure:
    """The answer when the pool offers no candidate: 502 without workers, else 503 (all full)."""
    return WORKERS_BUSY if has_workers else NO_WORKERS


def may_try_next(*, head_seen: bool, replayable: bool) -> bool:
    """Whether a failed attempt may go on to the next candidate worker: only before the first response
    byte, and only while the request body can be sent again (read whole, or none of it sent yet)."""
    return not head_seen and replayable


def gave_up(rec: RequestRecord) -> Failure:
    """The answer once no candidate is left: 502 when a worker failed, else 503 (they filled up)."""
    return UPSTREAM_UNAVAILABLE if rec.failed else WORKERS_FILLED


# -- the record ----------------------------------------------------------------------------------------
class RequestRecord:
    """What an engine fills in while it relays one request; :meth:`span` freezes it into a :class:`Span`."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "corr",
        "emitted",
        "error",
        "failed",
        "first_byte_ns",
        "last_error",
        "method",
        "model",
        "outcome",
        "path",
        "rid",
        "start_ns",
        "status",
        "tokens",
        "worker",
    )

    def __init__(self, corr: str | None, method: str, path: str, start_ns: int) -> None:
        self.rid = new_request_id()
        self.corr, self.method, self.path, self.start_ns = corr, method, path, start_ns
        self.worker: Worker | None = None  # the worker that served (or timed out on) the request
        self.model: str | None = None
        self.first_byte_ns: int | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tokens: int | None = None
        self.outcome = Outcome.OK
        self.failed: list[str] = []  # workers tried first that failed before the first byte
        self.last_error = "no worker available"
        self.error: str | None = None
        self.emitted = False

    # -- what happened ----------------------------------------------------------------------------------
    def attempt_failed(self, worker: Worker, why: str, *, connect: bool = False) -> None:
        """``worker`` failed before its response head (``why``: the error); not connected: marked down."""
        self.last_error = f"{worker.name}: {why}"
        if connect:
            worker.mark_down(self.last_error)
        self.failed.append(worker.name)

    def refuse(self, failure: Failure, message: str = "") -> dict[str, object]:
        """tmb answers ``failure`` itself: the span says so; returns the envelope's JSON-able body (the
        engine sends it with ``failure.status`` and the request id header)."""
        message = message or failure.message or self.last_error
        self.status = failure.status
        self.outcome = failure.outcome
        self.error = f"{failure.kind}: {message}"
        return error_body(failure.kind, message, request_id=self.rid)

    def client_gone(self, why: str = "client disconnected") -> None:
        self.outcome, self.error = Outcome.CLIENT_DISCONNECT, why

    def broke_off(self, why: str) -> None:
        """The worker's response broke off after its head went out."""
        name = self.worker.name if self.worker is not None else "?"
        self.outcome, self.error = Outcome.WORKER_DIED_MID_STREAM, f"worker {name} broke off: {why}"

    def silent(self, why: str) -> None:
        """The worker fell silent after its head went out (read or total timeout)."""
        self.outcome, self.error = Outcome.TIMEOUT, f"worker silent mid-response: {why}"

    # -- the span ---------------------------------------------------------------------------------------
    def emit(self, callback: SpanCallback | None) -> Awaitable[None] | None:
        """Hand the span to ``callback`` (once per request); its awaitable, if it returns one (store ack)."""
        if callback is None or self.emitted:
            return None
        self.emitted = True
        return callback(self.span())

    def span(self) -> Span:
        w = self.worker
        wc = w.config if w is not None else None
        return Span(
            id=self.rid,
            correlation_id=self.corr,
            worker=wc.name if wc else None,
            node=wc.node if wc else None,
            gpus=wc.gpus if wc else (),
            model_served=(wc.model or None) if wc else None,
            model_requested=self.model,
            method=self.method,
            path=self.path,
            start_ns=self.start_ns,
            first_byte_ns=self.first_byte_ns,
            end_ns=time_ns(),
            status=self.status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            tokens=self.tokens,
            outcome=self.outcome,
            failed_over_from=tuple(self.failed),
            error=self.error,
        )


# -- the daemon's own paths ----------------------------------------------------------------------------
def own_prefixes(canonical_paths: Iterable[str]) -> tuple[str, ...]:
    """The daemon's own path prefixes as mounted (``server.api_prefix`` included), from the canonical
    paths of its routes; each route must lie under one of :data:`DAEMON_PATHS` (ValueError otherwise: a
    new route is declared there first, so that the fast engine hands its requests to aiohttp)."""
    found: dict[str, None] = {}
    for path in canonical_paths:
        prefix = _mounted(path)
        if prefix is None:
            where = "tmb.proxy.contract.DAEMON_PATHS"
            raise ValueError(f"daemon route {path!r} is not under {where}: declare its prefix there")
        found[prefix] = None
    return tuple(found)


def _mounted(path: str) -> str | None:
    for own in DAEMON_PATHS:
        i = path.find(own)
        while i >= 0:
            end = i + len(own)
            if "{" not in path[:i] and path[end : end + 1] in ("", "/"):
                return path[:end]
            i = path.find(own, i + 1)
    return None


def normal_form(target: str) -> str:
    """The path of ``target`` as the most lenient server would read it: query cut off, percent escapes
    decoded once (``%2F`` too), repeated slashes merged, dot segments resolved, lower case. A request whose
    normal form lies under a daemon path is the daemon's however it is spelled (``/v1/ingest/node%2D1``,
    ``//v1/ingest``, ``/x/../v1/ingest``, ``/V1/Ingest``), so no spelling of one reaches a worker."""
    path = target.partition("?")[0]
    if "%" in path:
        path = unquote(path, errors="replace")
    if "//" in path or "/." in path:
        segments: list[str] = []
        for seg in path.split("/"):
            if seg == "..":
                if segments:
                    segments.pop()
            elif seg and seg != ".":
                segments.append(seg)
        path = "/" + "/".join(segments)
    return path.lower()


def under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or lies under one (whole path segments)."""
    return any(path == p or path.startswith(p + "/") for p in prefixes)
