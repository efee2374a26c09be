"""Passwords out of PostgreSQL connection strings, for what gets printed (no psycopg needed).

:func:`redact` masks the password of a URL (``postgresql://user:pw@host/db``, ``?password=``) or a libpq
key/value string (``password=...``); :func:`scrub` takes every form of that password out of a text, such as
a driver's error message. ``tmb config show`` and the stores' errors use them.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["redact", "scrub"]

_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE)
_MASK = "***"


def redact(url: str) -> str:
    """``url`` with its password (URL user info, ``password=`` parameter) replaced by ``***``."""
    if not url.startswith(("postgresql://", "postgres://")):
        return _KV_PASSWORD.sub(lambda m: m.group(1) + _MASK, url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://" + _MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{_MASK}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, _MASK if k == "password" else v) for k, v in pairs], safe="/*")
    return _KV_PASSWORD.sub(
        lambda m: m.group(1) + _MASK, urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    )


def _passwords(url: str) -> set[str]:
    found: set[str] = set()
    try:  # libpq's own parse, when psycopg is there (it is wherever a connection failed)
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        pass
    else:
        try:
            pw = conninfo_to_dict(url).get("password")
            if pw:
                found.add(str(pw))
        except Error:
            pass
    if url.startswith(("postgresql://", "postgres://")):
        netloc = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        if "@" in netloc and ":" in netloc.rsplit("@", 1)[0]:
            found.add(netloc.rsplit("@", 1)[0].split(":", 1)[1])
        found.update(re.findall(r"[?&]password=([^&#]*)", url))
    found.update(m.group(2).strip("'") for m in _KV_PASSWORD.finditer(url))
    return {variant for pw in found if pw for variant in (pw, unquote(pw))}


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) with ``url``'s password taken out wherever it appears."""
    text = text.replace(url, redact(url))
    for pw in sorted(_passwords(url), key=len, reverse=True):
        text = text.replace(pw, _MASK)
    return _KV_PASSWORD.sub(lambda m: m.group(1) + _MASK, text)
