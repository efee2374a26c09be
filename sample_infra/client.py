"""A sample client: prompts through the load balancer, then each request's signed verdict from tmb.

For every prompt it sends an OpenAI request (chat or completions, streamed or not) to the load balancer,
reads the ``X-TMB-Request-Id`` header tmb put on the response, asks the daemon for the verdict
(``GET /v1/verdicts/{id}?wait=S``: 200 verdict, 202 pending with ``Retry-After``, 404 unknown), checks the
verdict's Ed25519 signature with :func:`tmb.verdict.signing.verify_verdict` and that it is about this
request, and prints a table (request id, worker/node, claimed model, decision, reason) or, with
``--json``, a JSON list for programs.

Keys: ``--key FILE`` pins the daemon's public key (PEM, hex or a saved ``/v1/keys`` document); without it
the client fetches ``/v1/keys`` from the daemon it is checking (trust on first use: fine for the demo, not
for an auditor). Exit status: 0 when every request got a verdict whose signature holds and whose decision
is ``verified`` or ``demo``; 1 otherwise; 2 for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tmb.errors import InputError, Report, TmbError
from tmb.verdict.signing import PublicKey, load_public_keys, verify_verdict

__all__ = ["Client", "Outcome", "Reply", "format_table", "main"]

Verifier = Callable[[Mapping[str, Any], Sequence[PublicKey]], Report]
ACCEPTED = frozenset({"verified", "demo"})


@dataclass(frozen=True)
class Reply:
    """What came back from the load balancer for one request."""

    status: int
    request_id: str | None
    text: str
    usage: dict[str, Any] | None
    pieces: int  # content chunks received (streaming) or 0
    worker_node: str | None  # the X-Worker-Node header, where the sample worker's header came through
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One request's end result: reply, verdict state, decision and signature check."""

    prompt: str
    stream: bool
    http_status: int
    request_id: str | None
    completion_tokens: int | None
    verdict_state: str  # final | pending | unknown | error | no_request_id | request_failed
    signature: str  # ok | invalid | unchecked
    decision: str | None = None
    worker: str | None = None
    node: str | None = None
    claimed_model: str | None = None
    reason: str | None = None
    problems: list[str] = field(default_factory=list)
    verdict: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        """A signed verdict about this request whose decision is ``verified`` or ``demo``."""
        return self.verdict_state == "final" and self.signature == "ok" and self.decision in ACCEPTED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accepted": self.accepted}


