"""The daemon's evidence ingest: per-node chain continuity, nonces, quotes, IMA deltas, process bindings.

:class:`Ingest` takes the probe's evidence (wire formats in docs/probe.md and :mod:`tmb.ingest.wire`),
verifies it and persists it (:mod:`tmb.ingest.store`). Every method returns an
:class:`~tmb.ingest.results.IngestResult`: taken or refused, the findings, the answer's data; nothing raises
for bad evidence, and no HTTP status is decided here (:mod:`tmb.ingest.routes` maps the refusing finding's
id to one). Finding ids that refuse evidence:

==========================  ===================================================================
ingest.unknown_node         the node is not registered (``register_node``)
ingest.ak_unregistered      the quote names an AK other than the node's registered one
ingest.malformed            a document (or a batch's payload) does not follow the wire format
ingest.nonce_unknown        the quote's nonce was never issued to this node (by any daemon on the store)
ingest.nonce_expired        issued more than ``nonce_ttl_s`` ago
ingest.nonce_reused         already consumed by an earlier verified quote: a replayed quote (the very
                            quote that consumed it, delivered again, is taken as a ``duplicate``)
ingest.quote_head_unknown   the quoted chain head is not a batch the daemon holds
chain.node_mismatch         a batch sealed for another node
chain.digest_mismatch       the digest is not the digest of the batch's fields: edited after sealing
chain.fork                  a different batch at a (segment, seq) already held, or prev != head
chain.gap                   a batch beyond the next expected one (a batch is missing)
chain.reorder               ... and the missing batch comes later in the same request
chain.unknown_segment       a non-genesis batch of a segment whose genesis was never received
ima.delta_gap               an IMA delta starting past the bytes received so far
ima.delta_conflict          an IMA delta that rewrites bytes already received
ima.pending_too_large       more unquoted IMA bytes than the daemon holds for a node
eventlog.too_large          an event log larger than 4 MiB
binding.too_large           a bindings document of more than 4096 processes or 4 MiB (canonical JSON)
eventlog.malformed          an event log some event of which does not parse (not stored)
eventlog.truncated          an event log that ends inside an event (not stored)
quote.*                     the quote's signature, nonce, PCR digest or clock failed
epoch.old_boot              after a reboot, a quote over an old-boot chain head (tmb.ingest.epochs)
ingest.store_unavailable    the store cannot be read or written (an error raised; the routes answer 503)
==========================  ===================================================================

Findings reported with evidence that is taken: ``chain.segment_unlinked`` (a new segment's genesis does not
link to the node's last head), ``pcr.mismatch`` (no entry of the received IMA log replays to the quoted
PCR 10), every ``policy.*``, ``dm.*``, ``binding.*`` finding and, on each verified quote, the boot chain's
(``boot.*``, ``eventlog.*``: :mod:`tmb.ingest.boot`, which also states the rule for a node without an event
log). Only batches covered by a verified quote over a later chain head count as attested
(:meth:`Ingest.attested_window`); a quote with any error finding attests nothing (its summary is not ``ok``).

Identity (:mod:`tmb.ingest.identity`): :meth:`Ingest.enroll` / :meth:`Ingest.activate` pin a node to its
EK and AK and set its evidence key; :meth:`Ingest.authenticate` checks an evidence request's HMAC before any
of the above runs (the routes call it). Epochs and silence: the first verified quote of a new boot restarts
the IMA replay (:mod:`tmb.ingest.epochs`); :meth:`Ingest.check_stale` finds nodes without a verified quote
for ``stale_after_s``. Events (``node.rebooted``, ``node.rekeyed``, ``node.stale``, ``node.unattested``,
``node.attested``) go to the ``events`` sink (:mod:`tmb.events`).

Concurrency: the checks run in worker threads (:meth:`Ingest.submit`), one request of a node at a time in
arrival order (a per-node :class:`asyncio.Lock`), the database behind one lock. A request that changes a
node reads its row inside its transaction, locked (:mod:`tmb.ingest.store`), so several daemons on one
PostgreSQL database take a node's evidence in turn. A verified quote that attests batches wakes the node's
waiters (:meth:`Ingest.wait_attested`); on a shared store, so does another daemon's (``LISTEN``/``NOTIFY``),
and waiters look again every :data:`RECHECK_S` in case a notification was lost.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tmb.attest.policy import RuntimePolicy
from tmb.attest.quote import AkPublic, load_ak
from tmb.attest.tpm2 import PcrValues
from tmb.errors import Finding, ParseError, Report, Severity
from tmb.events import Event, EventSink, discard
from tmb.ingest import identity as _identity
from tmb.ingest.auth import ReplayGuard
from tmb.ingest.batches import take_batches
from tmb.ingest.boot import ParsedLog, parse_eventlog
from tmb.ingest.identity import IdentityPolicy
from tmb.ingest.limits import check_probe_findings
from tmb.ingest.policy import DEFAULT_MODEL_PATTERNS, check_bindings
from tmb.ingest.quotes import QuoteCheck, check_quote
from tmb.ingest.results import AttestedWindow, IngestResult, refused, taken
from tmb.ingest.store import IngestBackend, IngestStore, NodeRow
from tmb.ingest.wakeup import Wakeups
from tmb.ingest.window import Windows
from tmb.ingest.wire import MAX_BINDINGS_BYTES, MAX_EVENTLOG_BYTES, Head, TelemetryBatch, bindings_bytes

if TYPE_CHECKING:
    from tmb.ingest.export import NonceSigner

__all__ = ["Ingest"]

MAX_IMA_PENDING = 64 * 1024 * 1024
MAX_BATCHES_PER_REQUEST = 1024
PRUNE_SLICE = 1000  # rows one retention pass deletes at most (one transaction; the ingest waits that long)
MAX_BINDING_PROCESSES = 4096  # processes of one bindings document
RECHECK_S = 2.0  # shared store: longest sleep of a waiter between looks (a lost NOTIFY only delays)
INTAKE_THREADS = 4  # threads of the evidence intake (requests of different nodes; one node's run in turn)
UNATTESTED = "unattested"  # the identity record of a node a verified quote turned unattested (_judge)

T = TypeVar("T")


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise ParseError(f"{name} must be base64 text", field=name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(f"{name} is not valid base64", field=name) from None


def _told(record: Mapping[str, Any] | None) -> bool:
    """Whether the node's ``unattested`` record says ``node.unattested`` was raised (not just a reboot)."""
    return record is not None and not record.get("rebooted")


