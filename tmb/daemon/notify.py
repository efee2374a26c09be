"""Signed webhook notifications: the daemon tells receivers about :mod:`tmb.events` (docs/verdict.md,
"Notifications").

:class:`Notifier` is an :data:`~tmb.events.EventSink`. :meth:`Notifier.emit` records the event in the
durable outbox (:mod:`tmb.daemon.outbox`, one fsynced SQLite commit) and returns: that is the
acknowledgement, surviving kill -9 and restarts. It never raises (a failure to record is logged and counted
as ``tmb_notify_lost``) and may be called from any thread (the ingest's workers, the event loop).

The delivery task (:meth:`Notifier.start` / :meth:`Notifier.stop`, run by the daemon's lifecycle) POSTs each
event to every ``[notify] urls`` receiver, at most :data:`CONCURRENCY` at once:

* the body is JSON (``format: "tmb-notification/1"``: the notification id, the outbox sequence number, the
  daemon's identity, the event, the time of this attempt, the receiver's URL), signed with the daemon's
  verdict key (Ed25519 over the exact body bytes; the public key is served at ``GET /v1/keys``). Headers
  repeat the id and time and carry the key id and the signature (:func:`signed_request`);
* a 2xx is delivered; a 4xx other than 408 and 429 is a permanent refusal (the delivery is dead at once);
  anything else (another status, a refused connection, ``timeout_s`` passing) is retried after
  ``backoff_s * 2^(attempts-1)`` (at most ``max_backoff_s``) times a jitter factor in [0.5, 1), until
  ``max_attempts`` attempts or ``max_age_s`` after the event, when the delivery is dead (``tmb_notify_dead``);
* at-least-once: a delivery interrupted by a crash or a lost response is sent again, with the same id and
  sequence number; receivers dedupe on the id (:func:`verify_notification` checks the rest).

Receivers check a notification with :func:`verify_notification` (and the keys of ``GET /v1/keys`` read by
:func:`keys_from_document`), or in any language as docs/verdict.md shows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from time import time_ns
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tmb.config import Config, NotifyConfig, notify_url_label
from tmb.daemon.metrics import NotifyMetrics
from tmb.daemon.outbox import Delivery, Outbox
from tmb.errors import TmbError
from tmb.events import Event
from tmb.verdict.signing import Signer

__all__ = [
    "FORMAT",
    "NotificationError",
    "Notifier",
    "keys_from_document",
    "notify_db_path",
    "signed_request",
    "verify_notification",
]

log = logging.getLogger("tmb.notify")

FORMAT = "tmb-notification/1"
CONCURRENCY = 8  # deliveries in flight at once
IDLE_S = 30.0  # the delivery task looks at the outbox at least this often (a sibling process, a clock jump)
MAX_EVENT_BYTES = 64 * 1024  # an event's encoded size; larger data is replaced by a note saying so
MAX_DEPTH = 16  # nesting kept in an event's data
MAX_BODY_BYTES = 1024 * 1024  # verify_notification refuses larger bodies
TOLERANCE_S = 300.0  # verify_notification: how far the attempt's time may be from the receiver's clock
H_ID, H_TIME, H_KEY, H_SIG = "Tmb-Notification-Id", "Tmb-Timestamp", "Tmb-Key-Id", "Tmb-Signature"
SIG_PREFIX = "ed25519="


def notify_db_path(config: Config) -> Path:
    """``[notify] db``, else beside the verdict store's file: ``tmb.sqlite3`` -> ``tmb.notify.sqlite3``."""
    if config.notify.db:
        return Path(config.notify.db)
    store = Path(config.store.path)
    return store.with_name(store.stem + ".notify.sqlite3")


def backoff_s(settings: NotifyConfig, attempts: int, jitter: float) -> float:
    """The wait after the ``attempts``-th failed attempt: exponential, capped, times ``0.5 + jitter/2``
    (``jitter`` in [0, 1): the receivers a crowd of daemons retries against are not hit in step)."""
    base = settings.backoff_s * 2.0 ** min(attempts - 1, 60)
    return min(settings.max_backoff_s, base) * (0.5 + 0.5 * jitter)


def retry_after_s(value: str) -> float | None:
    """A ``Retry-After`` header's delay in seconds (delta-seconds only; an HTTP date or junk: None)."""
    value = value.strip()
    if not value.isdigit() or len(value) > 9:
        return None
    return float(int(value))


