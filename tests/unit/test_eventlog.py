"""UEFI/TCG event logs: parser, replay, decoders, summary and ``tmb boot`` on the vendored real-world logs
(tests/data/vectors/PROVENANCE.md) and on synthetic and fuzzed input."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vectors import VECTORS

from tmb.attest.boot_cli import load_pcr_file, parse_pcr_yaml
from tmb.attest.eventlog import (
    EVENT_TYPE_IDS,
    MAX_EVENT_DATA,
    Event,
    iter_events,
    read_eventlog,
    replay,
    replay_file,
)
from tmb.attest.eventlog_events import decode_event, parse_image_load, summarize
from tmb.cli import main
from tmb.errors import InputError, ParseError

C1 = sorted((VECTORS / "tpm2-tools").glob("event-*.bin"))
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every other vendored log and its event count, the header event included (PROVENANCE.md sections C2, C3).
OTHER_LOGS = {
    "go-attestation/crypto_agile_eventlog": 27,
    "go-attestation/ubuntu_2104_shielded_vm_no_secure_boot_eventlog": 106,
    "go-attestation/coreos_36_shielded_vm_no_secure_boot_eventlog": 76,
    "go-attestation/sb_cert_eventlog": 15,
    "go-attestation/option_rom_eventlog": 61,
    "go-attestation/ebs_event_missing_eventlog": 38,
    "go-attestation/short_no_action_eventlog": 1,
    "keylime/measured_boot/mb_log.bin": 102,
    "keylime/measured_boot/binary_bios_measurements": 121,
    "keylime/measured_boot/binary_bios_measurements-secureboot": 99,
    "rust-keylime/uefi_log.bin": 124,
    "tpm2-tss/binary_measurements_hcrtm.bin": 204,
    "tpm2-tss/binary_measurements_pc_client.bin": 33,
}
SECURE_BOOT_LOG = VECTORS / "keylime/measured_boot/binary_bios_measurements-secureboot"


def _expected(log: Path) -> dict[str, dict[int, bytes]]:
    return parse_pcr_yaml(log.with_name(log.name + ".yaml").read_text(), name=str(log))


def _digest_offset(raw: bytes, event: Event, bank: str) -> int:
    """Byte offset in the file of ``bank``'s digest of ``event`` (it precedes the event data)."""
    head = raw[event.offset : event.offset + event.size - len(event.data)]
    pos = head.find(event.digests[bank])
    assert pos > 0
    return event.offset + pos


# -------------------------------------------------------------------------------- C1: expected PCRs


@pytest.mark.parametrize("log", C1, ids=[p.name for p in C1])
def test_c1_logs_replay_to_every_pcr_in_their_yaml(log: Path) -> None:
    expected = _expected(log)
    assert sum(len(v) for v in expected.values()) >= 2
    result = replay_file(log, expected=expected)
    assert "eventlog.pcr_mismatch" not in result.report.ids(), result.report.to_list()
    assert result.report.ok, result.report.to_list()
    for bank, values in expected.items():
        for pcr, value in values.items():
            assert result.value(bank, pcr) == value


@pytest.mark.parametrize("log", C1, ids=[p.name for p in C1])
def test_c1_one_changed_digest_byte_is_named(log: Path, tmp_path: Path) -> None:
    raw = log.read_bytes()
    expected = _expected(log)
    events = read_eventlog(log).events
    for bank in expected:
        # The last event of this bank extended into a PCR the yaml lists.
        target = next(
            e for e in reversed(events) if e.pcr in expected[bank] and bank in e.digests and e.type != 3
        )
        bad = bytearray(raw)
        bad[_digest_offset(raw, target, bank)] ^= 0x01
        path = tmp_path / f"{bank}.bin"
        path.write_bytes(bytes(bad))
        result = replay_file(path, expected=expected)
        mismatches = [f for f in result.report if f.id == "eventlog.pcr_mismatch"]
        assert [(f.context["bank"], f.context["pcr"]) for f in mismatches] == [(bank, target.pcr)]
        assert mismatches[0].context["last_event"] == max(
            e.index for e in events if e.pcr == target.pcr and e.type != 3
        )
        assert not result.report.ok


