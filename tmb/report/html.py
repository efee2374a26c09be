"""The auditor's HTML report: one self-contained page (inline CSS, plots embedded as data: URIs).

Sections: the verdict summary, the attestation chain (quote -> PCR 10 -> IMA entries -> verity root ->
commitment) with each check's result, every finding, the IMA entries, and (when the bundle carries
telemetry) plots of the request window's telemetry against the enrolled profile's fitted distributions.
The page loads nothing from the network and runs no script.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from tmb.attest.evidence import AuditResult
from tmb.errors import Finding, Severity

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1c2430;
background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#5a6472}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:16px;margin:10px 0}
.verdict{font-size:20px;font-weight:600;padding:12px 16px;border-radius:8px;display:inline-block}
.pass{background:#e3f5e8;color:#14632c}.fail{background:#fde7e7;color:#8c1c1c}
.warn{background:#fff4d6;color:#7a5600}
.chain{display:flex;flex-wrap:wrap;align-items:stretch;gap:6px}
.link{flex:1 1 150px;border:1px solid #dde1e6;border-radius:8px;padding:10px;background:#fff}
.link .st{font-weight:600}.arrow{align-self:center;color:#8a94a3;font-size:20px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceff3;vertical-align:top}
th{background:#f0f2f5}code{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.muted{color:#8a94a3}.plots img{max-width:100%;border:1px solid #eceff3;border-radius:6px;margin:6px 0}
.note{font-size:12px;color:#5a6472}
"""


@dataclass(frozen=True)
class Plot:
    """An embedded figure: a title, a PNG as a data URI, and a caption."""

    title: str
    data_uri: str
    caption: str


@dataclass(frozen=True)
class TelemetrySection:
    """What the report says about the request window's telemetry (statistical evidence, not proof)."""

    summary: str  # e.g. "consistent with llama-1b/bf16/h100 (LLR 12.3, p = 0.41, 600 samples)"
    ok: bool
    plots: tuple[Plot, ...]
    synthetic: bool
    decision: str = ""  # consistent, inconsistent, inconclusive or not_judged


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _status(ok: bool | None, text_ok: str = "verified", text_bad: str = "failed") -> str:
    if ok is None:
        return '<span class="st warn">not checked</span>'
    return f'<span class="st {"pass" if ok else "fail"}">{"✓ " + text_ok if ok else "✗ " + text_bad}</span>'


def _ids(findings: Iterable[Finding], prefix: str) -> list[Finding]:
    return [f for f in findings if f.id.startswith(prefix) and f.severity is Severity.ERROR]


def _chain(result: AuditResult) -> str:
    findings = list(result.report)
    quote_bad = _ids(findings, "quote.") + _ids(findings, "audit.quote")
    pcr_bad = _ids(findings, "pcr.")
    ima_bad = _ids(findings, "ima.") + _ids(findings, "policy.")
    dm_bad = _ids(findings, "dm.")
    last = result.quotes[-1] if result.quotes else None
    quotes_ok = bool(result.quotes) and not quote_bad
    links = [
        *_boot_links(result),
        (
            "TPM quote",
            _status(quotes_ok if result.quotes else False),
            f"{len(result.quotes)} quote(s)"
            + (
                f"; last: clock {last.clock}, reset {last.reset_count}, restart {last.restart_count}"
                if last
                else ""
            ),
        ),
        (
            "PCR 10",
            _status(not pcr_bad and bool(result.entries_attested), "replayed", "not reached"),
            f"<code>{_e(last.pcr10 or '')}</code>" if last else "",
        ),
        (
            "IMA entries",
            _status(not ima_bad, "allowed by policy", "policy findings"),
            f"{result.entries_attested} of {result.entries_total} covered by a verified quote"
            + (f" (non-SHA-1 banks: {_e(result.mode)})" if result.mode else ""),
        ),
        (
            "dm-verity root",
            _status(bool(result.verity) and not dm_bad, "activated", "not matched"),
            ", ".join(f"{_e(n)} at entry {i}" for n, i in result.verity.items()) or "no verified mount",
        ),
        (
            "model commitment",
            _status(bool(result.verity) and not dm_bad, "matches", "no match")
            if result.rules
            else _status(None),
            "<br>".join(
                f"{_e(r.name)}: root <code>{_e(r.root_digest[:16])}…</code>, {r.data_blocks} blocks"
                for r in result.rules
            )
            or "no commitment given",
        ),
    ]
    parts = []
    for i, (title, status, detail) in enumerate(links):
        if i:
            parts.append('<div class="arrow">→</div>')
        parts.append(
            f'<div class="link"><div><b>{_e(title)}</b></div><div>{status}</div>'
            f'<div class="note">{detail}</div></div>'
        )
    return '<div class="chain">' + "".join(parts) + "</div>"


