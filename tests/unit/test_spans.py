"""Span records and the cheap body inspection: model, JSON usage, SSE token counting, hop-by-hop stripping."""

from __future__ import annotations

import json
import re

import pytest
from multidict import CIMultiDict

from tmb.proxy import contract
from tmb.proxy.contract import HOP_BY_HOP, strip_hop_by_hop
from tmb.proxy.inspect import SseTokenCounter, model_from_json, usage_from_json
from tmb.spans import SPAN_FIELDS, Outcome, Span


def sse(*docs: object) -> bytes:
    return b"".join(
        b"data: " + (d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n\n" for d in docs
    )


def chunk(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_sse_counts_content_events_across_arbitrary_chunk_boundaries() -> None:
    stream = sse(
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        *(chunk(f'to"k{i}\n') for i in range(9)),
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        b"[DONE]",
    )
    for size in (1, 3, 7, 64, len(stream)):
        counter = SseTokenCounter()
        for i in range(0, len(stream), size):
            counter.feed(stream[i : i + size])
        assert counter.tokens == 9, size


def test_sse_usage_object_wins_and_completions_text_counts() -> None:
    counter = SseTokenCounter()
    counter.feed(sse({"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}))
    assert counter.tokens == 2
    counter.feed(
        sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 40}}).replace(b"\n", b"\r\n")
    )
    assert counter.tokens == 40


def test_model_and_usage_from_json() -> None:
    assert model_from_json(b'{"model": "llama", "messages": [{"model": "inner"}]}') == "llama"
    assert model_from_json(b'{"messages": []}') is None
    assert model_from_json(b'{"model": 3}') is None
    assert model_from_json(b'{"model": "trunc", "messages": [') == "trunc"  # streamed prefix
    assert model_from_json(b"\xff\xfe") is None
    assert usage_from_json(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 12}}') == 12
    assert usage_from_json(b'{"usage": null}') is None


def test_hop_by_hop_fields_and_those_connection_names_are_dropped() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "x"),
            ("TE", "trailers"),
            ("Trailer", "X"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "x"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]
    )
    assert strip_hop_by_hop(headers, HOP_BY_HOP) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_span_round_trips_through_json() -> None:
    span = Span(
        "ab" * 16,
        "c",
        "w",
        "n",
        ("g1",),
        "m",
        None,
        "POST",
        "/v1/x?y=1",
        1,
        2,
        3,
        200,
        4,
        5,
        6,
        Outcome.WORKER_DIED_MID_STREAM,
        ("w0",),
        "boom",
    )
    assert Span.from_dict(json.loads(json.dumps(span.to_dict()))) == span
    assert tuple(span.to_dict()) == SPAN_FIELDS  # every field, in order (the stored doc's key order)
    assert span.served and not Span.from_dict({**span.to_dict(), "first_byte_ns": None}).served


def test_request_ids_start_with_their_millisecond_and_sort_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_765_000_000_123_456_789]
    monkeypatch.setattr(contract, "time_ns", lambda: clock[0])
    same_ms = [contract.new_request_id() for _ in range(600)]  # more than one pool of random bits
    clock[0] += 1_000_000
    later = contract.new_request_id()
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in [*same_ms, later])
    assert {rid[:12] for rid in same_ms} == {f"{1_765_000_000_123:012x}"}
    assert later[:12] == f"{1_765_000_000_124:012x}"
    assert len(set(same_ms)) == 600  # the 80 random bits differ
    assert all(rid < later for rid in same_ms)  # a later request's id sorts after
