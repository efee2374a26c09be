"""Unit tests of the probe's parts: chain encoding, config, disk buffer, IMA reader, process bindings."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

import pytest

from probes.bindings import bind
from probes.buffer import DiskBuffer
from probes.chain import Chain
from probes.config import load_config
from probes.ima_reader import ImaReader
from tmb.attest.ima_build import LogBuilder
from tmb.errors import ConfigError, ParseError
from tmb.ingest.wire import DOMAIN, ZERO, Head, TelemetryBatch, batch_digest, qualifying_data
from tmb.telemetry.sample import SampleBatch


def test_digest_follows_the_documented_encoding() -> None:
    seg, prev, payload = bytes(range(16)), b"\x07" * 32, b"payload"
    manual = hashlib.sha256(
        b"tmb-telemetry-batch\x00v1"
        + struct.pack(">H", 4)
        + b"node"
        + seg
        + struct.pack(">Q", 5)
        + prev
        + struct.pack(">I", 7)
        + payload
    ).digest()
    assert len(DOMAIN) == 22 and batch_digest("node", seg, 5, prev, payload) == manual
    assert qualifying_data(b"n" * 32, b"h" * 32) == hashlib.sha256(b"n" * 32 + b"h" * 32).digest()


def test_chain_links_and_detects_edits() -> None:
    chain = Chain("n1", previous_head=b"\x01" * 32)
    g = chain.genesis("synthetic")
    assert g.seq == 0 and g.prev == b"\x01" * 32 and SampleBatch.decode(g.payload).source == "synthetic"
    b1 = chain.seal(
        SampleBatch.from_columns([1, 2], ["GPU-a"], source="synthetic", power_w=[1.0, 2.0]).encode()
    )
    assert b1.prev == g.digest and b1.intact() and chain.head == Head(chain.segment, 1, b1.digest)
    back = TelemetryBatch.from_wire(b1.to_wire())
    assert back == b1 and len(back.samples()) == 2
    edited = TelemetryBatch(b1.node, b1.segment, b1.seq, b1.prev, g.payload, b1.digest)
    assert not edited.intact()
    with pytest.raises(ValueError):
        chain.genesis("synthetic")
    assert Chain("n1").segment != Chain("n1").segment and Chain("n1")._prev == ZERO


@pytest.mark.parametrize(
    "field", [("seq", -1), ("segment", "zz"), ("prev", "00"), ("payload", "%%%"), ("digest", 5), ("node", "")]
)
def test_wire_rejects_bad_fields(field: tuple[str, object]) -> None:
    doc = Chain("n").genesis("nvml").to_wire()
    doc[field[0]] = field[1]
    with pytest.raises(ParseError):
        TelemetryBatch.from_wire(doc)


def test_config_file_env_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "probe.toml"
    path.write_text('node = "n1"\nquote_period_s = 2\npcrs = [0, 10]\nsource = "synthetic"\n')
    cfg = load_config(path, env={"TMB_PROBE_QUOTE_PERIOD_S": "7", "TMB_PROBE_AK_HANDLE": "0x81010003"})
    assert (
        cfg.quote_period_s == 7.0 and cfg.ak_handle == 0x81010003 and cfg.quoted_pcrs == {"sha256": [0, 10]}
    )
    assert cfg.tcti == "device:/dev/tpmrm0" and cfg.batch_interval_s == 1.0
    for text, env in (
        ('node = "n"\nbogus = 1\n', {}),
        ('node = "n"\nquote_period_s = "x"\n', {}),
        ('node = "n"\n', {"TMB_PROBE_NOPE": "1"}),
        ("quote_period_s = 1\n", {}),
        ('node = "n"\nsource = "gpu"\n', {}),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError):
            load_config(path, env=env)


def test_buffer_persists_and_evicts_oldest(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path / "b", max_bytes=10_000, max_items=5, fsync=False)
    for seq in range(8):
        buf.put("batch", {"segment": "aa", "seq": seq, "pad": "x" * 10})
    assert [i.doc["seq"] for i in buf.peek(10)] == [3, 4, 5, 6, 7]
    assert {f.id for f in buf.findings} == {"probe.buffer_evicted"}
    assert sum(f.context["count"] for f in buf.findings) == 3
    again = DiskBuffer(tmp_path / "b", max_bytes=10_000, max_items=5, fsync=False)  # after a crash
    assert [i.doc["seq"] for i in again.peek(10)] == [3, 4, 5, 6, 7]
    again.ack(again.peek()[0])
    assert len(DiskBuffer(tmp_path / "b", fsync=False)) == 4


def test_ima_reader_returns_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with open(path, "wb") as fh:
        lb = LogBuilder(fh)
        a = lb.file("/bin/a", b"a")
        b = lb.file("/bin/b", b"b")
    reader = ImaReader(path)
    start, data = reader.read()
    assert start == 0 and data == a.record + b.record
    assert reader.read() == (len(data), b"")
    c = LogBuilder(None).file("/bin/c", b"c").record
    with open(path, "ab") as fh:
        fh.write(c[:10])
    assert reader.read() == (len(data), b"")  # partial record left for later
    with open(path, "ab") as fh:
        fh.write(c[10:])
    assert reader.read() == (len(data), c)


def test_bindings_of_this_process(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\0" * 4096)
    with open(model, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ):
        got = bind(os.getpid())
    st = os.stat(model)
    assert got.exe == os.path.realpath("/proc/self/exe") and got.error is None
    assert (str(model), f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}") in got.maps
    assert bind(2**22 + 7).error == "no such process"


async def test_synthetic_gpu_processes_are_not_bound(tmp_path: Path) -> None:
    """A synthetic source makes up its GPU process ids; binding one would read whatever real process has
    that pid (on a busy host: a non-allowlisted executable, and the node turns ``unattested``). Only NVML
    pids and ``bind_pids`` are bound."""
    import asyncio

    from probes.agent import Probe
    from probes.config import ProbeConfig
    from tmb.telemetry.synthetic import SyntheticSource

    source = SyntheticSource("llama-1b/bf16/h100", rate_hz=50.0, seed=3)
    source._sim.pid = os.getpid()  # the made-up pid happens to be a live process
    cfg = ProbeConfig(node="n1", source="synthetic", state_dir=str(tmp_path), batch_interval_s=0.05)
    probe = Probe(cfg, source=source)
    task = asyncio.create_task(probe._seal_loop())
    while probe.stats.sealed < 2:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    probe.close()
    assert probe._pids == set()
