"""The probe: sample telemetry, seal the chain, quote, read IMA, bind GPU processes, ship it all.

Three asyncio tasks share one :class:`Probe`:

* **seal**: every ``batch_interval_s`` the source yields a :class:`~tmb.telemetry.sample.SampleBatch`; it is
  sealed into the chain, written to the disk buffer and the chain head persisted (``state.json``);
* **quote**: every ``quote_period_s``, and at once when the daemon asks (``"quote": true`` in a response),
  with the newest unused daemon nonce (never one it already quoted with: an answer computed before the
  daemon took that quote names it again, and a second quote with it would be a replay): the process bindings
  of the GPU processes are read, then TPM2_Quote over PCRs 0-10 (+ configured PCRs) with qualifying data
  ``SHA-256(nonce ‖ head digest)``, or ``SHA-256(nonce ‖ head digest ‖ bindings digest)`` when there are
  bindings (the quote's ``bindings``), in a worker thread (the loop never blocks; a call slower than
  ``tpm_timeout_s`` is abandoned); then the IMA records appended since the last read (read *after* the
  quote, so they include everything the quoted PCR covers), the bindings document and the quote are queued
  in that order. TPM errors are retried with exponential backoff (0.5 s doubling to 30 s) while batches keep
  being sealed and shipped;
* **send**: ships the buffer in order (batches grouped, up to 64 a request) and takes the next nonce, the
  quote demand and the daemon's IMA offset from every response. Connection errors and 5xx keep the items
  and retry with backoff (0.2 s doubling to 5 s); a 4xx drops the refused item (it would be refused forever)
  and, for a refused batch, starts a new chain segment.

The UEFI event log (``eventlog``, read once at start, at most 4 MiB: :mod:`probes.eventlog_reader`) is sent
whole when the daemon's answers show it does not hold this log (``eventlog``: the SHA-256 of the one it
holds, or null): on the first answer after a boot, and again whenever the daemon lost it or holds another.
It is queued before the first quote, and again at most every :data:`EVENTLOG_RESEND_S` (30 s). A log the
daemon refused (4xx) is not offered again until a restart.

The daemon's answers are not trusted to be well-formed: each is read incrementally and refused beyond
:data:`MAX_ANSWER_BYTES` (1 MiB; a declared larger ``Content-Length`` is refused unread), a whole exchange is
limited to ``http_timeout_s``, and the values it carries are checked before use (``nonce``: 32 bytes of hex;
``quote``: a boolean; ``ima_offset``: a non-negative integer that is a record boundary of the local IMA log;
``eventlog``: null or a SHA-256 in hex; ``findings``: a list). Each refusal is a warning finding with a
stable id, kept in
:attr:`ProbeStats.refusals` and logged: ``probe.answer_too_large``, ``probe.answer_timeout``,
``probe.answer_malformed`` (not a JSON object) and ``probe.answer_bad_value`` (the exchange is retried with
backoff, the items stay buffered), ``probe.answer_ima_offset_outside_log`` (the offset is ignored; the
probe reads the IMA log from where it was).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote as urlquote

import aiohttp

from probes.bindings import bind_all
from probes.buffer import DiskBuffer, Item
from probes.chain import Chain
from probes.config import ProbeConfig
from probes.enrol import EnrolError, enrol, load_key, save_key
from probes.eventlog_reader import read_eventlog
from probes.ima_reader import ImaReader
from probes.tpm import Quote, TpmClient
from tmb.errors import Finding, Severity, TmbError, TpmError, finding
from tmb.ingest.auth import HEADER, sign_request
from tmb.ingest.wire import ZERO, bindings_bytes, qualifying_data
from tmb.telemetry.source import TelemetrySource, open_source

__all__ = ["Probe", "ProbeStats"]

log = logging.getLogger("tmb.probe")
T = TypeVar("T")
MAX_BATCHES_PER_POST = 64
IMA_CHUNK = 4 * 1024 * 1024
TPM_BACKOFF = (0.5, 30.0)
SEND_BACKOFF = (0.2, 5.0)
MAX_ANSWER_BYTES = 1 << 20  # a daemon answer is a few hundred bytes; a larger one is refused, never buffered
MAX_IMA_OFFSET = (1 << 63) - 1
USED_NONCES_KEPT = 64  # nonces this probe quoted with, never taken from an answer again
MAX_KEPT = 100  # refusals and refused-evidence records kept in ProbeStats (the newest)
MAX_FINDINGS_KEPT = 16  # findings kept from one refusal answer
REPEAT_LOG_S = 60.0  # an identical refusal is counted at once but logged again only after this long
OFFSET_RECHECK_S = 10.0  # a refused ima_offset offered again is checked against the log again after this
EVENTLOG_RESEND_S = 30.0  # the event log is sent again at most this often (a daemon that keeps losing it)
_KEY_UNKNOWN = ("auth.bad_mac", "auth.not_enrolled", "auth.missing")  # a 401 that means: enrol again
_HEX32 = re.compile(r"^[0-9a-fA-F]{64}$")


def _nonce_of(value: Any) -> bytes | None:
    """``value`` as a nonce (32 bytes of hex), or None when it is not one."""
    return bytes.fromhex(value) if isinstance(value, str) and _HEX32.match(value) else None


_ROUTES = {
    "batch": "batches",
    "quote": "quotes",
    "ima": "ima",
    "bindings": "bindings",
    "eventlog": "eventlog",
}


@dataclass
class ProbeStats:
    """Counters for tests, logs and the bench."""

    sealed: int = 0
    segments: int = 0
    batches_acked: int = 0
    quotes: int = 0
    quotes_acked: int = 0
    tpm_errors: int = 0
    send_errors: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)  # evidence the daemon refused (newest)
    answers_refused: int = 0  # daemon answers (or values in them) the probe refused
    refusals: list[Finding] = field(default_factory=list)  # the newest distinct refusals


class _Refused(Exception):
    """A daemon answer the probe will not use; the exchange is retried with backoff."""

    def __init__(self, refusal: Finding) -> None:
        super().__init__(str(refusal))
        self.finding = refusal


def _show(value: Any, limit: int = 80) -> str:
    """A value the daemon sent, for a finding's context or a log line: short, whatever it was."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refusal(fid: str, message: str, **context: Any) -> Finding:
    return finding(fid, message, severity=Severity.WARNING, **context)


