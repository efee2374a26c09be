"""Cheap body inspection behind the span's ``model_requested`` and ``tokens`` fields.

Token counting reads only what it needs:

* SSE (``text/event-stream``): events are split on blank lines; an event counts as one generated token when
  it carries a non-empty OpenAI-style ``"content"`` (chat) or ``"text"`` (completions) string. When an
  event carries a ``usage`` object, its ``completion_tokens`` wins over the count (the engine's own figure).
* JSON: ``usage.completion_tokens`` from the response body, when it is at most
  ``proxy.max_response_inspect_bytes`` long.
"""

from __future__ import annotations

import json
import re

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