def classify(status: int) -> str:
    """``delivered`` (2xx), ``rejected`` (4xx other than 408 Request Timeout and 429 Too Many Requests: the
    receiver will never take it) or ``retry``."""
    if 200 <= status < 300:
        return "delivered"
    if 400 <= status < 500 and status not in (408, 429):
        return "rejected"
    return "retry"


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON data: mappings with string keys, lists, finite numbers, strings; bytes as
    hex, anything else (and non-finite floats, nesting past :data:`MAX_DEPTH`) as its ``str``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return str(value)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_event(event: Event) -> str:
    """The event's JSON as the outbox keeps it, at most :data:`MAX_EVENT_BYTES` (larger data is replaced
    by ``{"truncated": true, "bytes": n}``)."""
    doc = _jsonable(event.to_dict())
    text = _dumps(doc)
    size = len(text.encode())
    if size > MAX_EVENT_BYTES:
        log.warning(
            "the %s event about %s carries %d bytes of data: sent without it", event.kind, event.subject, size
        )
        doc["data"] = {"truncated": True, "bytes": size}
        doc["subject"] = doc["subject"][:1024]
        text = _dumps(doc)
    return text


def signed_request(
    signer: Signer, origin: str, delivery: Delivery, sent_ns: int
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt of ``delivery``: the body's canonical JSON (sorted keys, no
    whitespace, UTF-8) and the signature over exactly those bytes."""
    doc = {
        "format": FORMAT,
        "id": delivery.id,
        "seq": delivery.seq,
        "daemon": {"origin": origin, "key_id": signer.key_id},
        "event": json.loads(delivery.event),
        "recorded_ns": delivery.created_ns,
        "sent_ns": sent_ns,
        "attempt": delivery.attempts + 1,
        "to": delivery.url,
    }
    body = _dumps(doc).encode()
    signature = base64.b64encode(signer.sign_bytes(body)).decode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "tmb-notify/1",
        H_ID: delivery.id,
        H_TIME: str(sent_ns // 10**9),
        H_KEY: signer.key_id,
        H_SIG: SIG_PREFIX + signature,
    }
    return body, headers


class Notifier:
    """The daemon's :data:`~tmb.events.EventSink` (:meth:`emit`) and webhook delivery task.

    Without ``urls`` it is inert: :meth:`emit` discards, nothing is opened. ``rng`` gives the backoff's
    jitter (tests pin it)."""

    def __init__(
        self,
        settings: NotifyConfig,
        path: str | Path,
        signer: Signer,
        origin: str,
        *,
        metrics: NotifyMetrics | None = None,
        rng: Callable[[], float] = random.random,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.urls = tuple(settings.urls)
        self.kinds = frozenset(settings.kinds)
        self.signer = signer
        self.origin = origin
        self.rng = rng
        self.ssl_context = ssl_context
        self.outbox = Outbox(path, max_events=settings.max_queued) if self.urls else None
        self.metrics: NotifyMetrics | None = None
        if metrics is not None:
            self.set_metrics(metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    def set_metrics(self, metrics: NotifyMetrics) -> None:
        """Count in ``metrics`` (the daemon's registry) from now on, the outbox's sizes included."""
        if metrics is self.metrics:
            return
        self.metrics = metrics
        if self.outbox is not None:
            metrics.watch(self.outbox.counts)

    # -- the sink ----------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Record ``event`` for every receiver (durable when this returns) and wake the delivery task.
        Never raises; an event of a kind ``[notify] kinds`` leaves out is not recorded."""
        if self.outbox is None:
            return
        try:
            if self.kinds and event.kind not in self.kinds:
                return
            added = self.outbox.add(encode_event(event), event.kind, self.urls, time_ns())
        except Exception:
            if self.metrics is not None:
                self.metrics.lost.inc()
            what = getattr(event, "kind", type(event).__name__)
            log.exception(
                "cannot record the %s event about %r: it is lost", what, getattr(event, "subject", "")
            )
            return
        if self.metrics is not None:
            self.metrics.recorded.labels(event.kind).inc()
            self.metrics.dropped.inc(len(added.dropped))
        for seq, kind in added.dropped:
            log.error(
                "notification outbox full ([notify] max_queued = %d): dropped undelivered event %d (%s)",
                self.settings.max_queued,
                seq,
                kind,
            )
        self._poke()

    __call__ = emit

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the next start delivers
            loop.call_soon_threadsafe(wake.set)

    # -- the delivery task -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start delivering (call inside the running loop); deliveries to URLs no longer configured are
        marked dead first."""
        if self.outbox is None or self._task is not None:
            return
        try:
            abandoned = await asyncio.to_thread(self.outbox.abandon_other_urls, self.urls)
        except Exception:  # the delivery task logs the outbox's trouble too; the daemon starts anyway
            log.exception("cannot mark deliveries to removed URLs dead")
            abandoned = 0
        if abandoned:
            log.warning("%d notification deliveries to URLs no longer in [notify] urls are dead", abandoned)
            if self.metrics is not None:
                self.metrics.dead.labels("url_removed").inc(abandoned)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            connector=aiohttp.TCPConnector(limit=CONCURRENCY, ssl=self.ssl_context or True),
        )
        self._stopping = False
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        """Stop delivering: attempts in flight are cancelled and stay pending (sent again at the next
        start: at-least-once)."""
        self._stopping = True  # the loop checks it too (a cancel is not its only way out)
        if self._wake is not None:
            self._wake.set()
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        while tasks:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks = list(self._inflight.values())
        self._task = None
        self._loop = self._wake = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def close(self) -> None:
        """Close the outbox (after :meth:`stop`); later events are logged as lost."""
        if self.outbox is not None:
            self.outbox.close()

    async def _run(self) -> None:
        assert self.outbox is not None and self._wake is not None  # noqa: S101 (set by start)
        outbox, wake = self.outbox, self._wake
        loop = asyncio.get_running_loop()
        while not self.stopping():
            wake.clear()
            wait = IDLE_S
            try:
                free = CONCURRENCY - len(self._inflight)
                due = (
                    await asyncio.to_thread(outbox.due, time_ns(), free, list(self._inflight)) if free else []
                )
                if self.stopping():  # stop() ran while the outbox was read: start nothing more
                    break
                for d in due:
                    task = loop.create_task(self._attempt(d))
                    self._inflight[d.key] = task
                    task.add_done_callback(functools.partial(self._done, d.key))
                if len(self._inflight) < CONCURRENCY:
                    nxt = await asyncio.to_thread(outbox.next_due_ns, list(self._inflight))
                    if nxt is not None:
                        wait = min(IDLE_S, max(0.0, (nxt - time_ns()) / 1e9))
            except Exception:
                log.exception("the notification outbox cannot be read")
            if wait > 0 and not wake.is_set():
                waiter = loop.create_task(wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=wait)
                finally:
                    waiter.cancel()

    def stopping(self) -> bool:
        return self._stopping

    def _done(self, key: tuple[int, str], _task: asyncio.Task[None]) -> None:
        self._inflight.pop(key, None)
        if self._wake is not None:
            self._wake.set()

    async def _attempt(self, d: Delivery) -> None:
        assert self.outbox is not None and self._session is not None  # noqa: S101 (set by start)
        attempts = d.attempts + 1
        asked: float | None = None  # the receiver's Retry-After (429, 503), in seconds
        try:
            body, headers = signed_request(self.signer, self.origin, d, time_ns())
            async with self._session.post(d.url, data=body, headers=headers, allow_redirects=False) as r:
                outcome, error = classify(r.status), f"HTTP {r.status}"
                if r.status in (429, 503):
                    asked = retry_after_s(r.headers.get("Retry-After", ""))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome, error = "retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a bug: keep the delivery, retry later
            log.exception("notification %d to %s failed", d.seq, notify_url_label(d.url))
            outcome, error = "retry", f"{type(exc).__name__}"
        try:
            await self._record(d, attempts, outcome, error, asked)
        except Exception:
            log.exception(
                "cannot record the outcome of notification %d to %s", d.seq, notify_url_label(d.url)
            )

    async def _record(
        self, d: Delivery, attempts: int, outcome: str, error: str, asked: float | None = None
    ) -> None:
        assert self.outbox is not None  # noqa: S101 (set by start)
        m = self.metrics
        if outcome == "delivered":
            await asyncio.to_thread(self.outbox.delivered, d.seq, d.url)
            log.debug("notification %d delivered to %s", d.seq, notify_url_label(d.url))
            if m is not None:
                m.delivered.inc()
            return
        now = time_ns()
        reason = ""
        if outcome == "rejected":
            reason = "rejected"
        elif attempts >= self.settings.max_attempts:
            reason = "attempts"
        elif now - d.created_ns >= self.settings.max_age_s * 1e9:
            reason = "age"
        if reason:
            await asyncio.to_thread(self.outbox.dead, d.seq, d.url, attempts, error)
            log.warning(
                "notification %d (%s) to %s is dead after %d attempts (%s): %s",
                d.seq,
                d.id,
                notify_url_label(d.url),
                attempts,
                reason,
                error,
            )
            if m is not None:
                m.dead.labels(reason).inc()
            return
        delay = backoff_s(self.settings, attempts, self.rng())
        if asked is not None:  # a receiver's Retry-After is honoured, within max_backoff_s
            delay = max(delay, min(asked, self.settings.max_backoff_s))
        await asyncio.to_thread(self.outbox.retry, d.seq, d.url, attempts, now + int(delay * 1e9), error)
        log.info(
            "notification %d to %s failed (%s); attempt %d in %.1f s",
            d.seq,
            notify_url_label(d.url),
            error,
            attempts + 1,
            delay,
        )
        if m is not None:
            m.retried.inc()


# -- receivers -------------------------------------------------------------------------------------------
class NotificationError(TmbError):
    """A notification that does not verify; ``reason`` is a stable id (``notify.bad_signature``, ...)."""

    def __init__(self, reason: str, message: str, **context: Any) -> None:
        super().__init__(message, reason=reason, **context)
        self.reason = reason


PublicKeys = Mapping[str, bytes] | bytes | Ed25519PublicKey


def keys_from_document(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """The daemon's public keys by key id, from its ``GET /v1/keys`` document (the current key and every
    earlier one); each key id is recomputed from the key."""
    out: dict[str, bytes] = {}
    for entry in doc.get("keys", []):
        raw = bytes.fromhex(str(entry["public_key_hex"]))
        if len(raw) != 32 or hashlib.sha256(raw).hexdigest() != entry.get("key_id"):
            raise NotificationError("notify.bad_key", "a key in the document does not match its key id")
        out[entry["key_id"]] = raw
    return out


def _header(headers: Mapping[str, str], name: str) -> str:
    for k, v in headers.items():  # HTTP header names are case-insensitive
        if k.lower() == name.lower():
            return v
    raise NotificationError("notify.missing_header", f"the {name} header is missing", header=name)


def verify_notification(
    body: bytes,
    headers: Mapping[str, str],
    keys: PublicKeys,
    *,
    now_ns: int | None = None,
    tolerance_s: float = TOLERANCE_S,
    url: str | None = None,
) -> dict[str, Any]:
    """Check one received notification and return its body as data; raise :class:`NotificationError`.

    ``keys``: the daemon's public keys by key id (:func:`keys_from_document`), or its one key (32 raw
    bytes or an ``Ed25519PublicKey``). Checks, in order: the size, the key named by ``Tmb-Key-Id``, the
    Ed25519 signature of ``Tmb-Signature`` over the exact body bytes, the body's format, that its id and key
    id are the headers', that the attempt's time (``sent_ns``) is within ``tolerance_s`` of ``now_ns``
    (replays of an old request), and, when ``url`` is given, that the notification was sent to that URL
    (one receiver's copy replayed to another). Deduplicating on ``id`` (retries, replays inside the
    tolerance) is the receiver's: keep the ids seen for twice ``tolerance_s``."""
    if len(body) > MAX_BODY_BYTES:
        raise NotificationError(
            "notify.too_large", f"the body is over {MAX_BODY_BYTES} bytes", size=len(body)
        )
    kid = _header(headers, H_KEY)
    if isinstance(keys, Mapping):
        raw = keys.get(kid)
        if raw is None:
            raise NotificationError(
                "notify.unknown_key", "the notification names a key the daemon does not publish", key_id=kid
            )
        public = Ed25519PublicKey.from_public_bytes(raw)
    else:
        public = keys if isinstance(keys, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(keys)
        own = public.public_bytes_raw()
        if hashlib.sha256(own).hexdigest() != kid:
            raise NotificationError("notify.unknown_key", "the notification names another key", key_id=kid)
    sig = _header(headers, H_SIG)
    if not sig.startswith(SIG_PREFIX):
        raise NotificationError("notify.bad_signature", f"{H_SIG} must be '{SIG_PREFIX}<base64>'")
    try:
        public.verify(base64.b64decode(sig[len(SIG_PREFIX) :], validate=True), body)
    except (InvalidSignature, binascii.Error, ValueError):
        raise NotificationError(
            "notify.bad_signature", "the signature does not verify over the body"
        ) from None
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise NotificationError("notify.not_json", "the signed body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise NotificationError("notify.wrong_format", f"the body is not a {FORMAT} notification")
    if doc.get("id") != _header(headers, H_ID):
        raise NotificationError("notify.id_mismatch", f"{H_ID} is not the body's id")
    daemon = doc.get("daemon")
    if not isinstance(daemon, dict) or daemon.get("key_id") != kid:
        raise NotificationError("notify.key_mismatch", f"{H_KEY} is not the body's daemon.key_id")
    sent = doc.get("sent_ns")
    now = time_ns() if now_ns is None else now_ns
    if not isinstance(sent, int) or isinstance(sent, bool) or abs(now - sent) > tolerance_s * 1e9:
        raise NotificationError(
            "notify.stale", f"the notification was not sent within {tolerance_s:g} s of now", sent_ns=sent
        )
    if url is not None and doc.get("to") != url:
        raise NotificationError(
            "notify.wrong_receiver", "the notification was sent to another URL", to=doc.get("to")
        )
    return doc
