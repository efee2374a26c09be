"""The ``[boot]`` policy: parsing, ``check_boot``, ``draft_policy`` and ``tmb boot policy|check`` on the
vendored real event logs (tests/data/vectors/PROVENANCE.md)."""

from __future__ import annotations

import dataclasses
import io
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from vectors import VECTORS

from tmb.attest.bootagg import boot_aggregate
from tmb.attest.bootpolicy import (
    DEFAULT_FORBID,
    BootPolicy,
    check_boot,
    cmdline_tokens,
    draft_policy,
    token_matches,
)
from tmb.attest.eventlog import Event, read_eventlog, replay
from tmb.attest.eventlog_events import BootSummary, KernelCmdline, summarize
from tmb.attest.ima_build import LogBuilder
from tmb.attest.policy import load_policy, policy_from_dict
from tmb.cli import main
from tmb.errors import ConfigError, Finding

SECURE_BOOT_LOG = VECTORS / "keylime/measured_boot/binary_bios_measurements-secureboot"
SB_CERT_LOG = VECTORS / "go-attestation/sb_cert_eventlog"
GCE_LOG = VECTORS / "tpm2-tools/event-gce-ubuntu-2104-log.bin"  # grub, Secure Boot off, ima_hash=sha256
GCE_OTHER = VECTORS / "go-attestation/ubuntu_2104_shielded_vm_no_secure_boot_eventlog"
ARCH_LOG = VECTORS / "tpm2-tools/event-arch-linux.bin"  # systemd-boot, kernel \vmlinuz-linux-lts

MS_UEFI_CA_2023 = "sha256:f6124e34125bee3fe6d79a574eaa7b91c0e7bd9d929c1a321178efd611dad901"
MS_UEFI_CA_2011 = "sha256:48e99b991f57fc52f76149599bff0a58c47154229b9f8d603ac40d3500248507"
KEYLIME_KERNEL = "sha256:219b8b53c54951cd07a580622e384391bbd9e113448a12ad319903fcafb81e79"


def _load(path: Path) -> tuple[BootSummary, tuple[Event, ...]]:
    log = read_eventlog(path)
    return summarize(log.events), log.events


def _ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings]


def _by_id(findings: list[Finding], fid: str) -> list[dict[str, Any]]:
    return [dict(f.context) for f in findings if f.id == fid]


def _draft(path: Path) -> tuple[str, BootPolicy]:
    summary, events = _load(path)
    text = draft_policy(summary, events=events, source=path.name)
    return text, BootPolicy.from_toml(text)


# ---------------------------------------------------------------------------------- draft and check


@pytest.mark.parametrize(
    "log", [SECURE_BOOT_LOG, SB_CERT_LOG, GCE_LOG, GCE_OTHER, ARCH_LOG], ids=lambda p: p.name
)
def test_a_drafted_policy_holds_on_its_own_log(log: Path) -> None:
    text, policy = _draft(log)
    summary, events = _load(log)
    assert check_boot(summary, policy, events=events) == []
    assert not policy.empty and policy.pcrs == tuple(range(10))
    assert text.startswith(f"# [boot] policy drafted by `tmb boot policy` from {log.name}.")


def test_draft_of_the_keylime_secure_boot_log_names_its_events() -> None:
    text, policy = _draft(SECURE_BOOT_LOG)
    assert 'secure_boot = "required"  # SecureBoot=1 at event 4 (PCR 7)' in text
    assert "# event 29: shim \\EFI\\redhat\\shimx64.efi" in text
    assert "# event 35: grub \\EFI\\redhat\\grubx64.efi" in text
    assert f'"{KEYLIME_KERNEL}",  # event 93: kernel (no file path)' in text
    assert '"root=/dev/mapper/rhel_rhel--9-root",  # event 94 (grub)' in text
    assert "# db as measured at event 7: 4 entries (4 x509)" in text
    assert "# dbx as measured at event 8: 371 entries (371 sha256)" in text
    assert f'"{MS_UEFI_CA_2023}",  # x509 CN=Microsoft UEFI CA 2023' in text
    assert policy.secure_boot == "required"
    assert len(policy.bootloaders) == 2 and policy.kernels == (KEYLIME_KERNEL,)
    assert policy.cmdline_require == ("root=/dev/mapper/rhel_rhel--9-root",)
    assert policy.cmdline_forbid == DEFAULT_FORBID
    assert len(policy.db_require) == 4 and len(policy.dbx_require) == 371


