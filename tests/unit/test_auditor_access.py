"""Who may read evidence bundles (tmb/daemon/evidence.py auditor_check): with tokens, a bearer token that
is one of them; without, loopback clients only (real address strings as aiohttp reports them)."""

from __future__ import annotations

from tmb.daemon.evidence import auditor_check

T1 = "9f2c4e6a8b0d1f3a5c7e9b1d3f5a7c9e"
T2 = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"


def kind(tokens: tuple[str, ...], remote: str | None, auth: str | None = None) -> str | None:
    got = auditor_check(tokens, remote, auth)
    return None if got is None else f"{got[0]} {got[1]}"


def test_without_tokens_only_loopback_clients() -> None:
    for remote in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert kind((), remote) is None, remote
    for remote in ("10.0.0.5", "192.168.1.2", "fe80::1%eth0", "2001:db8::1", "::ffff:10.0.0.5", "", None):
        assert kind((), remote) == "403 auditor_loopback_only", remote
    assert kind((), "10.0.0.5", f"Bearer {T1}") == "403 auditor_loopback_only"  # no token is configured


def test_with_tokens_a_bearer_token_from_anywhere() -> None:
    for remote in ("127.0.0.1", "10.0.0.5"):
        assert kind((T1, T2), remote) == "401 auditor_token_required"
        assert kind((T1, T2), remote, T1) == "401 auditor_token_required"  # not a bearer header
        assert kind((T1, T2), remote, f"Basic {T1}") == "401 auditor_token_required"
        assert kind((T1, T2), remote, f"Bearer {T1}x") == "403 auditor_token_invalid"
        assert kind((T1, T2), remote, "Bearer ") == "403 auditor_token_invalid"
        assert kind((T1, T2), remote, f"Bearer {T1}") is None
        assert kind((T1, T2), remote, f"Bearer {T2}") is None
