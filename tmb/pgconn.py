"""One PostgreSQL connection as tmb's stores use it (psycopg 3): the verdict store
(:mod:`tmb.verdict.store_pg`) and the evidence store (:mod:`tmb.ingest.store_pg`).

:class:`PgConnection` opens the connection with a connect timeout (unless the URL sets one) and the
``application_name`` ``tmb``, runs the caller's schema set-up on every (re)connection, reconnects on the
next call after the server dropped it, runs a function in one transaction retrying deadlock victims
(:meth:`PgConnection.run`), and turns every driver error into the caller's error type with the password
taken out of everything it says (:func:`tmb.pgurl.scrub`); the driver's exception is not chained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from tmb.errors import TmbError
from tmb.pgurl import redact, scrub

__all__ = ["ATTEMPTS", "CONNECT_TIMEOUT_S", "HINT_CONNECT", "Connection", "Cursor", "PgConnection"]

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]
Cursor = psycopg.Cursor[tuple[Any, ...]]

CONNECT_TIMEOUT_S = 10  # unless the URL sets connect_timeout: an unreachable host must not hang startup
ATTEMPTS = 5  # a transaction chosen as a deadlock victim (daemons sharing rows) is run again, this often
HINT_CONNECT = "check that PostgreSQL is running and reachable, and the URL's host, port, user and database"


class PgConnection:
    """A connection to ``url`` (a libpq URL or key/value string) that reconnects when it was lost.

    ``init(connection)`` runs after each connect (creating or checking the schema; a driver error there is
    "cannot open store"); ``error`` is the
    :class:`~tmb.errors.TmbError` subclass raised for every failure, with ``url`` (redacted) and the
    SQLSTATE in its context. Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        url: str,
        *,
        error: type[TmbError],
        init: Callable[[Connection], None] | None = None,
        autocommit: bool = False,
    ) -> None:
        self.conninfo = url
        self.url = redact(url)  # safe to print
        self._error_type, self._init, self._autocommit = error, init, autocommit
        self._closed = False
        self.db = self._connect()

    def _connect(self) -> Connection:
        try:
            params = conninfo_to_dict(self.conninfo)
            extra: dict[str, Any] = {}
            if "connect_timeout" not in params:
                extra["connect_timeout"] = CONNECT_TIMEOUT_S
            if "application_name" not in params:
                extra["application_name"] = "tmb"
            db = psycopg.connect(self.conninfo, autocommit=self._autocommit, **extra)
        except psycopg.Error as exc:
            raise self.error("cannot open store", exc, hint=HINT_CONNECT) from None
        if self._init is not None:
            try:
                self._init(db)
            except psycopg.Error as exc:
                db.close()
                raise self.error("cannot open store", exc) from None
            except BaseException:
                db.close()
                raise
        return db

    def connection(self) -> Connection:
        """The open connection; a new one when the server dropped the last (raises after :meth:`close`)."""
        if self.db.closed:
            if self._closed:
                raise self._error_type("store is closed", url=self.url)
            self.db = self._connect()  # the server restarted, or dropped us: start over
        return self.db

    def error(self, what: str, exc: BaseException, *, hint: str | None = None) -> TmbError:
        """The caller's error for ``exc`` with the password taken out of everything it says."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = scrub("; ".join(lines) or type(exc).__name__, self.conninfo)
        context: dict[str, Any] = {"url": self.url}
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate:
            context["sqlstate"] = sqlstate
        return self._error_type(f"{what}: {message}", hint=hint, **context)

    def run(self, what: str, fn: Callable[[Cursor], T]) -> T:
        """``fn(cursor)`` in one transaction: committed if it returns, rolled back if it raises; run again
        (up to :data:`ATTEMPTS` times) when chosen as a deadlock victim or a serialization failure."""
        attempt = 0
        while True:
            attempt += 1
            db = self.connection()
            try:
                with db.transaction(), db.cursor() as cur:
                    return fn(cur)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt >= ATTEMPTS:
                    raise self.error(what, exc) from None
            except psycopg.Error as exc:
                raise self.error(what, exc, hint=HINT_CONNECT if db.closed else None) from None

    def close(self) -> None:
        self._closed = True
        self.db.close()