def test_draft_of_a_secure_boot_off_grub_log() -> None:
    text, policy = _draft(GCE_LOG)
    assert 'secure_boot = "optional"  # SecureBoot=0 at event 3' in text
    assert "kernels = []  # no kernel boot application" in text  # grub measured the kernel into PCR 9 only
    assert policy.cmdline_require == ("root=PARTUUID=bf817bdf-6a3a-4221-8edb-2c1ca7c5537f", "ima_hash=sha256")
    assert "\n[boot.dbx]" not in text and "# dbx (event 7) has no entry" in text  # an empty dbx
    assert policy.secure_boot == "optional" and policy.kernels == () and policy.dbx_require == ()


def test_the_secure_boot_policy_against_a_gce_log_names_every_difference() -> None:
    _, policy = _draft(SECURE_BOOT_LOG)
    summary, events = _load(GCE_LOG)
    found = check_boot(summary, policy, events=events)
    assert _ids(found) == [
        "boot.secure_boot_off",
        "boot.bootloader_not_allowed",
        "boot.bootloader_not_allowed",
        "boot.no_kernel_measured",
        "boot.cmdline_missing",
        "boot.db_missing",
        "boot.dbx_missing",
    ]
    assert _by_id(found, "boot.secure_boot_off") == [{"event": 3, "state": "disabled"}]
    loaders = _by_id(found, "boot.bootloader_not_allowed")
    assert [(c["event"], c["path"], c["role"]) for c in loaders] == [
        (23, "\\EFI\\ubuntu\\shimx64.efi", "shim"),
        (27, "\\EFI\\ubuntu\\grubx64.efi", "grub"),
    ]
    assert loaders[0]["digest"] == "sha256:d99c93fcb042dbe52707bbde371c75fcf081dd5b0c88a195d44cc57536f6f521"
    (cmd,) = _by_id(found, "boot.cmdline_missing")
    assert (cmd["event"], cmd["rule"]) == (102, "root=/dev/mapper/rhel_rhel--9-root")
    (db,) = _by_id(found, "boot.db_missing")
    assert db["event"] == 6 and db["entries"] == 2 and MS_UEFI_CA_2023 in db["missing"]
    (dbx,) = _by_id(found, "boot.dbx_missing")
    assert dbx["event"] == 7 and dbx["entries"] == 0 and len(dbx["missing"]) == 371


def test_another_machines_kernel_and_loaders_are_not_allowed() -> None:
    _, policy = _draft(SB_CERT_LOG)
    summary, events = _load(SECURE_BOOT_LOG)
    found = check_boot(summary, policy, events=events)
    assert "boot.secure_boot_off" not in _ids(found)  # both logs have Secure Boot on
    (kernel,) = _by_id(found, "boot.kernel_not_allowed")
    assert (kernel["event"], kernel["digest"], kernel["path"]) == (93, KEYLIME_KERNEL, None)
    assert [c["event"] for c in _by_id(found, "boot.bootloader_not_allowed")] == [29, 35]
    # sb_cert has no command line, so its draft has no [boot.cmdline] rules to break
    assert "boot.cmdline_missing" not in _ids(found)


def test_systemd_boot_kernel_is_checked_by_its_digest() -> None:
    summary, _ = _load(ARCH_LOG)
    kernel = "sha256:6c1b73563471cd9082ea3d149fa4668cd8f1a0c315531d4bf513bc5ede8939a5"
    assert check_boot(summary, BootPolicy(kernels=(kernel,))) == []
    found = check_boot(summary, BootPolicy(kernels=(KEYLIME_KERNEL,)))
    assert _by_id(found, "boot.kernel_not_allowed")[0]["path"] == "\\vmlinuz-linux-lts"
    # a SHA-384 rule matches a log's sha384 digests; the arch log has none, so nothing matches
    found = check_boot(summary, BootPolicy(kernels=("sha384:" + "00" * 48,)))
    assert _ids(found) == ["boot.kernel_not_allowed"]


def test_secure_boot_required() -> None:
    on, _ = _load(SECURE_BOOT_LOG)
    off, _ = _load(ARCH_LOG)
    required = BootPolicy(secure_boot="required")
    assert check_boot(on, required) == []
    assert _by_id(check_boot(off, required), "boot.secure_boot_off") == [{"event": 3, "state": "disabled"}]
    unmeasured = dataclasses.replace(on, secure_boot=None, secure_boot_event=None)
    assert _by_id(check_boot(unmeasured, required), "boot.secure_boot_off")[0]["state"] == "not measured"
    conflict = summarize(read_eventlog(SECURE_BOOT_LOG).events)
    conflict.report.add("eventlog.secure_boot_conflict", "measured twice")
    assert _by_id(check_boot(conflict, required), "boot.secure_boot_off")[0]["state"] == "conflicting"
    assert check_boot(off, BootPolicy(secure_boot="optional", kernels=(KEYLIME_KERNEL,))) != []


