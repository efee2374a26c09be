"""The demo's outputs: evidence bundles for its requests (with the request window's telemetry), HTML audit
reports, the offline audit scenarios, and the printed table."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmb.attest.evidence import audit_bundle, load_bundle, write_bundle
from tmb.attest.tpm2 import parse_attest
from tmb.telemetry.sample import SampleBatch

if TYPE_CHECKING:
    from sample_infra.demo import Demo, DemoResult, Row

LABELS = {"node-1": "honest", "node-2": "honest", "node-3": "impostor", "node-4": "tampered-log"}
LABELS["node-5"] = "other-image"


def _quote(db: sqlite3.Connection, node: str, quote_id: Any) -> tuple[bytes, bytes, dict[str, Any]] | None:
    sql = "SELECT message, signature, summary FROM ingest_quotes WHERE node = ?"
    args: tuple[Any, ...] = (node,)
    if isinstance(quote_id, int):
        sql, args = sql + " AND id = ?", (node, quote_id)
    row = db.execute(sql + " ORDER BY id DESC LIMIT 1", args).fetchone()
    return (bytes(row[0]), bytes(row[1]), json.loads(row[2])) if row else None


def _window(db: sqlite3.Connection, node: str, t0: int, t1: int) -> bytes | None:
    rows = db.execute(
        "SELECT payload FROM ingest_batches WHERE node = ? AND t1_ns >= ? AND t0_ns < ? ORDER BY t0_ns",
        (node, t0, t1),
    ).fetchall()
    parts = [p for p in (SampleBatch.decode(bytes(r[0])).slice_time(t0, t1) for r in rows) if len(p)]
    return SampleBatch.concat(parts).encode() if parts else None


def write_request_bundle(demo: Demo, row: Row, dest: Path) -> Path | None:
    """A bundle for one request: the node's AK, IMA log, firmware event log and the quote the verdict rests
    on, the policy, the commitment, the window's telemetry, the profiles, the claimed model and the signed
    verdict."""
    verdict = row.outcome.verdict
    node_name = row.outcome.node
    if verdict is None or node_name is None or node_name not in demo.nodes:
        return None
    node = demo.nodes[node_name]
    db = sqlite3.connect(f"file:{demo.out / 'daemon' / 'ingest.sqlite3'}?mode=ro", uri=True)
    try:
        quote = _quote(db, node_name, verdict.get("attestation", {}).get("quote_id"))
        window = verdict.get("window", {})
        telemetry = _window(db, node_name, int(window.get("t0_ns", 0)), int(window.get("t1_ns", 0)))
    finally:
        db.close()
    if quote is None:
        return None
    message, signature, summary = quote
    # every PCR the quote covers (0-10 since the boot chain is checked); older summaries kept PCR 10 alone
    signed = summary.get("pcrs") or {summary.get("pcr_bank", "sha256"): {"10": summary.get("pcr10", "")}}
    pcrs = json.dumps(signed).encode()
    return write_bundle(
        dest,
        node=node_name,
        ak=node.ak_path.read_bytes(),
        ima_log=node.ima_log.read_bytes(),
        # the qualifying data the daemon checked: H(its nonce || the probe's chain head)
        quotes=[
            {
                "message": message,
                "signature": signature,
                "pcrs": pcrs,
                "nonce": parse_attest(message).extra_data,
            }
        ],
        policy_toml=demo.policy,
        commitments={"model.commitment.json": demo.commitment_path.read_bytes()},
        telemetry=telemetry,
        profiles={p.name: p.read_bytes() for p in demo.profiles},
        claimed=verdict.get("claimed_model"),
        verdict=json.dumps(verdict, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
        eventlog=node.eventlog.read_bytes() if node.eventlog is not None else None,
    )


def audit_to_html(bundle: Path, page: Path) -> bool:
    """What ``tmb audit BUNDLE --html PAGE`` does; True when it would exit 0."""
    from tmb.report import render_html
    from tmb.report.telemetry import telemetry_section

    result = audit_bundle(bundle)
    telemetry = telemetry_section(load_bundle(bundle))
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(result, telemetry=telemetry, title="tmb demo"))
    return result.ok and (telemetry is None or telemetry.ok)


def write_bundles(demo: Demo, result: DemoResult) -> None:
    """Bundles and HTML reports for round 1's requests (one per node)."""
    for row in [r for r in result.rows if r.round == "1"]:
        node = row.outcome.node or ""
        label = f"{LABELS.get(node, node)}-{node}"
        bundle = write_request_bundle(demo, row, demo.out / "bundles" / label)
        if bundle is None:
            continue
        result.bundles[label] = bundle
        page = demo.out / "reports" / f"{label}.html"
        result.audits[label] = 0 if audit_to_html(bundle, page) else 1
        result.reports[label] = page