class _NonceTaken(Exception):
    """Another transaction consumed the nonce between the check and the consumption (never under the node's
    row lock; kept as a guard)."""

    def __init__(self, nonce: bytes, message: bytes, signature: bytes) -> None:
        super().__init__("nonce taken")
        self.quote = (nonce, message, signature)


def _err(fid: str, message: str, **context: Any) -> Finding:
    return Finding(fid, message, Severity.ERROR, context)


class Ingest:
    """Evidence ingest for any number of nodes over one store: a SQLite database (path or shared
    connection) or an open backend (:func:`tmb.ingest.store.open_ingest_store`, PostgreSQL for daemons
    sharing evidence)."""

    def __init__(
        self,
        db: str | Path | sqlite3.Connection | IngestBackend,
        *,
        policy: RuntimePolicy,
        nonce_ttl_s: float = 120.0,
        pcr_bank: str = "sha256",
        model_patterns: Sequence[str] = DEFAULT_MODEL_PATTERNS,
        clock_ns: Callable[[], int] = time.time_ns,
        synchronous: str = "NORMAL",
        require_eventlog: bool = False,
        identity: IdentityPolicy | None = None,
        events: EventSink = discard,
        stale_after_s: float = 0.0,
    ) -> None:
        if isinstance(db, str | Path | sqlite3.Connection):
            self.store: IngestBackend = IngestStore(db, synchronous=synchronous)
        else:
            self.store = db
        self.policy = policy
        self.pcr_bank = pcr_bank
        self.require_eventlog = require_eventlog
        self._eventlogs: dict[str, ParsedLog] = {}  # parsed once per node and log
        self.model_patterns = tuple(model_patterns)
        self.clock_ns = clock_ns
        self.nonce_ttl_s = nonce_ttl_s
        self.policy_ref = ""  # the policy text's digest in the evidence trail (keep_policy)
        self.identity = identity or IdentityPolicy()  # the default trusts no EK: nodes must be configured
        self.events = events
        self.auth = ReplayGuard(self.identity.auth_skew_s)
        self._keys: dict[str, bytes | None] = {}  # by node: the evidence key (None: a static node)
        self.stale_after_s = stale_after_s  # no verified quote for this long: stale (0: never)
        self._stale: dict[str, int] = {}  # stale node -> since (ns): check_stale() keeps it
        self._aks: dict[str, tuple[bytes, AkPublic]] = {}  # by node: the stored AK bytes, parsed
        self._quote_wanted: set[str] = set()
        self._db = threading.RLock()  # one connection: one request's work at a time
        self._node_locks: dict[str, asyncio.Lock] = {}
        # The probes' requests run on threads of their own: never queued behind the verdict engine's window
        # reads on the loop's default executor (a backlog of verdicts must not starve the evidence intake)
        self._intake = ThreadPoolExecutor(INTAKE_THREADS, thread_name_prefix="tmb-ingest")
        self.windows = Windows(self.store, self._db)
        self.wakeups = Wakeups()
        # Another daemon's quotes wake this one's waiters too (None: only this daemon writes the store).
        self._listener = self.store.listen(self.wakeups.notify, self.wakeups.notify_all)

    def close(self) -> None:
        self._intake.shutdown(wait=True)
        if self._listener is not None:
            self._listener.close()
        with self._db:
            self.store.close()

    # ----------------------------------------------------------------------------------------- off the loop

    async def submit(self, node: str, handler: Callable[[str, Any], T], doc: Any = None) -> T:
        """Run ``handler(node, doc)`` (a method of this ingest) in a worker thread, after the node's earlier
        requests: the checks never hold the event loop, and a node's evidence is taken in arrival order."""
        lock = self._node_locks.setdefault(node, asyncio.Lock())
        async with lock:
            return await self.off_loop(handler, node, doc)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the intake's own threads (:data:`INTAKE_THREADS`), not the loop's default
        executor, which the verdict engine's reads may fill."""
        return await asyncio.get_running_loop().run_in_executor(self._intake, functools.partial(fn, *args))

    def attested_since(self, node: str) -> int:
        """A token for :meth:`wait_attested`: read it before looking at the node's evidence."""
        return self.wakeups.generation(node)

    async def wait_attested(self, node: str, since: int, timeout_s: float) -> bool:
        """Until a verified quote attests new batches of ``node`` after ``since`` (True), or ``timeout_s``;
        on a shared store at most :data:`RECHECK_S` (False), so the caller looks again."""
        if self.store.shared:
            timeout_s = min(timeout_s, RECHECK_S)
        return await self.wakeups.wait(node, since, timeout_s)

    # ----------------------------------------------------------------------------------------- nodes

    def register_node(self, node: str, ak: bytes | str) -> AkPublic:
        """Register (or re-key) ``node`` with its AK (PEM, DER, TPM2B_PUBLIC or TPMT_PUBLIC)."""
        raw = ak.encode() if isinstance(ak, str) else bytes(ak)
        key = load_ak(raw)
        if not node or len(node.encode()) > 255:
            raise ParseError("node id must be 1..255 bytes")
        with self._db, self.store.transaction():
            now = self.clock_ns()
            held = self.store.node(node)
            self.store.upsert_node(node, raw, now)
            if held is None or held.ak != raw:  # the trail records each AK once, when it takes effect
                self.store.keep(node, "ak", now, raw)
        self._aks[node] = (raw, key)
        self._keys.pop(node, None)
        return key

    def keep_policy(
        self, text: bytes, commitments: Mapping[str, bytes], files: Mapping[str, bytes] | None = None
    ) -> str:
        """Record the policy (its TOML text), the files it references (``[keyrings] ima``, ``[[import]]``:
        name as written -> content, :func:`tmb.attest.policy.policy_files`) and the model commitments in
        force in the evidence trail (once per change; daemon-wide records, node ``""``); every quote checked
        from now on names it. Returns the policy's digest (hex)."""
        with self._db, self.store.transaction():
            names = [
                {"name": name, "sha256": self.store.put_blob("commitment", data).hex()}
                for name, data in sorted(commitments.items())
            ]
            kept = [
                {"name": name, "sha256": self.store.put_blob("policy.file", data).hex()}
                for name, data in sorted((files or {}).items())
            ]
            digest = hashlib.sha256(text).digest()
            last = self.store.last_record("", "policy")
            if (
                last is None
                or last.digest != digest
                or last.meta.get("commitments") != names
                or last.meta.get("files", []) != kept
            ):
                meta: dict[str, Any] = {"commitments": names}
                if kept:
                    meta["files"] = kept
                self.store.keep("", "policy", self.clock_ns(), text, **meta)
        self.policy_ref = digest.hex()
        return self.policy_ref

    def _ak(self, row: NodeRow) -> AkPublic:
        """The node's AK as stored now (another daemon may have re-keyed it)."""
        cached = self._aks.get(row.node)
        if cached is not None and cached[0] == row.ak:
            return cached[1]
        key = load_ak(row.ak)
        self._aks[row.node] = (row.ak, key)
        return key

    def request_quote(self, node: str) -> None:
        """Ask the node's probe for a quote now (answered in the ``quote`` field of its next response)."""
        self._quote_wanted.add(node)

    def _extra(self, node: str, row: NodeRow | None = None) -> dict[str, Any]:
        """What every answer to a registered node carries: the next nonce, the quote demand, the IMA offset,
        the digest of the event log and the chain head the daemon holds."""
        row = row or self.store.node(node)
        end = 0
        eventlog = None
        if row is not None:
            end = row.ima_end
            eventlog = self.store.eventlog_digest(node)
        return {
            "nonce": self._nonce(node).hex(),
            "quote": node in self._quote_wanted,
            "ima_offset": end,
            "eventlog": eventlog.hex() if eventlog is not None else None,
            "head": (
                Head(row.segment, row.seq, row.head).to_wire()
                if row is not None
                and row.segment is not None
                and row.seq is not None
                and row.head is not None
                else None
            ),
        }

    def _nonce(self, node: str) -> bytes:
        """The nonce to hand out: the newest unused one issued (by any daemon on the store) less than half
        its lifetime ago, else a new one, recorded in the nonce log (``ingest_nonces``)."""
        now = self.clock_ns()
        ttl_ns = int(self.nonce_ttl_s * 1e9)
        nonce = self.store.fresh_nonce(node, now - ttl_ns // 2)
        if nonce is None:
            nonce = os.urandom(32)
            self.store.issue_nonce(node, nonce, now)
        return nonce

    def _nonce_problem(self, node: str, nonce: bytes) -> str | None:
        """Why ``nonce`` cannot be used by a quote now (a finding id), or None; nothing is consumed."""
        row = self.store.nonce_row(node, nonce)
        if row is None:
            return "ingest.nonce_unknown"
        if row.consumed_ns is not None:
            return "ingest.nonce_reused"
        if self.clock_ns() - row.issued_ns > int(self.nonce_ttl_s * 1e9):
            return "ingest.nonce_expired"
        return None

    def _delivered_again(
        self, node: str, nonce: bytes, message: bytes, signature: bytes
    ) -> IngestResult | None:
        """The answer to a quote that is, byte for byte (TPMS_ATTEST and signature), the verified quote that
        consumed ``nonce``: taken as a ``duplicate``, nothing changed (a probe that died, or lost the answer,
        before it knew the quote was taken sends it again; nobody learns or gains anything from a copy).
        None for any other quote with a used nonce: a replay, refused ``ingest.nonce_reused``."""
        digest = hashlib.sha256(message).digest()
        row = self.store.nonce_row(node, nonce)
        if row is None or row.quote_digest != digest:
            return None
        kept = self.store.last_record(node, "quote", digest=digest)
        if kept is None or kept.meta.get("signature") != hashlib.sha256(signature).hexdigest():
            return None
        return self._taken(node, [], duplicate=True, quote_id=kept.ref)

    def _taken(self, node: str, findings: Sequence[Finding], **data: Any) -> IngestResult:
        return taken(findings, {**data, **self._extra(node)})

    def _refused(
        self, node: str, refusal: Finding, findings: Sequence[Finding] | None = None, **data: Any
    ) -> IngestResult:
        return refused(refusal, findings, {**data, **self._extra(node)})

    def _known(self, node: str, *, lock: bool = False) -> NodeRow | IngestResult:
        """The node's row, or the refusal of a node that is not registered (``lock``: inside a transaction,
        the row stays locked until it ends, so no other daemon changes the node meanwhile)."""
        row = self.store.node(node, lock=lock)
        if row is None:
            return refused(
                _err("ingest.unknown_node", "this node is not registered with the daemon", node=node)
            )
        return row

    def _malformed(self, node: str, exc: ParseError) -> IngestResult:
        return self._refused(
            node, Finding("ingest.malformed", exc.message, Severity.ERROR, dict(exc.context))
        )

    def nonce(self, node: str, _doc: Any = None) -> IngestResult:
        with self._db:
            row = self._known(node)
            return (
                row if isinstance(row, IngestResult) else self._taken(node, [], expires_in_s=self.nonce_ttl_s)
            )

    # ----------------------------------------------------------------------------------------- batches

    def add_batches(self, node: str, doc: Any) -> IngestResult:
        """``{"batches": [batch...], "probe_findings": [finding...]}``; batches in chain order."""
        try:
            if not isinstance(doc, Mapping) or not isinstance(doc.get("batches"), list):
                raise ParseError('expected {"batches": [...]}')
            if len(doc["batches"]) > MAX_BATCHES_PER_REQUEST:
                raise ParseError(f"at most {MAX_BATCHES_PER_REQUEST} batches per request")
            batches = [TelemetryBatch.from_wire(b) for b in doc["batches"]]
            probe_findings = doc.get("probe_findings", [])
            check_probe_findings(probe_findings)  # probe.* only, bounded (tmb.ingest.limits)
        except ParseError as exc:
            with self._db:
                row = self._known(node)
                return row if isinstance(row, IngestResult) else self._malformed(node, exc)
        with self._db:
            with self.store.transaction():
                row = self._known(node, lock=True)
                if not isinstance(row, NodeRow):
                    return row
                position = (row.segment, row.seq, row.head)
                findings, accepted, duplicates, refusal = take_batches(
                    self.store, node, position, row.state, batches, probe_findings, self.clock_ns()
                )
                self.store.set_state(node, row.state)
            if refusal is not None:
                return self._refused(node, refusal, findings, accepted=accepted, duplicates=duplicates)
            return self._taken(node, findings, accepted=accepted, duplicates=duplicates)

    # ----------------------------------------------------------------------------------------- IMA

    def add_ima(self, node: str, doc: Any) -> IngestResult:
        """``{"offset": int, "data": base64}``: binary IMA records from byte ``offset`` of the node's log."""
        with self._db, self.store.transaction():
            row = self._known(node, lock=True)
            if not isinstance(row, NodeRow):
                return row
            try:
                if not isinstance(doc, Mapping):
                    raise ParseError('expected {"offset": int, "data": base64}')
                offset = doc.get("offset")
                if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                    raise ParseError("offset must be a non-negative integer", field="offset")
                data = _b64(doc.get("data"), "data")
            except ParseError as exc:
                return self._malformed(node, exc)
            base, pending, end = row.replay.offset, row.ima_data, row.ima_end
            if offset > end:
                f = _err(
                    "ima.delta_gap",
                    "an IMA delta starts past the bytes received so far",
                    expected=end,
                    got=offset,
                )
                return self._refused(node, f)
            lo, hi = max(offset, base), min(offset + len(data), end)
            if hi > lo and data[lo - offset : hi - offset] != pending[lo - base : hi - base]:
                f = _err("ima.delta_conflict", "an IMA delta rewrites log bytes already received", offset=lo)
                return self._refused(node, f)
            new = data[max(0, end - offset) :]
            if len(pending) + len(new) > MAX_IMA_PENDING:
                f = _err("ima.pending_too_large", "too many unquoted IMA bytes", limit=MAX_IMA_PENDING)
                return self._refused(node, f)
            if new:
                self.store.set_ima(node, row.replay, pending + new)
                # The bytes as received, an append-only segment of the node's log from byte ``end``.
                self.store.keep(node, "ima", self.clock_ns(), new, end, length=len(new))
            return self._taken(node, [], appended=len(new))

    # ----------------------------------------------------------------------------------------- event log

    def add_eventlog(self, node: str, doc: Any) -> IngestResult:
        """``{"data": base64, "sha256": hex}``: the node's whole UEFI event log (binary_bios_measurements) of
        this boot (``sha256`` optional). It replaces the one held; every later quote's PCRs 0-9 are checked
        against it. A log that does not parse is refused and recorded as a finding against the node."""
        with self._db:
            row = self._known(node)
            if not isinstance(row, NodeRow):
                return row
            try:
                if not isinstance(doc, Mapping):
                    raise ParseError('expected {"data": base64, "sha256": hex (optional)}')
                data = _b64(doc.get("data"), "data")
                claimed = doc.get("sha256")
                if claimed is not None and claimed != hashlib.sha256(data).hexdigest():
                    raise ParseError("sha256 is not the SHA-256 of data (lower-case hex)", field="sha256")
            except ParseError as exc:
                return self._malformed(node, exc)
            now = self.clock_ns()
            if len(data) > MAX_EVENTLOG_BYTES:
                f = _err(
                    "eventlog.too_large",
                    "the event log is larger than the daemon accepts",
                    limit=MAX_EVENTLOG_BYTES,
                    size=len(data),
                )
                with self.store.transaction():
                    self.store.add_findings(node, now, [f.to_dict()])
                return self._refused(node, f)
            digest = hashlib.sha256(data).digest()
            held = self.store.eventlog_digest(node)
            if held == digest:
                parsed = self._parsed_eventlog(node)
                findings = parsed.findings_report().findings if parsed is not None else []
                return self._taken(node, findings, digest=digest.hex(), replaced=False)
            try:
                parsed = parse_eventlog(data, name=f"event log of {node}")
            except ParseError as exc:
                fid = "eventlog.truncated" if exc.context.get("truncated") else "eventlog.malformed"
                context = {k: v for k, v in exc.context.items() if k != "truncated"}
                f = Finding(fid, exc.message, Severity.ERROR, context)
                with self.store.transaction():
                    self.store.add_findings(node, now, [f.to_dict()])
                message = f"the event log does not parse: {exc.message}"
                return refused(f, None, self._extra(node), message=message)
            with self.store.transaction():
                self.store.set_eventlog(node, now, digest, data)
                self.store.keep(node, "eventlog", now, data)
            self._eventlogs[node] = parsed
            return self._taken(
                node,
                parsed.findings_report().findings,
                digest=digest.hex(),
                replaced=held is not None,
                events=len(parsed.events),
                banks=list(parsed.replay.banks),
            )

    def _parsed_eventlog(self, node: str) -> ParsedLog | None:
        """The node's event log, parsed (cached while its digest is the stored one); None when it has none."""
        digest = self.store.eventlog_digest(node)
        if digest is None:
            return None
        cached = self._eventlogs.get(node)
        if cached is not None and cached.digest == digest:
            return cached
        held = self.store.eventlog(node)
        if held is None:
            return None
        try:
            parsed = parse_eventlog(held.data, name=f"event log of {node}")
        except ParseError:  # stored logs parsed when they arrived; a damaged row is as good as none
            return None
        self._eventlogs[node] = parsed
        return parsed

    # ----------------------------------------------------------------------------------------- quotes

    def add_quote(self, node: str, doc: Any) -> IngestResult:
        """``{"message", "signature": base64, "pcrs": {bank: {idx: hex}}, "nonce": hex, "head": {...},
        "ak_name": hex (optional), "bindings": hex (optional)}``: ``bindings``, the digest of the process
        bindings document the quote covers (in its qualifying data, :func:`~tmb.ingest.wire.
        qualifying_data`); a quote without it covers none."""
        judged = None
        with self._db:
            try:
                with self.store.transaction():
                    result = self._add_quote(node, doc)
                    judged = self._judge(node, result)
            except ParseError as exc:  # found by the quote's checks: nothing of it is kept
                result = self._malformed(node, exc)
            except _NonceTaken as taken_by:
                again = self._delivered_again(node, *taken_by.quote)
                f = _err("ingest.nonce_reused", "the nonce was already used: a replayed quote")
                result = again if again is not None else self._refused(node, f)
        if result.attested:
            self.wakeups.notify(node)
        if result.accepted and result.data.get("rebooted"):
            self.windows.forget(node)  # the previous boot's decoded batches (a memo only: frees memory)
            self.events(
                Event("node.rebooted", node, self.clock_ns(), {"quote_id": result.data.get("quote_id")})
            )
        if judged is not None:
            self.events(judged)
        return result

    def _judge(self, node: str, result: IngestResult) -> Event | None:
        """In the quote's transaction, the node's row locked (:meth:`_add_quote` took it; daemons sharing
        the store judge a node's quotes in turn): the event this quote raises, if any. Whether the node is
        unattested is a record (kind ``unattested``) that the quote turning it sets and the next ``ok``
        one clears, so each transition is raised once (not per quote, not again after a restart, not by
        another daemon on the store):

        * ``node.unattested``: a verified quote whose summary is not ``ok``, or a quote refused for
          failing verification (a ``quote.*`` refusal: signature, nonce, PCR digest, clock), when the node
          was not already unattested. The first quote of a new boot, which comes before the new boot's IMA
          log (:mod:`tmb.ingest.epochs`), raises nothing: it records the node as rebooted (unattested, not
          told), so a failure of the quotes after it is still raised;
        * ``node.attested``: an ``ok`` quote when the node was unattested, rebooted, or stale (the
          ``stale`` record :meth:`check_stale` keeps, marked ``attested_quote`` so it is raised once per
          stale episode)."""
        now = self.clock_ns()
        record = self.store.identity(node, UNATTESTED)
        quote_id = result.data.get("quote_id")
        if not result.accepted:
            refusal = result.refusal
            if refusal is None or not refusal.id.startswith("quote.") or _told(record):
                return None
            why = [f.id for f in result.findings if f.severity is Severity.ERROR][:8]
            data: dict[str, Any] = {"quote_id": quote_id, "why": why, "refused": True}
            self.store.set_identity(node, UNATTESTED, data, now)
            return Event("node.unattested", node, now, data)
        if "ok" not in result.data:
            return None
        if result.data["ok"]:
            after = None
            if record is not None:
                self.store.set_identity(node, UNATTESTED, None, now)
                after = "rebooted" if record.get("rebooted") else "unattested"
            stale = self.store.identity(node, "stale")
            if stale is not None and "attested_quote" not in stale:
                self.store.set_identity(node, "stale", {**stale, "attested_quote": quote_id}, now)
                after = after or "stale"
            if after is None and result.data.get("rebooted"):  # a new boot attesting at its first quote
                after = "rebooted"
            if after is None:
                return None
            return Event("node.attested", node, now, {"quote_id": quote_id, "after": after})
        if result.data.get("rebooted"):
            if record is None:
                self.store.set_identity(node, UNATTESTED, {"quote_id": quote_id, "rebooted": True}, now)
            return None
        if _told(record):
            return None
        why = [f.id for f in result.findings if f.severity is Severity.ERROR][:8]
        data = {"quote_id": quote_id, "why": why}
        self.store.set_identity(node, UNATTESTED, data, now)
        return Event("node.unattested", node, now, data)

    def _add_quote(self, node: str, doc: Any) -> IngestResult:
        """In the caller's transaction, the node's row locked."""
        row = self._known(node, lock=True)
        if not isinstance(row, NodeRow):
            return row
        try:
            if not isinstance(doc, Mapping):
                raise ParseError("a quote must be a JSON object")
            message = _b64(doc.get("message"), "message")
            signature = _b64(doc.get("signature"), "signature")
            pcrs = PcrValues.from_dict(doc.get("pcrs"))
            head = Head.from_wire(doc.get("head"))
            nonce_hex = doc.get("nonce")
            nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
            if len(nonce) != 32:
                raise ParseError("nonce must be 32 bytes of hex", field="nonce")
            ak_name = doc.get("ak_name")
            bindings_hex = doc.get("bindings")  # absent or null: the quote covers no bindings document
            bindings = bytes.fromhex(bindings_hex) if isinstance(bindings_hex, str) else None
            if bindings_hex is not None and (bindings is None or len(bindings) != 32):
                raise ParseError("bindings must be null or a SHA-256 of 32 bytes of hex", field="bindings")
        except (ParseError, ValueError) as exc:
            return self._malformed(node, exc if isinstance(exc, ParseError) else ParseError(str(exc)))
        ak = self._ak(row)
        if isinstance(ak_name, str) and ak.name is not None and ak_name != ak.name.hex():
            f = _err(
                "ingest.ak_unregistered",
                "the quote was made with an AK not registered for this node",
                expected=ak.name.hex(),
                got=ak_name,
            )
            return self._refused(node, f)
        problem = self._nonce_problem(node, nonce)  # consumed below, only by a quote that verified
        if problem == "ingest.nonce_reused":
            again = self._delivered_again(node, nonce, message, signature)
            if again is not None:
                return again
        if problem is not None:
            f = _err(
                problem,
                {
                    "ingest.nonce_reused": "the nonce was already used: a replayed quote",
                    "ingest.nonce_expired": "the nonce expired before the quote arrived",
                    "ingest.nonce_unknown": "the daemon never issued this nonce to this node",
                }[problem],
                nonce=nonce.hex(),
            )
            return self._refused(node, f)
        held = self.store.batch(node, head.segment, head.seq)
        if held is None or held.digest != head.digest:
            f = _err(
                "ingest.quote_head_unknown",
                "the quoted chain head is not a batch the daemon holds",
                **head.to_wire(),
            )
            return self._refused(node, f)
        cfg = QuoteCheck(
            self.policy, self.pcr_bank, self.require_eventlog, self.policy_ref, self.model_patterns
        )
        eventlog = self._parsed_eventlog(node)
        now = self.clock_ns()
        pcrs_raw = json.dumps(doc.get("pcrs"), sort_keys=True, separators=(",", ":")).encode()
        checked = check_quote(
            cfg, self.store, row, ak, eventlog, message, signature, pcrs, nonce, head, now, pcrs_raw, bindings
        )
        if checked.verified and not self.store.consume_nonce(
            node, nonce, now, hashlib.sha256(message).digest()
        ):
            raise _NonceTaken(nonce, message, signature)  # rolls the transaction back: the quote is not kept
        if not checked.verified:
            refusal = next(f for f in checked.findings if f.severity is Severity.ERROR)
            why = "the quote failed verification"
            data = {"quote_id": checked.summary.quote_id, **self._extra(node)}
            return refused(refusal, checked.findings, data, message=why)
        self._quote_wanted.discard(node)
        summary = checked.summary
        data = {
            "ok": summary.ok,
            "quote_id": summary.quote_id,
            "attested": checked.attested,
            "summary": summary.to_dict(),
            **self._extra(node),
        }
        if checked.rebooted:
            data["rebooted"] = True
        return taken(checked.findings, data, attested=checked.attested)

    # ----------------------------------------------------------------------------------------- bindings

    def add_bindings(self, node: str, doc: Any) -> IngestResult:
        """``{"t_ns": int, "processes": [binding...]}``: kept in the evidence trail as its canonical bytes
        (:func:`~tmb.ingest.wire.bindings_bytes`), pending until a verified quote covers its digest (the
        quote's ``bindings``): only then is it checked, against the state that quote verified, and in effect
        (the quote summaries' and the stored findings). A pending document the next verified quote does not
        cover never takes effect (``binding.unquoted``). The answer's findings are those of the document
        against the last verified quote's state: what the probe may expect, nothing a verdict reads."""
        with self._db, self.store.transaction():
            row = self._known(node, lock=True)
            if not isinstance(row, NodeRow):
                return row
            if not isinstance(doc, Mapping) or not isinstance(doc.get("processes"), list):
                return self._malformed(node, ParseError('expected {"t_ns": int, "processes": [...]}'))
            if len(doc["processes"]) > MAX_BINDING_PROCESSES:
                f = _err(
                    "binding.too_large",
                    f"a bindings document names at most {MAX_BINDING_PROCESSES} processes",
                    limit=MAX_BINDING_PROCESSES,
                )
                return self._refused(node, f)
            try:
                raw = bindings_bytes(doc)
            except ValueError as exc:
                return self._malformed(node, ParseError(f"the bindings document is not plain JSON: {exc}"))
            if len(raw) > MAX_BINDINGS_BYTES:
                f = _err(
                    "binding.too_large",
                    "the bindings document is larger than the daemon keeps",
                    limit=MAX_BINDINGS_BYTES,
                    size=len(raw),
                )
                return self._refused(node, f)
            report = Report()
            check_bindings(self.policy, row.state, doc["processes"], self.model_patterns, report)
            digest = self.store.keep(node, "bindings", self.clock_ns(), raw, processes=len(doc["processes"]))
            row.state.bindings_pending = digest.hex()  # in effect once a verified quote covers it
            self.store.set_state(node, row.state)
            return self._taken(
                node,
                report.findings,
                processes=len(doc["processes"]),
                sha256=digest.hex(),
                effective="covering_quote",
            )

    # ----------------------------------------------------------------------------------------- queries

    def export(
        self, out: str | Path, node: str, t0_ns: int, t1_ns: int, *, sign: NonceSigner, context: Any = None
    ) -> Path:
        """The bundle of ``node``'s evidence over ``[t0_ns, t1_ns)``
        (:func:`~tmb.ingest.export.export_window`), read under the database lock; in a worker thread."""
        from tmb.ingest.export import export_window

        with self._db:
            return export_window(
                self.store,
                out,
                node,
                t0_ns,
                t1_ns,
                sign=sign,
                nonce_ttl_s=self.nonce_ttl_s,
                pcr_bank=self.pcr_bank,
                context=context,
            )

    def prune_evidence(self, cutoff_ns: int, limit: int = PRUNE_SLICE) -> int:
        """One bounded retention pass: at most ``limit`` rows of evidence older than ``cutoff_ns`` that no
        export of a later window needs (:mod:`tmb.ingest.retention`), in one transaction; returns the rows
        deleted (call again while it returns ``limit`` or more). In a worker thread."""
        with self._db, self.store.transaction():
            return self.store.prune_evidence(cutoff_ns, limit)

    def attested_window(self, node: str, t0_ns: int, t1_ns: int) -> AttestedWindow:
        """The node's samples with ``t0_ns <= t < t1_ns``, the summary of the quote that covers all of them
        (None when any is not yet covered by a verified quote, or there are none), and the findings (with
        ``node.stale`` when none covers it and the node is stale)."""
        got = self.attested_windows(node, [(t0_ns, t1_ns)])[0]
        assert got is not None  # noqa: S101 (the first window is always built)
        return got

    def attested_windows(
        self,
        node: str,
        ranges: Sequence[tuple[int, int]],
        more: Callable[[AttestedWindow], bool] = lambda first: True,
    ) -> list[AttestedWindow | None]:
        """:meth:`attested_window` of each of ``ranges``, read at once (:meth:`Windows.attested_windows`:
        those after the first only when ``more(first)``, else None)."""
        since = self._stale.get(node)

        def stale(window: AttestedWindow | None) -> AttestedWindow | None:
            if window is None or window.summary is not None or since is None:
                return window
            found = _err(
                "node.stale",
                f"the node sent no valid quote for more than {self.stale_after_s:g} s",
                since_ns=since,
            )
            return dc_replace(window, findings=(*window.findings, found))

        return [stale(w) for w in self.windows.attested_windows(node, ranges, more)]

    def stale_nodes(self) -> dict[str, int]:
        """The stale nodes as the last :meth:`check_stale` found them: node -> since (ns)."""
        return dict(self._stale)

    def check_stale(self, now_ns: int | None = None) -> list[str]:
        """The nodes with no verified quote for ``stale_after_s`` (since their registration, if they never
        sent one); raises ``node.stale`` once each time a node becomes stale (a record in the store, so a
        restart does not raise it again). The daemon calls it every few seconds."""
        if self.stale_after_s <= 0:
            return []
        now = self.clock_ns() if now_ns is None else now_ns
        limit = int(self.stale_after_s * 1e9)
        raised: list[Event] = []
        stale: dict[str, int] = {}
        with self._db:
            times = self.store.quote_times()
            with self.store.transaction():
                for node, registered, last in times:
                    since = (last if last is not None else registered) + limit
                    record = self.store.identity(node, "stale")
                    if now <= since:
                        if record is not None:
                            self.store.set_identity(node, "stale", None, now)
                        continue
                    stale[node] = since
                    if record is None or int(record.get("since_ns", -1)) != since:
                        # daemons sharing the store check too: the node's row lock makes one of them
                        # raise it (the others wait, then read its record)
                        self.store.node(node, lock=True)
                        record = self.store.identity(node, "stale")
                    if record is None or int(record.get("since_ns", -1)) != since:
                        self.store.set_identity(node, "stale", {"since_ns": since}, now)
                        data = {"since_ns": since, "last_quote_ns": last}
                        raised.append(Event("node.stale", node, now, data))
            self._stale = stale
        for event in raised:
            self.events(event)
        return sorted(stale)

    def status(self, node: str, _doc: Any = None) -> dict[str, Any] | None:
        with self._db:
            row = self.store.node(node)
            if row is None:
                return None
            return {
                "node": node,
                "batches": self.store.count_batches(node),
                "attested": self.store.count_batches(node, attested=True),
                "last_quote": self.store.last_quote(node),
                "identity": _identity.status(self.store, node),
                "stale_since_ns": self._stale.get(node),
                **self._extra(node, row),
            }

    # ----------------------------------------------------------------------------------------- identity

    def enroll(self, node: str, doc: Any) -> IngestResult:
        """Enrolment step 1 (:mod:`tmb.ingest.identity`): the EK and AK checked, a credential challenge."""
        if not node or len(node.encode()) > 255:
            return refused(_err("identity.malformed", "node id must be 1..255 bytes"))
        with self._db, self.store.transaction():
            now = self.clock_ns()  # expired challenges go first: their number stays bounded
            self.store.drop_identities("challenge", now - int(self.identity.challenge_ttl_s * 1e9))
            row = self.store.node(node, lock=True)
            return _identity.begin(
                self.store, self.identity, node, doc, self.clock_ns(), row.ak if row is not None else None
            )

    def activate(self, node: str, doc: Any) -> IngestResult:
        """Enrolment step 2: the proof checked, the node pinned to its EK and AK, its evidence key set."""
        now = self.clock_ns()
        with self._db, self.store.transaction():
            self.store.node(node, lock=True)
            result, pin, rekey = _identity.activate(self.store, node, doc, now)
        if pin is not None:
            self._keys[node] = pin.key
            if rekey:
                self.events(Event("node.rekeyed", node, now, pin.to_public()))
        return result

    def approve_rekey(self, node: str, doc: Any, who: str = "admin") -> IngestResult:
        """The admin approves the EK and AK ``doc`` names for the node's next enrolment."""
        with self._db, self.store.transaction():
            approval = _identity.approve(self.store, node, doc, self.clock_ns(), who)
        return approval if isinstance(approval, IngestResult) else taken([], {"node": node, **approval})

    def pinned(self, node: str) -> _identity.Pinned | None:
        with self._db:
            return _identity.pinned(self.store, node)

    def _evidence_key(self, node: str, *, fresh: bool = False) -> bytes | str | None:
        """The node's evidence key; None for a node registered by AK alone; ``"unknown"`` for no node."""
        if not fresh and node in self._keys:
            return self._keys[node]
        with self._db:
            pin = _identity.pinned(self.store, node)
            if pin is None:
                known = self.store.node(node) is not None
                if not known:
                    return "unknown"
                self._keys[node] = None
                return None
        self._keys[node] = pin.key
        return pin.key

    def _use_request_nonce(self, node: str, t_ms: int, n: str, now_ms: int) -> str | None:
        """Use the authentic request's nonce ``n`` once in all (None), else ``auth.replayed``: this process's
        memory first (no database work for a replay it saw), then one insert into the store's window."""
        if self.auth.seen(node, n, now_ms):
            return "auth.replayed"
        with self._db, self.store.transaction():
            fresh = self.store.use_request_nonce(node, bytes.fromhex(n), t_ms, now_ms - 2 * self.auth.skew_ms)
        self.auth.remember(node, n, now_ms)  # committed: used, whoever used it
        return None if fresh else "auth.replayed"

    def authenticate(
        self, node: str, method: str, route: str, header: str | None, body: bytes
    ) -> Finding | None:
        """None when the evidence request is the node's (:mod:`tmb.ingest.auth`), else the 401 finding.
        Touches no evidence state: only the node's key (cached) and the replay window (in memory, then the
        store's ``ingest_auth_nonces``, shared by every daemon on it and kept across restarts)."""
        key = self._evidence_key(node)
        now_ms = self.auth.now_ms()
        problem: str | None
        if isinstance(key, bytes):
            got = self.auth.verify(key, header, method, node, route, body, now_ms)
            if got == "auth.bad_mac":  # the node may have re-enrolled through another daemon
                fresh = self._evidence_key(node, fresh=True)
                if isinstance(fresh, bytes) and fresh != key:
                    got = self.auth.verify(fresh, header, method, node, route, body, now_ms)
            problem = got if isinstance(got, str) else self._use_request_nonce(node, *got, now_ms)
        elif key is None and self.identity.insecure_static_nodes:
            return None
        else:
            problem = "auth.not_enrolled"
        if problem is None:
            return None
        return _err(
            problem,
            {
                "auth.missing": "evidence requests must carry X-Tmb-Auth (the node's enrolment key)",
                "auth.malformed": "the X-Tmb-Auth header does not follow the format",
                "auth.not_enrolled": "this node has no enrolment key: enrol it (tmb-probe enroll)",
                "auth.bad_mac": "the request is not authenticated by the node's key",
                "auth.stale": "the request's time is outside the accepted window",
                "auth.replayed": "the request was already received: a replay",
            }[problem],
            node=node,
            route=route,
        )
