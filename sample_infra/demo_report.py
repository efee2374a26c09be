"""The demo's outputs: evidence bundles for its requests (with the request window's telemetry), HTML audit
reports, the offline audit scenarios, and the printed table."""

from __future__ import annotations

import io
import shutil
import ssl
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from tmb.attest.evidence import audit_bundle, load_bundle

if TYPE_CHECKING:
    from sample_infra.demo import Demo, DemoResult

LABELS = {"node-1": "honest", "node-2": "honest", "node-3": "impostor", "node-4": "tampered-log"}
LABELS["node-5"] = "other-image"


async def fetch_request_bundle(demo: Demo, request_id: str, dest: Path) -> Path | None:
    """The daemon's own export of one request's bundle: ``GET /v1/evidence/{id}/bundle`` on its management
    listener (TLS pinned to the demo's CA; a loopback client, so no auditor token is needed), a tar archive
    unpacked into ``dest``. None when the daemon has no final verdict for it."""
    context = ssl.create_default_context(cafile=demo.daemon_ca)
    url = f"{demo.management_url}/v1/evidence/{request_id}/bundle"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, ssl=context) as resp:
        if resp.status != 200:
            return None
        data = await resp.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        (Path(tmp) / "bundle").rename(dest)
    return dest


def audit_to_html(bundle: Path, page: Path) -> bool:
    """What ``tmb audit BUNDLE --html PAGE`` does; True when it would exit 0."""
    from tmb.report import render_html
    from tmb.report.telemetry import telemetry_section

    result = audit_bundle(bundle)
    telemetry = telemetry_section(load_bundle(bundle))
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(result, telemetry=telemetry, title="tmb demo"))
    return result.ok and (telemetry is None or telemetry.ok)


async def write_bundles(demo: Demo, result: DemoResult) -> None:
    """Bundles (the daemon's export, while it runs) and HTML reports for round 1's requests (one per
    node)."""
    for row in [r for r in result.rows if r.round == "1"]:
        node = row.outcome.node or ""
        label = f"{LABELS.get(node, node)}-{node}"
        rid = row.outcome.request_id
        bundle = await fetch_request_bundle(demo, rid, demo.out / "bundles" / label) if rid else None
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
