"""What the end-to-end demo (``sample_infra/demo.py``) prepares before anything serves: the model commitment,
the fingerprint profiles, and per node a measured boot (swtpm, AK, IMA log in step with PCR 10).

* **Commitment**: ``tmb commit`` of the sample workers' model directory (``sample_infra/corpus/``, the
  training text of their n-gram model, standing in for weights).
* **Profiles**: load-aware, enrolled from SYNTHETIC runs rendered by the same :class:`SyntheticSource` the
  workers drive, on a virtual clock, under the demo's load (one request at a time, several seconds each,
  short gaps: one request in flight), each run labelled with its load series; four runs, so the
  leave-one-run-out calibration can decide (docs/profiles.md).
* **Nodes**: a private swtpm, an RSA AK, a UEFI event log of a Secure Boot through shim and grub written
  the way firmware does while PCRs 0-9 are extended with exactly what :class:`EventLogBuilder` returns, and
  a binary IMA log written the way the kernel does (``boot_aggregate`` = SHA-256 of the PCRs 0-9 read back
  from the TPM, the probe, the inference engine = this Python interpreter, the dm-verity mount of the
  committed image) while PCR 10 is extended with exactly what :class:`LogBuilder` returns. A node may be
  booted with an attack: ``tampered_log`` (an entry edited after it was extended) or ``other_image`` (the
  verity device carries another root than the commitment's).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probes.tpm import AK_HANDLE
from sample_infra.swtpm import Swtpm
from tmb.attest.bootagg import boot_aggregate
from tmb.attest.bootpolicy import draft_policy
from tmb.attest.eventlog import read_eventlog
from tmb.attest.eventlog_build import EventLogBuilder, standard_boot
from tmb.attest.eventlog_events import summarize
from tmb.attest.ima import iter_log
from tmb.attest.ima_build import LogBuilder
from tmb.fingerprint import enroll_runs, window_summaries
from tmb.telemetry.load import LoadSeries
from tmb.telemetry.sample import SampleBatch
from tmb.telemetry.synthetic import SyntheticSource
from tmb.verity import Commitment, commit_model, policy_toml_snippet

CORPUS = Path(__file__).parent / "corpus"
REGIME = "demo-sequential"
PROBE_PATH = "/usr/bin/tmb-probe"
PROBE_BYTES = b"#!/usr/bin/python3\n# tmb-probe (demo build: a stand-in file measured into IMA)\n"
ENGINE_PATH = os.path.realpath(sys.executable)  # the workers run in this interpreter: their GPU process
LIBCUDA_PATH = "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
LIBCUDA_BYTES = b"\x7fELF demo libcuda (stand-in)\n"
ENGINE_ENTRY = 2  # boot_aggregate, probe, engine, ...: the entry the tampered node edits
CMDLINE = "root=/dev/vda1 ro ima_policy=tcb ima_hash=sha256"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def engine_digest() -> str:
    with open(ENGINE_PATH, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def commit_demo_model(out: Path) -> tuple[Commitment, Path]:
    """``tmb commit`` of the sample model directory; (commitment, path of commitment.json)."""
    result = commit_model(CORPUS, out, model_id="llama-1b", revision="sample-ngram-v1")
    return result.commitment, Path(result.commitment_path)


def demo_run(
    claim: str, seconds: float, seed: int, start_ns: int = 1_700_000_000 * 10**9
) -> tuple[SampleBatch, LoadSeries]:
    """SYNTHETIC telemetry of the demo's load: back-to-back requests of 3-9 s with 0.05-0.5 s gaps, rendered
    by a :class:`SyntheticSource` on a virtual clock (deterministic for a seed), and its load series."""
    now = [start_ns]
    source = SyntheticSource(claim, rate_hz=20.0, seed=seed, clock=lambda: now[0])
    rng = np.random.default_rng([seed, 7])
    parts = []
    steps_t, steps_v = [start_ns], [0.0]
    end = start_ns + int(seconds * 1e9)
    while now[0] < end:
        source.request_started(tokens_expected=300, prompt_tokens=int(rng.integers(8, 48)))
        steps_t.append(now[0])
        steps_v.append(1.0)
        now[0] += int(rng.uniform(3.0, 9.0) * 1e9)
        parts.append(source.read())
        source.request_finished()
        steps_t.append(now[0])
        steps_v.append(0.0)
        now[0] += int(rng.uniform(0.05, 0.5) * 1e9)
        parts.append(source.read())
    return SampleBatch.concat([p for p in parts if len(p)]), LoadSeries(
        tuple(steps_t), tuple(steps_v), "series"
    )


def demo_trace(claim: str, seconds: float, seed: int, start_ns: int = 1_700_000_000 * 10**9) -> SampleBatch:
    """The telemetry of :func:`demo_run` alone."""
    return demo_run(claim, seconds, seed, start_ns)[0]


def enrol_profiles(claims: list[str], out: Path, *, seconds: float = 60.0, runs: int = 4) -> list[Path]:
    """A load-aware profile per claim (``model/precision/gpu``) from ``runs`` SYNTHETIC runs, saved under
    ``out``. Windows of 5 s, like the demo's requests."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, claim in enumerate(claims):
        model, precision, gpu = claim.split("/")
        windows = {}
        for s in range(runs):
            batch, load = demo_run(
                claim, seconds, seed=100 * i + s, start_ns=(1_700_000_000 + 3600 * s) * 10**9
            )
            windows[f"demo-{model}-{precision}-run{s}"] = window_summaries(batch, load, 5.0, 2.5)
        profile = enroll_runs(
            windows, model=model, precision=precision, engine="sample", gpu_type=gpu, regime=REGIME,
            window_s=5.0, extra={"synthetic": True, "sources": ["sample_infra.demo_setup.demo_run"]},
        )  # fmt: skip
        path = out / f"{model}_{precision}_{gpu}_{REGIME}.json"
        profile.save(path)
        paths.append(path)
    return paths


