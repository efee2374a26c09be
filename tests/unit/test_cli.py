"""The ``tmb`` entry point: lazy subcommand loading stays consistent, errors never show a traceback."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tmb.cli import SUBCOMMANDS, build_parser, main


@pytest.mark.parametrize("module", list(SUBCOMMANDS))
def test_each_module_registers_exactly_the_commands_it_is_mapped_to(module: str) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    assert set(sub.choices) == set(SUBCOMMANDS[module])


class _Recorder:
    """Stands in for argparse's subparsers action: records each command's help, delegates the rest."""

    def __init__(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self.sub = sub
        self.help: dict[str, str] = {}

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        self.help[name] = str(kwargs.get("help"))
        return self.sub.add_parser(name, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("module", list(SUBCOMMANDS))
def test_the_help_lines_tmb_help_lists_are_the_modules_own(module: str) -> None:
    """``tmb --help`` lists the commands from SUBCOMMANDS without importing their modules."""
    recorder = _Recorder(argparse.ArgumentParser().add_subparsers())
    importlib.import_module(module).register(recorder)
    assert recorder.help == SUBCOMMANDS[module]


def test_the_complete_parser_and_the_listing_agree() -> None:
    full = build_parser()  # every module imported and registered
    listed = build_parser(["--help"])
    assert full.format_help() == listed.format_help()


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
