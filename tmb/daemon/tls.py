"""TLS for the daemon's listeners: ``tls_cert`` and ``tls_key`` in ``[server]`` and in ``[management]``.

Each is a PEM file: the certificate (its chain after it) and its private key (unencrypted). A file that is
missing, unreadable or not PEM, or a key that does not belong to the certificate, is a
:class:`~tmb.errors.ConfigError` naming the section and key, raised before anything listens.
"""

from __future__ import annotations

import ssl

from tmb.errors import ConfigError

__all__ = ["server_context"]


def server_context(section: str, cert: str, key: str) -> ssl.SSLContext | None:
    """The server-side context for one listener (TLS 1.2 or later), or None when ``cert`` is empty."""
    if not cert:
        return None
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(
                f"cannot read {section}.{name}: {exc.strerror}", section=section, key=name, path=path
            ) from None
        if b"-----BEGIN " not in head:
            raise ConfigError(f"{section}.{name} is not a PEM file", section=section, key=name, path=path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        mismatch = "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc)
        name, what = ("tls_key", "does not belong to the certificate") if mismatch else ("tls_cert", str(exc))
        raise ConfigError(
            f"{section}.{name} {what}" if mismatch else f"cannot load {section}.tls_cert/tls_key: {what}",
            section=section,
            key=name,
            cert=cert,
            tls_key=key,
        ) from None
    return context
