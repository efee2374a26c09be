"""A sample inference worker: OpenAI-compatible HTTP API, the n-gram text model, live synthetic telemetry.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as Server-Sent Events in
OpenAI's chunk format, or one JSON body, both with ``usage``), ``GET /v1/models``, ``GET /health``.

Each worker *claims* a model (``--claims llama-1b/bf16/h100``: what it says it serves, reported in every
response) and *behaves as* one (``--behaves-as``, default the claim): the synthetic workload model whose
telemetry its node produces. An honest worker behaves as what it claims; the impostor claims bf16 and
behaves as int8. The node's :class:`~tmb.telemetry.SyntheticSource` is driven by the requests actually
served: admission (with the prompt length), every generated token, completion or disconnect.

:class:`WorkerNode` bundles the server and the source, so a probe in the same process samples
``node.source``; for a probe in another process, ``activity_log`` appends every activity event as a JSON
line that :func:`follow_activity` replays into that process's own source (format in docs/sample-infra.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from aiohttp.typedefs import Handler

from sample_infra.load_balancer import serve_until_signal
from sample_infra.model import Generation, TextModel, default_model
from tmb.errors import InputError, TmbError
from tmb.telemetry.synthetic import MODELS, SyntheticSource

__all__ = ["WorkerConfig", "WorkerNode", "follow_activity", "main", "parse_claim"]


def parse_claim(text: str) -> tuple[str, str, str]:
    """``model/precision/gpu`` -> its three parts; :class:`InputError` when it is not that shape."""
    parts = text.split("/")
    if len(parts) != 3 or not all(p and p.strip() == p for p in parts):
        raise InputError("a model claim is MODEL/PRECISION/GPU, e.g. llama-1b/bf16/h100", claim=text)
    return parts[0], parts[1], parts[2]


def default_gpu_uuid(node_id: str) -> str:
    """A stable, NVML-shaped GPU UUID for a sample node (so configs can name it before it starts)."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, 'tmb-sample-node/' + node_id)}"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a sample worker needs. Delays are the pacing that makes requests take measurable time."""

    node_id: str = "node-1"
    claims: str = "llama-1b/bf16/h100"
    behaves_as: str | None = None  # None: behave as claimed (honest)
    gpu_uuid: str | None = None  # None: default_gpu_uuid(node_id)
    host: str = "127.0.0.1"
    port: int = 0
    token_delay_s: float = 0.005
    prefill_delay_s_per_token: float = 2e-5
    seed: int = 0  # default sampling seed when a request gives none
    telemetry_seed: int | None = None  # None: derived from node_id
    rate_hz: float = 20.0
    model_dir: Path | None = None  # None: the bundled corpus
    activity_log: Path | None = None
    shutdown_grace_s: float = 1.0  # how long stop() lets running requests finish before cancelling them

    def validated(self) -> WorkerConfig:
        """Self, after checking every field; :class:`InputError` naming the bad one."""
        parse_claim(self.claims)
        behaves = self.behaves_as or self.claims
        if behaves not in MODELS:
            raise InputError(
                f"no synthetic telemetry profile for {behaves!r} (set --behaves-as)", known=sorted(MODELS)
            )
        if not self.node_id or any(c.isspace() for c in self.node_id):
            raise InputError("node id must be non-empty without whitespace", node_id=self.node_id)
        if not (0.0 <= self.token_delay_s <= 10.0 and 0.0 <= self.prefill_delay_s_per_token <= 1.0):
            raise InputError("delays must be between 0 and 10 s per token", token_delay_s=self.token_delay_s)
        return self


class _ActivityLog:
    """Appends activity events as JSON lines (flushed per line) for an out-of-process probe."""

    def __init__(self, path: Path, node_id: str) -> None:
        try:
            self._file: TextIO | None = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot open the activity log: {exc.strerror}", path=str(path)) from None
        self._node = node_id

    def write(self, event: str, **fields: int) -> None:
        if self._file is not None:
            line = {"t_ns": time.time_ns(), "node": self._node, "event": event, **fields}
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WorkerNode:
    """One sample GPU node: the worker's HTTP server plus the node's live synthetic telemetry source.

    ``await start()`` returns the base URL; ``await stop()`` closes everything. ``source`` is the node's
    :class:`SyntheticSource` (pass one in to share a clock or seed with a test). ``healthy = False`` makes
    ``GET /health`` answer 503, as a failing node would.
    """

    def __init__(
        self, config: WorkerConfig, *, model: TextModel | None = None, source: SyntheticSource | None = None
    ) -> None:
        self.config = config.validated()
        self.claims = config.claims
        self.behaves_as = config.behaves_as or config.claims
        self.gpu_uuid = config.gpu_uuid or default_gpu_uuid(config.node_id)
        self.model = model or (TextModel.from_dir(config.model_dir) if config.model_dir else default_model())
        tseed = config.telemetry_seed
        if tseed is None:
            tseed = int.from_bytes(hashlib.sha256(config.node_id.encode()).digest()[:4], "big")
        self.source = source or SyntheticSource(
            self.behaves_as, rate_hz=config.rate_hz, seed=tseed, gpu=self.gpu_uuid
        )
        self._log = _ActivityLog(config.activity_log, config.node_id) if config.activity_log else None
        self.healthy = True
        self.requests = 0
        self.tokens = 0
        self.in_flight = 0
        self.app = _build_app(self)
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0

    async def start(self) -> str:
        """Listen on ``config.host:config.port`` (0 = any free port); the base URL."""
        runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=max(self.config.shutdown_grace_s, 0.001)
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise InputError(
                f"cannot listen: {exc.strerror}", host=self.config.host, port=self.config.port
            ) from None
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop serving (requests still running after ``shutdown_grace_s`` are cancelled, their telemetry
        finished) and close the activity log."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._log is not None:
            self._log.close()

    # Activity hooks the API handlers call; each goes to the source and the activity log.
    def request_started(self, prompt_tokens: int, max_tokens: int) -> None:
        self.requests += 1
        self.in_flight += 1
        self.source.request_started(tokens_expected=max_tokens, prompt_tokens=prompt_tokens)
        if self._log is not None:
            self._log.write("start", prompt_tokens=prompt_tokens, tokens_expected=max_tokens)

    def token_generated(self) -> None:
        self.tokens += 1
        self.source.token_generated(1)
        if self._log is not None:
            self._log.write("token", count=1)

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.source.request_finished()
        if self._log is not None:
            self._log.write("finish")

    def describe(self) -> dict[str, Any]:
        """What ``GET /health`` reports (also handy for a demo's table)."""
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "node": self.config.node_id,
            "gpu": self.gpu_uuid,
            "claims": self.claims,
            "model_digest": self.model.digest,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "tokens": self.tokens,
        }


