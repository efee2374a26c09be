"""Throughput of ``tmb verity format`` against ``veritysetup format`` on the same file, in the same run.

Both run as commands (``python -m tmb verity format`` and ``veritysetup format``), end to end, on a 1 GiB
pseudo-random file in a temporary directory, same salt and UUID, from a warm page cache, alternating which
goes first. tmb is also timed in-process (``tmb.cli.main([...])``: the same command without the Python
start-up and the imports of every subcommand module), and the start-up alone (``python -m tmb --version``)
is reported. Every run's root hash and hash file must be identical to veritysetup's. The last line is the
end-to-end ratio of throughputs, tmb / veritysetup (aim: >= 1.0x; veritysetup hashes on one core, tmb on all
of them).

    python bench/bench_verity.py [--size-mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SALT = "5a" * 32
UUID = "12345678-1234-1234-1234-123456789abc"
ROOT = re.compile(r"Root hash:\s+([0-9a-f]+)")


def find_veritysetup() -> str:
    found = shutil.which("veritysetup") or shutil.which("veritysetup", path="/usr/sbin:/sbin")
    if not found:
        sys.exit("bench_verity: veritysetup not found (install cryptsetup-bin: make deps)")
    return found


def make_data(path: Path, size: int) -> None:
    """Pseudo-random, reproducible and fast: SHAKE-256 keystream of a fixed seed."""
    chunk = 16 << 20
    xof = hashlib.shake_256(b"tmb bench_verity seed")
    block = xof.digest(chunk)
    with path.open("wb") as fh:
        written = 0
        counter = 0
        while written < size:
            n = min(chunk, size - written)
            # vary each chunk cheaply so no two data blocks repeat
            fh.write(counter.to_bytes(8, "little") + block[8:n])
            written += n
            counter += 1


def warm(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(16 << 20):
            pass


def run_in_process(argv: list[str]) -> tuple[float, str]:
    import contextlib
    import io

    from tmb.cli import build_parser
    from tmb.cli import main as tmb_main

    build_parser()  # import every subcommand module now, outside the timing
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = tmb_main(argv)
    elapsed = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"bench_verity: tmb {' '.join(argv)} failed ({rc})")
    match = ROOT.findall(out.getvalue())
    if not match:
        sys.exit("bench_verity: no root hash in the output of tmb")
    return elapsed, match[-1]


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_verity: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    match = ROOT.findall(proc.stdout)
    if not match:
        sys.exit(f"bench_verity: no root hash in the output of {cmd[0]}")
    return elapsed, match[-1]


def same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def run_startup() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tmb", "--version"], capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vs = find_veritysetup()
    size = args.size_mib << 20
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="tmb-bench-verity-") as tmp:
        data = Path(tmp) / "data.img"
        make_data(data, size)
        warm(data)
        ref_hash = Path(tmp) / "veritysetup.hash"
        tmb_hash = Path(tmp) / "tmb.hash"
        vs_cmd = [vs, "format", str(data), str(ref_hash), "--salt", SALT, "--uuid", UUID]
        tmb_args = [
            "verity",
            "format",
            str(data),
            "--salt",
            SALT,
            "--uuid",
            UUID,
            "--hash-file",
            str(tmb_hash),
        ]
        tmb_cmd = [sys.executable, "-m", "tmb", *tmb_args]
        startup = statistics.median(run_startup() for _ in range(3))
        times: dict[str, list[float]] = {"veritysetup": [], "tmb": [], "tmb-in-process": []}
        roots: set[str] = set()
        hash_bytes: bytes | None = None
        for i in range(args.repeats):
            order = ["veritysetup", "tmb", "tmb-in-process"]
            if i % 2:
                order.reverse()
            for name in order:
                out = ref_hash if name == "veritysetup" else tmb_hash
                out.unlink(missing_ok=True)
                if name == "veritysetup":
                    elapsed, root = run(vs_cmd)
                elif name == "tmb":
                    elapsed, root = run(tmb_cmd)
                else:
                    elapsed, root = run_in_process(tmb_args)
                times[name].append(elapsed)
                roots.add(root)
                if (
                    name != "veritysetup"
                    and ref_hash.exists()
                    and tmb_hash.read_bytes() != ref_hash.read_bytes()
                ):
                    sys.exit("bench_verity: FAIL: hash files differ")
            hash_bytes = tmb_hash.read_bytes()
            if hash_bytes != ref_hash.read_bytes():
                sys.exit("bench_verity: FAIL: hash files differ")
        if len(roots) != 1:
            sys.exit(f"bench_verity: FAIL: root hashes differ: {sorted(roots)}")
    mib = size / (1 << 20)
    print(
        f"bench_verity: {mib / 1024:.2f} GiB ({size // 4096} blocks), sha256, 32-byte salt, "
        f"{cpus} CPU(s), {args.repeats} repeats, warm page cache"
    )
    labels = {
        "veritysetup": "veritysetup format          ",
        "tmb": "python -m tmb verity format ",
        "tmb-in-process": "tmb.cli.main (in-process)   ",
    }
    medians = {}
    for name, label in labels.items():
        med = statistics.median(times[name])
        medians[name] = med
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{label} median {med:.3f} s  {mib / med:8.1f} MiB/s  (runs: {runs} s)")
    assert hash_bytes is not None
    print(f"python -m tmb --version (start-up and imports only): {startup:.3f} s")
    print(f"identical output: root {roots.pop()}, hash file {len(hash_bytes)} bytes")
    print(f"ratio in-process (without start-up): {medians['veritysetup'] / medians['tmb-in-process']:.2f}x")
    print(f"ratio (tmb/veritysetup throughput): {medians['veritysetup'] / medians['tmb']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
