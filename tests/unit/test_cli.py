"""The ``tmb`` entry point: lazy subcommand loading stays consistent, errors never show a traceback."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tmb.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("module", list(SUBCOMMANDS))
def test_each_module_registers_exactly_the_commands_it_is_mapped_to(module: str) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    assert set(sub.choices) == set(SUBCOMMANDS[module])


def test_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tmb", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for commands in SUBCOMMANDS.values():
        for command in commands:
            assert command in out


def test_input_errors_exit_2_with_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ima", "replay", str(tmp_path / "missing.log")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read IMA log") and "missing.log" in err and "Traceback" not in err
