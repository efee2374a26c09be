"""The verdict key is never replaced silently over a store's verdicts (adversarial report, row 5).

A missing key file where the store holds verdicts is a one-line error naming the key file and the store,
unless ``new_key`` (``tmb serve --new-key``); the store records every public key it has seen (first and
last use), so ``/v1/keys`` keeps publishing old keys. The daemon-level checks (exit 2, ``--new-key``,
``/v1/keys``, ``tmb verify-verdict --keys-url``) are in tests/integration/test_store_hardening.py.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from tmb.verdict.model import Decision, Verdict, Window
from tmb.verdict.signing import KeyFileError, Signer, load_or_create_key, load_verdict_key
from tmb.verdict.store import Store


def verdict(signer: Signer, i: int) -> Verdict:
    v = Verdict(
        f"{i:032x}", None, "w", "n", (), "m", None, Window(1, 2), {}, {}, Decision.UNATTESTED, (), "nvml", 5
    )
    return signer.sign(v)


def test_missing_key_over_signed_verdicts_is_a_one_line_error(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    with pytest.raises(KeyFileError) as info:
        load_verdict_key(key, signed_by=["ab" * 32], store="/var/lib/tmb/tmb.sqlite3")
    text = info.value.diagnostics()
    assert len(text.splitlines()) == 1
    assert str(key) in text and "/var/lib/tmb/tmb.sqlite3" in text and "--new-key" in text
    assert "abababababababab" in text  # the key id the verdicts name
    assert not key.exists()  # nothing was created


def test_new_key_or_no_verdicts_creates_and_an_existing_file_is_used(tmp_path: Path) -> None:
    fresh = load_verdict_key(tmp_path / "a.pem", signed_by=[], store="s")  # first start: no verdicts
    assert (tmp_path / "a.pem").exists()
    rotated = load_verdict_key(tmp_path / "b.pem", signed_by=[fresh.key_id], store="s", new_key=True)
    assert rotated.key_id != fresh.key_id and (tmp_path / "b.pem").exists()
    # The file exists: loaded as it is, whatever key ids the store names (another key the operator chose).
    again = load_verdict_key(tmp_path / "a.pem", signed_by=[rotated.key_id], store="s")
    assert again.key_id == fresh.key_id


def test_store_records_keys_first_and_last_use(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    signer = load_or_create_key(tmp_path / "k.pem")
    assert store.verdict_signers() == [] and store.known_keys() == []
    store.remember_key(signer.public.raw, signer.key_id, now_ns=100)
    store.remember_key(signer.public.raw, signer.key_id, now_ns=200)  # a restart: first use kept
    (known,) = store.known_keys()
    assert (known.key_id, known.public_key, known.first_ns, known.last_ns) == (
        signer.key_id,
        signer.public.raw,
        100,
        200,
    )
    assert store.verdict_signers() == []  # a key, but no verdict yet: a new key would lose nothing
    store.put_verdict(verdict(signer, 1))
    (known,) = store.known_keys()
    assert known.last_ns > 200  # signing a stored verdict is a use
    assert store.verdict_signers() == [signer.key_id]
    other = load_or_create_key(tmp_path / "k2.pem")
    store.remember_key(other.public.raw, other.key_id, now_ns=300)
    assert [k.key_id for k in store.known_keys()] == [signer.key_id, other.key_id]  # oldest first
    store.close()
    reopened = Store(tmp_path / "s.sqlite3")
    assert [k.public_key for k in reopened.known_keys()] == [signer.public.raw, other.public.raw]
    assert hashlib.sha256(reopened.known_keys()[1].public_key).hexdigest() == other.key_id
    reopened.close()


def test_store_written_before_keys_were_recorded_names_a_verdicts_key(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    signer = load_or_create_key(tmp_path / "k.pem")
    store = Store(path)
    store.put_verdict(verdict(signer, 1))
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE verdict_keys")  # as an older tmb left it
    db.commit()
    db.close()
    store = Store(path)  # the table comes back, empty
    assert store.known_keys() == []
    assert store.verdict_signers() == [signer.key_id]  # read from a stored verdict
    with pytest.raises(KeyFileError, match="refusing to create a new key"):
        load_verdict_key(tmp_path / "gone.pem", signed_by=store.verdict_signers(), store=str(path))
    store.close()
