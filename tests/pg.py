"""pytest fixtures around a private PostgreSQL server (Debian package ``postgresql``) for the store tests.

Fixtures (registered in conftest.py): ``postgres`` (one :class:`PgServer` per test session, started on first
use) and ``pg_url`` (a ``postgresql://`` URL to a fresh database of its own, dropped after the test).

The server is the Debian one under ``/usr/lib/postgresql/<version>/bin`` (or ``initdb``/``postgres`` on PATH),
with its data directory and unix socket in a temporary directory, no TCP listener, ``trust`` auth and
durability off (``fsync=off``: a test server, nothing to keep). PostgreSQL refuses to run as root, so as root
(the CI) ``initdb`` and ``postgres`` run as the ``postgres`` system user the Debian package creates; otherwise
as the current user. Every wait is bounded; the server is stopped with ``pg_ctl stop -m immediate`` on
teardown, and killed if that fails. Missing binaries are a test *failure*, never a skip.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10
_PORT = 5432  # only names the socket file: the server listens on its private unix socket alone


class PgServerError(Exception):
    """The test PostgreSQL server could not be found or started."""


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl`` (the newest Debian version first)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0, reverse=True)
    for path in [*found, shutil.which("initdb") or ""]:
        bindir = Path(path).parent
        if path and all(os.access(bindir / b, os.X_OK) for b in ("initdb", "postgres", "pg_ctl")):
            return bindir
    raise PgServerError(
        "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found under /usr/lib/postgresql/*/bin "
        "or on PATH: install the Debian package 'postgresql' (`make deps` does)"
    )


@dataclass
class PgServer:
    """A running private PostgreSQL server; ``url(dbname)`` connects as the superuser ``postgres``."""

    root: Path
    bindir: Path
    proc: subprocess.Popen[bytes]
    run_as: dict[str, Any]

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, dbname: str = "postgres", *, password: str | None = None) -> str:
        auth = "postgres" + (f":{quote(password, safe='')}" if password is not None else "")
        return f"postgresql://{auth}@/{dbname}?host={quote(str(self.socket_dir))}&port={_PORT}"

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                pg_ctl = [
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "immediate",
                ]
                subprocess.run(
                    [*pg_ctl, "-t", str(STOP_TIMEOUT_S)],
                    capture_output=True,
                    timeout=STOP_TIMEOUT_S + 5,
                    cwd=self.root,
                    **self.run_as,
                )
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PgServer:
    """initdb a fresh cluster in a temporary directory and start ``postgres`` on a unix socket there."""
    bindir = find_bindir()
    # Not under pytest's tmp_path: its parents are 0700 root, which the postgres user cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="tmb-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise PgServerError(
                "running as root and there is no 'postgres' system user to run PostgreSQL as "
                "(the Debian package 'postgresql' creates it)"
            ) from None
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC", "HOME": str(root)}
    data = root / "data"
    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        init = subprocess.run(
            [*initdb, "--locale=C", "--no-sync", "--no-instructions"],
            capture_output=True,
            timeout=120,
            cwd=root,
            env=env,
            **run_as,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(root, ignore_errors=True)
        raise PgServerError("initdb did not finish within 120 s") from None
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        out = (init.stdout + init.stderr).decode(errors="replace").strip()
        raise PgServerError(f"initdb failed (exit {init.returncode}): {out[-2000:]}")
    options = {
        "listen_addresses": "",
        "unix_socket_directories": str(root),
        "port": str(_PORT),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "100",
        "logging_collector": "off",
    }
    cmd = [str(bindir / "postgres"), "-D", str(data)]
    for key, value in options.items():
        cmd += ["-c", f"{key}={value}"]
    with open(root / "postgres.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=root, env=env, **run_as
        )
    server = PgServer(root, bindir, proc, run_as)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: PgServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            raise PgServerError(f"postgres exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            psycopg.connect(server.url(), connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise PgServerError(
                    f"postgres not accepting connections after {START_TIMEOUT_S:.0f} s ({exc}):\n"
                    f"{server.log_tail()}"
                ) from None
        time.sleep(0.05)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """One private PostgreSQL server for the whole test session (tests use their own databases)."""
    try:
        server = start_server()
    except PgServerError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


_db_numbers = itertools.count()


@pytest.fixture
def pg_url(postgres: PgServer) -> Iterator[str]:
    """A URL to a fresh, empty database on the session server (dropped, connections and all, after)."""
    name = f"tmb_test_{os.getpid()}_{next(_db_numbers)}"
    with psycopg.connect(postgres.url(), autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres.url(name)
    finally:
        with psycopg.connect(postgres.url(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
