"""The sample worker's OpenAI-compatible API on a real socket (127.0.0.1): shapes, streams, usage, errors."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sample_infra.model import count_tokens
from sample_infra.worker import WorkerConfig, WorkerNode, default_gpu_uuid, main, parse_claim
from tmb.errors import InputError

CLAIM = "llama-1b/bf16/h100"


@pytest.fixture
async def node() -> AsyncIterator[WorkerNode]:
    n = WorkerNode(WorkerConfig(node_id="node-a", token_delay_s=0.001, prefill_delay_s_per_token=0.0))
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def parse_sse(raw: bytes) -> list[Any]:
    """Every event of an SSE body; asserts the framing (``data: ...`` + blank line, nothing else)."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_non_streaming(node: WorkerNode, http: aiohttp.ClientSession) -> None:
    body = {"model": CLAIM, "messages": [{"role": "user", "content": "Tell me about the kitchen."}]}
    async with http.post(f"{node.url}/v1/chat/completions", json={**body, "max_tokens": 12}) as resp:
        assert resp.status == 200 and resp.headers["X-Worker-Node"] == "node-a"
        data = await resp.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == CLAIM and isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    content = choice["message"]["content"]
    assert usage["completion_tokens"] == count_tokens(content) >= 1
    assert usage["prompt_tokens"] == count_tokens("user: Tell me about the kitchen.\nassistant:")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert node.source.requests == 1 and node.source.tokens_generated == usage["completion_tokens"]
    # Deterministic: the same request (seed defaults to the worker's) gives the same text.
    async with http.post(f"{node.url}/v1/chat/completions", json={**body, "max_tokens": 12}) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == content


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_streaming(node: WorkerNode, http: aiohttp.ClientSession, include_usage: bool) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The ledger?"}],
        "max_tokens": 20,
        "stream": True,
        "ignore_eos": True,
        "seed": 5,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with http.post(f"{node.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = parse_sse(await resp.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == CLAIM for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks.pop() if include_usage else None
    final = chunks.pop()
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(pieces) == 20 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert count_tokens("".join(pieces)) == 20
    if usage_chunk is not None:
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(pieces)
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in [*chunks, final])
    # The same request, not streamed, gives the same text.
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    async with http.post(f"{node.url}/v1/chat/completions", json=body) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == "".join(pieces)