def test_empty_policy_and_missing_measurements_fail_closed() -> None:
    summary, _ = _load(SECURE_BOOT_LOG)
    assert _ids(check_boot(summary, BootPolicy())) == ["boot.empty"]
    bare = dataclasses.replace(summary, boot_apps=(), kernel_cmdlines=(), variables={})
    policy = BootPolicy(
        bootloaders=(MS_UEFI_CA_2011,),
        kernels=(KEYLIME_KERNEL,),
        cmdline_forbid=("ima=off",),
        db_require=(MS_UEFI_CA_2011,),
        dbx_require=(MS_UEFI_CA_2011,),
    )
    assert _ids(check_boot(bare, policy)) == [
        "boot.no_bootloader_measured",
        "boot.no_kernel_measured",
        "boot.no_cmdline_measured",
        "boot.db_missing",
        "boot.dbx_missing",
    ]


# ------------------------------------------------------------------------------------- command lines


def test_cmdline_require_and_forbid_on_a_grub_log() -> None:
    summary, _ = _load(GCE_LOG)
    policy = BootPolicy(
        cmdline_require=("ima_hash=sha256", "ima_policy=tcb", "ro", "root="),
        cmdline_forbid=("ima=off", "console=", "panic", "scsi-mod.use_blk_mq=Y", "init="),
    )
    found = check_boot(summary, policy)
    assert [(c["event"], c["rule"]) for c in _by_id(found, "boot.cmdline_missing")] == [
        (102, "ima_policy=tcb")
    ]
    forbidden = [(c["event"], c["rule"], c["token"]) for c in _by_id(found, "boot.cmdline_forbidden")]
    assert forbidden == [
        (102, "console=", "console=ttyS0"),
        (102, "panic", "panic=-1"),
        (102, "scsi-mod.use_blk_mq=Y", "scsi_mod.use_blk_mq=Y"),  # '-' and '_' alike in keys
    ]
    # the kernel image path grub puts first is not a parameter
    assert check_boot(summary, BootPolicy(cmdline_forbid=("/boot/vmlinuz-5.11.0-1008-gcp",))) == []


def test_systemd_boot_command_lines_are_each_checked() -> None:
    summary, _ = _load(VECTORS / "tpm2-tools/event-sd-boot-fedora37.bin")
    found = check_boot(summary, BootPolicy(cmdline_require=("ima_policy=tcb",), cmdline_forbid=("efi",)))
    assert [c["event"] for c in _by_id(found, "boot.cmdline_missing")] == [23, 24]
    assert [c["token"] for c in _by_id(found, "boot.cmdline_forbidden")] == ["efi=debug", "efi=debug"]


def test_cmdline_tokens_and_matching() -> None:
    line = KernelCmdline(
        1, 8, "grub", '/vmlinuz root=/dev/sda ro dm-mod.create="vroot,,,ro,0 8 verity" -- single'
    )
    params, init = cmdline_tokens(line)
    assert params == ["root=/dev/sda", "ro", "dm-mod.create=vroot,,,ro,0 8 verity"]
    assert init == ["single"]
    sd = KernelCmdline(1, 12, "systemd-boot", "initrd=\\x.img  quiet")
    assert cmdline_tokens(sd) == (["initrd=\\x.img", "quiet"], [])
    assert token_matches("ro", "ro") and token_matches("rd.break", "rd.break=pre-mount")
    assert token_matches("init=", "init=/bin/sh") and not token_matches("init=", "init")
    assert token_matches("dm_mod.create=", "dm-mod.create=x") and not token_matches("ima=off", "ima=on")
    assert not token_matches("ima", "ima_policy=tcb")
    # required words after "--" go to init, not the kernel; forbidden words count anywhere
    summary = dataclasses.replace(_load(GCE_LOG)[0], kernel_cmdlines=(line,))
    found = check_boot(summary, BootPolicy(cmdline_require=("single",), cmdline_forbid=("single",)))
    assert _ids(found) == ["boot.cmdline_missing", "boot.cmdline_forbidden"]


