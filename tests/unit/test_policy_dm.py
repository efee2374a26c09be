"""Runtime policy evaluation and the dm-verity rules, on logs built like the kernel's."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from tmb.attest.dm import VerityRule, check_verity, dm_events
from tmb.attest.ima import iter_log, parse_fields
from tmb.attest.ima_build import (
    LogBuilder,
    dm_device_remove,
    dm_device_resume,
    dm_table_clear,
    dm_table_load_verity,
)
from tmb.attest.policy import PolicyChecker, load_policy, policy_from_dict
from tmb.errors import ConfigError, Report

ROOT = "ab" * 32
SALT = "cd" * 32
BLOCKS = 1000
RULE = VerityRule(name="llama-1b@main", root_digest=ROOT, salt=SALT, data_blocks=BLOCKS)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _mount(b: LogBuilder, *, root: str = ROOT, blocks: int = BLOCKS, name: str = "model") -> str:
    loaded, _ = b.mount_verity(name, root_digest=root, salt=SALT, data_blocks=blocks)
    return _sha(parse_fields(loaded.entry).buf)


def _verity(build: object) -> Report:
    out = io.BytesIO()
    b = LogBuilder(out)
    build(b)  # type: ignore[operator]
    report = Report()
    check_verity(dm_events(list(iter_log(io.BytesIO(out.getvalue()))), report), [RULE], report)
    return report


def test_verity_mount_matching_the_commitment_passes() -> None:
    assert _verity(lambda b: _mount(b)).ok


def test_verity_root_that_differs_from_the_commitment() -> None:
    report = _verity(lambda b: _mount(b, root="ef" * 32))
    assert {"dm.verity_root_mismatch", "dm.verity_missing"} <= set(report.ids())
    mismatch = next(f for f in report if f.id == "dm.verity_root_mismatch")
    assert mismatch.context["got"] == "ef" * 32 and mismatch.context["entry"] == 0


def test_truncated_data_size_is_caught_even_with_the_right_root() -> None:
    report = _verity(lambda b: _mount(b, blocks=BLOCKS - 1))
    f = next(f for f in report if f.id == "dm.verity_param_mismatch")
    assert f.context["field"] == "target_len"
    assert f.context["expected"] == str(BLOCKS * 8)


def test_loaded_but_never_resumed() -> None:
    def build(b: LogBuilder) -> None:
        b.buffer(
            "dm_table_load", dm_table_load_verity("model", root_digest=ROOT, salt=SALT, data_blocks=BLOCKS)
        )

    assert {"dm.verity_not_resumed", "dm.verity_missing"} <= set(_verity(build).ids())


def test_resume_of_a_different_table() -> None:
    def build(b: LogBuilder) -> None:
        b.buffer(
            "dm_table_load", dm_table_load_verity("model", root_digest=ROOT, salt=SALT, data_blocks=BLOCKS)
        )
        b.buffer(
            "dm_device_resume", dm_device_resume("model", table_digest="sha256:" + "00" * 32, capacity=8)
        )

    assert "dm.active_table_mismatch" in _verity(build).ids()


@pytest.mark.parametrize("event", ["reload", "clear", "remove"])
def test_device_changed_after_resume(event: str) -> None:
    def build(b: LogBuilder) -> None:
        digest = _mount(b)
        if event == "reload":
            b.buffer(
                "dm_table_load", dm_table_load_verity("model", root_digest=ROOT, salt=SALT, data_blocks=5)
            )
        elif event == "clear":
            b.buffer("dm_table_clear", dm_table_clear("model", capacity=BLOCKS * 8))
        else:
            b.buffer("dm_device_remove", dm_device_remove("model", table_digest=digest, capacity=BLOCKS * 8))

    report = _verity(build)
    changed = [f for f in report if f.id == "dm.device_modified_after_resume"]
    assert len(changed) == 1 and changed[0].context["entry"] == 2
    assert not report.ok


def _policy_log() -> tuple[bytes, dict[str, str]]:
    out = io.BytesIO()
    b = LogBuilder(out)
    contents = {"/usr/bin/vllm": b"engine", "/usr/bin/tmb-probe": b"probe", "/tmp/scratch": b"junk"}
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    for path, content in contents.items():
        b.file(path, content)
    return out.getvalue(), {p: hashlib.sha256(c).hexdigest() for p, c in contents.items()}


def _evaluate(log: bytes, doc: dict[str, object]) -> Report:
    report = Report()
    checker = PolicyChecker(policy_from_dict(doc), report)
    for entry in iter_log(io.BytesIO(log)):
        checker(entry)
    checker.finish()
    return report


def test_allowlist_exclusions_and_requirements() -> None:
    log, digests = _policy_log()
    doc: dict[str, object] = {
        "version": 1,
        "allow": {
            "boot_aggregate": ["sha256:" + "00" * 32],
            "/usr/bin/vllm": [f"sha256:{digests['/usr/bin/vllm']}"],
            "/usr/bin/tmb-probe": [digests["/usr/bin/tmb-probe"]],  # bare hex, as Keylime writes it
        },
        "exclude": {"paths": ["^/tmp/"]},
        "require": {"paths": ["/usr/bin/vllm", "/usr/bin/tmb-probe"]},
    }
    assert _evaluate(log, doc).ok

    doc["exclude"] = {"paths": []}
    report = _evaluate(log, doc)
    assert report.ids() == ["policy.path_not_allowed"]
    assert report.findings[0].context["path"] == "/tmp/scratch"

    doc["exclude"] = {"paths": ["^/tmp/"]}
    doc["allow"] = {**doc["allow"], "/usr/bin/tmb-probe": ["sha256:" + "11" * 32]}  # type: ignore[dict-item]
    report = _evaluate(log, doc)
    assert report.ids() == ["policy.digest_not_allowed", "policy.required_missing"]
    assert report.findings[1].context["path"] == "/usr/bin/tmb-probe"


def test_empty_policy_fails_closed() -> None:
    log, _ = _policy_log()
    report = _evaluate(log, {"version": 1})
    assert "policy.empty" in report.ids()
    assert not report.ok


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 2\n", "version must be 1"),
        ("version = 1\nallow = 3\n", "must be a table"),
        ('version = 1\n[allow]\n"/x" = ["sha256:zz"]\n', "not hex"),
        ('version = 1\n[allow]\n"/x" = ["sha256:00"]\n', "must be 32 bytes"),
        ('version = 1\n[exclude]\npaths = ["("]\n', "bad regular expression"),
        ("version = 1\n[[verity]]\nname = 'm'\n", "root_digest"),
        ("version = 1\nbogus = 1\n", "unknown policy keys"),
        ("version = [", "not valid TOML"),
    ],
)
def test_bad_policies_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_policy(path)
    assert str(path) in info.value.diagnostics()


def test_keylime_import_is_relative_to_the_policy(tmp_path: Path) -> None:
    (tmp_path / "kl.json").write_text(
        '{"meta": {"version": 1}, "digests": {"/bin/sh": ["' + "aa" * 32 + '"]}}'
    )
    (tmp_path / "policy.toml").write_text('version = 1\n[[import]]\nkeylime = "kl.json"\n')
    policy = load_policy(tmp_path / "policy.toml")
    assert "/bin/sh" in policy.allow