def _boot_links(result: AuditResult) -> list[tuple[str, str, str]]:
    """firmware -> bootloader -> kernel, ahead of the quote: what the event log and the [boot] rules say."""
    boot = result.boot
    if boot is None or not boot.eventlog:
        return [("firmware event log", _status(None), "none in the bundle: the boot chain is not checked")]
    bad_policy = [f for f in boot.findings if f.id.startswith("boot.") and f.id != "boot.aggregate_mismatch"]
    apps = [a for a in boot.boot_apps if a["role"] != "kernel"]
    kernels = [a for a in boot.boot_apps if a["role"] == "kernel"]
    secure = {True: "Secure Boot on", False: "Secure Boot OFF", None: "Secure Boot not measured"}[
        boot.secure_boot
    ]
    return [
        (
            "firmware",
            _status(boot.pcrs_replayed, "PCRs 0-9 replayed", "does not replay"),
            f"{boot.events} events; {secure}",
        ),
        (
            "bootloader",
            _status(not bad_policy if boot.policy_checked else None, "allowed", "policy findings"),
            "<br>".join(f"{_e(a['role'])} {_e(a['path'] or '')}" for a in apps) or "none measured",
        ),
        (
            "kernel",
            _status(not bad_policy if boot.policy_checked else None, "allowed", "policy findings"),
            "<br>".join(_e(c) for c in boot.kernel_cmdlines) or f"{len(kernels)} image(s) measured",
        ),
        (
            "IMA boot_aggregate",
            _status(boot.boot_aggregate, "this boot's", "another boot's"),
            "the IMA log starts at the kernel this boot measured",
        ),
    ]


def _findings(findings: Sequence[Finding]) -> str:
    if not findings:
        return '<p class="muted">No findings.</p>'
    rows = []
    for f in findings:
        ctx = f.to_dict()["context"]
        where = ", ".join(f"{_e(k)}={_e(v)}" for k, v in ctx.items())
        cls = {"error": "fail", "warning": "warn"}.get(f.severity.value, "")
        rows.append(
            f'<tr><td class="{cls}">{_e(f.severity.value)}</td><td><code>{_e(f.id)}</code></td>'
            f"<td>{_e(f.message)}</td><td><code>{where}</code></td></tr>"
        )
    return (
        "<table><tr><th>severity</th><th>id</th><th>what</th><th>where</th></tr>" + "".join(rows) + "</table>"
    )


def _entries(result: AuditResult) -> str:
    by_entry: dict[int, list[str]] = {}
    for f in result.report:
        entry = f.context.get("entry")
        if isinstance(entry, int):
            by_entry.setdefault(entry, []).append(f.id)
    rows = []
    for row in result.entries:
        flags = ", ".join(by_entry.get(row.num, []))
        cls = "fail" if any(not i.endswith("mode_detected") for i in by_entry.get(row.num, [])) else ""
        rows.append(
            f"<tr><td>{row.num}</td><td>{_e(row.template)}</td><td><code>{_e(row.name)}</code></td>"
            f"<td><code>{_e(row.digest)}</code></td><td>{'yes' if row.attested else '<b>no</b>'}</td>"
            f'<td class="{cls}">{_e(flags)}</td></tr>'
        )
    more = ""
    if result.entries_total > len(result.entries):
        more = (
            f'<p class="note">Showing the first {len(result.entries)} of {result.entries_total} entries.</p>'
        )
    return (
        "<table><tr><th>#</th><th>template</th><th>path / event</th><th>digest</th><th>quoted</th>"
        "<th>findings</th></tr>" + "".join(rows) + "</table>" + more
    )


def _telemetry(section: TelemetrySection | None) -> str:
    if section is None:
        return '<p class="muted">This bundle carries no telemetry window.</p>'
    label = (
        '<p class="note"><b>Synthetic telemetry</b>: produced by a workload model, not read from a GPU.</p>'
        if section.synthetic
        else ""
    )
    plots = "".join(
        f'<figure><figcaption><b>{_e(p.title)}</b></figcaption><img alt="{_e(p.title)}" src="{p.data_uri}">'
        f'<figcaption class="note">{_e(p.caption)}</figcaption></figure>'
        for p in section.plots
    )
    cls = "pass" if section.ok and section.decision != "inconclusive" else "warn" if section.ok else "fail"
    return (
        f'<p><span class="st {cls}">{_e(section.summary)}</span></p>{label}'
        '<p class="note">A fingerprint is statistical evidence with a calibrated false-alarm rate, '
        "not a proof.</p>"
        f'<div class="plots">{plots}</div>'
    )


def render_html(result: AuditResult, *, telemetry: TelemetrySection | None = None, title: str = "") -> str:
    """The whole page as a string."""
    ok = result.ok and (telemetry is None or telemetry.ok)
    if ok and telemetry is not None and telemetry.decision == "inconclusive":
        verdict = "PASS: every check held; the telemetry fingerprint could not decide (inconclusive)"
    elif ok:
        verdict = "PASS: every check held"
    elif result.ok and telemetry is not None:
        verdict = "FAIL: the telemetry does not fit the claimed model (attestation chain held)"
    else:
        verdict = "FAIL: see the findings"
    errors = len(result.report.errors)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title or "tmb audit report")}: {_e(result.node or result.bundle)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>tmb audit report</h1>
<div class="sub">node <b>{_e(result.node or "(unnamed)")}</b> · bundle <code>{_e(result.bundle)}</code> ·
policy <code>{_e(result.policy_source)}</code> · generated {generated}</div>
<h2>Verdict</h2>
<div id="verdict" class="verdict {"pass" if ok else "fail"}">{_e(verdict)}</div>
<p class="note">{errors} error finding(s), {len(result.report) - errors} warning(s)/note(s).
The attestation chain is a cryptographic proof under the TPM threat model; the telemetry section is
statistical evidence.</p>
<h2>Attestation chain</h2>
{_chain(result)}
<h2>Findings</h2>
<div class="card">{_findings(result.report.findings)}</div>
<h2>Telemetry during the request window</h2>
<div class="card">{_telemetry(telemetry)}</div>
<h2>IMA measurement list</h2>
<div class="card">{_entries(result)}</div>
</main></body></html>
"""
