"""Request spans: what the proxy records about each request, and the cheap body inspection behind them.

A :class:`Span` is frozen and JSON-able (:meth:`Span.to_dict` / :meth:`Span.from_dict`); times are wall-clock
nanoseconds since the Unix epoch (``time.time_ns()``). Token counting reads only what it needs:

* SSE (``text/event-stream``): events are split on blank lines; an event counts as one generated token when
  it carries a non-empty OpenAI-style ``"content"`` (chat) or ``"text"`` (completions) string. When an
  event carries a ``usage`` object, its ``completion_tokens`` wins over the count (the engine's own figure).
* JSON: ``usage.completion_tokens`` from the response body, when it is at most
  ``proxy.max_response_inspect_bytes`` long.
"""

from __future__ import annotations

import enum
import json
import re
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

    id: str  # tmb request id: 32 lowercase hex digits (128 random bits)
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
        data = {name: getattr(self, name) for name in _SPAN_FIELDS}  # not asdict(): it deep-copies (slow)
        data["gpus"] = list(self.gpus)
        data["failed_over_from"] = list(self.failed_over_from)
        data["outcome"] = self.outcome.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Span:
        data = dict(data)
        data["gpus"] = tuple(data.get("gpus", ()))
        data["failed_over_from"] = tuple(data.get("failed_over_from", ()))
        data["outcome"] = Outcome(data["outcome"])
        return cls(**data)


_SPAN_FIELDS = tuple(f.name for f in fields(Span))
_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,512})"')
_CONTENT_RE = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')
_COMPLETION_TOKENS_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')


def model_from_json(body: bytes) -> str | None:
    """The top-level ``model`` string of a JSON request body, or None (not JSON, absent, not a string)."""
    if b'"model"' not in body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        m = _MODEL_RE.search(body)  # a truncated or streamed prefix: best effort
        return m[1].decode("utf-8", "replace") if m else None
    value = doc.get("model") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def usage_from_json(body: bytes) -> int | None:
    """``usage.completion_tokens`` of a JSON response body (last occurrence), or None."""
    if b'"completion_tokens"' not in body:
        return None
    found = _COMPLETION_TOKENS_RE.findall(body)
    return int(found[-1]) if found else None


class SseTokenCounter:
    """Counts generated tokens in an SSE byte stream fed chunk by chunk (events may span chunks)."""

    __slots__ = ("_tail", "events", "usage")

    def __init__(self) -> None:
        self._tail = b""
        self.events = 0  # events carrying non-empty content/text
        self.usage: int | None = None  # last usage.completion_tokens seen

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n\n")
        cut_r = data.rfind(b"\r\n\r\n")
        end = max(cut + 2 if cut >= 0 else -1, cut_r + 4 if cut_r >= 0 else -1)
        if end < 0:
            self._tail = data if len(data) < 1 << 20 else b""
            return
        complete, self._tail = data[:end], data[end:]
        self.events += len(_CONTENT_RE.findall(complete))
        if b'"usage"' in complete:
            found = _COMPLETION_TOKENS_RE.findall(complete)
            if found:
                self.usage = int(found[-1])

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.events
