"""Auditor-facing commands: ``tmb ima replay``, ``tmb ima check``, ``tmb audit``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tmb.attest.pcr import BANK_SIZES, MODES, ReplayState, replay_file
from tmb.errors import InputError, Report, Severity
from tmb.extras import require


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ima = sub.add_parser("ima", help="IMA measurement lists: replay and policy checks")
    ima_sub = ima.add_subparsers(dest="ima_command", metavar="COMMAND", required=True)

    rp = ima_sub.add_parser(
        "replay",
        help="check every template hash and print the replayed PCR 10",
        description="Parse a binary or ascii IMA log (auto-detected), check every template hash and "
        "replay it. The last line printed is the replayed PCR value in hex. Exit 1 when an entry is bad "
        "or the expected value is not reached.",
    )
    rp.add_argument("log", type=Path, help="binary_runtime_measurements or ascii_runtime_measurements")
    rp.add_argument("--bank", choices=sorted(BANK_SIZES), default="sha256", help="PCR bank (default sha256)")
    rp.add_argument(
        "--sha256-mode",
        choices=[*MODES, "auto"],
        default=None,
        help="non-SHA-1 bank behaviour: per-bank hash of the template data (newer kernels) or the "
        "zero-padded SHA-1 template hash (older kernels); default per-bank, or auto with --expect",
    )
    rp.add_argument("--expect", metavar="HEX", help="quoted PCR value: find the entry where it is reached")
    rp.add_argument("--pcr", type=int, default=10, help="PCR index the log extends (default 10)")
    rp.add_argument("--state", type=Path, help="resume from a saved state (JSON from --save-state)")
    rp.add_argument("--save-state", type=Path, help="write the state after the last verified entry")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=_cmd_replay)

    ck = ima_sub.add_parser("check", help="evaluate a runtime policy against an IMA log (no quote)")
    ck.add_argument("log", type=Path)
    ck.add_argument("--policy", type=Path, required=True, help="runtime policy TOML (docs/policy.md)")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=_cmd_check)

    au = sub.add_parser(
        "audit",
        help="re-check an evidence bundle offline (quotes, IMA log, policy, verity)",
        description="Verify every quote in an evidence bundle with the AK, replay the IMA log to each "
        "quoted PCR 10, evaluate the runtime policy and the dm-verity rules over the quoted entries. "
        "Exit 0 only when no check failed.",
    )
    au.add_argument("bundle", type=Path, help="evidence bundle directory (docs/evidence-bundle.md)")
    au.add_argument("--policy", type=Path, help="runtime policy TOML (default: the bundle's policy.toml)")
    au.add_argument("--json", action="store_true")
    au.add_argument("--html", type=Path, metavar="OUT", help="also write a self-contained HTML report to OUT")
    au.add_argument(
        "--daemon-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="the daemon's verdict public key (PEM, 64 hex digits or a saved /v1/keys document): the "
        "nonce log and the verdict must be signed by it (repeatable; default: the nonce log's own key, "
        "with a warning)",
    )
    au.add_argument(
        "--ek-roots",
        metavar="DIR|builtin",
        help="TPM manufacturer root (and intermediate) certificates, like the daemon's [identity] ek_roots "
        "(a directory, 'builtin' for the curated store shipped with tmb, or 'builtin:DIR'): the node's EK "
        "certificates in the bundle are verified again against them (default: the daemon's decision is "
        "reported, audit.ek_not_rechecked)",
    )
    au.set_defaults(func=_cmd_audit)


def print_findings(report: Report, *, out: Any = None, verbose: bool = True) -> None:
    out = out or sys.stdout
    for f in report:
        if f.severity is Severity.INFO and not verbose:
            continue
        print(str(f), file=out)


def _cmd_replay(args: argparse.Namespace) -> int:
    expected: dict[str, bytes] = {}
    if args.expect:
        try:
            expected[args.bank] = bytes.fromhex(args.expect)
        except ValueError:
            raise InputError("--expect is not hex", got=args.expect) from None
    mode = args.sha256_mode or ("auto" if expected else "per-bank")
    state = None
    if args.state:
        try:
            state = ReplayState.from_json(json.loads(args.state.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read state file: {exc}", path=str(args.state)) from None
    banks = ["sha1"] if args.bank == "sha1" else ["sha1", args.bank]
    result = replay_file(args.log, banks=banks, mode=mode, state=state, expected=expected, pcr_index=args.pcr)
    value = result.state.value(args.bank, args.pcr)
    if args.save_state:
        keep = result.matched if expected else result.state
        if keep is not None:
            args.save_state.write_text(json.dumps(keep.to_json(), indent=1) + "\n")
    if args.json:
        doc = {
            "ok": result.report.ok,
            "entries": result.entries,
            "bank": args.bank,
            "mode": result.mode,
            "pcr": args.pcr,
            "value": value.hex(),
            "matched_at_entry": result.matched.index if result.matched else None,
            "state": result.state.to_json(),
            "findings": result.report.to_list(),
        }
        print(json.dumps(doc, indent=1))
    else:
        print_findings(result.report)
        print(f"entries: {result.entries}  bank: {args.bank}  mode: {result.mode}")
        if result.matched is not None:
            m = result.matched
            print(f"quoted value reached after entry {m.index - 1} (offset {m.offset})")
        print(value.hex())
    return 0 if result.report.ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from tmb.attest.policy import PolicyChecker, load_policy

    policy = load_policy(args.policy)
    report = Report()
    checker = PolicyChecker(policy, report)
    result = replay_file(args.log, banks=["sha1"], on_entry=checker)
    report.extend(result.report)
    from tmb.attest.dm import check_verity, dm_events

    check_verity(dm_events(checker.entries, report), policy.verity, report)
    checker.finish()
    if args.json:
        print(
            json.dumps({"ok": report.ok, "entries": result.entries, "findings": report.to_list()}, indent=1)
        )
    else:
        print_findings(report)
        print(f"{result.entries} entries, {len(report.errors)} errors: {'PASS' if report.ok else 'FAIL'}")
    return 0 if report.ok else 1


def _daemon_keys(paths: list[Path]) -> list[bytes]:
    """The raw Ed25519 keys in the files (PEM, hex, or a /v1/keys document)."""
    from tmb.verdict.signing import load_public_keys

    keys: list[bytes] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the daemon key: {exc.strerror}", path=str(path)) from None
        keys += [k.raw for k in load_public_keys(data, str(path))]
    return keys


def _cmd_audit(args: argparse.Namespace) -> int:
    from tmb.attest.evidence import audit_bundle, load_bundle, render_text

    bundle = load_bundle(args.bundle)
    if bundle.telemetry is not None and args.html:  # the pictures of the telemetry section
        require("report", "the telemetry plots of an HTML audit (--html)")  # before the audit, not after
    keys = _daemon_keys(args.daemon_key)
    roots = None
    if args.ek_roots is not None:
        from tmb.attest.ekcert import TrustStore

        roots = TrustStore.load(args.ek_roots)
    result = audit_bundle(args.bundle, policy_path=args.policy, daemon_keys=keys, ek_roots=roots)
    telemetry = None
    if bundle.telemetry is not None:
        from tmb.report.telemetry import telemetry_section

        telemetry = telemetry_section(bundle, plots=bool(args.html))
    decision: tuple[str, str | None] | None = None
    if bundle.verdict is not None and bundle.nonce_log is not None:  # the daemon's export
        from tmb.verdict.bundle_check import check_bundle_verdict

        outcome = telemetry.decision if telemetry is not None else None
        synthetic = telemetry.synthetic if telemetry is not None else False
        derived, claimed, more = check_bundle_verdict(bundle, result, outcome, synthetic, keys)
        result.report.extend(more)
        decision = (derived, claimed)
    if args.html:
        from tmb.report import render_html

        try:
            args.html.write_text(render_html(result, telemetry=telemetry))
        except OSError as exc:
            raise InputError(f"cannot write the HTML report: {exc.strerror}", path=str(args.html)) from None
    ok = result.ok and (telemetry is None or telemetry.ok)
    if decision is not None:  # and the verdict's checks (its signature, the decision re-derived, ...)
        ok = ok and result.report.ok
    if args.json:
        doc = result.to_json()
        if decision is not None:
            doc["decision"] = {"derived": decision[0], "verdict": decision[1]}
            doc["ok"] = ok
        if telemetry is not None:
            doc["telemetry"] = {
                "summary": telemetry.summary,
                "ok": telemetry.ok,
                "synthetic": telemetry.synthetic,
            }
            doc["ok"] = ok
        print(json.dumps(doc, indent=1))
    else:
        print(render_text(result))
        if telemetry is not None:
            label = " (SYNTHETIC telemetry)" if telemetry.synthetic else ""
            print(f"telemetry fingerprint{label}: {telemetry.summary} -- statistical evidence, not proof")
        if decision is not None:
            same = "the same" if decision[0] == decision[1] else "DIFFERENT"
            print(f"decision re-derived from the bundle: {decision[0]}; the daemon's verdict: {decision[1]}")
            print(f"DECISION: {same}")
    return 0 if ok else 1
