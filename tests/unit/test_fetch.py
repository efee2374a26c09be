"""tmb.fetch: the command-line tools' one GET, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tmb.errors import InputError
from tmb.fetch import fetch


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"x" * int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetches_a_body_up_to_the_limit(server: str) -> None:
    assert fetch(f"{server}/16", "keys", limit=16) == b"x" * 16


def test_a_longer_body_is_an_error_not_a_cut(server: str) -> None:
    with pytest.raises(InputError, match="over 15 bytes"):
        fetch(f"{server}/16", "keys", limit=15)


@pytest.mark.parametrize("scheme", ["file", "ftp", "data", ""])
def test_other_schemes_are_refused(tmp_path: Path, scheme: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not read me")
    url = f"{scheme}://{secret}" if scheme else str(secret)
    with pytest.raises(InputError, match="only http and https") as info:
        fetch(url, "keys")
    assert info.value.context["url"] == url


def test_an_unreachable_server_names_what_was_fetched() -> None:
    with pytest.raises(InputError, match="cannot fetch the consistency proof"):
        fetch("http://127.0.0.1:9/x", "the consistency proof", timeout_s=2)