NODE_KEY: web.AppKey[WorkerNode] = web.AppKey("node", WorkerNode)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_MISSING: Any = object()


class _BadRequest(Exception):
    """A request the worker refuses, answered as an OpenAI-style JSON error."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def response(self) -> web.Response:
        return _error(self.status, self.message, param=self.param, code=self.code)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _int(obj: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str = "") -> int:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadRequest(f"'{where}{key}' must be an integer", where + key, "invalid_type")
    if not lo <= value <= hi:
        raise _BadRequest(f"'{where}{key}' must be between {lo} and {hi}, got {value}", where + key)
    return value


def _num(obj: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _BadRequest(f"'{key}' must be a number", key, "invalid_type")
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        raise _BadRequest(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _bool(obj: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _BadRequest(f"'{where}{key}' must be a boolean", where + key, "invalid_type")
    return value


def _text(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role in ("assistant", "tool"):
        return ""
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise _BadRequest(
                    f"'{where}[{j}]' must be a text part {{'type': 'text', 'text': ...}}", f"{where}[{j}]"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _BadRequest(f"'{where}' must be a string or a non-empty list of text parts", where, "invalid_type")


def _chat_prompt(messages: Any) -> str:
    if messages is _MISSING:
        raise _BadRequest("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array", "messages", "invalid_type")
    lines = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRequest(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if role not in _ROLES:
            raise _BadRequest(
                f"'messages[{i}].role' must be one of {sorted(_ROLES)}, got {role!r}", f"messages[{i}].role"
            )
        if "content" not in msg:
            raise _BadRequest(
                f"'messages[{i}].content' is required", f"messages[{i}].content", "missing_required_parameter"
            )
        lines.append(f"{role}: {_text(msg['content'], f'messages[{i}].content', role)}")
    return "\n".join([*lines, "assistant:"])


def _completion_prompt(prompt: Any) -> str:
    if prompt is _MISSING:
        raise _BadRequest("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _BadRequest(
            "'prompt' must be a string (or a list of exactly one string; batches and token arrays are not "
            "supported by the sample worker)",
            "prompt",
            "invalid_type",
        )
    return prompt


@dataclass(frozen=True)
class _Params:
    chat: bool
    prompt: str
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    ignore_eos: bool


def _parse(body: Any, chat: bool, node: WorkerNode) -> _Params:
    """Validate an OpenAI request body; :class:`_BadRequest` naming the first bad parameter."""
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _BadRequest("'model' must be a string", "model", "invalid_type")
        if model not in (node.claims, node.claims.split("/")[0]):
            raise _BadRequest(
                f"the model {model!r} does not exist on this worker (it serves {node.claims!r})",
                "model",
                "model_not_found",
                404,
            )
    prompt = (
        _chat_prompt(body.get("messages", _MISSING))
        if chat
        else _completion_prompt(body.get("prompt", _MISSING))
    )
    stream = _bool(body, "stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _BadRequest("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise _BadRequest("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = _bool(options, "include_usage", False, "stream_options.")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 64, 1, 4096)
    _int(body, "n", 1, 1, 1)
    for name, allowed in (("stop", (None, "", [])), ("echo", (None, False)), ("logprobs", (None, False))):
        if body.get(name, None) not in allowed:
            raise _BadRequest(
                f"'{name}' is not supported by the sample worker", name, "unsupported_parameter"
            )
    return _Params(
        chat=chat,
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_int(body, "seed", node.config.seed, -(2**63), 2**64 - 1),
        ignore_eos=_bool(body, "ignore_eos", False),
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Chunks:
    """Builds one request's streamed chunks in OpenAI's format (chat.completion.chunk / text_completion)."""

    def __init__(self, p: _Params, rid: str, created: int, model: str) -> None:
        self.p = p
        self.head: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": created,
            "model": model,
        }

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> bytes:
        if self.p.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            ch: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        extra = {"usage": None} if self.p.include_usage else {}
        return _sse({**self.head, "choices": [ch], **extra})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return _sse({**self.head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _decode(node: WorkerNode, gen: Generation) -> AsyncIterator[str]:
    """Paced generation: prefill delay, then one decode step per token delay; reports each token."""
    cfg = node.config
    await asyncio.sleep(cfg.prefill_delay_s_per_token * gen.prompt_tokens)
    while True:
        await asyncio.sleep(cfg.token_delay_s)
        text = gen.step()
        if text is None:
            return
        node.token_generated()
        yield text


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, f"request body too large: {exc.text}", code="request_too_large")
    try:
        body = json.loads(raw)
    except RecursionError:
        return _error(400, "invalid JSON: nested too deeply", code="invalid_json")
    except ValueError as exc:
        return _error(400, f"invalid JSON in the request body: {exc}", code="invalid_json")
    try:
        p = _parse(body, chat, node)
        gen = node.model.start(
            p.prompt,
            max_tokens=p.max_tokens,
            seed=p.seed,
            temperature=p.temperature,
            top_p=p.top_p,
            ignore_eos=p.ignore_eos,
            continue_prompt=not chat,
        )
    except _BadRequest as exc:
        return exc.response()
    except InputError as exc:
        return _error(400, exc.message, code="context_length_exceeded")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    node.request_started(gen.prompt_tokens, p.max_tokens)
    try:
        if p.stream:
            return await _stream(request, node, p, gen, rid)
        pieces = [text async for text in _decode(node, gen)]
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": gen.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(pieces)}
        else:
            choice["text"] = "".join(pieces)
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": node.claims,
                "choices": [choice],
                "usage": _usage(gen.prompt_tokens, len(gen.tokens)),
            }
        )
    finally:
        node.request_finished()


async def _stream(
    request: web.Request, node: WorkerNode, p: _Params, gen: Generation, rid: str
) -> web.StreamResponse:
    chunks = _Chunks(p, rid, int(time.time()), node.claims)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    try:
        await resp.prepare(request)
        if p.chat:
            await resp.write(chunks.choice(None, None, first=True))
        async for text in _decode(node, gen):
            await resp.write(chunks.choice(text, None))
        await resp.write(chunks.choice(None if p.chat else "", gen.finish_reason))
        if p.include_usage:
            await resp.write(chunks.usage(gen.prompt_tokens, len(gen.tokens)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away: stop generating (the caller finishes the request's telemetry)
    return resp


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _models(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    entry = {"id": node.claims, "object": "model", "created": 0, "owned_by": "tmb-sample"}
    return web.json_response({"object": "list", "data": [entry]})


async def _health(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response(node.describe(), status=200 if node.healthy else 503)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing and method errors as OpenAI-style JSON, never aiohttp's text pages."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(
            exc.status,
            f"{exc.reason}: {request.method} {request.path}",
            code=exc.reason.lower().replace(" ", "_"),
        )


async def _add_node_headers(request: web.Request, response: web.StreamResponse) -> None:
    node = request.app[NODE_KEY]
    response.headers["X-Worker-Node"] = node.config.node_id
    response.headers["X-Worker-Claims"] = node.claims


def _build_app(node: WorkerNode) -> web.Application:
    app = web.Application(middlewares=[_json_errors])
    app[NODE_KEY] = node
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.on_response_prepare.append(_add_node_headers)
    return app


def apply_activity(source: SyntheticSource, line: str) -> bool:
    """Feed one activity-log line to ``source``; False (and nothing fed) for a line that is not an event."""
    try:
        ev = json.loads(line)
    except ValueError:
        return False
    if not isinstance(ev, dict):
        return False
    kind = ev.get("event")
    if kind == "start":
        pt, te = ev.get("prompt_tokens"), ev.get("tokens_expected")
        if not (isinstance(pt, int) and isinstance(te, int)):
            return False
        source.request_started(tokens_expected=te, prompt_tokens=pt)
    elif kind == "token":
        count = ev.get("count", 1)
        if not isinstance(count, int):
            return False
        source.token_generated(count)
    elif kind == "finish":
        source.request_finished()
    else:
        return False
    return True


async def follow_activity(path: Path, source: SyntheticSource, *, poll_s: float = 0.02) -> None:
    """Tail a worker's activity log into ``source`` until cancelled (events land within ``poll_s``).

    Starts at the current end of the file (a restarted probe does not replay old requests); a file that
    does not exist yet is waited for. Malformed lines are skipped.
    """
    offset = path.stat().st_size if path.exists() else 0  # noqa: ASYNC240 (once, at start)
    pending = b""
    while True:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            data = b""
        offset += len(data)
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            apply_activity(source, raw.decode("utf-8", "replace"))
        await asyncio.sleep(poll_s)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sample_infra.worker", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed at start)")
    p.add_argument("--node-id", default="node-1")
    p.add_argument("--gpu-uuid", default=None, help="default: derived from the node id")
    p.add_argument("--claims", default="llama-1b/bf16/h100", help="the model this worker says it serves")
    p.add_argument("--behaves-as", default=None, help="the telemetry profile it produces (default: --claims)")
    p.add_argument("--token-delay-ms", type=float, default=5.0, help="pacing per generated token")
    p.add_argument("--prefill-us-per-token", type=float, default=20.0, help="pacing per prompt token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for requests that give none")
    p.add_argument("--telemetry-seed", type=int, default=None)
    p.add_argument("--rate-hz", type=float, default=20.0, help="synthetic telemetry sample rate")
    p.add_argument("--model-dir", type=Path, default=None, help="directory of .txt training text")
    p.add_argument("--activity-log", type=Path, default=None, help="append activity events (JSON lines)")
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        node_id=args.node_id,
        claims=args.claims,
        behaves_as=args.behaves_as,
        gpu_uuid=args.gpu_uuid,
        host=args.host,
        port=args.port,
        token_delay_s=args.token_delay_ms / 1000.0,
        prefill_delay_s_per_token=args.prefill_us_per_token / 1e6,
        seed=args.seed,
        telemetry_seed=args.telemetry_seed,
        rate_hz=args.rate_hz,
        model_dir=args.model_dir,
        activity_log=args.activity_log,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sample_infra.worker``: serve until SIGINT/SIGTERM. Prints ``... listening on URL``."""
    args = _parser().parse_args(argv)
    try:
        node = WorkerNode(config_from_args(args))
        banner = (
            f"worker {node.config.node_id} listening on {{url}} "
            f"(claims {node.claims}, behaves as {node.behaves_as})"
        )
        asyncio.run(serve_until_signal(node.start, node.stop, banner))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