def _retry_after(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return min(max(seconds, 0.05), 30.0)


class Client:
    """Talks to the load balancer (requests) and to the daemon (verdicts, keys).

    ``await start()`` / ``await stop()`` (or ``async with``). ``keys`` pins the verdict keys; None fetches
    them from ``{daemon_url}/v1/keys`` on first use. ``verify`` is the signature check
    (:func:`~tmb.verdict.signing.verify_verdict`; a test may pass another).
    """

    def __init__(
        self,
        lb_url: str,
        daemon_url: str,
        *,
        model: str | None = None,
        keys: Sequence[PublicKey] | None = None,
        verify: Verifier = verify_verdict,
        wait_s: float = 10.0,
        deadline_s: float = 60.0,
        request_timeout_s: float = 300.0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.lb_url, self.daemon_url = lb_url.rstrip("/"), daemon_url.rstrip("/")
        self.model = model
        self.extra_body = dict(extra_body or {})  # merged into every request body (e.g. ignore_eos)
        self._keys = list(keys) if keys is not None else None
        self._verify = verify
        self.wait_s, self.deadline_s = wait_s, deadline_s
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Client.start() was not awaited")
        return self._session

    async def send(self, prompt: str, *, stream: bool, chat: bool = True, max_tokens: int = 32) -> Reply:
        """One completion request through the load balancer."""
        body: dict[str, Any] = {**self.extra_body, "max_tokens": max_tokens, "stream": stream}
        if self.model is not None:
            body["model"] = self.model
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        url = f"{self.lb_url}/v1/{'chat/completions' if chat else 'completions'}"
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        try:
            async with self.session.post(url, json=body, timeout=timeout) as resp:
                rid = resp.headers.get("X-TMB-Request-Id")
                node = resp.headers.get("X-Worker-Node")
                if resp.status != 200:
                    text = (await resp.read())[:500].decode("utf-8", "replace")
                    return Reply(resp.status, rid, "", None, 0, node, f"HTTP {resp.status}: {text}")
                if stream:
                    text, usage, pieces = await _read_sse(resp.content, chat)
                else:
                    text, usage = _read_json(await resp.json(content_type=None), chat)
                    pieces = 0
                return Reply(resp.status, rid, text, usage, pieces, node)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Reply(0, None, "", None, 0, None, f"{type(exc).__name__}: {exc}")

    async def keys(self) -> list[PublicKey]:
        """The verdict keys: pinned, or fetched once from the daemon's ``/v1/keys``."""
        if self._keys is None:
            url = f"{self.daemon_url}/v1/keys"
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        raise InputError(f"cannot fetch verdict keys: HTTP {resp.status}", url=url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise InputError(f"cannot fetch verdict keys: {exc}", url=url) from None
            self._keys = load_public_keys(data, url)
        return self._keys

    async def fetch_verdict(self, request_id: str) -> tuple[str, dict[str, Any] | None, str | None]:
        """(state, verdict, problem); state ``final``, ``pending`` (deadline), ``unknown``, ``error``."""
        url = f"{self.daemon_url}/v1/verdicts/{request_id}"
        deadline = time.monotonic() + self.deadline_s
        while True:
            left = deadline - time.monotonic()
            wait = max(0.0, min(self.wait_s, left))
            try:
                timeout = aiohttp.ClientTimeout(total=wait + 10.0)
                async with self.session.get(url, params={"wait": f"{wait:g}"}, timeout=timeout) as resp:
                    data = await resp.read()
                    retry = _retry_after(resp.headers.get("Retry-After"), 1.0)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                return "error", None, f"verdict request failed: {type(exc).__name__}: {exc}"
            if status == 200:
                try:
                    doc = json.loads(data)
                except ValueError as exc:
                    return "error", None, f"verdict is not JSON: {exc}"
                if not isinstance(doc, dict):
                    return "error", None, "verdict is not a JSON object"
                return "final", doc, None
            if status == 404:
                return "unknown", None, f"daemon: {data[:300].decode('utf-8', 'replace')}"
            if status != 202:
                return "error", None, f"verdict request answered HTTP {status}"
            left = deadline - time.monotonic()
            if left <= 0:
                return "pending", None, f"no verdict within {self.deadline_s:g} s"
            await asyncio.sleep(min(retry, left))

    async def run_one(self, prompt: str, *, stream: bool, chat: bool = True, max_tokens: int = 32) -> Outcome:
        """Send one prompt, fetch its verdict and check it."""
        reply = await self.send(prompt, stream=stream, chat=chat, max_tokens=max_tokens)
        tokens = reply.usage.get("completion_tokens") if reply.usage else None
        base: dict[str, Any] = {
            "prompt": prompt,
            "stream": stream,
            "http_status": reply.status,
            "request_id": reply.request_id,
            "completion_tokens": tokens if isinstance(tokens, int) else None,
            "node": reply.worker_node,
        }
        if reply.request_id is None:
            state = "request_failed" if reply.error else "no_request_id"
            why = reply.error or "the response has no X-TMB-Request-Id: it did not pass through tmb"
            return Outcome(**base, verdict_state=state, signature="unchecked", problems=[why])
        if reply.error:
            base["problems"] = [reply.error]
        state, doc, problem = await self.fetch_verdict(reply.request_id)
        if doc is None:
            problems = [*base.pop("problems", []), *([problem] if problem else [])]
            return Outcome(**base, verdict_state=state, signature="unchecked", problems=problems)
        return self._judge(base, doc)

    def _judge(self, base: dict[str, Any], doc: dict[str, Any]) -> Outcome:
        problems: list[str] = list(base.pop("problems", []))
        try:
            report = self._verify(doc, self._keys or [])
        except TmbError as exc:
            report = Report()
            report.add("verdict.malformed", exc.message)
        problems += [str(f) for f in report.errors]
        if doc.get("request_id") != base["request_id"]:
            problems.append(
                f"[error] client.request_id_mismatch: the verdict is about {doc.get('request_id')!r}"
            )
        reasons = doc.get("reasons")
        first = reasons[0] if isinstance(reasons, list) and reasons else None
        reason = f"{first.get('id')}: {first.get('message')}" if isinstance(first, dict) else None
        ok = report.ok and doc.get("request_id") == base["request_id"]
        return Outcome(
            **{**base, "node": _s(doc.get("node")) or base["node"]},
            verdict_state="final",
            signature="ok" if ok else "invalid",
            decision=_s(doc.get("decision")),
            worker=_s(doc.get("worker")),
            claimed_model=_s(doc.get("claimed_model")),
            reason=reason,
            problems=problems,
            verdict=doc,
        )

    async def run(
        self,
        prompts: Sequence[str],
        *,
        stream: str = "alternate",
        chat: bool = True,
        max_tokens: int = 32,
        concurrency: int = 1,
    ) -> list[Outcome]:
        """Every prompt in order (``stream``: ``on``, ``off`` or ``alternate``), ``concurrency`` at a time."""
        if stream not in ("on", "off", "alternate"):
            raise InputError("stream must be on, off or alternate", stream=stream)
        if self._keys is None:
            await self.keys()
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(i: int, prompt: str) -> Outcome:
            streamed = stream == "on" or (stream == "alternate" and i % 2 == 1)
            async with gate:
                return await self.run_one(prompt, stream=streamed, chat=chat, max_tokens=max_tokens)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def _s(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def _read_sse(content: aiohttp.StreamReader, chat: bool) -> tuple[str, dict[str, Any] | None, int]:
    """Text, usage and number of content chunks of an OpenAI SSE stream (``ValueError`` if malformed)."""
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError("an SSE chunk is not a JSON object")
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if isinstance(piece, str) and piece:
                parts.append(piece)
    # Read to the end: tmb sends a response's last byte only once the request is stored (store.ack =
    # commit), so a verdict asked for right after [DONE] could otherwise be for a request not known yet.
    await content.read()
    return "".join(parts), usage, len(parts)


def _read_json(body: Any, chat: bool) -> tuple[str, dict[str, Any] | None]:
    if not isinstance(body, dict):
        raise ValueError("the completion is not a JSON object")
    choices = body.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    text = (first.get("message") or {}).get("content") if chat else first.get("text")
    usage = body.get("usage")
    return (text if isinstance(text, str) else ""), (usage if isinstance(usage, dict) else None)


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A fixed-width table: request id, worker/node, claimed model, decision, signature, reason."""
    head = ("request id", "worker/node", "claimed model", "decision", "sig", "reason")
    rows = []
    for o in outcomes:
        where = "/".join(x for x in (o.worker, o.node) if x) or "-"
        decision = o.decision or o.verdict_state
        reason = o.reason or (o.problems[0] if o.problems else "")
        sig = o.signature if o.verdict_state == "final" else "-"
        rows.append((o.request_id or "-", where, o.claimed_model or "-", decision, sig, reason))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    out = []
    for r in [head, *rows]:
        cells = [c.ljust(w) for c, w in zip(r[:5], widths, strict=True)]
        out.append("  ".join([*cells, r[5][:100]]).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    return "\n".join(out)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read prompts: {exc}", path=str(args.prompts_file)) from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        prompts = ["Tell me about the workshop.", "What does the ledger record?", "Describe the kitchen."]
    count = args.count or len(prompts)
    if count < 1:
        raise InputError("--count must be at least 1", count=count)
    return [prompts[i % len(prompts)] for i in range(count)]


async def _run(args: argparse.Namespace) -> list[Outcome]:
    keys = None
    if args.key is not None:
        try:
            keys = load_public_keys(args.key.read_bytes(), str(args.key))
        except OSError as exc:
            raise InputError(f"cannot read public key: {exc.strerror}", path=str(args.key)) from None
    async with Client(
        args.lb, args.daemon, model=args.model, keys=keys, wait_s=args.wait, deadline_s=args.deadline
    ) as client:
        return await client.run(
            _prompts(args),
            stream=args.stream,
            chat=args.api == "chat",
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sample_infra.client --lb URL --daemon URL [...]``."""
    p = argparse.ArgumentParser(prog="python -m sample_infra.client", description=__doc__.split("\n")[0])
    p.add_argument("--lb", required=True, help="load balancer base URL")
    p.add_argument("--daemon", required=True, help="tmb daemon base URL (verdict API)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--prompts-file", type=Path, help="one prompt a line")
    p.add_argument("--count", type=int, default=0, help="requests to send, cycling the prompts")
    p.add_argument("--stream", choices=["on", "off", "alternate"], default="alternate")
    p.add_argument("--api", choices=["chat", "completions"], default="chat")
    p.add_argument("--model", default=None, help="the request body's model (default: none sent)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--wait", type=float, default=10.0, help="long-poll seconds per verdict request")
    p.add_argument("--deadline", type=float, default=60.0, help="give up on a verdict after this long")
    p.add_argument("--key", type=Path, help="pinned verdict public key (default: fetch /v1/keys)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    args = p.parse_args(argv)
    try:
        outcomes = asyncio.run(_run(args))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([o.to_dict() for o in outcomes], indent=2))
    else:
        print(format_table(outcomes))
    return 0 if outcomes and all(o.accepted for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
