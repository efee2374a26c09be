"""The verdict engine: a finished request span -> a signed verdict.

For each span a worker served, the engine waits (bounded by ``[attestation] wait_s`` from the window's end)
until the node's telemetry for the request window is in and covered by a verified quote
(``Ingest.attested_window``): it looks once, then sleeps until the ingest says a quote attested new batches
of the node (``Ingest.wait_attested``) and looks again. Then it decides:

============================  =================================================================
decision                      when
============================  =================================================================
``unattested``                no verified quote covers the window, or its IMA replay, runtime policy or
                              dm-verity model rule failed (the cryptographic chain did not hold)
``insufficient_telemetry``    the chain held but there is no telemetry, no enrolled profile for the
                              claimed model, or the telemetry is synthetic in a deployment that is not a
                              demo (too few samples is an ``inconclusive`` fingerprint, see below)
``model_mismatch``            the fingerprint is ``inconsistent`` with the claimed model's load-aware profile
                              (never from an ``inconclusive`` one: that leaves ``verified``/``demo`` with a
                              ``fingerprint.inconclusive`` reason saying why it could not decide)
``demo``                      everything held on a synthetic source and ``[verdicts] demo = true``
``verified``                  everything held on real GPU telemetry
============================  =================================================================

Windows shorter than ``[verdicts] min_window_ms`` are widened symmetrically, then every window's ends are
moved out to the ``[verdicts] window_grid_ms`` grid of wall-clock time (:func:`widen`), and the verdict
says so. The grid is what lets concurrent requests on one GPU share their scoring: short requests whose
widened windows start within one grid step get the same window, so its telemetry is cut, digested,
summarised and judged once (:meth:`Engine._cached`) however many requests it serves. The
verdict is signed with the daemon's key (verdicts decided together share one signature over a Merkle
root, each with its inclusion proof: docs/verdict.md) and published with references to the evidence it
rests on. Floats never enter the signed encoding: statistics are rendered as decimal strings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from time import time_ns
from typing import Any

from tmb.errors import Finding, Severity
from tmb.events import Event, EventSink, discard
from tmb.fingerprint.judge import Judge, Judgement
from tmb.fingerprint.loadprofile import LoadProfile
from tmb.fingerprint.summary import WindowSummary, summarise
from tmb.ingest.results import AttestationSummary, AttestedWindow, BatchRef
from tmb.ingest.service import Ingest
from tmb.spans import Span
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.model import Decision, Reason, Verdict, Window
from tmb.verdict.signing import BatchSigner, Signer
from tmb.verdict.store import EvidenceRef

log = logging.getLogger("tmb.verdict.engine")
_NO_SAMPLES = SampleBatch.empty("nvml")  # immutable; built once (it costs tens of microseconds)
WINDOW_CACHE = 1024  # windows whose telemetry digest and summary are kept (see Engine._cached)
LOOK_AHEAD = 64  # the next spans' windows of a group read with a span's own (one thread hop for them all)


@dataclass(frozen=True)
class EngineSettings:
    wait_s: float = 20.0  # longest wait for telemetry + quote after the window ends
    min_window_s: float = 1.0
    grid_s: float = 0.25  # window ends are moved out to multiples of this (0: not aligned)
    demo: bool = False
    target_far: float | None = None


def _num(value: float | None) -> str | None:
    """A float as the decimal string the signed encoding carries (None, ``nan`` and ``inf`` kept readable)."""
    if value is None:
        return None
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def widen(span: Span, min_window_s: float, grid_s: float = 0.0) -> Window:
    """The request's window: start to end, widened around its middle to at least ``min_window_s``, then its
    start moved down and its end up to multiples of ``grid_s`` (wall-clock ns since the epoch; 0: not
    aligned). It always covers the request; ``widened`` says it is longer than the request. Requests whose
    widened windows start and end within the same grid steps get the same window: with ``grid_s`` dividing
    ``min_window_s``, every short request starting within one step."""
    t0, t1 = span.start_ns, max(span.end_ns, span.start_ns)
    need = round(min_window_s * 1e9)  # round: 1.001 * 1e9 is 1000999999.99...
    if t1 - t0 < need:
        t0 = (t0 + t1) // 2 - need // 2
        t1 = t0 + need
    grid = round(grid_s * 1e9)
    if grid > 0:
        t0, t1 = t0 // grid * grid, -(-t1 // grid) * grid
    return Window(t0, t1, (t0, t1) != (span.start_ns, max(span.end_ns, span.start_ns)))


class Engine:
    """Implements :class:`tmb.daemon.pipeline.VerdictEngine` structurally (this room does not import it)."""

    def __init__(
        self,
        store: AsyncStore,
        signer: Signer,
        ingest: Ingest | None,
        profiles: Sequence[LoadProfile],
        settings: EngineSettings,
        load_of: Callable[[Span, Window], float | None] | None = None,
        events: EventSink = discard,
    ) -> None:
        self.store = store
        self.signer = signer
        self.batch_signer = BatchSigner(signer)  # verdicts decided within 5 ms: one signature
        self.ingest = ingest
        self.judge = Judge(profiles, target_far=settings.target_far) if profiles else None
        self.profiles = tuple(profiles)
        self.settings = settings
        self.load_of = load_of
        self.events = events  # told of each model_mismatch verdict before it is published
        self._started: float | None = None  # loop time of the first wait for evidence
        # What a window's samples give (telemetry digest, summary), shared by the requests whose evidence
        # coincides: the samples are a function of (node, window, the stored batches they are cut from)
        self._windows: OrderedDict[Hashable, Any] = OrderedDict()
        self._cut_from: tuple[SampleBatch | None, Sequence[BatchRef]] = (None, ())  # the window in decision

    def set_profiles(self, profiles: Sequence[LoadProfile]) -> None:
        """Score with these profiles from now on (an upload replaced or added one)."""
        self.profiles = tuple(profiles)
        self.judge = Judge(profiles, target_far=self.settings.target_far) if profiles else None
        self._windows.clear()  # judgements under the old profiles

    async def on_span(self, span: Span) -> None:
        await self.on_spans([span])

    async def on_spans(self, spans: Sequence[Span]) -> None:
        """Decide, sign and publish the verdicts of spans stored together: one task for the group, the
        spans of each node handled in order (their windows end within milliseconds of each other, so the
        first wait for evidence covers the rest), nodes concurrently."""
        by_node: dict[str, list[Span]] = {}
        for span in spans:
            if span.served and span.node is not None:  # else nothing to attest (the API answers 404)
                by_node.setdefault(span.node, []).append(span)
        if len(by_node) == 1:
            node, group = next(iter(by_node.items()))
            await self._decide_node(node, group)
        elif by_node:
            groups = list(by_node.items())
            results = await asyncio.gather(
                *(self._decide_node(n, g) for n, g in groups), return_exceptions=True
            )
            for (node, group), result in zip(groups, results, strict=True):
                if isinstance(result, Exception):
                    log.error("verdicts for %d spans of node %s failed", len(group), node, exc_info=result)

    async def _decide_node(self, node: str, spans: Sequence[Span]) -> None:
        decided: list[tuple[Verdict, list[EvidenceRef]]] = []
        windows = [widen(span, self.settings.min_window_s, self.settings.grid_s) for span in spans]
        ahead: dict[int, AttestedWindow] = {}  # later spans' windows, read along with an earlier one's
        for i, span in enumerate(spans):
            window = windows[i]
            got = ahead.pop(i, None)
            # What was read ahead is final once it covers the window's end (the span's own wait would have
            # returned it as it is); else the span waits for its evidence itself.
            if got is None or not got.covers_end():
                rest = windows[i + 1 : i + 1 + LOOK_AHEAD]
                got, more = await self._wait_for_evidence_ahead(node, window, rest)
                ahead = {i + 1 + k: w for k, w in enumerate(more) if w is not None}
            try:
                self._cut_from = (got.samples, got.batches)
                decided.append(self.decide(span, window, got.samples, got.summary, got.findings))
            except Exception:  # one bad span must not cost the others their verdicts; this one stays pending
                log.exception("cannot decide the verdict of span %s", span.id)
        try:
            signed = await self.batch_signer.sign_many([verdict for verdict, _ in decided])
        except Exception:  # one verdict could not be encoded: sign the others on their own
            signed = []
            for verdict, refs in list(decided):
                try:
                    signed.append(await self.batch_signer.sign(verdict))
                except Exception:
                    log.exception("cannot sign the verdict of span %s", verdict.request_id)
                    decided.remove((verdict, refs))
        mismatches = [v for v in signed if v.decision is Decision.MODEL_MISMATCH]
        if mismatches:  # recorded (off the event loop) before publishing: a crash in between notifies again
            await asyncio.to_thread(self._tell, mismatches)
        await self.store.publish_many([(v, refs) for v, (_, refs) in zip(signed, decided, strict=True)])

    def _tell(self, verdicts: Sequence[Verdict]) -> None:
        for v in verdicts:
            try:  # a sink must not raise; one that does costs no verdict
                self.events(Event("verdict.model_mismatch", v.request_id, time_ns(), mismatch_data(v)))
            except Exception:
                log.exception("the event sink failed on the model_mismatch verdict of %s", v.request_id)

    def _deadline(self, window: Window) -> float:
        """Loop time until which a verdict over ``window`` waits for its evidence. The wait counts from the
        window's end, not from now, so a restart's backlog of old spans is not waited for span by span; but
        never ends before wait_s after this engine started, the time probes get to re-send what they
        buffered while the daemon was down."""
        loop = asyncio.get_running_loop()
        if self._started is None:
            self._started = loop.time()
        since_end = time_ns() / 1e9 - window.t1_ns / 1e9
        return max(
            loop.time() + self.settings.wait_s - max(since_end, 0.0), self._started + self.settings.wait_s
        )

    async def _wait_for_evidence(self, node: str, window: Window) -> AttestedWindow:
        return (await self._wait_for_evidence_ahead(node, window, ()))[0]

    async def _wait_for_evidence_ahead(
        self, node: str, window: Window, ahead: Sequence[Window]
    ) -> tuple[AttestedWindow, list[AttestedWindow | None]]:
        """The window's evidence once it covers the window's end (or the wait is over); with it, in the same
        thread hop, the ``ahead`` windows as they stand then (None: one could not be read; its span waits
        on its own)."""
        if self.ingest is None:
            missing = Finding("attestation.not_configured", "this daemon has no evidence ingest configured")
            return AttestedWindow(node, window.t0_ns, window.t1_ns, _NO_SAMPLES, None, (missing,)), []
        ingest = self.ingest
        loop = asyncio.get_running_loop()
        deadline = self._deadline(window)

        def look() -> tuple[AttestedWindow, list[AttestedWindow | None]]:
            ranges = [(w.t0_ns, w.t1_ns) for w in (window, *ahead)]
            try:  # one read of the store for them all; the later ones cut only once this one is complete
                got, *more = ingest.attested_windows(node, ranges, AttestedWindow.covers_end)
            except Exception:  # the later spans' own waits read theirs again (and meet the error there)
                if not ahead:
                    raise
                got, more = ingest.attested_window(node, window.t0_ns, window.t1_ns), []
            assert got is not None  # noqa: S101 (the first window is always built)
            return got, (more if ahead and got.covers_end() else [])

        while True:
            since = ingest.attested_since(node)  # before looking: a quote landing meanwhile still wakes
            got, more = await asyncio.to_thread(look)
            if got.covers_end() or loop.time() >= deadline:
                return got, more
            await ingest.wait_attested(node, since, deadline - loop.time())

    def decide(
        self,
        span: Span,
        window: Window,
        samples: SampleBatch,
        summary: AttestationSummary | None,
        findings: Sequence[Finding],
        batches: Sequence[BatchRef] = (),
    ) -> tuple[Verdict, list[EvidenceRef]]:
        """The verdict of ``span`` over ``window`` and the evidence it rests on. ``batches`` names the stored
        batches ``samples`` were cut from (``AttestedWindow.batches``): requests whose window and batches
        coincide then share the window's telemetry digest and summary instead of recomputing them."""
        if not batches and self._cut_from[0] is samples:  # from _decide_node: the window's batches
            batches = self._cut_from[1]
        key = (span.node, window.t0_ns, window.t1_ns, tuple(b.digest for b in batches)) if batches else None
        reasons: list[Reason] = []
        refs: list[EvidenceRef] = []
        if window.widened:
            reasons.append(Reason("window.widened", self._widened(span)))
        errors = [f for f in findings if f.severity is Severity.ERROR]
        attestation: dict[str, Any] = {"verified": False}
        if summary is not None:
            attestation = {
                "verified": summary.ok,
                "quote_id": summary.quote_id,
                "quote_clock": summary.quote_clock,
                "reset_count": summary.reset_count,
                "restart_count": summary.restart_count,
                "pcr10": summary.pcr10,
                "pcr_bank": summary.pcr_bank,
                "pcr_matched": summary.pcr_matched,
                "policy_ok": summary.policy_ok,
                "verity_ok": summary.verity_ok,
                "quote_time_ns": summary.quote_time_ns,
                "verity_roots": dict(summary.verity),  # model commitment (rule) -> dm-verity root mounted
            }
            for name in ("quote_digest", "ak_digest", "eventlog_digest", "policy_digest"):
                if getattr(summary, name):  # SHA-256 of the bytes the evidence trail keeps (the bundle's)
                    attestation[name] = getattr(summary, name)
            # The quote's digest: SHA-256 of its TPMS_ATTEST as the TPM signed it, the key of the evidence
            # trail (summaries stored before the trail existed: the digest of the summary).
            digest = (
                summary.quote_digest
                or hashlib.sha256(
                    json.dumps(summary.to_dict(), sort_keys=True, separators=(",", ":")).encode()
                ).hexdigest()
            )
            refs.append(
                EvidenceRef(
                    "quote",
                    digest,
                    span.node,
                    detail={"quote_id": summary.quote_id, "pcr10": summary.pcr10},
                )
            )
            for kind, ref in (
                ("ak", summary.ak_digest),
                ("eventlog", summary.eventlog_digest),
                ("policy", summary.policy_digest),
            ):
                if ref:  # what the quote was checked with, by the digest of the bytes the trail keeps
                    refs.append(EvidenceRef(kind, ref, span.node if kind != "policy" else None))
            # The quote's own findings (IMA replay, policy, verity) first: they say why the chain broke;
            # the findings stored for the window (e.g. process bindings) often only follow from that.
            errors = [f for f in summary.findings if f.severity is Severity.ERROR] + errors
        if len(samples):
            refs.append(
                EvidenceRef(
                    "telemetry_window",
                    self._cached(key, lambda: hashlib.sha256(samples.encode()).hexdigest()),
                    span.node,
                    int(samples.t_ns[0]),
                    detail={"samples": len(samples), "source": samples.source},
                )
            )
        source = samples.source if len(samples) else "none"
        synthetic = bool(len(samples)) and samples.synthetic
        fingerprint: dict[str, Any] = {"decision": "not_scored"}
        claimed = span.model_served or span.model_requested

        if summary is None or not summary.ok:
            decision = Decision.UNATTESTED
            if summary is None and any(f.id == "ingest.window_empty" for f in errors):
                decision = Decision.INSUFFICIENT_TELEMETRY
            unique = dict.fromkeys((f.id, _located(f)) for f in errors)  # the same finding once
            reasons += [Reason(fid, message) for fid, message in list(unique)[:8]]
            if not errors:
                reasons.append(Reason("attestation.no_quote", "no verified quote covers the request window"))
        elif not len(samples):
            decision = Decision.INSUFFICIENT_TELEMETRY
            reasons.append(Reason("telemetry.none", "no telemetry of the node covers the request window"))
        else:
            score = self._score(claimed, samples, span, window, key)
            if score is None:
                decision = Decision.INSUFFICIENT_TELEMETRY
                reasons.append(Reason("fingerprint.no_profile", f"no enrolled profile for {claimed!r}"))
            else:
                fingerprint = _fingerprint_dict(score)
                refs.append(
                    EvidenceRef(
                        "profile",
                        hashlib.sha256(str(score.profile).encode()).hexdigest(),
                        None,
                        detail={"profile": score.profile},
                    )
                )
                decision, more = self._from_score(score, synthetic)
                reasons += more
        verdict = Verdict(
            request_id=span.id,
            correlation_id=span.correlation_id,
            worker=span.worker or "",
            node=span.node or "",
            gpus=span.gpus,
            claimed_model=span.model_served,
            requested_model=span.model_requested,
            window=window,
            attestation=attestation,
            fingerprint=fingerprint,
            decision=decision,
            reasons=tuple(reasons),
            telemetry_source="synthetic" if synthetic else source,
            issued_ns=time_ns(),
            key_id=self.signer.key_id,
            attestation_evidence=tuple(r.digest for r in refs),
        )
        return verdict, refs

    def _widened(self, span: Span) -> str:
        """Why the window is longer than the request (the ``window.widened`` reason)."""
        grid = f"{self.settings.grid_s:g} s grid" if self.settings.grid_s > 0 else ""
        if span.end_ns - span.start_ns < round(self.settings.min_window_s * 1e9):
            why = f"request shorter than {self.settings.min_window_s:g} s: window widened"
            return f"{why}, its ends aligned to the {grid}" if grid else why
        return f"window ends aligned to the {grid}"

    def window_load(self, span: Span, window: Window) -> float:
        """Requests in flight on the span's worker over the window (as the proxy counted them); at least
        the request itself when the proxy has no record (a span resumed after a restart)."""
        load = self.load_of(span, window) if self.load_of is not None else None
        return load if load is not None and math.isfinite(load) else 1.0

    def _cached(self, key: Hashable | None, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept under ``key`` (None: not kept) for the next request with the same key."""
        if key is None:
            return compute()
        got = self._windows.get(key)
        if got is None:
            got = self._windows[key] = compute()
            if len(self._windows) > WINDOW_CACHE:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return got

    def _score(
        self,
        claimed: str | None,
        samples: SampleBatch,
        span: Span,
        window: Window,
        key: tuple[Any, ...] | None = None,
    ) -> Judgement | None:
        if self.judge is None or not claimed or not self.judge.covers(claimed):
            return None

        def features() -> WindowSummary:  # the window's summary at load 0 (the load is the request's)
            mine = [g for g in span.gpus if g in samples.gpus]
            part = samples
            if mine and len(mine) < len(samples.gpus):  # the node's other GPUs serve other workers
                parts = [samples.for_gpu(g) for g in mine]
                part = SampleBatch.concat(parts) if len(parts) > 1 else parts[0]
            return summarise(part, 0.0)

        shared: WindowSummary = self._cached(None if key is None else (*key, span.gpus), features)
        load = float(self.window_load(span, window))
        judge = self.judge
        judged: Judgement = self._cached(  # requests sharing the window on one worker share its load too
            None if key is None else (*key, span.gpus, claimed, load),
            lambda: judge.judge(claimed, WindowSummary(shared.t0_ns, shared.t1_ns, load, shared.features)),
        )
        return judged

    def _from_score(self, score: Judgement, synthetic: bool) -> tuple[Decision, list[Reason]]:
        """``model_mismatch`` only from ``inconsistent``; an inconclusive fingerprint does not break a chain
        that held (the verdict says why it could not decide)."""
        if score.decision == "inconsistent":
            alt = f"; closest enrolled model: {score.best_alternative}" if score.best_alternative else ""
            return Decision.MODEL_MISMATCH, [
                Reason("fingerprint.inconsistent", f"telemetry is inconsistent with {score.claimed}{alt}")
            ]
        reasons: list[Reason] = []
        if score.decision == "inconclusive":
            why = next((f for f in score.findings if f.severity is not Severity.INFO), None)
            reasons.append(
                Reason(
                    "fingerprint.inconclusive",
                    f"the fingerprint cannot decide: {why.message if why else 'too little power'}",
                )
            )
        if synthetic:
            if self.settings.demo:
                return Decision.DEMO, [
                    *reasons,
                    Reason("telemetry.synthetic", "synthetic telemetry (demo deployment): never `verified`"),
                ]
            return Decision.INSUFFICIENT_TELEMETRY, [
                *reasons,
                Reason(
                    "telemetry.synthetic", "synthetic telemetry is not evidence outside a demo deployment"
                ),
            ]
        if not reasons:
            reasons.append(Reason("fingerprint.consistent", f"telemetry consistent with {score.claimed}"))
        return Decision.VERIFIED, reasons


_WHERE = ("entry", "path", "rule", "device", "pid", "exe")


def mismatch_data(v: Verdict) -> dict[str, Any]:
    """A ``verdict.model_mismatch`` event's data: who, what was claimed, and the signed verdict itself."""
    return {
        "request_id": v.request_id,
        "worker": v.worker,
        "node": v.node,
        "claimed_model": v.claimed_model,
        "decision": v.decision.value,
        "verdict": v.to_dict(),
    }


def _located(f: Finding) -> str:
    """A finding's message with where it happened (IMA entry, path, policy rule, ...): a verdict's reasons
    carry no context of their own, and "which entry" is the point of an attestation failure."""
    where = ", ".join(f"{k}={f.context[k]}" for k in _WHERE if k in f.context)
    return f"{f.message} ({where})" if where else f.message


def _fingerprint_dict(score: Judgement) -> dict[str, Any]:
    return {
        "decision": score.decision,
        "profile": score.profile,
        "load": _num(score.load),
        "statistic": _num(score.statistic),
        "threshold": _num(score.threshold),
        "samples": score.n_samples,
        "power": _num(score.power),
        "runs": score.runs,
        "best_alternative": score.best_alternative,
        "false_alarm_rate": _num(score.false_alarm_rate),
        "window_s": _num(score.window_s),
        "kind": "statistical evidence, not proof",
    }
