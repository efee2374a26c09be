"""``tmb quote verify``: check a TPM quote made by ``tpm2_quote`` (or any TSS) against an AK.

Inputs are the files tpm2-tools writes: ``--message`` (``tpm2_quote -m``, TPMS_ATTEST; a TPM2B_ATTEST is
accepted too), ``--signature`` (``tpm2_quote -s``, TPMT_SIGNATURE), ``--pcrs`` (``tpm2_quote -o``, serialized
or ``-F values``; or the JSON form ``{"sha256": {"10": "<hex>"}}``), ``--ak`` (PEM/DER SubjectPublicKeyInfo,
TPM2B_PUBLIC as from ``tpm2_createak -u``, or TPMT_PUBLIC). Exit status: 0 every check passed, 1 findings,
2 unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tmb.attest import tpm2
from tmb.attest.quote import QuoteResult, load_ak, verify_quote
from tmb.errors import InputError, Severity, TmbError

__all__ = ["main", "register"]


def register(sub: Any) -> None:
    quote = sub.add_parser("quote", help="TPM 2.0 quotes", description="TPM 2.0 quote tools.")
    qsub = quote.add_subparsers(dest="quote_command", metavar="SUBCOMMAND")
    qsub.required = True
    p = qsub.add_parser(
        "verify",
        help="verify a TPM quote (tpm2_quote -m/-s/-o files) against an AK",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ak", required=True, type=Path, help="AK public key: PEM, DER, TPM2B_PUBLIC or TPMT_PUBLIC"
    )
    p.add_argument("--message", "-m", required=True, type=Path, help="TPMS_ATTEST (tpm2_quote -m)")
    p.add_argument("--signature", "-s", required=True, type=Path, help="TPMT_SIGNATURE (tpm2_quote -s)")
    nonce = p.add_mutually_exclusive_group()
    nonce.add_argument("--nonce", "-q", metavar="HEX", help="expected qualifying data (extraData), hex")
    nonce.add_argument("--nonce-file", type=Path, metavar="FILE", help="expected qualifying data, raw bytes")
    p.add_argument("--pcrs", "-f", type=Path, metavar="FILE", help="PCR values (tpm2_quote -o, or JSON)")
    p.add_argument(
        "--hash", "-g", metavar="ALG", help="required signature hash (sha1, sha256, sha384, sha512)"
    )
    p.add_argument(
        "--require-pcr", type=int, action="append", default=[], metavar="N", help="PCR that must be quoted"
    )
    p.add_argument("--previous", type=Path, metavar="FILE", help="an earlier TPMS_ATTEST of the same AK")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=run_verify)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} file: {exc.strerror}", path=str(path)) from None


def _attest_bytes(data: bytes) -> bytes:
    """TPMS_ATTEST from a file that may hold a TPM2B_ATTEST (u16 size prefix)."""
    magic = tpm2.TPM_GENERATED_VALUE.to_bytes(4, "big")
    if data[2:6] == magic and int.from_bytes(data[:2], "big") == len(data) - 2:
        return data[2:]
    return data


def _nonce(args: argparse.Namespace) -> bytes | None:
    if args.nonce_file is not None:
        return _read(args.nonce_file, "nonce")
    if args.nonce is None:
        return None
    text = args.nonce.strip().removeprefix("0x")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InputError("--nonce is not hex", value=args.nonce) from None


def verify_files(args: argparse.Namespace) -> QuoteResult:
    ak = load_ak(_read(args.ak, "AK"))
    message = _attest_bytes(_read(args.message, "message"))
    signature = _read(args.signature, "signature")
    attest = tpm2.parse_attest(message)
    pcrs = None
    if args.pcrs is not None:
        selection = attest.quote.pcr_select if attest.quote is not None else None
        pcrs = tpm2.load_pcr_values(_read(args.pcrs, "PCR values"), selection)
    previous = None
    if args.previous is not None:
        previous = tpm2.parse_attest(_attest_bytes(_read(args.previous, "previous quote")))
    if args.hash is not None:
        tpm2.hash_id(args.hash)  # unknown names are input errors, not findings
    return verify_quote(
        ak,
        message,
        signature,
        nonce=_nonce(args),
        pcrs=pcrs,
        expected_hash=args.hash,
        require_pcrs=args.require_pcr,
        previous=previous,
    )


def _human(result: QuoteResult) -> str:
    d = result.to_dict()
    sel = " ".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in (d["pcr_select"] or {}).items())
    lines = [
        f"signature:    {d['signature']['scheme']}/{d['signature']['hash']}",
        f"clock:        {d['clock']} ms, resetCount {d['reset_count']}, restartCount {d['restart_count']}, "
        f"safe {'yes' if d['safe'] else 'no'}",
        f"firmware:     {d['firmware_version']}",
        f"extraData:    {d['extra_data'] or '(empty)'}",
        f"PCRs quoted:  {sel or '(none)'}",
        f"pcrDigest:    {d['pcr_digest']}",
    ]
    for item in result.report:
        lines.append(str(item))
    errors = len(result.report.errors)
    warnings = sum(1 for f in result.report if f.severity is Severity.WARNING)
    verdict = "OK: every check passed" if result.ok else f"FAILED: {errors} error(s)"
    lines.append(f"quote {verdict}" + (f", {warnings} warning(s)" if warnings else ""))
    return "\n".join(lines)


def run_verify(args: argparse.Namespace) -> int:
    result = verify_files(args)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(_human(result))
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tmb.attest.quote_cli quote verify ...``: the quote command alone, without the imports of
    every other ``tmb`` subcommand (same arguments and exit codes as ``tmb quote verify``)."""
    parser = argparse.ArgumentParser(prog="tmb")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