def test_hcrtm_log_starts_pcr0_at_locality_4_as_tpm2_tss_expects() -> None:
    # tpm2-tss test/unit/fapi-eventlog.c, check_eventlog_pcr0: "pcr0 value got from system with HCRTM events"
    result = replay_file(VECTORS / "tpm2-tss/binary_measurements_hcrtm.bin")
    assert result.locality == 4
    assert result.value("sha1", 0).hex() == "15f4e6ca457d1af6bc49511a93ba3500ad69acc5"
    assert result.banks == ("sha1", "sha256", "sm3_256")


def test_startup_locality_event_sets_pcr0() -> None:
    result = replay_file(VECTORS / "go-attestation/short_no_action_eventlog")
    assert result.locality == 3
    assert result.value("sha1", 0) == bytes(19) + b"\x03"
    assert result.value("sha1", 1) == bytes(20) and result.value("sha1", 17) == b"\xff" * 20


# ------------------------------------------------------------------------------- C2/C3: parse cleanly


@pytest.mark.parametrize("name", sorted(OTHER_LOGS))
def test_other_logs_parse_replay_and_decode(name: str) -> None:
    log = read_eventlog(VECTORS / name)
    assert len(log.events) == OTHER_LOGS[name]
    assert [e.index for e in log.events] == list(range(len(log.events)))
    assert log.events[-1].offset + log.events[-1].size == (VECTORS / name).stat().st_size
    result = replay(log.events)
    assert result.events == len(log.events) and result.banks == log.banks
    for event in log.events:
        decode_event(event)  # every event of a real log decodes
    summary = summarize(log.events)
    assert "eventlog.malformed_event" not in summary.report.ids()


@pytest.mark.parametrize("name", ["rust-keylime/uefi_log.bin", "go-attestation/option_rom_eventlog"])
def test_truncated_log_names_file_offset_and_event(name: str, tmp_path: Path) -> None:
    path = VECTORS / name
    last = read_eventlog(path).events[-1]
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[: last.offset + last.size - 3])
    with pytest.raises(ParseError) as info:
        read_eventlog(cut)
    ctx = info.value.context
    assert (ctx["file"], ctx["offset"], ctx["event"]) == (str(cut), last.offset, last.index)
    assert "ends inside event" in info.value.message
    result = replay_file(cut)  # replayed up to the cut, the cut an error finding
    assert result.events == last.index
    assert result.report.ids()[-1] == "eventlog.truncated"
    assert result.report.findings[-1].context["offset"] == last.offset
    assert not result.report.ok


def test_log_cut_at_an_event_boundary_is_a_shorter_log(tmp_path: Path) -> None:
    path = VECTORS / "rust-keylime/uefi_log.bin"
    tenth = read_eventlog(path).events[10]
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[: tenth.offset])
    assert len(read_eventlog(cut).events) == 10


def test_short_reads_from_a_pipe_like_stream() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            n = min(3, len(buf), len(self.data) - self.pos)
            buf[:n] = self.data[self.pos : self.pos + n]
            self.pos += n
            return n

    raw = (VECTORS / "tpm2-tools/event-sd-boot-fedora37.bin").read_bytes()
    events = list(iter_events(Trickle(raw), name="securityfs"))  # type: ignore[arg-type]
    assert events == list(read_eventlog(io.BytesIO(raw)).events)


# ----------------------------------------------------------------------------------- summary, decode


def test_secure_boot_logs_show_secure_boot_and_db_certificates() -> None:
    for name, db_certs in (("go-attestation/sb_cert_eventlog", 4), (SECURE_BOOT_LOG, 4)):
        summary = summarize(read_eventlog(VECTORS / name).events)
        assert summary.secure_boot is True and summary.secure_boot_event is not None
        db = summary.variables["db"]
        assert sum(s.kind == "x509" for s in db) == db_certs
        assert any("Microsoft" in (s.subject or "") for s in db)
        assert "eventlog.secure_boot_disabled" not in summary.report.ids()


