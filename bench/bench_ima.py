"""IMA parse + template-hash check + PCR replay throughput: tmb vs Keylime, same log, same run.

Generates a 100,000-entry ima-ng log (SHA-256 file digests) as binary and ascii, then times:

* Keylime 7.14 ``keylime.ima.ima.process_measurement_list`` on the ascii lines (what the Keylime verifier
  runs), SHA-1 bank, no runtime policy, with the final PCR value to match. Keylime imports the ``gpg``
  binding, which the IMA path never uses; a placeholder module stands in for it.
* tmb ``replay_file`` on the same ascii log and on the binary log (what a node exports), SHA-1 bank and
  SHA-1 + SHA-256 banks, with the same PCR value to match.
* tmb incremental: the same log with a saved state 1,000 entries from its end (only the new entries are read).

Repeats each measurement, reports medians, and prints the tmb/Keylime ratio as the last line. Says which
hot loops ran: the C extension (``tmb.attest._imafast``, built by ``pip install``) or the Python loops
(``TMB_IMA_NATIVE=0``, or where the extension did not build). With
``--profile N``, first prints cProfile's top N functions (by own time) for tmb's binary and ascii SHA-1 runs.
Run: ``.venv/bin/python bench/bench_ima.py [--entries N] [--repeats R] [--profile N]`` (``make bench``
installs Keylime).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import importlib.util
import io
import logging
import pstats
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from tmb.attest import pcr
from tmb.attest.ima import iter_log
from tmb.attest.ima_build import LogBuilder
from tmb.attest.pcr import replay_file


def make_logs(n: int, directory: Path) -> tuple[Path, Path, LogBuilder]:
    binary, text = io.BytesIO(), io.BytesIO()
    b = LogBuilder(binary, text)
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    for i in range(n - 1):
        path = f"/usr/lib/x86_64-linux-gnu/python3.11/site-packages/pkg{i % 613}/module_{i}.cpython-311.so"
        b.add("ima-ng", path, digest=hashlib.sha256(i.to_bytes(8, "little")).digest())
    bin_path, txt_path = directory / "binary_runtime_measurements", directory / "ascii_runtime_measurements"
    bin_path.write_bytes(binary.getvalue())
    txt_path.write_bytes(text.getvalue())
    return bin_path, txt_path, b


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def keylime_runner(txt: Path, sha1_pcr: str) -> Callable[[], object]:
    sys.modules.setdefault("gpg", types.ModuleType("gpg"))  # unused by the IMA path
    from keylime.common.algorithms import Hash
    from keylime.ima import ima as kima

    logging.getLogger("keylime").setLevel(logging.CRITICAL)

    def run() -> object:
        # Keylime takes the log as a list of lines; reading the file is part of the job for both.
        with open(txt) as f:
            got_lines = f.read().splitlines(keepends=True)
        running, failure = kima.process_measurement_list(None, got_lines, pcrval=sha1_pcr, hash_alg=Hash.SHA1)
        assert running == sha1_pcr and not failure, failure.get_event_ids()
        return running

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print cProfile's top N functions first"
    )
    args = ap.parse_args()
    if importlib.util.find_spec("keylime") is None:
        print(
            "keylime (the peer) is missing: `make bench` installs it (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return 2
    n = args.entries
    with tempfile.TemporaryDirectory() as tmp:
        bin_path, txt_path, builder = make_logs(n, Path(tmp))
        sha1 = builder.pcrs["sha1"]
        both = {"sha1": sha1, "sha256": builder.pcrs["sha256"]}

        def tmb(path: Path, expected: dict[str, bytes]) -> Callable[[], object]:
            def run() -> object:
                r = replay_file(path, banks=list(expected), mode="per-bank", expected=expected)
                assert r.matched is not None and r.entries == n and r.report.ok, r.report.to_list()
                return r

            return run

        tail = n - 1000
        full = replay_file(bin_path, banks=["sha1"], mode="per-bank")
        # State after entry `tail`: replay a prefix copy of the log.
        prefix = Path(tmp) / "prefix"
        with open(bin_path, "rb") as f:
            data = f.read()
        cut = next(e.offset for e in iter_log(io.BytesIO(data)) if e.num == tail)
        prefix.write_bytes(data[:cut])
        state = replay_file(prefix, banks=["sha1"], mode="per-bank").state
        assert full.state.value("sha1") == sha1

        def incremental() -> object:
            r = replay_file(bin_path, banks=["sha1"], mode="per-bank", state=state, expected={"sha1": sha1})
            assert r.entries == 1000 and r.matched is not None
            return r

        if args.profile:
            for name, path in (("binary", bin_path), ("ascii", txt_path)):
                prof = cProfile.Profile()
                prof.runcall(tmb(path, {"sha1": sha1}))
                print(f"== cProfile: tmb replay_file, {name}, sha1 (top {args.profile} by own time)")
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
        kl = median_time(keylime_runner(txt_path, sha1.hex()), max(1, args.repeats // 2))
        rows = [
            ("keylime process_measurement_list, ascii, sha1", kl, n),
            ("tmb replay_file, ascii, sha1", median_time(tmb(txt_path, {"sha1": sha1}), args.repeats), n),
            ("tmb replay_file, binary, sha1", median_time(tmb(bin_path, {"sha1": sha1}), args.repeats), n),
            ("tmb replay_file, binary, sha1+sha256", median_time(tmb(bin_path, both), args.repeats), n),
            ("tmb incremental, last 1,000 entries", median_time(incremental, args.repeats * 4), 1000),
        ]
    print(f"{n} ima-ng entries, medians of {args.repeats} runs (Keylime {max(1, args.repeats // 2)})")
    loop = "C (tmb.attest._imafast)" if pcr.NATIVE else "Python (TMB_IMA_NATIVE=0 or no C extension)"
    print(f"IMA hot loops: {loop}")
    print(f"{'measurement':48} {'seconds':>9} {'entries/s':>12}")
    for name, secs, count in rows:
        print(f"{name:48} {secs:9.4f} {count / secs:12,.0f}")
    ascii_ratio = kl / rows[1][1]
    print(f"tmb/keylime speed ratio, ascii sha1: {ascii_ratio:.1f}x; binary sha1: {kl / rows[2][1]:.1f}x")
    print(f"ratio tmb(binary, sha1) / keylime(ascii, sha1) = {kl / rows[2][1]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