async def test_completions(node: WorkerNode, http: aiohttp.ClientSession) -> None:
    body = {"model": "llama-1b", "prompt": "The weather station", "max_tokens": 15, "seed": 3}
    async with http.post(f"{node.url}/v1/completions", json=body) as resp:
        data = await resp.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    text = data["choices"][0]["text"]
    assert data["usage"]["prompt_tokens"] == 3 and data["usage"]["completion_tokens"] == count_tokens(text)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{node.url}/v1/completions", json=stream) as resp:
        events = parse_sse(await resp.read())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    usage = events[-2]["usage"]
    pieces = [e["choices"][0]["text"] for e in events[:-3]]
    assert "".join(pieces) == text and len(pieces) == usage["completion_tokens"] == count_tokens(text)
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_models_and_health(node: WorkerNode, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{node.url}/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == CLAIM
    async with http.get(f"{node.url}/health") as resp:
        health = await resp.json()
    assert resp.status == 200 and health["node"] == "node-a" and health["gpu"] == default_gpu_uuid("node-a")
    assert health["gpu"] == node.source.gpu and health["model_digest"] == node.model.digest
    node.healthy = False
    async with http.get(f"{node.url}/health") as resp:
        assert resp.status == 503 and (await resp.json())["status"] == "unhealthy"


CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        (CHAT, b"{not json", None, "invalid_json"),
        (CHAT, b"\xff\xfe", None, "invalid_json"),
        (CHAT, b"[" * 100000, None, "invalid_json"),
        (CHAT, [1, 2], None, "invalid_type"),
        (CHAT, {}, "messages", "missing_required_parameter"),
        (CHAT, {"messages": "hi"}, "messages", "invalid_type"),
        (CHAT, {"messages": []}, "messages", "invalid_type"),
        (CHAT, {"messages": ["hi"]}, "messages[0]", "invalid_type"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages[0].content[0]",
            None,
        ),
        (CHAT, {"messages": MSGS, "max_tokens": "5"}, "max_tokens", "invalid_type"),
        (CHAT, {"messages": MSGS, "max_tokens": True}, "max_tokens", "invalid_type"),
        (CHAT, {"messages": MSGS, "max_tokens": 0}, "max_tokens", "invalid_value"),
        (CHAT, {"messages": MSGS, "max_completion_tokens": 10**6}, "max_completion_tokens", None),
        (CHAT, {"messages": MSGS, "temperature": 3}, "temperature", "invalid_value"),
        (CHAT, {"messages": MSGS, "top_p": 0}, "top_p", "invalid_value"),
        (CHAT, {"messages": MSGS, "seed": 1.5}, "seed", "invalid_type"),
        (CHAT, {"messages": MSGS, "stream": "yes"}, "stream", "invalid_type"),
        (CHAT, {"messages": MSGS, "stream_options": {"include_usage": True}}, "stream_options", None),
        (CHAT, {"messages": MSGS, "stream": True, "stream_options": 1}, "stream_options", "invalid_type"),
        (CHAT, {"messages": MSGS, "n": 2}, "n", "invalid_value"),
        (CHAT, {"messages": MSGS, "stop": ["."]}, "stop", "unsupported_parameter"),
        (CHAT, {"messages": MSGS, "model": 7}, "model", "invalid_type"),
        ("/v1/completions", {}, "prompt", "missing_required_parameter"),
        ("/v1/completions", {"prompt": 3}, "prompt", "invalid_type"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "invalid_type"),
        ("/v1/completions", {"prompt": "a", "echo": True}, "echo", "unsupported_parameter"),
        ("/v1/completions", {"prompt": "word " * 40000}, None, "context_length_exceeded"),
    ],
)
async def test_bad_requests_get_400(
    node: WorkerNode, http: aiohttp.ClientSession, path: str, body: Any, param: str | None, code: str | None
) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.post(node.url + path, **kwargs) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if code is not None:
        assert err["code"] == code
    assert node.source.requests == 0 and node.requests == 0  # refused requests make no GPU activity


async def test_other_errors_are_json(node: WorkerNode, http: aiohttp.ClientSession) -> None:
    body = {"model": "llama-1b/int8/h100", "messages": MSGS}
    async with http.post(f"{node.url}{CHAT}", json=body) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    async with http.get(f"{node.url}/v2/nothing") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with http.get(f"{node.url}{CHAT}") as resp:
        assert resp.status == 405 and "error" in await resp.json()
    async with http.post(f"{node.url}{CHAT}", data=io.BytesIO(b"x" * (2 << 20))) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"


async def test_client_disconnect_finishes_the_request(http: aiohttp.ClientSession) -> None:
    node = WorkerNode(WorkerConfig(token_delay_s=0.02))
    await node.start()
    try:
        body = {"messages": MSGS, "max_tokens": 2000, "stream": True, "ignore_eos": True}
        async with http.post(f"{node.url}{CHAT}", json=body) as resp:
            await resp.content.readline()
            assert node.in_flight == 1
        for _ in range(200):  # bounded wait for the server to notice
            if node.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert node.in_flight == 0 and 0 < node.tokens < 2000
    finally:
        await node.stop()


def test_config_validation() -> None:
    assert parse_claim("llama-1b/bf16/h100") == ("llama-1b", "bf16", "h100")
    for bad in ("llama-1b", "a/b/c/d", "a//c", " a/b/c"):
        with pytest.raises(InputError, match="MODEL/PRECISION/GPU"):
            parse_claim(bad)
    with pytest.raises(InputError, match="no synthetic telemetry profile"):
        WorkerNode(WorkerConfig(claims="mystery/bf16/h100"))
    with pytest.raises(InputError, match="no synthetic telemetry profile"):
        WorkerNode(WorkerConfig(behaves_as="llama-1b/int3/h100"))
    with pytest.raises(InputError, match="node id"):
        WorkerNode(WorkerConfig(node_id="a b"))
    impostor = WorkerNode(WorkerConfig(claims=CLAIM, behaves_as="llama-1b/int8/h100"))
    assert impostor.claims == CLAIM and impostor.source.model.name == "llama-1b/int8/h100"


def test_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--claims", "nonsense"]) == 2
    assert "MODEL/PRECISION/GPU" in capsys.readouterr().err