def test_secure_boot_summary_of_the_keylime_log() -> None:
    summary = summarize(read_eventlog(SECURE_BOOT_LOG).events)
    assert summary.secure_boot_event == 4
    assert summary.report.ok, summary.report.to_list()
    assert [(a.role, a.path) for a in summary.boot_apps] == [
        ("shim", "\\EFI\\redhat\\shimx64.efi"),
        ("grub", "\\EFI\\redhat\\grubx64.efi"),
        ("kernel", None),
    ]
    assert summary.boot_apps[0].digests["sha256"] == (
        "27b12463e599b3147635f272e3722960e443def60fef088eba600697017529f2"
    )
    assert len(summary.variables["dbx"]) == 371 and {s.kind for s in summary.variables["dbx"]} == {"sha256"}
    assert [c.source for c in summary.kernel_cmdlines] == ["grub"]
    assert "root=/dev/mapper/rhel_rhel--9-root" in summary.kernel_cmdlines[0].text


def test_grub_and_systemd_boot_kernel_command_lines() -> None:
    grub = summarize(
        read_eventlog(VECTORS / "go-attestation/ubuntu_2104_shielded_vm_no_secure_boot_eventlog").events
    )
    assert grub.secure_boot is False and "eventlog.secure_boot_disabled" in grub.report.ids()
    assert [(c.event, c.pcr, c.source) for c in grub.kernel_cmdlines] == [(96, 8, "grub")]
    assert grub.kernel_cmdlines[0].text.startswith("/boot/vmlinuz-5.11.0-1006-gcp root=PARTUUID=6443a6ae")
    sd = summarize(read_eventlog(VECTORS / "tpm2-tools/event-sd-boot-fedora37.bin").events)
    assert {(c.source, c.text) for c in sd.kernel_cmdlines} == {
        ("systemd-boot", "console=ttyS0 console=tty0 efi=debug")
    }


def test_edited_event_data_is_left_out_of_the_summary(tmp_path: Path) -> None:
    raw = bytearray(SECURE_BOOT_LOG.read_bytes())
    event = read_eventlog(SECURE_BOOT_LOG).events[4]  # SecureBoot = 1
    assert event.data[-1] == 1
    raw[event.offset + event.size - 1] = 0  # claim it was off: the digest still says on
    path = tmp_path / "edited.bin"
    path.write_bytes(bytes(raw))
    assert replay_file(path).report.ok  # the PCRs do not see the data
    summary = summarize(read_eventlog(path).events)
    assert summary.secure_boot is None
    bad = [f for f in summary.report if f.id == "eventlog.event_data_mismatch"]
    assert [(f.context["event"], f.context["type"]) for f in bad] == [(4, "EV_EFI_VARIABLE_DRIVER_CONFIG")]


def test_boot_application_device_path() -> None:
    log = read_eventlog(VECTORS / "go-attestation/sb_cert_eventlog")
    image = parse_image_load(log.events[10])
    assert image.path == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert image.device_path_text.startswith("PciRoot(0x0)/Pci(0x3,0x0)/")
    gpt = decode_event(log.events[9])
    assert gpt["partitions"] == 3


# ---------------------------------------------------------------------------------- synthetic logs

SHA256 = 0x000B


def _spec_event(algs: list[tuple[int, int]], signature: bytes = b"Spec ID Event03\0") -> bytes:
    body = signature + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, s) for a, s in algs) + b"\0"
    return struct.pack("<II20sI", 0, 3, bytes(20), len(body)) + body


def _event2(pcr: int, etype: int, data: bytes, digests: list[tuple[int, bytes]] | None = None) -> bytes:
    digests = digests if digests is not None else [(SHA256, hashlib.sha256(data).digest())]
    head = struct.pack("<III", pcr, etype, len(digests))
    head += b"".join(struct.pack("<H", a) + d for a, d in digests)
    return head + struct.pack("<I", len(data)) + data


def _log(*events: bytes) -> bytes:
    return _spec_event([(SHA256, 32)]) + b"".join(events)


