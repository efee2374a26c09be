"""The request span: what the proxy records about each request, read by the store, the engine and the API.

A :class:`Span` is frozen and JSON-able (:meth:`Span.to_dict` / :meth:`Span.from_dict`); times are wall-clock
nanoseconds since the Unix epoch (``time.time_ns()``). It lives outside ``tmb/proxy/`` so that the verdict
room and the store can read spans without knowing the proxy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any


class Outcome(enum.StrEnum):
    """How the exchange ended, seen from the proxy."""

    OK = "ok"  # the worker's response was relayed completely (whatever its status)
    UPSTREAM_ERROR = "upstream_error"  # no worker could be reached / answered (502)
    CLIENT_DISCONNECT = "client_disconnect"  # the client went away; the upstream request was cancelled
    WORKER_DIED_MID_STREAM = "worker_died_mid_stream"  # the worker's response broke off after headers
    TIMEOUT = "timeout"  # the worker was silent longer than the configured timeout (504 before headers)
    REJECTED = "rejected"  # refused by tmb before any worker saw it (413 body too large, 503 all full)


@dataclass(frozen=True, slots=True)
class Span:
    """One request through the proxy. ``worker``/``node``/``gpus`` name the worker that served it."""

    id: str  # tmb request id: 32 lowercase hex digits (start millisecond, then 80 random bits)
    correlation_id: str | None  # the client's X-Request-Id, if any (never the key)
    worker: str | None  # None when no worker served the request
    node: str | None
    gpus: tuple[str, ...]
    model_served: str | None  # the model the worker is configured to serve
    model_requested: str | None  # the request body's "model" (JSON bodies only)
    method: str
    path: str  # raw path and query as received
    start_ns: int
    first_byte_ns: int | None  # first response byte from the worker (None: none came)
    end_ns: int
    status: int  # status sent to the client
    bytes_in: int  # request body bytes received from the client
    bytes_out: int  # response body bytes sent to the client
    tokens: int | None  # generated tokens (None: not counted)
    outcome: Outcome
    failed_over_from: tuple[str, ...] = ()  # workers tried first that failed before the first byte
    error: str | None = None

    @property
    def served(self) -> bool:
        """Whether a worker produced (at least the start of) a response."""
        return self.worker is not None and self.first_byte_ns is not None

    def to_dict(self) -> dict[str, Any]:
        # A literal (not asdict(), which deep-copies, nor a loop over the fields): once per span on the
        # proxy's hot path. tests/unit/test_spans.py checks it names every field, in their order.
        return {
            "id": self.id,
            "correlation_id": self.correlation_id,
            "worker": self.worker,
            "node": self.node,
            "gpus": list(self.gpus),
            "model_served": self.model_served,
            "model_requested": self.model_requested,
            "method": self.method,
            "path": self.path,
            "start_ns": self.start_ns,
            "first_byte_ns": self.first_byte_ns,
            "end_ns": self.end_ns,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "tokens": self.tokens,
            "outcome": self.outcome.value,
            "failed_over_from": list(self.failed_over_from),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Span:
        data = dict(data)
        data["gpus"] = tuple(data.get("gpus", ()))
        data["failed_over_from"] = tuple(data.get("failed_over_from", ()))
        data["outcome"] = Outcome(data["outcome"])
        return cls(**data)


SPAN_FIELDS = tuple(f.name for f in fields(Span))  # in order: the keys of Span.to_dict()
