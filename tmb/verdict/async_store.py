"""The store for asyncio code: group commit, the span fast path, long-poll wake-ups (see :class:`AsyncStore`).

The tables and what each ``[store] sync`` mode survives are described in :mod:`tmb.verdict.store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tmb.spans import Span
from tmb.verdict import tlog
from tmb.verdict.model import Verdict
from tmb.verdict.store import Cursor, EvidenceRef, KnownKey, Store, StoreError, VerdictRecord, Write

log = logging.getLogger("tmb.store")


class Backend(Protocol):
    """What :class:`AsyncStore` needs of a store: :class:`Store` (SQLite) or ``store_pg.PgStore``."""

    def write_batch(self, writes: Sequence[Write]) -> None: ...
    def lookup(self, request_id: str) -> VerdictRecord: ...
    def evidence(self, request_id: str) -> list[EvidenceRef]: ...
    def pending(self, limit: int = 1000) -> list[str]: ...
    def pending_spans(
        self, after: Cursor | None = None, *, before_ns: int | None = None, limit: int = 500
    ) -> tuple[list[Span], Cursor | None]: ...
    def remember_key(self, public_key: bytes, key_id: str, now_ns: int | None = None) -> None: ...
    def known_keys(self) -> list[KnownKey]: ...
    def verdict_signers(self) -> list[str]: ...
    def counts(self) -> dict[str, int]: ...
    def prune(self, before_ns: int) -> int: ...
    def close(self) -> None: ...
    def log_size(self) -> int: ...
    def log_root(self, size: int) -> bytes: ...
    def log_inclusion(self, index: int, size: int) -> list[bytes]: ...
    def log_consistency(self, old: int, new: int) -> list[bytes]: ...
    def add_checkpoint(self, size: int, root: bytes, note: str, now_ns: int | None = None) -> None: ...
    def latest_checkpoint(self) -> tlog.StoredCheckpoint | None: ...
    def log_proof(self, request_id: str) -> tuple[tlog.LogEntry | None, tlog.LogProof | None]: ...


class AsyncStore:
    """A store for asyncio code: group commit, long-poll wake-ups on publish.

    Over a SQLite :class:`Store` with ``sync="normal"`` (inline mode), writes run on the event loop's own
    thread: every write queued during one loop iteration is committed in one transaction at the start of the
    next (``write()`` to the WAL, no fsync); verdict writes, which no response waits for, gather for
    ``LINGER_S`` and then commit together (with the spans queued at that moment), so a batch of verdicts
    shares the pages it writes, :data:`VERDICT_CHUNK` a transaction and one transaction per iteration (the
    loop relays requests between); reads run at once, and a background thread checkpoints the WAL every second
    on its own connection (:meth:`_checkpoint_round`: under steady load it holds the commits for one short
    catch-up pass, so the WAL starts over instead of growing). Otherwise (``sync="full"``, or another backend
    such as PostgreSQL) every call is queued to one dedicated thread: writes queued while a transaction
    commits are written together in the next one (one ``COMMIT``, one fsync, one wake-up of the event loop for
    the whole group); other calls (reads, prune) run one by one after the group's commit, in the order queued.
    Either way a caller's future resolves only after the transaction holding its write committed, so the ``ack
    = "commit"`` guarantee holds per write.
    """

    def __init__(self, target: str | Path | Backend, *, sync: str = "normal", init: bool = False) -> None:
        """``target``: a SQLite path (opened with ``sync``; ``init`` accepts an empty file, see
        :class:`Store`) or an open backend."""
        self.store: Backend = (
            Store(target, sync=sync, init=init) if isinstance(target, str | Path) else target
        )
        self.inline = isinstance(self.store, Store) and self.store.sync == "normal"
        if isinstance(self.store, Store) and self.inline:
            self.store.db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._batch: list[_Op] = []  # inline mode: writes waiting for the next loop iteration
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False  # the pending flush is for the next iteration (not LINGER_S away)
        self._later: list[_Op] = []  # inline mode: verdict writes gathering for LINGER_S (see _submit)
        self._later_handle: asyncio.TimerHandle | None = None
        self._draining: deque[_Op] = deque()  # inline mode: gathered verdict writes, VERDICT_CHUNK a commit
        self._drain_handle: asyncio.Handle | None = None
        self._spans: list[Span] | None = None  # add_span: the spans of the write being gathered
        self._spans_future: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # inline mode: the loop that commits
        self._held = False  # inline mode: commits wait while the checkpointer catches up (_hold)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        if self.inline:
            self._thread = threading.Thread(target=self._checkpointer, name="tmb-store-ckpt", daemon=True)
        else:
            self._thread = threading.Thread(target=self._writer, name="tmb-store", daemon=True)
        self._thread.start()

    def _submit(self, kind: int, payload: Any, *, soon: bool = True) -> asyncio.Future[Any]:
        if self._stop.is_set():  # the writer thread is gone: a queued call would wait forever
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self.inline and kind == _WRITE:
            self._loop = loop
            if not soon:  # nobody's response waits: gathered for LINGER_S, then committed together
                self._later.append((kind, payload, fut))
                if self._later_handle is None:
                    self._later_handle = loop.call_later(LINGER_S, self._flush_later)
            else:  # a response waits for this write: next iteration
                self._batch.append((kind, payload, fut))
                if not self._flush_soon:
                    self._flush_handle = loop.call_soon(self._flush)
                    self._flush_soon = True
        else:
            self._queue.put((kind, payload, fut))
        return fut

    def _flush_later(self) -> None:
        """Inline mode: the gathered verdict writes commit now, with the spans queued at this moment; at most
        :data:`VERDICT_CHUNK` verdicts a transaction, the rest in the next loop iterations (:meth:`_drain`),
        so that requests and span commits go on between: a burst of verdicts never holds the loop for the
        milliseconds one transaction of hundreds of them takes."""
        self._later_handle = None
        self._draining.extend(self._later)
        self._later = []
        if self._drain_handle is None:  # else the chunks already under way take these too
            self._drain()

    def _drain(self, *, again: bool = True) -> None:
        """Inline mode: commit the next chunk of :attr:`_draining` (and the spans queued); the rest next
        iteration (``again``; closing, the caller takes them at once). While the checkpointer holds the
        commits nothing is taken: :meth:`_release` goes on."""
        self._drain_handle = None
        if self._held or not self._draining:
            return
        verdicts = 0
        while self._draining and verdicts < VERDICT_CHUNK:
            op = self._draining.popleft()
            self._batch.append(op)
            verdicts += len(_writes(op))
        if self._draining and again:
            assert self._loop is not None  # noqa: S101 (set by the first write)
            self._drain_handle = self._loop.call_soon(self._drain)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def _flush(self) -> None:
        """Inline mode: commit the writes queued since the last flush, in one transaction."""
        if self._held:  # the checkpointer is catching up: the writes stay queued until _release
            self._flush_handle, self._flush_soon = None, False
            return
        batch, self._batch, self._flush_handle, self._flush_soon = self._batch, [], None, False
        self._spans = None  # gathered spans are in this batch: the next add_span starts a new write
        if batch:
            _resolve(_commit(self.store, batch))

    async def _run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` against the store: at once in inline mode, else on the store's thread."""
        if self._stop.is_set():
            raise StoreError("the store is closed")
        if self.inline:
            return fn(*args)
        return await self._submit(_CALL, (fn, args))

    def _writer(self) -> None:
        q, store = self._queue, self.store
        while True:
            first = q.get()
            if first is None:
                return
            ops = [first]
            stop = False
            while True:
                try:
                    op = q.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                ops.append(op)
            done = _commit(store, [op for op in ops if op[0] != _CALL])
            for kind, payload, fut in ops:
                if kind == _CALL:
                    fn, args = payload
                    try:
                        done.append((fut, None, fn(*args)))
                    except Exception as exc:
                        done.append((fut, exc, None))
            _post(done)
            if stop:
                return

    def _checkpointer(self) -> None:
        """Inline mode: copy the WAL into the database file every second (the fsyncs happen here)."""
        assert isinstance(self.store, Store)  # noqa: S101 (SQLite-only path)
        try:
            db = sqlite3.connect(self.store.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.exception("store checkpointer cannot open %s", self.store.path)
            return
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    self._checkpoint_round(db)
                except sqlite3.Error as exc:  # busy or full disk: the next round tries again
                    log.warning("store checkpoint failed: %s", exc)
        finally:
            db.close()

    def _checkpoint_round(self, db: sqlite3.Connection) -> None:
        """One round of the checkpointer (on its thread, with its connection ``db``).

        A passive checkpoint copies the WAL's frames into the database file while the loop goes on
        committing. The WAL starts over (its next commit writes from the start of the file) only once every
        frame was copied; under steady load a commit always lands during the pass (its fsyncs take
        milliseconds), so the WAL would grow without end: gigabytes in minutes, and every page the loop
        reads costs more the longer it gets. So when the WAL holds :data:`WAL_RESTART_FRAMES` or more after
        the pass, more passes copy what was committed during the last one until that is at most
        :data:`HELD_PASS_FRAMES` (or :data:`CATCH_UP_PASSES` were made), then the loop holds its commits
        (:meth:`_hold`: writes queue, the requests waiting for them wait) for a last pass that copies the
        few frames committed meanwhile (nothing, and no fsync, when none was), at
        most :data:`HOLD_MAX_S`; the next commit then starts the WAL over. Commits are held, never lost, and
        a request is still acknowledged only once its write committed."""
        log_frames, _ = _passive_checkpoint(db)  # the WAL's length when the pass began
        if log_frames < WAL_RESTART_FRAMES:  # it started over lately: commits will not be held
            return
        for _ in range(CATCH_UP_PASSES):  # shorten the tail the held pass copies (each pass copies what
            began = log_frames  # was committed during the last one, mostly less and less)
            log_frames, _ = _passive_checkpoint(db)
            if log_frames - began <= HELD_PASS_FRAMES:
                break
        loop = self._loop
        if loop is None:
            return
        held = threading.Event()
        try:
            loop.call_soon_threadsafe(self._hold, held)
        except RuntimeError:  # the loop is closed
            return
        try:
            if held.wait(HOLD_MAX_S) and self._held:
                _passive_checkpoint(db)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._release)

    def _hold(self, held: threading.Event) -> None:
        """On the loop: no commit runs from now until :meth:`_release` (or :data:`HOLD_MAX_S`)."""
        if self._stop.is_set():  # closing: nothing is held, and the checkpointer need not wait
            held.set()
            return
        self._held = True
        assert self._loop is not None  # noqa: S101 (set by the first write)
        self._hold_timer = self._loop.call_later(HOLD_MAX_S, self._release)
        held.set()

    def _release(self) -> None:
        """On the loop: commit what queued while held."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if not self._held:
            return
        self._held = False
        if self._batch and not self._flush_soon:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush()
        if self._draining and self._drain_handle is None and self._loop is not None:
            self._drain_handle = self._loop.call_soon(self._drain)

    async def record_spans(self, spans: Sequence[Span]) -> None:
        await self._submit(_WRITE, (spans, None))

    def add_span(self, span: Span) -> asyncio.Future[None]:
        """Queue ``span`` for the next group commit, without a task or a queue hop (the proxy's hot path).

        Every span added during one loop iteration goes into the same write: they share the returned
        future, which resolves once that write committed (or fails for all of them)."""
        if self._spans is not None:
            self._spans.append(span)
            assert self._spans_future is not None  # noqa: S101
            return self._spans_future
        spans = [span]
        self._spans = spans
        if self.inline:  # the flush reads the list at the next iteration: it can keep growing until then
            self._spans_future = self._submit(_WRITE, (spans, None))
        else:  # the writer thread may take a queued write at once: queue the list once it is complete
            loop = asyncio.get_running_loop()
            self._spans_future = loop.create_future()
            loop.call_soon(self._seal_spans)
        return self._spans_future

    def _seal_spans(self) -> None:
        spans, fut = self._spans, self._spans_future
        self._spans = None
        if spans and fut is not None:
            self._queue.put((_WRITE, (spans, None), fut))

    async def publish(self, verdict: Verdict, evidence: Sequence[EvidenceRef] = ()) -> None:
        """The engine's write: store the final signed verdict, then wake whoever waits for it."""
        await self.publish_many([(verdict, evidence)])

    async def publish_many(self, finals: Sequence[tuple[Verdict, Sequence[EvidenceRef]]]) -> None:
        """Several final verdicts in one write (they commit together), then wake whoever waits for them."""
        if not finals:
            return
        if any(not verdict.signature for verdict, _ in finals):
            raise ValueError("refusing to store an unsigned verdict")
        await self._submit(_WRITE, [(None, final) for final in finals], soon=False)
        for verdict, _ in finals:
            for fut in self._waiters.pop(verdict.request_id, ()):
                if not fut.done():
                    fut.set_result(None)

    async def lookup(self, request_id: str) -> VerdictRecord:
        rec: VerdictRecord = await self._run(self.store.lookup, request_id)
        return rec

    async def wait(self, request_id: str, timeout_s: float) -> VerdictRecord:
        """Like :meth:`lookup`, but while pending wait up to ``timeout_s`` for the final verdict."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(request_id, set()).add(fut)
            try:
                rec = await self.lookup(request_id)
                remaining = deadline - loop.time()
                if rec.state != "pending" or remaining <= 0:
                    return rec
                # re-check at least once a second (another daemon may share the store)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, min(remaining, 1.0))
            finally:
                waiters = self._waiters.get(request_id)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._waiters[request_id]

    async def evidence(self, request_id: str) -> list[EvidenceRef]:
        refs: list[EvidenceRef] = await self._run(self.store.evidence, request_id)
        return refs

    async def pending(self, limit: int = 1000) -> list[str]:
        ids: list[str] = await self._run(self.store.pending, limit)
        return ids

    async def pending_spans(
        self, after: Cursor | None = None, *, before_ns: int | None = None, limit: int = 500
    ) -> tuple[list[Span], Cursor | None]:
        """One page of the spans waiting for a verdict, and the next page's cursor (see
        ``Store.pending_spans``)."""
        page: tuple[list[Span], Cursor | None] = await self._run(
            lambda: self.store.pending_spans(after, before_ns=before_ns, limit=limit)
        )
        return page

    async def remember_key(self, public_key: bytes, key_id: str) -> None:
        """Record the verdict public key the daemon signs with (published at ``/v1/keys`` from then on)."""
        await self._run(self.store.remember_key, public_key, key_id)

    async def known_keys(self) -> list[KnownKey]:
        keys: list[KnownKey] = await self._run(self.store.known_keys)
        return keys

    async def verdict_signers(self) -> list[str]:
        ids: list[str] = await self._run(self.store.verdict_signers)
        return ids

    async def prune(self, before_ns: int) -> int:
        if not self.inline:
            n: int = await self._run(self.store.prune, before_ns)
            return n
        assert isinstance(self.store, Store)  # noqa: S101 (SQLite-only path)
        total = 0
        while True:  # in slices, so the loop (and the proxy on it) never stalls for a big purge
            n = self.store.prune(before_ns, limit=PRUNE_SLICE)
            total += n
            if n < PRUNE_SLICE:
                return total
            await asyncio.sleep(0)

    # -- the verdict transparency log ----------------------------------------------------------------

    async def log_head(self) -> tuple[int, bytes]:
        """The log's size and root now."""

        def read() -> tuple[int, bytes]:
            size = self.store.log_size()
            return size, self.store.log_root(size)

        head: tuple[int, bytes] = await self._run(read)
        return head

    async def log_inclusion(self, index: int, size: int) -> list[bytes]:
        proof: list[bytes] = await self._run(self.store.log_inclusion, index, size)
        return proof

    async def log_consistency(self, old: int, new: int) -> list[bytes]:
        proof: list[bytes] = await self._run(self.store.log_consistency, old, new)
        return proof

    async def add_checkpoint(self, size: int, root: bytes, note: str) -> None:
        await self._run(self.store.add_checkpoint, size, root, note)

    async def latest_checkpoint(self) -> tlog.StoredCheckpoint | None:
        checkpoint: tlog.StoredCheckpoint | None = await self._run(self.store.latest_checkpoint)
        return checkpoint

    async def log_proof(self, request_id: str) -> tuple[tlog.LogEntry | None, tlog.LogProof | None]:
        found: tuple[tlog.LogEntry | None, tlog.LogProof | None] = await self._run(
            self.store.log_proof, request_id
        )
        return found

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = await self._run(self.store.counts)
        return counts

    async def close(self) -> None:
        """Finish what is queued, stop the thread, close the store."""
        if self._spans is not None and not self.inline:
            self._seal_spans()
        self._release()
        if self._later_handle is not None:
            self._later_handle.cancel()
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        self._draining.extend(self._later)
        self._later = []
        while self._draining and not self._held:  # every gathered verdict commits before the store closes
            self._drain(again=False)
        self._flush()
        self._stop.set()
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
        if self.inline:
            assert isinstance(self.store, Store)  # noqa: S101 (SQLite-only path)
            with contextlib.suppress(sqlite3.Error):
                self.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.store.close()