def test_draft_warns_about_a_forbidden_word_and_does_not_require_it() -> None:
    summary, _ = _load(GCE_LOG)
    bad = KernelCmdline(102, 8, "grub", "/boot/vmlinuz root=/dev/sda ima_appraise=off ima_hash=sha256")
    text = draft_policy(dataclasses.replace(summary, kernel_cmdlines=(bad,)))
    assert '# WARNING: this log\'s command line has "ima_appraise=off"' in text
    policy = BootPolicy.from_toml(text)
    assert policy.cmdline_require == ("root=/dev/sda", "ima_hash=sha256")
    assert _ids(check_boot(dataclasses.replace(summary, kernel_cmdlines=(bad,)), policy)) == [
        "boot.cmdline_forbidden"
    ]


# --------------------------------------------------------------------------------------------- db/dbx


def test_db_and_dbx_rules() -> None:
    summary, events = _load(SECURE_BOOT_LOG)
    first_dbx = "sha256:" + summary.variables["dbx"][0].data.hex()
    policy = BootPolicy(db_require=(MS_UEFI_CA_2023, MS_UEFI_CA_2011), dbx_require=(first_dbx,))
    assert check_boot(summary, policy, events=events) == []
    gce, gce_events = _load(GCE_LOG)
    found = check_boot(gce, policy, events=gce_events)
    assert _by_id(found, "boot.db_missing") == [
        {"variable": "db", "pcr": 7, "event": 6, "missing": [MS_UEFI_CA_2023], "entries": 2}
    ]
    assert _by_id(found, "boot.dbx_missing")[0]["missing"] == [first_dbx]
    # without the events the findings still name the variable, just not the event
    assert _by_id(check_boot(gce, policy), "boot.db_missing")[0]["event"] is None
    # a revoked certificate in dbx is named by its fingerprint
    other, _ = _load(GCE_OTHER)
    dbx_cert = next(s for s in other.variables["dbx"] if s.kind == "x509")
    revoked = BootPolicy(dbx_require=(f"sha256:{dbx_cert.sha256}",))
    assert check_boot(other, revoked) == []
    assert _by_id(check_boot(gce, revoked), "boot.dbx_missing")[0]["entries"] == 0


# -------------------------------------------------------------------------------------- configuration


def test_policy_file_holds_the_boot_section(tmp_path: Path) -> None:
    text, policy = _draft(SECURE_BOOT_LOG)
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[allow]\n"/usr/bin/x" = ["sha256:' + "00" * 32 + '"]\n' + text)
    loaded = load_policy(path)
    assert loaded.boot == policy and loaded.allow
    assert policy_from_dict({"version": 1}).boot is None
    assert policy_from_dict({"version": 1, "boot": {}}).boot == BootPolicy()


