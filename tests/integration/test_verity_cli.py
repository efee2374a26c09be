"""``tmb verity format|verify|policy`` and ``tmb commit`` through the real entry point."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tmb.cli import main

UUID = "12345678-1234-1234-1234-123456789abc"
ROOT_LINE = re.compile(r"^Root hash: ([0-9a-f]{64})$")


def veritysetup() -> str:
    found = shutil.which("veritysetup") or shutil.which("veritysetup", path="/usr/sbin:/sbin")
    if not found:
        pytest.fail("veritysetup not found: install cryptsetup-bin (make deps)")
    return found


def reference(data: Path, hash_file: Path, salt: str) -> str:
    out = subprocess.run(
        [veritysetup(), "format", str(data), str(hash_file), "--salt", salt, "--uuid", UUID],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Root hash:\s+([0-9a-f]+)", out)
    assert match
    return match.group(1)


def last_root(text: str) -> str:
    match = ROOT_LINE.match(text.rstrip("\n").splitlines()[-1])
    assert match, text
    return match.group(1)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.img"
    path.write_bytes(random.Random(5).randbytes(300 * 4096))
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text("{}\n")
    (root / "weights.bin").write_bytes(random.Random(6).randbytes(20 * 4096 + 17))
    return root


def test_format_matches_veritysetup(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = reference(data, tmp_path / "ref.hash", "00112233")
    argv = [
        "verity",
        "format",
        str(data),
        "--salt",
        "00112233",
        "--hash-file",
        str(tmp_path / "h"),
        "--uuid",
        UUID,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert last_root(out) == expected
    assert (
        f"UUID:            \t{UUID}" in out
        and "Data blocks:     \t300" in out
        and "Hash blocks:     \t4" in out
    )
    assert (tmp_path / "h").read_bytes() == (tmp_path / "ref.hash").read_bytes()


def test_format_without_hash_file_and_tail_warning(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = reference(data, tmp_path / "ref.hash", "-")
    with data.open("ab") as fh:
        fh.write(b"tail")
    assert main(["verity", "format", str(data), "--salt", "-"]) == 0
    captured = capsys.readouterr()
    assert last_root(captured.out) == expected
    assert "not written" in captured.out and "Salt:            \t-" in captured.out
    assert "last 4 bytes" in captured.err
    assert sorted(os.listdir(tmp_path)) == ["data.img", "ref.hash"]


def test_format_default_salt_is_random(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verity", "format", str(data)]) == 0
    first = capsys.readouterr().out
    assert main(["verity", "format", str(data)]) == 0
    second = capsys.readouterr().out
    assert last_root(first) != last_root(second)
    assert re.search(r"Salt:\s+[0-9a-f]{64}\n", first)


def test_format_bad_input_exits_2(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verity", "format", str(data), "--salt", "xyz"]) == 2
    assert "error: invalid salt" in capsys.readouterr().err
    assert main(["verity", "format", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["verity", "format", str(data), "--hash", "md5"]) == 2
    assert "unsupported verity hash algorithm" in capsys.readouterr().err


def test_python_m_tmb_verity_format(tmp_path: Path, data: Path) -> None:
    expected = reference(data, tmp_path / "ref.hash", "ab")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tmb",
            "verity",
            "format",
            str(data),
            "--salt",
            "ab",
            "--hash-file",
            str(tmp_path / "h"),
            "--uuid",
            UUID,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert last_root(proc.stdout) == expected
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    assert (tmp_path / "h").read_bytes() == (tmp_path / "ref.hash").read_bytes()


def test_commit_verify_policy(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["commit", str(model), "--model-id", "acme/m", "--revision", "v1", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    root = last_root(captured.out)
    assert captured.err == ""
    commitment = json.loads((out / "commitment.json").read_text())
    assert commitment["verity"]["root_hash"] == root
    image, hashes, cfile = out / "image.erofs", out / "image.verity", out / "commitment.json"
    # veritysetup agrees with the published root for the image
    subprocess.run([veritysetup(), "verify", str(image), str(hashes), root], check=True, capture_output=True)

    assert main(["verity", "verify", str(image), "--commitment", str(cfile)]) == 0
    assert f"OK: root hash {root} matches" in capsys.readouterr().out
    assert main(["verity", "verify", str(image), "--commitment", str(cfile), "--hash-file", str(hashes)]) == 0
    capsys.readouterr()

    assert main(["verity", "policy", str(cfile)]) == 0
    rule = tomllib.loads(capsys.readouterr().out)["verity"][0]
    assert rule["name"] == "acme/m@v1" and rule["root_digest"] == root
    assert rule["data_blocks"] == commitment["verity"]["data_blocks"]
    assert main(["verity", "policy", str(cfile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rule


def test_verify_reports_first_differing_block(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["commit", str(model), "--model-id", "acme/m", "--revision", "v1", "--out", str(out)]) == 0
    capsys.readouterr()
    cfile, hashes = out / "commitment.json", out / "image.verity"
    bad = tmp_path / "bad.erofs"
    raw = bytearray((out / "image.erofs").read_bytes())
    blocks = len(raw) // 4096
    raw[5 * 4096 + 100] ^= 0xFF
    raw[(blocks - 1) * 4096] ^= 0x01
    bad.write_bytes(bytes(raw))

    assert main(["verity", "verify", str(bad), "--commitment", str(cfile), "--hash-file", str(hashes)]) == 1
    text = capsys.readouterr().out
    assert text.rstrip().splitlines()[-1] == "First differing data block: 5"
    assert "verity.block_mismatch" in text and "blocks=2" in text and "verity.root_mismatch" in text

    # without the stored tree: the root differs, size and block count say what else does
    assert main(["verity", "verify", str(bad), "--commitment", str(cfile)]) == 1
    text = capsys.readouterr().out
    assert "verity.root_mismatch" in text and "FAILED" in text and "First differing" not in text

    short = tmp_path / "short.erofs"
    short.write_bytes(bytes(raw[: 4 * 4096]))
    assert main(["verity", "verify", str(short), "--commitment", str(cfile), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    ids = [f["id"] for f in doc["findings"]]
    assert doc["ok"] is False and doc["first_bad_data_block"] == 4
    assert "verity.image_size_mismatch" in ids and "verity.image_truncated" in ids

    longer = tmp_path / "long.erofs"
    longer.write_bytes((out / "image.erofs").read_bytes() + bytes(4096))
    assert main(["verity", "verify", str(longer), "--commitment", str(cfile)]) == 1
    assert "verity.image_size_mismatch" in capsys.readouterr().out

    # a tampered hash tree is caught too
    tree = bytearray(hashes.read_bytes())
    tree[4096 + 10] ^= 1
    forged = tmp_path / "forged.verity"
    forged.write_bytes(bytes(tree))
    assert (
        main(
            [
                "verity",
                "verify",
                str(out / "image.erofs"),
                "--commitment",
                str(cfile),
                "--hash-file",
                str(forged),
            ]
        )
        == 1
    )
    assert "verity.hash_tree" in capsys.readouterr().out


def test_verify_with_bad_commitment_exits_2(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfile = tmp_path / "c.json"
    cfile.write_text('{"format": "tmb-model-commitment", "format_version": 99}')
    assert main(["verity", "verify", str(data), "--commitment", str(cfile)]) == 2
    err = capsys.readouterr().err
    assert "unsupported commitment format version 99" in err and str(cfile) in err


def test_commit_bad_input_exits_2(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(model / "fifo")
    out = tmp_path / "out"
    assert main(["commit", str(model), "--model-id", "acme/m", "--revision", "v1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "special file" in err and str(model / "fifo") in err
    assert not out.exists()
    assert main(["commit", str(model), "--model-id", "a@b", "--revision", "v1", "--out", str(out)]) == 2
    assert "invalid model id" in capsys.readouterr().err


def test_commit_explicit_salt(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = [
        "commit",
        str(model),
        "--model-id",
        "acme/m",
        "--revision",
        "v1",
        "--out",
        str(out),
        "--salt",
        "-",
    ]
    assert main(argv) == 0
    root = last_root(capsys.readouterr().out)
    doc = json.loads((out / "commitment.json").read_text())
    assert doc["verity"]["salt"] == "-" and doc["verity"]["salt_source"] == "explicit"
    assert reference(out / "image.erofs", tmp_path / "ref", "-") == root
