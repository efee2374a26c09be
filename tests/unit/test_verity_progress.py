"""The stderr progress bar: silent off a terminal and for short operations, a \\r-redrawn line otherwise."""

from __future__ import annotations

import io

from tmb.verity.progress import Progress, human_bytes


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with Progress("hashing", 100, stream=stream, delay=0) as bar:
        bar.update(50)
        bar.update(100)
    assert stream.getvalue() == ""


def test_silent_for_quick_operations() -> None:
    stream = FakeTty()
    with Progress("hashing", 100, stream=stream, delay=60) as bar:
        bar.update(100)
    assert stream.getvalue() == ""


def test_draws_on_a_terminal_after_the_delay() -> None:
    stream = FakeTty()
    with Progress("hashing", 4 << 30, stream=stream, delay=0, width=10) as bar:
        bar.update(1 << 30)
        bar.advance(3 << 30)
    text = stream.getvalue()
    assert text.startswith("\rhashing [##########] 100%") or "\rhashing [##--------]  25%" in text
    assert "4.0 GiB / 4.0 GiB" in text and text.endswith("\n")


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