CHECKPOINT_INTERVAL_S = 1.0
WAL_RESTART_FRAMES = 16384  # inline mode: a WAL this long (64 MiB of 4 KiB pages) gets a held catch-up pass
HOLD_MAX_S = 0.5  # inline mode: the longest commits are held for the checkpointer's catch-up pass
CATCH_UP_PASSES = 4  # inline mode: passes without holding, before the held one, to shorten what it copies
HELD_PASS_FRAMES = 256  # inline mode: a tail this short (1 MiB) is left to the held pass
# inline mode: how long verdict writes gather before they commit together. No response waits for them (a
# verdict is decided a second or more after its request when evidence is configured); the pages a batch of
# verdicts writes (the log's tree levels, the tails of the tables) are shared by more of them the longer.
LINGER_S = 0.05
# inline mode: at most this many gathered verdicts commit in one transaction (about 1 ms of the event loop
# on a 2-core VM); a burst of them commits in chunks, one per loop iteration, so requests are not held behind
# it (one transaction of the ~360 verdicts a 50 ms linger gathers at 6,000 requests/s held the loop ~7 ms)
VERDICT_CHUNK = 64
PRUNE_SLICE = 2000


def _commit(store: Backend, writes: list[_Op]) -> list[tuple[asyncio.Future[Any], BaseException | None, Any]]:
    """Commit ``writes`` in one transaction; when that fails, each on its own (the good ones still land)."""
    if not writes:
        return []
    try:
        store.write_batch([w for op in writes for w in _writes(op)])
        return [(op[2], None, None) for op in writes]
    except Exception:
        done: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        for op in writes:
            try:
                store.write_batch(_writes(op))
                done.append((op[2], None, None))
            except Exception as exc:
                done.append((op[2], exc, None))
        return done


def _writes(op: _Op) -> list[Write]:
    """A write op's payload as a list: one Write, or the list of them ``publish_many`` queued."""
    return op[1] if isinstance(op[1], list) else [op[1]]


def _passive_checkpoint(db: sqlite3.Connection) -> tuple[int, int]:
    """``PRAGMA wal_checkpoint(PASSIVE)``: (frames in the WAL, frames copied into the database file)."""
    row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
    return int(row[1]), int(row[2])


_WRITE, _CALL = 0, 1
_Op = tuple[int, Any, "asyncio.Future[Any]"]


def _post(done: list[tuple[asyncio.Future[Any], BaseException | None, Any]]) -> None:
    """Resolve futures from the writer thread: one ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], BaseException | None, Any]]] = {}
    for item in done:
        by_loop.setdefault(item[0].get_loop(), []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[Any], BaseException | None, Any]]) -> None:
    for fut, exc, value in items:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