def write_boot_log(builder: EventLogBuilder) -> EventLogBuilder:
    """Every demo node's measured boot: the same firmware, Secure Boot keys, shim, grub and kernel."""
    return standard_boot(builder, cmdline=CMDLINE, firmware="tmb demo firmware 1.0")


def demo_boot_aggregate() -> bytes:
    """IMA's boot_aggregate of the demo's boot: SHA-256 of PCRs 0-9 as its event log leaves them."""
    return boot_aggregate(write_boot_log(EventLogBuilder()).pcrs["sha256"], "sha256")


def demo_boot_policy() -> str:
    """The ``[boot]`` rules every demo node must meet, drafted from the demo's known-good boot
    (``tmb boot policy`` does the same for a real node's event log): Secure Boot on, its shim, grub and
    kernel, its IMA command-line options."""
    log = write_boot_log(EventLogBuilder())
    return draft_policy(summarize(read_eventlog(io.BytesIO(log.getvalue()), name="demo event log").events))


def policy_toml(commitment: Commitment) -> str:
    """The runtime policy every demo node is checked against (allowlist + the commitment's verity rule)."""
    return (
        "# tmb demo runtime policy (generated)\nversion = 1\n\n[allow]\n"
        f'"boot_aggregate" = ["sha256:{demo_boot_aggregate().hex()}"]\n'
        f'"{PROBE_PATH}" = ["{_sha(PROBE_BYTES)}"]\n'
        f'"{ENGINE_PATH}" = ["{engine_digest()}"]\n'
        f'"{LIBCUDA_PATH}" = ["{_sha(LIBCUDA_BYTES)}"]\n\n'
        f'[require]\npaths = ["{PROBE_PATH}", "{ENGINE_PATH}"]\n\n'
        + policy_toml_snippet(commitment)
        + "\n"
        + demo_boot_policy()
    )


@dataclass(frozen=True)
class BootedNode:
    """A node after its measured boot: its swtpm (running), AK file, IMA log and UEFI event log files."""

    name: str
    swtpm: Swtpm
    ak_path: Path
    ima_log: Path
    attack: str | None
    tampered_entry: int | None = None
    eventlog: Path | None = None


def boot_node(name: str, root: Path, commitment: Commitment, *, attack: str | None = None) -> BootedNode:
    """Start the node's swtpm, create its AK, boot it: the event log while extending PCRs 0-9, then the IMA
    log while extending PCR 10 (see module doc)."""
    root.mkdir(parents=True, exist_ok=True)
    swtpm = Swtpm(root / "tpm", ek_cert=True)  # an EK certificate from its own local CA, as a vendor
    try:
        log_path = root / "binary_runtime_measurements"
        eventlog_path = root / "binary_bios_measurements"
        with swtpm.client() as tpm, open(log_path, "wb") as stream:
            ak = tpm.create_or_load_ak(AK_HANDLE, "rsa")
            with open(eventlog_path, "wb") as firmware_log:
                write_boot_log(EventLogBuilder(firmware_log)).extend_into(tpm.pcr_extend)
            pcrs = tpm.pcr_read(range(10), ("sha256",))
            boot = boot_aggregate({i: pcrs.get("sha256", i) or b"" for i in range(10)}, "sha256")
            builder = LogBuilder(stream)

            def extend(extends: dict[str, bytes]) -> None:
                tpm.pcr_extend(10, {"sha1": extends["sha1"], "sha256": extends["sha256"]})

            extend(builder.add("ima-ng", "boot_aggregate", digest=boot).extends)
            extend(builder.file(PROBE_PATH, PROBE_BYTES).extends)
            with open(ENGINE_PATH, "rb") as f:
                extend(builder.file(ENGINE_PATH, f.read()).extends)
            extend(builder.file(LIBCUDA_PATH, LIBCUDA_BYTES).extends)
            root_hex = commitment.root_hex
            if attack == "other_image":
                root_hex = hashlib.sha256(b"another, cheaper model image").hexdigest()
            for built in builder.mount_verity(
                "model", root_digest=root_hex, salt=commitment.salt_hex, data_blocks=commitment.data_blocks
            ):
                extend(built.extends)
        ak_path = root / "ak.tpm2b"
        ak_path.write_bytes(ak.tpm2b_public or ak.pem)
        tampered = None
        if attack == "tampered_log":
            tampered = _tamper(log_path, ENGINE_ENTRY)
        return BootedNode(name, swtpm, ak_path, log_path, attack, tampered, eventlog_path)
    except BaseException:
        swtpm.stop()
        raise


def _tamper(log_path: Path, index: int) -> int:
    """Edit entry ``index`` after the fact: its file digest is changed to another value (as someone hiding a
    modified binary would), the template hash is left as it was. Returns the entry number."""
    with open(log_path, "rb") as f:
        entries = list(iter_log(f))
    entry = entries[index]
    raw = bytearray(log_path.read_bytes())
    # ima-ng record: pcr(4) template_hash(20) name_len(4) "ima-ng" data_len(4) | d-ng: len(4) "sha256:\0" ...
    digest_at = entry.offset + 4 + 20 + 4 + len("ima-ng") + 4 + 4 + len("sha256:") + 1
    raw[digest_at : digest_at + 4] = b"\x00\x00\x00\x00"
    log_path.write_bytes(bytes(raw))
    return entry.num
