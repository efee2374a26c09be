"""Quote verification time per quote: tmb vs. tpm2-tools' ``tpm2_checkquote``, same files, same run.

For RSA-2048 (RSASSA-SHA256) and ECC P-256 (ECDSA-SHA256) AKs, a private swtpm makes one quote over
sha256 PCRs 0-7 and 10 (the probe's usual selection); the quote, signature, AK PEM and the tpm2-tools
serialized PCR file are written once, then verified many times by:

* tmb in-process: ``verify_quote`` on the file bytes (AK PEM loading + PCR file parsing included);
* tmb as a process: ``python -m tmb quote verify ...`` per invocation (interpreter start + imports of every
  registered subcommand included), and ``python -m tmb.attest.quote_cli quote verify ...`` (the quote
  command's own imports only);
* ``tpm2_checkquote -u ak.pem -m quote.msg -s quote.sig -f quote.pcrs -q NONCE -g sha256`` per invocation.

Each figure is the median over repeats. Usage: ``.venv/bin/python bench/bench_quote.py [--repeats 15]``.
The ratio (tpm2_checkquote time / tmb time) is printed last.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.tpm import TpmClient  # noqa: E402
from tmb.attest import tpm2  # noqa: E402
from tmb.attest.quote import verify_quote  # noqa: E402

SELECTION = {"sha256": [0, 1, 2, 3, 4, 5, 6, 7, 10]}
HANDLES = {"rsa": 0x81010002, "ecc": 0x81010003}


def start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server", f"type=tcp,port={port}"]
    cmd += ["--ctrl", f"type=tcp,port={port + 1}", "--flags", "not-need-init,startup-clear"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            with TpmClient(tcti) as tpm:
                tpm.get_random(1)
            return proc, tcti
        except Exception:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("swtpm did not start")


def make_files(tcti: str, alg: str, out: Path) -> bytes:
    nonce = bytes(range(20))
    with TpmClient(tcti) as tpm:
        ak = tpm.create_or_load_ak(HANDLES[alg], alg)
        q = tpm.quote(HANDLES[alg], SELECTION, nonce)
    attest = tpm2.parse_attest(q.message)
    assert attest.quote is not None
    (out / "ak.pem").write_bytes(ak.pem)
    (out / "quote.msg").write_bytes(q.message)
    (out / "quote.sig").write_bytes(q.signature)
    (out / "quote.pcrs").write_bytes(tpm2.marshal_tools_serialized_pcrs(attest.quote.pcr_select, q.pcrs))
    return nonce


def tmb_in_process(d: Path, nonce: bytes, loops: int, repeats: int) -> float:
    ak, msg, sig, pcrs = ((d / n).read_bytes() for n in ("ak.pem", "quote.msg", "quote.sig", "quote.pcrs"))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            result = verify_quote(
                ak, msg, sig, nonce=nonce, pcrs=tpm2.load_pcr_values(pcrs), expected_hash="sha256"
            )
        samples.append((time.perf_counter() - t0) / loops)
        if not result.ok:
            raise SystemExit(f"tmb rejected the benchmark quote: {result.report.ids()}")
    return statistics.median(samples)


def per_invocation(cmd: list[str], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="process invocations per tool and key (median)")
    ap.add_argument("--loops", type=int, default=300, help="in-process verifications per repeat")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tmb-bench-quote-") as tmp:
        proc, tcti = start_swtpm(Path(tmp))
        try:
            files = {}
            for alg in ("rsa", "ecc"):
                d = Path(tmp) / alg
                d.mkdir()
                files[alg] = (d, make_files(tcti, alg, d))
        finally:
            proc.terminate()
            proc.wait()
        for alg, (d, nonce) in files.items():
            common = ["-m", str(d / "quote.msg"), "-s", str(d / "quote.sig"), "-f", str(d / "quote.pcrs")]
            peer = ["tpm2_checkquote", "-u", str(d / "ak.pem"), *common, "-q", nonce.hex(), "-g", "sha256"]
            verify = ["quote", "verify", "--ak", str(d / "ak.pem"), *common]
            verify += ["--nonce", nonce.hex(), "--hash", "sha256", "--require-pcr", "10"]
            in_proc = tmb_in_process(d, nonce, args.loops, 5)
            tmb_cli = per_invocation([sys.executable, "-m", "tmb", *verify], args.repeats)
            quote_cli = per_invocation([sys.executable, "-m", "tmb.attest.quote_cli", *verify], args.repeats)
            checkquote = per_invocation(peer, args.repeats)
            rows.append((alg, in_proc, tmb_cli, quote_cli, checkquote))
    names = {"rsa": "RSA-2048 RSASSA-SHA256", "ecc": "ECC P-256 ECDSA-SHA256"}
    print(
        f"quote over sha256 PCRs {SELECTION['sha256']}; "
        f"medians of {args.repeats} process runs, 5x{args.loops} calls"
    )
    print(
        f"{'AK':<24}{'tmb in-process':>15}{'python -m tmb':>15}{'-m ..quote_cli':>16}{'tpm2_checkquote':>17}"
    )
    for alg, in_proc, tmb_cli, quote_cli, checkquote in rows:
        print(
            f"{names[alg]:<24}{in_proc * 1e6:>12.0f} us{tmb_cli * 1e3:>12.1f} ms"
            f"{quote_cli * 1e3:>13.1f} ms{checkquote * 1e3:>14.1f} ms"
        )
    print(
        "ratio tpm2_checkquote/tmb (>1: tmb faster): "
        + "; ".join(
            f"{alg} in-process {c / i:.0f}x, quote_cli process {c / q:.2f}x, tmb CLI process {c / t:.2f}x"
            for alg, i, t, q, c in rows
        )
    )


if __name__ == "__main__":
    main()