def test_separator_error_and_missing_separators_are_findings() -> None:
    raw = _log(*(_event2(p, 4, struct.pack("<I", 1 if p == 7 else 0)) for p in range(7)))
    summary = summarize(read_eventlog(io.BytesIO(raw)).events)
    assert summary.report.ids() == ["eventlog.secure_boot_unmeasured", "eventlog.separator_missing"]
    raw = _log(*(_event2(p, 4, struct.pack("<I", 1 if p == 5 else 0)) for p in range(8)))
    summary = summarize(read_eventlog(io.BytesIO(raw)).events)
    errors = summary.report.errors
    assert [(f.id, f.context["event"], f.context["type"]) for f in errors] == [
        ("eventlog.separator_error", 6, "EV_SEPARATOR")
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (_log(struct.pack("<IIIH", 0, 1, 1, SHA256) + bytes(32) + struct.pack("<I", 1 << 30)), "exceeds"),
        (_log(struct.pack("<III", 0, 1, 9)), "digest count 9"),
        (_log(_event2(0, 1, b"x", [(0x0004, bytes(20))])), "0x0004 is not in the Spec ID"),
        (
            _spec_event([(SHA256, 32), (0x0004, 20)]) + _event2(0, 1, b"x", [(SHA256, bytes(32))] * 2),
            "two sha256",
        ),
        (_spec_event([(SHA256, 20)]), "digest size 20"),
        (_spec_event([(SHA256, 32)], b"Spec ID Event99\0"), "unknown Spec ID"),
    ],
    ids=["empty", "huge-data", "digest-count", "unknown-alg", "duplicate-alg", "size", "signature"],
)
def test_malformed_logs_are_parse_errors_naming_the_place(raw: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message) as info:
        read_eventlog(io.BytesIO(raw), name="x.bin")
    assert info.value.context["file"] == "x.bin"
    assert "offset" in info.value.context and "event" in info.value.context


def test_event_size_bound_is_checked_before_reading() -> None:
    raw = _log(struct.pack("<III", 0, 1, 0) + struct.pack("<I", MAX_EVENT_DATA + 1))
    with pytest.raises(ParseError) as info:
        read_eventlog(io.BytesIO(raw))
    assert info.value.context["size"] == MAX_EVENT_DATA + 1 and info.value.context["event"] == 1


def test_replay_needs_the_first_event() -> None:
    events = read_eventlog(io.BytesIO(_log(_event2(0, 1, b"a"), _event2(0, 1, b"b")))).events
    with pytest.raises(InputError):
        replay(events[1:])
    assert (
        replay(events).value("sha256", 0)
        == hashlib.sha256(
            hashlib.sha256(bytes(32) + hashlib.sha256(b"a").digest()).digest() + hashlib.sha256(b"b").digest()
        ).digest()
    )


def test_bank_without_digests_is_named() -> None:
    raw = _spec_event([(SHA256, 32), (0x0004, 20)]) + _event2(0, 1, b"a")
    result = replay(read_eventlog(io.BytesIO(raw)).events)
    assert [(f.id, f.context["bank"]) for f in result.report] == [("eventlog.digest_missing", "sha1")]


# ----------------------------------------------------------------------------------------- fuzzing

SEED = (VECTORS / "tpm2-tools/event-uefivar.bin").read_bytes() + _event2(
    7,
    EVENT_TYPE_IDS["EV_EFI_BOOT_SERVICES_APPLICATION"],
    struct.pack("<QQQQ", 1, 2, 3, 8) + b"\x04\x04\x08\x00a\x00b\x00",
)


def _exercise(raw: bytes) -> None:
    try:
        events = list(iter_events(io.BytesIO(raw)))
    except ParseError as exc:
        assert exc.diagnostics().startswith("error: ")
        assert {"file", "offset", "event"} <= set(exc.context)
        return
    replay(events)
    summarize(events)
    for event in events:
        with contextlib.suppress(ParseError):
            decode_event(event)


@FUZZ
@given(raw=st.binary(max_size=600))
def test_random_bytes_give_events_or_parse_errors(raw: bytes) -> None:
    _exercise(raw)