def offline_scenarios(out: Path, result: DemoResult) -> None:
    """The offline audit scenarios (one quote each; attacks an auditor catches): evidence_demo."""
    from sample_infra import evidence_demo

    scenarios = evidence_demo.run(out)
    result.offline_table = evidence_demo.render(scenarios, out)
    result.offline_ok = all(s.result.ok == s.expect_pass for s in scenarios)


def _reason(r: dict[str, str]) -> str:
    text = f"{r.get('id')}: {r.get('message')}"
    return text if len(text) <= 160 else text[:159] + "…"


def render(result: DemoResult) -> str:
    head = ("#", "request id", "worker", "claimed model", "decision", "expected", "scenario")
    cells = []
    for r in result.rows:
        o = r.outcome
        mark = "" if r.ok else "  <-- UNEXPECTED"
        cells.append(
            (
                r.round,
                o.request_id or "-",
                o.worker or "-",
                o.claimed_model or "-",
                r.decision,
                r.expect,
                r.scenario,
            )
        )
        cells[-1] = (*cells[-1][:6], cells[-1][6] + mark)
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(6)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + "  " + head[6]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    indent = " " * (widths[0] + 2)
    for r, c in zip(result.rows, cells, strict=True):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=False)) + "  " + c[6])
        reasons = r.reasons or [{"id": "-", "message": "; ".join(r.outcome.problems) or "no reason given"}]
        for reason in reasons[:2]:
            lines.append(f"{indent}reason: {_reason(reason)}")
        if r.outcome.signature != "ok":
            lines.append(f"{indent}signature: {r.outcome.signature} {'; '.join(r.outcome.problems)}")
    out = ["\n".join(lines), ""]
    if result.restart:
        info = result.restart
        out.append(
            f"probe restart on {info['node']}: killed mid-request, restarted; new chain segment's genesis "
            f"quoted: {'yes' if info.get('new_segment_quoted') else 'NO'}; evidence refused after the "
            f"restart: {len(info.get('refused_after', []))}; every request before and after got a verdict."
        )
    out.append("verdicts: every signature checked against the daemon's key (fetched from /v1/keys: TOFU).")
    out.append("`demo` = everything held on SYNTHETIC telemetry; real NVML telemetry would read `verified`.")
    if result.bundles:
        out.append("\nevidence bundles (with the request window's telemetry) and HTML reports:")
        for label, bundle in result.bundles.items():
            status = "PASS" if result.audits.get(label) == 0 else "FAIL"
            expect = "PASS" if label.startswith("honest") else "FAIL"
            mark = "" if status == expect else "  <-- UNEXPECTED"
            out.append(f"  {label:20} audit {status} (expected {expect}){mark}  {bundle}")
            out.append(f"  {'':20} report {result.reports[label]}")
        first = next(iter(result.bundles.values()))
        out.append(f"re-check offline: tmb audit {first} --html report.html")
    if result.offline_table:
        out.append("\noffline audit scenarios (one quote each; what an auditor catches):\n")
        out.append(result.offline_table)
    out.append(f"\neverything is in {result.out}")
    out.append(
        "RESULT: " + ("every request got the decision it should" if result.ok else "UNEXPECTED OUTCOMES")
    )
    return "\n".join(out)
