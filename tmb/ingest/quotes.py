"""The ingest's checks of one quote whose nonce and chain head it already accepted: the signature and clock
(:func:`tmb.attest.quote.verify_quote`), the incremental IMA replay to the quoted PCR 10, the boot chain
(:mod:`tmb.ingest.boot`), the runtime policy and dm-verity rules (:mod:`tmb.ingest.policy`); then the quote
row, its summary and the batches it attests, in the caller's transaction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tmb.attest import tpm2
from tmb.attest.ima import ImaEntry, Incomplete, parse_record
from tmb.attest.pcr import ReplayState, replay
from tmb.attest.policy import RuntimePolicy
from tmb.attest.quote import AkPublic, verify_quote
from tmb.attest.tpm2 import ClockInfo, PcrValues
from tmb.errors import Finding, ParseError, Report, Severity
from tmb.ingest.boot import ParsedLog, check_boot_chain
from tmb.ingest.epochs import new_boot, old_boot_head, previous_clock, rebooted
from tmb.ingest.policy import (
    DEFAULT_MODEL_PATTERNS,
    check_bindings,
    evaluate_entries,
    evaluate_verity,
    required_missing,
)
from tmb.ingest.results import AttestationSummary
from tmb.ingest.state import NodeState
from tmb.ingest.store import IngestBackend, NodeRow
from tmb.ingest.wire import Head, qualifying_data

__all__ = ["QuoteCheck", "QuoteChecked", "check_quote"]


@dataclass(frozen=True)
class QuoteCheck:
    """What the checks of a node's quotes need besides the quote: the ingest's settings."""

    policy: RuntimePolicy
    pcr_bank: str
    require_eventlog: bool
    policy_ref: str = ""  # SHA-256 (hex) of the policy text in the evidence trail ("": not recorded)
    model_patterns: Sequence[str] = DEFAULT_MODEL_PATTERNS  # files the bindings check must see on verity


@dataclass(frozen=True)
class QuoteChecked:
    """``verified``: the quote's signature, nonce and clock held (else ``findings`` say why and nothing is
    attested); ``summary``: what it attests; ``attested``: how many batches became attested."""

    verified: bool
    summary: AttestationSummary
    findings: tuple[Finding, ...]
    attested: int = 0
    rebooted: bool = False  # the first verified quote of a new boot epoch (tmb.ingest.epochs)


def check_quote(
    cfg: QuoteCheck,
    store: IngestBackend,
    row: NodeRow,
    ak: AkPublic,
    eventlog: ParsedLog | None,
    message: bytes,
    signature: bytes,
    pcrs: PcrValues,
    nonce: bytes,
    head: Head,
    now: int,
    pcrs_raw: bytes = b"",
    bindings: bytes | None = None,
) -> QuoteChecked:
    """Check one quote and record it (:class:`~tmb.errors.ParseError` when its structures do not parse):
    its row in ``ingest_quotes`` and, in the evidence trail (:mod:`tmb.ingest.trail`), the TPMS_ATTEST,
    TPMT_SIGNATURE and PCR values (``pcrs_raw``, the JSON as received) as content-addressed blobs.
    ``bindings``: the digest of the process bindings document the quote covers (None: none), part of its
    qualifying data; once the quote verified, that document is checked and in effect (:func:`_bindings`)."""
    state = row.state
    qr = verify_quote(
        ak,
        message,
        signature,
        nonce=qualifying_data(nonce, head.digest, bindings),
        pcrs=pcrs,
        require_pcrs=[10],
        previous=previous_clock(state, message),  # across a reboot the clock may restart lower
    )
    ci = qr.attest.clock_info
    pcr10 = pcrs.get(cfg.pcr_bank, 10)
    selected = qr.attest.quote.selected() if qr.attest.quote else []
    bank_id = tpm2.hash_id(cfg.pcr_bank)
    bank_selected = any(a == bank_id and i == 10 for a, i in selected)
    quoted = {  # the other PCRs the signature covers, in the bank the IMA log is checked in
        i: v for a, i in selected if a == bank_id and i != 10 and (v := pcrs.get(a, i)) is not None
    }
    report = Report(list(qr.report.findings))
    if qr.ok and (pcr10 is None or not bank_selected):
        report.add(
            "quote.pcr_missing",
            f"PCR 10 of the {cfg.pcr_bank} bank is not quoted",
            pcr=10,
            bank=cfg.pcr_bank,
        )
    position = (head.segment, head.seq, head.digest)
    if report.ok and not rebooted(state, ci):
        old = old_boot_head(store, state, row.node, head.segment)
        if old is not None:
            report.extend([old])
    if not report.ok:
        summary = _summary(cfg, row.node, 0, ci, pcr10, False, False, False, report.findings)
        failed = store.add_quote(row.node, now, False, position, summary.to_dict(), message, signature)
        _keep(store, cfg, row.node, now, failed, False, message, signature, pcrs_raw, nonce, head, bindings)
        store.add_findings(row.node, now, [f.to_dict() for f in report.errors])
        return QuoteChecked(False, replace(summary, quote_id=failed), tuple(report.findings))
    assert pcr10 is not None  # noqa: S101 (report.ok: PCR 10 was read)
    new_epoch = rebooted(state, ci)
    if new_epoch:  # the first verified quote of a new boot: the IMA replay starts again (tmb.ingest.epochs)
        row, started = new_boot(store, row, ci, head.segment, now)
        report.extend([started])
    matched = _replay(cfg, store, row, pcr10, report)
    boot_ok = _boot(cfg, eventlog, quoted, matched, state, report)
    required_missing(cfg.policy, state, report)
    verity_ok = evaluate_verity(cfg.policy, state, report)
    taken = _bindings(cfg, store, row.node, state, bindings, report)  # the covered document, if any
    if taken:
        store.add_findings(row.node, now, [f.to_dict() for f in taken])
    sticky, binding = list(state.sticky), list(state.bindings)
    policy_ok = (
        matched
        and not sticky
        and not any(f.severity is Severity.ERROR and f.id.startswith(("policy.", "ima.")) for f in report)
    )
    all_findings = _dedup(list(report.findings) + sticky + binding)
    state.clock = ClockInfo(ci.clock, ci.reset_count, ci.restart_count, ci.safe)
    quote_id = store.add_quote(row.node, now, True, position, {}, message, signature)
    digest = _keep(
        store, cfg, row.node, now, quote_id, True, message, signature, pcrs_raw, nonce, head, bindings
    )
    summary = _summary(cfg, row.node, quote_id, ci, pcr10, matched, policy_ok, verity_ok, all_findings)
    signed = {  # the values the signature covers (an auditor recomputes pcrDigest from them)
        tpm2.alg_name(a): {str(i): v.hex() for a2, i in selected if a2 == a and (v := pcrs.get(a, i))}
        for a in dict.fromkeys(a for a, _ in selected)
    }
    verity = {rule: dev.root for rule, dev in state.verity.items()}
    summary = replace(
        summary,
        quote_time_ns=now,
        verity=verity,
        boot_ok=boot_ok,
        pcrs=signed,
        quote_digest=digest.hex(),
        ak_digest=hashlib.sha256(row.ak).hexdigest(),
        eventlog_digest=eventlog.digest.hex() if eventlog is not None else "",
        policy_digest=cfg.policy_ref,
    )
    store.set_quote_summary(quote_id, summary.to_dict())
    attested = store.attest(row.node, head.segment, head.seq, quote_id)
    store.set_state(row.node, state)
    return QuoteChecked(True, summary, tuple(all_findings), attested, new_epoch)


def _keep(
    store: IngestBackend,
    cfg: QuoteCheck,
    node: str,
    now: int,
    quote_id: int,
    ok: bool,
    message: bytes,
    signature: bytes,
    pcrs_raw: bytes,
    nonce: bytes,
    head: Head,
    bindings: bytes | None = None,
) -> bytes:
    """The quote as the TPM produced it, in the evidence trail, with the policy it was checked against and
    the bindings document it covers (``bindings``: its digest, hex; absent when it covers none); returns its
    digest (SHA-256 of the TPMS_ATTEST, the bytes the signature covers)."""
    sig = store.put_blob("quote.signature", signature)
    pcrs = store.put_blob("quote.pcrs", pcrs_raw)
    extra = {"bindings": bindings.hex()} if bindings is not None else {}
    return store.keep(
        node,
        "quote",
        now,
        message,
        quote_id,
        ok=ok,
        signature=sig.hex(),
        pcrs=pcrs.hex(),
        nonce=nonce.hex(),
        head=head.to_wire(),
        policy=cfg.policy_ref,
        **extra,
    )


def _bindings(
    cfg: QuoteCheck,
    store: IngestBackend,
    node: str,
    state: NodeState,
    covered: bytes | None,
    report: Report,
) -> list[Finding]:
    """At a verified quote, after its IMA replay: the process bindings document the quote covers
    (``covered``, its digest) is checked against the state the quote verified and takes effect; a pending
    document it does not cover never does (``binding.unquoted``); a covered document the node never posted
    is ``binding.missing`` and stays in effect as that error until a covered document replaces it. Without
    ``covered`` and nothing pending, the document in effect stays. Returns the findings newly in effect."""
    pending, state.bindings_pending = state.bindings_pending, None
    if pending is not None and (covered is None or pending != covered.hex()):
        report.add(
            "binding.unquoted",
            "process bindings were posted that the next verified quote does not cover: never in effect "
            "(a probe that posts bindings after its quote is older than the daemon: upgrade it)",
            sha256=pending,
            covered=covered.hex() if covered is not None else None,
        )
    if covered is None:
        return []
    state.bindings_sha256 = covered.hex()
    record = store.last_record(node, "bindings", digest=covered)
    raw = store.blob(covered) if record is not None else None
    processes: Any = None
    if raw is not None:
        try:
            doc = json.loads(raw)
            processes = doc.get("processes") if isinstance(doc, dict) else None
        except (ValueError, UnicodeDecodeError):
            processes = None
    local = Report()
    if not isinstance(processes, list):
        local.add(
            "binding.missing",
            "the quote covers a process bindings document the daemon does not hold",
            sha256=covered.hex(),
        )
    else:
        check_bindings(cfg.policy, state, processes, cfg.model_patterns, local)
    report.extend(local.findings)
    state.bindings = local.errors
    return local.errors


def _summary(
    cfg: QuoteCheck,
    node: str,
    quote_id: int,
    ci: ClockInfo,
    pcr10: bytes | None,
    matched: bool,
    policy_ok: bool,
    verity_ok: bool,
    findings: Sequence[Finding],
) -> AttestationSummary:
    return AttestationSummary(
        node,
        quote_id,
        ci.clock,
        ci.reset_count,
        ci.restart_count,
        pcr10.hex() if pcr10 else "",
        cfg.pcr_bank,
        matched,
        policy_ok,
        verity_ok,
        tuple(findings),
    )


def _replay(cfg: QuoteCheck, store: IngestBackend, row: NodeRow, pcr10: bytes, report: Report) -> bool:
    """Replay the unverified IMA tail to the quoted PCR 10; on a match advance the persisted replay state,
    drop the verified bytes and run the policy over the newly covered entries."""
    start, state, data = row.replay, row.state, row.ima_data
    entries: list[ImaEntry] = []
    pos, names, index = 0, {}, start.index  # type: int, dict[bytes, str], int
    while pos < len(data):
        try:
            entry, pos = parse_record(data, pos, start.offset, index, names)
        except Incomplete:
            break
        except ParseError as exc:
            report.add("ima.malformed_record", exc.message, **exc.context)
            break
        entries.append(entry)
        index += 1
    local = Report()
    result = replay(
        entries, banks=("sha1", cfg.pcr_bank), state=start, expected={cfg.pcr_bank: pcr10}, report=local
    )
    report.extend(f for f in local if f.id != "pcr.mode_detected")
    if result.matched is None:
        return False
    matched: ReplayState = result.matched
    newly = [e for e in entries if e.num < matched.index]
    if newly and newly[0].num == 0:
        state.ima_first = newly[0]  # boot_aggregate, checked on every quote
    state.ima_entries = matched.index
    evaluate_entries(cfg.policy, state, newly, report)
    store.set_ima(row.node, matched, data[matched.offset - start.offset :])
    return True


def _boot(
    cfg: QuoteCheck,
    eventlog: ParsedLog | None,
    quoted: Mapping[int, bytes],
    matched: bool,
    state: NodeState,
    report: Report,
) -> bool | None:
    """The boot chain of a verified quote (:func:`~tmb.ingest.boot.check_boot_chain`)."""
    first, replayed = state.ima_first, state.ima_entries
    if matched and first is None and replayed > 0:
        report.add(
            "boot.aggregate_unchecked",
            "the IMA log's first entry was verified before the daemon kept it: boot_aggregate unchecked",
            severity=Severity.WARNING,
        )
    return check_boot_chain(
        eventlog,
        quoted,
        cfg.pcr_bank,
        first,
        ima_checked=matched and (first is not None or replayed == 0),
        required=cfg.require_eventlog or cfg.policy.boot is not None,
        boot_policy=cfg.policy.boot,
        report=report,
    )


def _dedup(findings: Sequence[Finding]) -> list[Finding]:
    seen: set[str] = set()
    out = []
    for f in findings:
        key = f"{f.id}|{sorted(f.context.items(), key=str)}"
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
