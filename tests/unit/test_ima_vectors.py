"""Real IMA logs among the vendored vectors (tests/data/vectors/PROVENANCE.md, section B)."""

from __future__ import annotations

import pytest
from vectors import VECTORS

from tmb.attest.dm import check_verity, dm_events
from tmb.attest.ima import iter_log, template_hash_ok
from tmb.attest.pcr import replay_file
from tmb.attest.policy import PolicyChecker, RuntimePolicy, load_keylime_policy
from tmb.errors import ConfigError, Report

# file, entries, sha1, sha256 (per-bank), sha256 (padded) -- PROVENANCE.md B1-B3
EXPECTED = [
    (
        "tpm2-tss/sml-ima-ng-sha1.bin",
        6,
        "ef2a20de2a84a4780f92ab11d5c4934c709dff00",
        "700a1bb47bc2bc005f2d8e23d80e2a1e301733c1d29023c52d1d7d149719eb64",
        "f4059058172c2d1d279b7ce206ce9373249786f9a9dc59a2af279e0eaed14a26",
    ),
    (
        "tpm2-tss/sml-ima-sha1.bin",
        12,
        "062a05a9d18d1a51775ff8162bf6964b8dd23eb4",
        "239ba8e6f20ecfec961d771036c68f02dbeb771678b64c18cba81363e8e7139a",
        "fe965aa7a38d566f153dbefe5841c37c4494d93f0716e53b3617343d801fd349",
    ),
    (
        "tpm2-tss/sml-ima-sig-sha256.bin",
        9,
        "b44019405884709ca410b0c30b48159d3a556622",
        "a7e76625386d3dc6248552e44a3b2b1bebb6f2ff3acc9bd220821ad22f7a9d6a",
        "9795c7da414424d16efd3821f51d88fd39d64ec382ce36a28ca650a3e9f69c18",
    ),
    (
        "tpm2-tss/sml-ima-sig-sha256-invalidated.bin",
        2,
        "a0e7bc9af0a2b54147b0d595d058f15c6cc44a6d",
        "338c5ec5cba3d64a886cc6f369f10e5209bf8f49db078635723bb1ed8091b2ba",
        "f2f46aea1e58bbde2ddbb455c76051da641c69453fad9103a1fd1f42bac3b90b",
    ),
    ("tpm2-tss/sml-ima-sha1-invalidated.bin", 1, "bac37b84f007d0238af95af707cac8d61254870e", None, None),
    (
        "rust-keylime/ascii_runtime_measurements",
        826,
        "82231c67a69da98dc5b3aa10f6343d33109225fc",
        "c4a065637fc6a7c55f2811dd06cb45dd037133be2b3dc5c3e6fbe6bf061db724",
        "ef71b29aba95006a998a95086640b01738a688e3558e36b547df3d989a4c57fd",
    ),
]


@pytest.mark.parametrize(
    ("name", "entries", "sha1", "per_bank", "padded"), EXPECTED, ids=[e[0] for e in EXPECTED]
)
def test_replays_to_provenance_values(
    name: str, entries: int, sha1: str, per_bank: str | None, padded: str | None
) -> None:
    for mode, want in (("per-bank", per_bank), ("padded-sha1", padded)):
        result = replay_file(VECTORS / name, banks=["sha1", "sha256"], mode=mode)
        assert result.entries == entries
        assert result.state.value("sha1").hex() == sha1
        if want is not None:
            assert result.state.value("sha256").hex() == want
        assert not [f for f in result.report.errors], result.report.to_list()


@pytest.mark.parametrize(
    ("name", "entries", "sha1", "per_bank", "padded"), EXPECTED, ids=[e[0] for e in EXPECTED]
)
def test_auto_mode_detects_kernel_behaviour(
    name: str, entries: int, sha1: str, per_bank: str | None, padded: str | None
) -> None:
    for mode, want in (("per-bank", per_bank), ("padded-sha1", padded)):
        if want is None:
            continue
        result = replay_file(VECTORS / name, mode="auto", expected={"sha256": bytes.fromhex(want)})
        assert result.matched is not None
        assert result.mode == mode
        assert result.matched.index == entries