def _bad_value(route: str, key: str, value: Any, want: str) -> Finding:
    return _refusal(
        "probe.answer_bad_value",
        f"the daemon's {key!r} is not {want}",
        route=route,
        field=key,
        got=_show(value),
    )


def _quote(cfg: ProbeConfig, qdata: bytes, client: TpmClient) -> Quote:
    return client.quote(cfg.ak_handle, cfg.quote_selection, qdata)


class Probe:
    """One probe. ``source`` and ``tpm`` (a factory of TPM clients) can be injected (tests, benches)."""

    def __init__(
        self,
        config: ProbeConfig,
        *,
        source: TelemetrySource | None = None,
        tpm: Callable[[], TpmClient] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self._tpm_factory = tpm or (lambda: TpmClient(config.tcti))
        self._tpm: TpmClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tmb-probe-tpm")
        state_dir = Path(config.state_dir)
        self.state_file = state_dir / "state.json"
        self.buffer = DiskBuffer(
            state_dir / "buffer",
            max_bytes=config.buffer_max_bytes,
            max_items=config.buffer_max_items,
            fsync=config.buffer_fsync,
        )
        self.chain = Chain(config.node, previous_head=self._load_head())
        self.ima = ImaReader(config.ima_log)
        self._ima_ready = False
        self.stats = ProbeStats()
        self._nonce: bytes | None = None
        self._nonce_event = asyncio.Event()
        # Nonces quoted with: an answer computed before the daemon took that quote (one that timed out, or
        # still in flight) names the nonce again, and a second quote with it would be refused as a replay.
        self._used: OrderedDict[bytes, None] = OrderedDict()
        for item in self.buffer.peek(len(self.buffer)):
            if item.kind == "quote" and (buffered := _nonce_of(item.doc.get("nonce"))) is not None:
                self._used[buffered] = None
        self._wake = asyncio.Event()
        self._quote_now = True  # a new segment's genesis is quoted at once
        self._new_segment = False
        self._pids: set[int] = set()
        self._ak_name: str | None = None
        self._last_refusal: dict[str, tuple[Finding, float]] = {}
        self._offset_refused: tuple[int, float] | None = None
        self._daemon_offset: int | None = None  # the last ima_offset the daemon answered
        self._eventlog: bytes | None = None  # this boot's UEFI event log, as read at start
        self._eventlog_digest: str | None = None  # its SHA-256 (hex)
        self._eventlog_refused: str | None = None  # the digest of a log the daemon refused (4xx)
        self._eventlog_queued: float | None = None  # when it was last queued (monotonic)
        self._key = load_key(state_dir, config.node) if config.enroll else None  # the evidence key
        self._enrol_lock = asyncio.Lock()

    # ----------------------------------------------------------------------------------------- state

    def _load_head(self) -> bytes:
        try:
            doc = json.loads(self.state_file.read_text())
            head = bytes.fromhex(doc["digest"])
            return head if len(head) == 32 and doc.get("node") == self.config.node else ZERO
        except (OSError, ValueError, KeyError, TypeError):
            return ZERO

    def _save_head(self) -> None:
        head = self.chain.head
        if head is None:
            return
        doc = {"node": self.config.node, **head.to_wire()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.state_file)

    def _seal(self, payload: bytes | None) -> None:
        if payload is None:
            batch = self.chain.genesis(self._source().kind)  # type: ignore[arg-type]
            self.stats.segments += 1
        else:
            batch = self.chain.seal(payload)
        self.buffer.put("batch", batch.to_wire())
        self._save_head()
        self.stats.sealed += 1
        self._wake.set()

    def _source(self) -> TelemetrySource:
        if self.source is None:
            options = dict(self.config.source_options)
            if self.config.source in ("nvml", "synthetic"):
                options.setdefault("rate_hz", self.config.sample_rate_hz)
            self.source = open_source(self.config.source, **options)
        return self.source

    # ----------------------------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or the task is cancelled)."""
        await self._load_eventlog()
        self._seal(None)
        timeout = aiohttp.ClientTimeout(total=self.config.http_timeout_s)
        tls = self.config.tls_context()  # https: the pinned daemon_ca (or the system's CAs), never none
        async with aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            headers={"Accept-Encoding": "identity"},
            connector=aiohttp.TCPConnector(ssl=tls if tls is not None else True),
        ) as http:
            tasks = [
                asyncio.create_task(self._seal_loop(), name="probe-seal"),
                asyncio.create_task(self._quote_loop(), name="probe-quote"),
                asyncio.create_task(self._send_loop(http), name="probe-send"),
            ]
            try:
                if stop is None:
                    await asyncio.gather(*tasks)
                else:
                    waiter = asyncio.create_task(stop.wait())
                    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        if t is not waiter:
                            t.result()
            finally:
                for t in tasks:
                    while not t.done():  # cancelled again should a cancel be swallowed (3.11 wait_for)
                        t.cancel()
                        await asyncio.wait({t}, timeout=1.0)
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                if stop is not None:
                    waiter.cancel()
                self.close()

    def close(self) -> None:
        def shut() -> None:
            if self._tpm is not None:
                self._tpm.close()
                self._tpm = None

        self._executor.submit(shut)
        self._executor.shutdown(wait=False, cancel_futures=False)
        if self.source is not None:
            self.source.close()

    async def _seal_loop(self) -> None:
        async for samples in self._source().batches(self.config.batch_interval_s):
            if self._new_segment:
                self._new_segment = False
                head = self.chain.head
                self.chain = Chain(self.config.node, previous_head=head.digest if head else ZERO)
                self._seal(None)
                self._quote_now = True
            self._seal(samples.encode())
            if not samples.synthetic:  # a synthetic source's "GPU processes" are made up: never bind them
                self._pids = {pid for row in samples.processes for pid, _ in row} or self._pids

    async def _load_eventlog(self) -> None:
        """Read the UEFI event log once; a problem is logged and shipped as a finding with the batches."""
        if not self.config.eventlog:
            return
        data, problem = await asyncio.to_thread(read_eventlog, self.config.eventlog)
        if problem is not None:
            log.warning("%s", problem)
            self.buffer.findings.append(problem)
            return
        assert data is not None  # noqa: S101
        self._eventlog, self._eventlog_digest = data, hashlib.sha256(data).hexdigest()

    def _offer_eventlog(self, route: str, held: Any) -> None:
        """Queue the event log when the daemon's answer shows it holds none or another one."""
        if held is not None and not (isinstance(held, str) and _HEX32.match(held)):
            self._refuse(_bad_value(route, "eventlog", held, "null or a SHA-256 in hex"))
            return
        mine = self._eventlog_digest
        if (
            self._eventlog is None
            or mine is None
            or (held is not None and held.lower() == mine)
            or mine == self._eventlog_refused
            or self.buffer.has("eventlog")
        ):
            return
        now = time.monotonic()
        if self._eventlog_queued is not None and now - self._eventlog_queued < EVENTLOG_RESEND_S:
            return
        self._eventlog_queued = now
        self.buffer.put("eventlog", {"data": base64.b64encode(self._eventlog).decode(), "sha256": mine})
        self._wake.set()

    # ----------------------------------------------------------------------------------------- TPM

    async def _in_tpm_thread(self, fn: Callable[[TpmClient], T]) -> T:
        def call() -> T:
            if self._tpm is None:
                self._tpm = self._tpm_factory()
            try:
                return fn(self._tpm)
            except TpmError:
                with contextlib.suppress(Exception):
                    self._tpm.close()
                self._tpm = None
                raise

        fut = asyncio.get_running_loop().run_in_executor(self._executor, call)
        return await asyncio.wait_for(fut, self.config.tpm_timeout_s)

    async def _quote_loop(self) -> None:
        backoff = TPM_BACKOFF[0]
        due = time.monotonic()
        cfg = self.config
        while True:
            while self._nonce is None or not (self._quote_now or time.monotonic() >= due):
                self._nonce_event.clear()
                wait = max(0.05, due - time.monotonic()) if self._nonce is not None else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._nonce_event.wait()
            nonce, head = self._nonce, self.chain.head
            assert nonce is not None and head is not None  # noqa: S101
            bindings, covered = await self._bindings()
            qdata = qualifying_data(nonce, head.digest, covered)
            try:
                if self._ak_name is None:
                    ak = await self._in_tpm_thread(lambda c: c.read_public(cfg.ak_handle))
                    self._ak_name = ak.name.hex() if ak.name else None
                q = await self._in_tpm_thread(functools.partial(_quote, cfg, qdata))
            except (TpmError, TimeoutError) as exc:
                self.stats.tpm_errors += 1
                log.warning("TPM quote failed (retrying in %.1f s): %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, TPM_BACKOFF[1])
                continue
            backoff = TPM_BACKOFF[0]
            self._used[nonce] = None
            while len(self._used) > USED_NONCES_KEPT:
                self._used.popitem(last=False)
            if self._nonce == nonce:
                self._nonce = None
            self._quote_now = False
            due = time.monotonic() + cfg.quote_period_s
            await self._ship_ima()
            if bindings is not None:  # before the quote that covers it: the daemon holds it when it arrives
                self.buffer.put("bindings", bindings)
            doc: dict[str, Any] = {
                "message": base64.b64encode(q.message).decode(),
                "signature": base64.b64encode(q.signature).decode(),
                "pcrs": q.pcrs.to_dict(),
                "nonce": nonce.hex(),
                "head": head.to_wire(),
                "ak_name": self._ak_name,
            }
            if covered is not None:
                doc["bindings"] = covered.hex()
            self.buffer.put("quote", doc)
            self.stats.quotes += 1
            self._wake.set()

    async def _bindings(self) -> tuple[dict[str, Any] | None, bytes | None]:
        """The process bindings document of the GPU processes now and its digest (the quote covers it), or
        (None, None) when there is no GPU process to bind."""
        pids = set(self._pids) | set(self.config.bind_pids)
        if not pids:
            return None, None
        procs = await asyncio.to_thread(bind_all, pids)
        doc: dict[str, Any] = {"t_ns": time.time_ns(), "processes": [p.to_wire() for p in procs]}
        return doc, hashlib.sha256(bindings_bytes(doc)).digest()

    async def _ship_ima(self) -> None:
        if not self._ima_ready:
            return
        try:
            start, data = await asyncio.to_thread(self.ima.read)
        except TmbError as exc:
            log.warning("%s", exc.diagnostics())
            return
        for i in range(0, len(data), IMA_CHUNK):
            chunk = data[i : i + IMA_CHUNK]
            self.buffer.put("ima", {"offset": start + i, "data": base64.b64encode(chunk).decode()})

    # ----------------------------------------------------------------------------------------- send

    def _url(self, what: str) -> str:
        return f"{self.config.daemon_url.rstrip('/')}/v1/ingest/{urlquote(self.config.node, safe='')}/{what}"

    def _refuse(self, refusal: Finding) -> None:
        """Count, keep and log a refused answer; the same refusal again is logged once a minute."""
        self.stats.answers_refused += 1
        now = time.monotonic()
        last = self._last_refusal.get(refusal.id)
        if last is not None and last[0] == refusal and now - last[1] < REPEAT_LOG_S:
            return
        self._last_refusal[refusal.id] = (refusal, now)
        self.stats.refusals.append(refusal)
        del self.stats.refusals[:-MAX_KEPT]
        log.warning("refused the daemon's answer: %s", refusal)

    async def _take_answer(self, route: str, doc: dict[str, Any]) -> int | None:
        """Take the next nonce, the quote demand and (once) the IMA offset from an answer; every value is
        checked first. Returns the answer's ``ima_offset`` when it is a sane integer."""
        nonce = doc.get("nonce")
        if nonce is not None:
            fresh = _nonce_of(nonce)
            if fresh is not None:
                if fresh not in self._used:  # a used one: wait for the next answer's
                    self._nonce = fresh
                    self._nonce_event.set()
            else:
                self._refuse(_bad_value(route, "nonce", nonce, "32 bytes of hex"))
        quote = doc.get("quote")
        if quote is not None and not isinstance(quote, bool):
            self._refuse(_bad_value(route, "quote", quote, "a boolean"))
        elif quote:
            self._quote_now = True
            self._nonce_event.set()
        if "eventlog" in doc:  # before any await: queued ahead of the quote the nonce above allows
            self._offer_eventlog(route, doc["eventlog"])
        offset = doc.get("ima_offset")
        if offset is not None and (
            not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_IMA_OFFSET
        ):
            self._refuse(_bad_value(route, "ima_offset", offset, "a non-negative integer"))
            offset = None
        if offset is not None and not self._ima_ready and await self._offset_in_log(route, offset):
            self.ima.rewind(offset)
            self._ima_ready = True
        elif (
            offset is not None
            and self._daemon_offset is not None
            and offset < self._daemon_offset
            and await self._offset_in_log(route, offset)
        ):
            # The daemon's offset only shrinks when it started the node's log again (a new boot epoch): a
            # probe that took an old-boot offset which happened to be a boundary of the new log would
            # otherwise never send the new log. (An answer overtaken by a later one only re-sends bytes
            # the daemon already holds, which it takes as the same.)
            self.ima.rewind(offset)
        if offset is not None:
            self._daemon_offset = offset
        return offset

    async def _offset_in_log(self, route: str, offset: int) -> bool:
        """Whether ``offset`` is a record boundary of the local IMA log (a refusal is a finding)."""
        now = time.monotonic()
        last = self._offset_refused
        if last is not None and last[0] == offset and now - last[1] < OFFSET_RECHECK_S:
            return False
        try:
            problem, boundary = await asyncio.to_thread(self.ima.check_offset, offset)
        except TmbError as exc:
            self._offset_refused = (offset, now)
            log.warning("cannot check the daemon's ima_offset against the IMA log:\n%s", exc.diagnostics())
            return False
        if problem is None:
            self._offset_refused = None
            return True
        self._offset_refused = (offset, now)
        self._refuse(
            _refusal(
                "probe.answer_ima_offset_outside_log",
                f"the daemon's ima_offset {offset} is not a record boundary of the local IMA log ({problem})",
                route=route,
                offset=offset,
                problem=problem,
                boundary=boundary,
                path=str(self.ima.path),
            )
        )
        return False

    async def _send_loop(self, http: aiohttp.ClientSession) -> None:
        backoff = SEND_BACKOFF[0]
        while True:
            items = self.buffer.peek(MAX_BATCHES_PER_POST)
            if not items and self._nonce is not None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # not wait_for: on 3.11 it can swallow a cancel
                        await self._wake.wait()
                continue
            try:
                if not items:
                    status, doc = await self._request(http, "GET", "nonce", None)
                    sent: list[Item] = []
                else:
                    status, doc, sent = await self._post(http, items)
            except _Refused as exc:
                self._refuse(exc.finding)
                self.stats.send_errors += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, SEND_BACKOFF[1])
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.stats.send_errors += 1
                log.info("daemon unreachable (retrying in %.1f s): %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, SEND_BACKOFF[1])
                continue
            route = _ROUTES[sent[0].kind] if sent else "nonce"
            offset = await self._take_answer(route, doc) if doc is not None else None
            if status in (401, 429):  # not the evidence's fault: keep it, enrol again (401), retry later
                error = (doc or {}).get("error")
                if status == 401 and isinstance(error, dict) and error.get("type") in _KEY_UNKNOWN:
                    self._forget_key()  # not for auth.stale (a clock off) or auth.replayed: the key is fine
                self.stats.send_errors += 1
                await asyncio.sleep(max(backoff, 1.0))
                backoff = min(backoff * 2, SEND_BACKOFF[1])
                continue
            if status >= 500:
                self.stats.send_errors += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, SEND_BACKOFF[1])
                continue
            if not sent:
                if status >= 400 or self._nonce is None:  # e.g. node not registered yet; no usable nonce
                    await asyncio.sleep(max(backoff, 1.0) if status >= 400 else backoff)
                    backoff = min(backoff * 2, SEND_BACKOFF[1])
                else:
                    backoff = SEND_BACKOFF[0]
                continue
            backoff = SEND_BACKOFF[0]
            await self._settle(status, doc or {}, sent, offset)

    async def _ensure_key(self, http: aiohttp.ClientSession) -> bytes:
        """The evidence key; enrols first when there is none (docs/probe.md, "Node identity")."""
        async with self._enrol_lock:
            if self._key is not None:
                return self._key

            async def post(route: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
                return await self._request(http, "POST", route, doc, sign=False)

            try:
                key, answer = await enrol(self.config.node, self.config.ak_handle, post, self._in_tpm_thread)
            except EnrolError as exc:
                raise _Refused(exc.finding) from None
            except (TpmError, TimeoutError) as exc:
                raise _Refused(
                    _refusal("probe.enrol_tpm_failed", f"enrolment: the TPM failed: {exc}", error=_show(exc))
                ) from None
            save_key(self.config.state_dir, self.config.node, key)
            self._key = key
            log.info("enrolled with the daemon: %s", _show(answer, 300))
            return key

    def _forget_key(self) -> None:
        """The daemon no longer knows the key (401): enrol again before the next request."""
        if self.config.enroll and self._key is not None:
            log.warning("the daemon refused the evidence key: enrolling again")
            self._key = None
            save_key(self.config.state_dir, self.config.node, None)

    async def _request(
        self, http: aiohttp.ClientSession, method: str, what: str, body: Any, *, sign: bool = True
    ) -> tuple[int, dict[str, Any] | None]:
        """``(status, JSON object)``; raises :class:`_Refused` for an answer too large, too slow or (below
        500) not a JSON object. A 5xx answer's body may be anything (None)."""
        limit_s = self.config.http_timeout_s
        kw: dict[str, Any] = {}
        raw = json.dumps(body).encode() if body is not None else b""
        headers: dict[str, str] = {}
        if body is not None:  # a stream, not one bytes object: aiohttp warns about large bodies given whole
            kw = {"data": io.BytesIO(raw)}
            headers["Content-Type"] = "application/json"
        if sign and self.config.enroll:
            key = await self._ensure_key(http)
            headers[HEADER] = sign_request(key, method, self.config.node, what, raw)
        kw["headers"] = headers
        try:
            async with asyncio.timeout(limit_s), http.request(method, self._url(what), **kw) as resp:
                status = resp.status
                declared = resp.content_length
                if declared is not None and declared > MAX_ANSWER_BYTES:
                    resp.close()
                    raise _Refused(self._too_large(what, status, declared))
                data = bytearray()
                async for chunk in resp.content.iter_any():
                    data += chunk
                    if len(data) > MAX_ANSWER_BYTES:
                        resp.close()
                        raise _Refused(self._too_large(what, status, None))
        except TimeoutError:
            raise _Refused(
                _refusal(
                    "probe.answer_timeout",
                    f"no complete answer from the daemon within http_timeout_s ({limit_s} s)",
                    route=what,
                    timeout_s=limit_s,
                )
            ) from None
        try:
            doc = json.loads(bytes(data))
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            return status, doc
        if status >= 500:
            return status, None
        raise _Refused(
            _refusal(
                "probe.answer_malformed",
                "the daemon's answer is not a JSON object",
                route=what,
                status=status,
                got=_show(bytes(data[:64])),
            )
        )

    @staticmethod
    def _too_large(route: str, status: int, declared: int | None) -> Finding:
        return _refusal(
            "probe.answer_too_large",
            f"the daemon's answer exceeds {MAX_ANSWER_BYTES} bytes; refused unread",
            route=route,
            status=status,
            limit=MAX_ANSWER_BYTES,
            **({"content_length": declared} if declared is not None else {}),
        )

    async def _post(self, http: aiohttp.ClientSession, items: list[Item]) -> tuple[int, Any, list[Item]]:
        first = items[0]
        if first.kind == "batch":
            group = []
            for item in items:
                if item.kind != "batch":
                    break
                group.append(item)
            findings: list[Finding] = self.buffer.take_findings()
            body = {"batches": [i.doc for i in group], "probe_findings": [f.to_dict() for f in findings]}
            try:
                status, doc = await self._request(http, "POST", "batches", body)
            except BaseException:
                self.buffer.findings[:0] = findings
                raise
            if status >= 500 or status in (401, 429):  # the batches stay buffered: so do the findings
                self.buffer.findings[:0] = findings
            return status, doc, group
        status, doc = await self._request(http, "POST", _ROUTES[first.kind], first.doc)
        return status, doc, [first]

    async def _settle(self, status: int, doc: dict[str, Any], sent: list[Item], offset: int | None) -> None:
        kind = sent[0].kind
        if status >= 400:
            raw = doc.get("findings", [])
            if not isinstance(raw, list):
                self._refuse(_bad_value(_ROUTES[kind], "findings", raw, "a list of findings"))
                raw = []
            findings = [f for f in raw if isinstance(f, dict)][:MAX_FINDINGS_KEPT]
            self.stats.refused.append({"status": status, "kind": kind, "findings": findings})
            del self.stats.refused[:-MAX_KEPT]
            log.warning("daemon refused %s evidence (%s): %s", kind, status, _show(findings, 1000))
            ids = {f.get("id") for f in findings}
            if kind == "batch":
                self._new_segment = True
            elif kind == "ima" and "ima.delta_gap" in ids:
                if offset is not None and await self._offset_in_log("ima", offset):
                    self.ima.rewind(offset)
            elif kind == "quote":
                self._quote_now = True
                if "ingest.nonce_reused" not in ids:  # the daemon did not consume it: it may be used again
                    used = _nonce_of(sent[0].doc.get("nonce"))
                    if used is not None:
                        self._used.pop(used, None)
            elif kind == "eventlog":
                self._eventlog_refused = str(sent[0].doc.get("sha256"))
        for item in sent:
            self.buffer.ack(item)
            if status < 400 and item.kind == "batch":
                self.stats.batches_acked += 1
            elif status < 400 and item.kind == "quote":
                self.stats.quotes_acked += 1