@pytest.mark.parametrize(
    ("boot", "key", "message"),
    [
        ({"secureboot": "required"}, "boot", "unknown keys: secureboot"),
        ({"secure_boot": True}, "boot.secure_boot", 'must be "required" or "optional"'),
        ({"secure_boot": "on"}, "boot.secure_boot", 'must be "required" or "optional"'),
        ({"kernels": "sha256:" + "00" * 32}, "boot.kernels", "must be a list of strings"),
        ({"kernels": ["sha256:" + "00" * 32, 5]}, "boot.kernels[1]", "must be a string"),
        ({"bootloaders": ["00" * 32]}, "boot.bootloaders[0]", "is not 'alg:hex'"),
        ({"bootloaders": ["md5:" + "00" * 16]}, "boot.bootloaders[0]", "is not 'alg:hex'"),
        ({"kernels": ["sha256:zz"]}, "boot.kernels[0]", "is not hex"),
        ({"kernels": ["sha256:" + "00" * 20]}, "boot.kernels[0]", "a sha256 digest is 32 bytes, got 20"),
        ({"pcrs": []}, "boot.pcrs", "non-empty list"),
        ({"pcrs": [0, 24]}, "boot.pcrs[1]", "must be a PCR index 0-23"),
        ({"pcrs": [True]}, "boot.pcrs[0]", "must be a PCR index 0-23"),
        ({"cmdline": ["ima=off"]}, "boot.cmdline", "must be a table"),
        ({"cmdline": {"deny": []}}, "boot.cmdline", "unknown keys: deny"),
        ({"cmdline": {"require": ["ima_policy=tcb ro"]}}, "boot.cmdline.require[0]", "not one command-line"),
        ({"cmdline": {"forbid": ["=off"]}}, "boot.cmdline.forbid[0]", "not one command-line"),
        ({"db": {"require": ["sha256:00"]}}, "boot.db.require[0]", "32 bytes, got 1"),
        ({"dbx": {"allow": []}}, "boot.dbx", "unknown keys: allow"),
        ({"dbx": []}, "boot.dbx", "must be a table"),
    ],
)
def test_config_errors_name_the_field(boot: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        policy_from_dict({"version": 1, "boot": boot}, where="p.toml")
    assert exc.value.context["key"] == key and exc.value.context["path"] == "p.toml"
    assert message in exc.value.message and exc.value.message.startswith(f"{key}: ")


def test_from_toml_normalises_and_reads_text() -> None:
    policy = BootPolicy.from_toml(
        '[boot]\nkernels = ["SHA256:' + "AB" * 32 + '", "sha256:' + "ab" * 32 + '"]\npcrs = [7, 0, 7]\n'
    )
    assert policy.kernels == ("sha256:" + "ab" * 32,) and policy.pcrs == (0, 7)
    with pytest.raises(ConfigError, match="no \\[boot\\] section"):
        BootPolicy.from_toml("version = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        BootPolicy.from_toml("[boot\n")


# ------------------------------------------------------------------------------------------------ CLI


def _policy_file(tmp_path: Path, log: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["boot", "policy", str(log)]) == 0
    text = capsys.readouterr().out
    tomllib.loads(text)
    path = tmp_path / "policy.toml"
    path.write_text("version = 1\n" + text)
    return path


def test_cli_policy_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy_file(tmp_path, SECURE_BOOT_LOG, capsys)
    assert main(["boot", "check", str(SECURE_BOOT_LOG), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "boot policy OK; 99 events, PCRs 0-9 not checked, 1 warning(s)"
    assert any("boot.pcrs_not_checked" in line for line in out)
    assert main(["boot", "check", str(GCE_LOG), "--policy", str(policy), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and doc["secure_boot"] is False and doc["pcrs_match"] is None
    ids = [f["id"] for f in doc["findings"]]
    assert "boot.secure_boot_off" in ids and ids.count("boot.bootloader_not_allowed") == 2


def test_cli_check_with_pcrs_and_ima(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy_file(tmp_path, GCE_LOG, capsys)
    pcrs = f"{GCE_LOG}.yaml"  # tpm2_eventlog's PCR values for this log
    ima = tmp_path / "ima.bin"
    replayed = replay(read_eventlog(GCE_LOG).events).pcrs
    binary = io.BytesIO()
    LogBuilder(binary).add("ima-ng", "boot_aggregate", digest=boot_aggregate(replayed["sha256"], "sha256"))
    ima.write_bytes(binary.getvalue())
    args = ["boot", "check", str(GCE_LOG), "--policy", str(policy), "--pcrs", pcrs, "--ima", str(ima)]
    assert main(args) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "boot policy OK; 112 events, PCRs 0-9 match, boot_aggregate matches, 1 warning(s)"
    # the other GCE log does not replay to these PCRs, breaks the policy and is not this IMA log's boot
    args[2] = str(GCE_OTHER)
    assert main([*args, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    ids = {f["id"] for f in doc["findings"]}
    assert {"eventlog.pcr_mismatch", "boot.bootloader_not_allowed", "boot.cmdline_missing"} <= ids
    assert "boot.aggregate_mismatch" in ids and doc["pcrs_match"] is False and doc["boot_aggregate"] is False
    # PCR values that leave out a policy PCR do not tie the log to them
    (tmp_path / "few.json").write_text(json.dumps({"sha256": {"0": "00" * 32}}))
    args[2], args[6] = str(GCE_LOG), str(tmp_path / "few.json")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "boot.pcrs_not_covered" in out and "eventlog.pcr_mismatch" in out


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_boot = tmp_path / "ima-only.toml"
    no_boot.write_text('version = 1\n[require]\npaths = ["/usr/bin/x"]\n')
    assert main(["boot", "check", str(GCE_LOG), "--policy", str(no_boot)]) == 2
    assert "the policy has no [boot] section" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[boot]\nkernels = ["sha1:00"]\n')
    assert main(["boot", "check", str(GCE_LOG), "--policy", str(bad)]) == 2
    assert "boot.kernels[0]" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('version = 1\n[boot]\nsecure_boot = "required"\n')
    assert main(["boot", "check", str(tmp_path / "missing"), "--policy", str(good)]) == 2
    assert main(["boot", "check", str(GCE_LOG), "--policy", str(good), "--pcrs", str(tmp_path / "nope")]) == 2
    assert main(["boot", "policy", str(tmp_path / "missing")]) == 2
