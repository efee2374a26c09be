"""One bounded HTTP(S) GET for the command-line tools (keys, proofs): no other URL schemes, a timeout, a size
limit, and failures as :class:`~tmb.errors.InputError` naming the URL and what was being fetched."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from tmb.errors import InputError

__all__ = ["fetch"]


def fetch(url: str, what: str, *, limit: int = 1 << 20, timeout_s: float = 10.0) -> bytes:
    """The body at ``url`` (``http``/``https`` only; ``file:`` and the rest are refused), at most ``limit``
    bytes: a longer body is an error rather than silently cut."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(f"cannot fetch {what}: only http and https URLs are allowed", url=url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (scheme checked above)
            data: bytes = resp.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(f"cannot fetch {what}: {exc}", url=url) from None
    if len(data) > limit:
        raise InputError(f"cannot fetch {what}: the answer is over {limit} bytes", url=url)
    return data