@FUZZ
@given(data=st.data())
def test_truncated_and_mutated_logs_give_events_or_parse_errors(data: st.DataObject) -> None:
    buf = bytearray(SEED)
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    _exercise(bytes(buf[: data.draw(st.integers(0, len(buf)))]))


DECODED_EVENTS = [read_eventlog(SECURE_BOOT_LOG).events[i] for i in (4, 7, 8, 16, 29, 94)] + [
    read_eventlog(VECTORS / "go-attestation/sb_cert_eventlog").events[i] for i in (8, 9, 10, 12)
]


@FUZZ
@given(data=st.data())
def test_mutated_event_data_decodes_or_is_a_parse_error(data: st.DataObject) -> None:
    """Variables with signature lists, authorities, Boot####, images, GPT, grub strings: edited data."""
    event = data.draw(st.sampled_from(DECODED_EVENTS))
    buf = bytearray(event.data)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, buf[pos] ^ 1]))
    cut = bytes(buf[: data.draw(st.integers(0, len(buf)))])
    for item in (dataclasses.replace(event, data=bytes(buf)), dataclasses.replace(event, data=cut)):
        with contextlib.suppress(ParseError):
            decode_event(item)
        summarize([item])


# --------------------------------------------------------------------------------------------- CLI


def test_cli_replay_matches_the_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    log = VECTORS / "tpm2-tools/event-gce-ubuntu-2104-log.bin"
    assert main(["boot", "replay", str(log), "--pcrs", f"{log}.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("eventlog OK: 33 PCR value(s) match; 112 events")
    assert "  0  : 0x0f2d3a2a1adaa479aeeca8f5df76aadc41b862ea" in out


def test_cli_replay_mismatch_json_and_pcr_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = VECTORS / "tpm2-tools/event-arch-linux.bin"
    expected = _expected(log)
    wrong = {b: {str(p): v.hex() for p, v in vals.items()} for b, vals in expected.items()}
    wrong["sha256"]["7"] = "00" * 32
    (tmp_path / "pcrs.json").write_text(json.dumps(wrong))
    assert main(["boot", "replay", str(log), "--pcrs", str(tmp_path / "pcrs.json")]) == 1
    out = capsys.readouterr().out
    assert "eventlog.pcr_mismatch" in out and out.splitlines()[-1].startswith("eventlog FAILED: 1 error(s)")
    pcrread = "sha256:\n" + "".join(f"  {p} : 0x{v.hex()}\n" for p, v in expected["sha256"].items())
    (tmp_path / "pcrread.yaml").write_text(pcrread)
    assert load_pcr_file(tmp_path / "pcrread.yaml") == {"sha256": expected["sha256"]}
    assert main(["boot", "replay", str(log), "--pcrs", str(tmp_path / "pcrread.yaml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["banks"] == ["sha1", "sha256"] and len(doc["pcrs"]["sha256"]) == 24


def test_cli_show_prints_events_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot", "show", str(SECURE_BOOT_LOG)]) == 0
    out = capsys.readouterr().out
    assert "Secure Boot: enabled (SecureBoot variable, event 4)" in out
    assert "shim" in out and "\\EFI\\redhat\\grubx64.efi" in out and "db: 4 entries (4 x509)" in out
    assert out.splitlines()[-1].startswith("eventlog OK; 99 events, Secure Boot on, 3 boot application(s)")
    assert main(["boot", "show", str(SECURE_BOOT_LOG), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["secure_boot"] is True and len(doc["events"]) == 99


def test_cli_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot", "replay", str(tmp_path / "missing")]) == 2
    (tmp_path / "junk").write_bytes(b"\x01\x00\x00\x00junk")
    assert main(["boot", "show", str(tmp_path / "junk")]) == 2
    err = capsys.readouterr().err
    assert "error: event log ends inside event 0" in err and "offset: 0" in err
    (tmp_path / "bad.yaml").write_text("pcrs:\n  sha1:\n    0 : 0x1234\n")
    log = VECTORS / "tpm2-tools/event-uefivar.bin"
    assert main(["boot", "replay", str(log), "--pcrs", str(tmp_path / "bad.yaml")]) == 2
    assert "line: 3" in capsys.readouterr().err