@pytest.mark.parametrize(
    ("name", "offset", "trailing"),
    [
        ("tpm2-tss/sml-ima-ng-sha1.bin", 558, 1),
        ("tpm2-tss/sml-ima-sha1.bin", 916, 1),
        ("tpm2-tss/sml-ima-sig-sha256.bin", 987, 6),
        ("tpm2-tss/sml-ima-ng-sha1-invalidated.bin", 0, 86),
    ],
)
def test_trailing_partial_records_are_named(name: str, offset: int, trailing: int) -> None:
    result = replay_file(VECTORS / name)
    partial = [f for f in result.report if f.id == "ima.trailing_partial_record"]
    assert len(partial) == 1
    assert partial[0].context["offset"] == offset
    assert partial[0].context["trailing_bytes"] == trailing
    assert result.state.offset == offset  # the next incremental read starts at the partial record


def test_violation_entries_are_flagged() -> None:
    result = replay_file(VECTORS / "tpm2-tss/sml-ima-sig-sha256-invalidated.bin")
    violations = [f for f in result.report if f.id == "ima.violation"]
    assert [f.context["entry"] for f in violations] == [1]
    assert violations[0].context["path"] == "/init"


def test_every_template_hash_in_real_logs_is_valid() -> None:
    for name in (
        "rust-keylime/ascii_runtime_measurements",
        "rust-keylime/ima_log.txt",
        "keylime/ima/measurements.ascii",
        "keylime/ima/signatures.ascii",
        "keylime/ima/keyrings.ascii",
        "keylime/ima_dm/dm_events.ascii",
        "keylime/create_runtime_policy/ima-log-sha256",
    ):
        with open(VECTORS / name, "rb") as stream:
            entries = list(iter_log(stream))
        assert entries, name
        assert all(template_hash_ok(e) for e in entries), name


def test_modified_signature_breaks_the_template_hash() -> None:
    result = replay_file(VECTORS / "keylime/ima/bad_signatures.ascii", banks=["sha1"])
    assert result.report.ids() == ["ima.template_hash_mismatch"]
    assert result.report.findings[0].context["path"] == "/usr/bin/zmore"


def test_keylime_policy_allows_its_log_and_empty_policy_fails_closed() -> None:
    policy = load_keylime_policy(VECTORS / "keylime/ima/runtime_policy_test.json")
    report = Report()
    checker = PolicyChecker(policy, report)
    replay_file(VECTORS / "keylime/ima/measurements.ascii", on_entry=checker)
    checker.finish()
    assert report.ok, report.to_list()

    empty = Report()
    checker = PolicyChecker(RuntimePolicy(), empty)
    replay_file(VECTORS / "keylime/ima/measurements.ascii", on_entry=checker)
    checker.finish()
    assert "policy.empty" in empty.ids()
    assert empty.ids().count("policy.path_not_allowed") == 3


def test_signed_keylime_envelope_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="signed"):
        load_keylime_policy(VECTORS / "keylime/runtime_policy/runtime-policy-test-signed.json")


def test_keylime_dm_events_satisfy_the_verity_rule() -> None:
    from tmb.attest.dm import VerityRule

    with open(VECTORS / "keylime/ima_dm/dm_events.ascii", "rb") as stream:
        entries = list(iter_log(stream))
    report = Report()
    events = dm_events(entries, report)
    assert [e.event for e in events][:2] == ["dm_table_load", "dm_table_load"]
    rule = VerityRule(
        name="keylime-test",
        root_digest="6eaffe6b8b01990a1e39712657468e9b722cb64ba9942c6d586948da1bd40967",
        salt="d738fd9f4203f397f5a15562c30211957040cd671efc469715bf26895622eabc",
        data_blocks=204808 // 8,
    )
    # Only the verity load and its resume: the rule is satisfied.
    verity = [e for e in events if e.device.get("uuid", "").startswith("CRYPT-VERITY")]
    ok = Report()
    assert check_verity(verity[:2], [rule], ok) == {"keylime-test": verity[1].entry_index}
    assert ok.ok, ok.to_list()
    # The full sequence goes on to remove, update (hash_failed=C) and clear the device.
    bad = Report()
    check_verity(verity, [rule], bad)
    assert {"dm.device_modified_after_resume", "dm.verity_missing"} <= set(bad.ids())
