"""The ingest's token buckets (:class:`tmb.ingest.limits.RateLimit`) on a clock the test moves: a bucket
refills at its rate up to its burst, and the table holds at most ``max_keys`` buckets however many keys
come (a flood from ever new addresses), evicting the least recently used. Enrolment is counted by client
address (:func:`tmb.ingest.limits.peer_key`), an IPv6 one by its /64."""

from __future__ import annotations

import pytest

from tmb.attest.policy import policy_from_dict
from tmb.ingest.limits import RateLimit, peer_key
from tmb.ingest.routes import (
    ENROL_PEER_BURST,
    ENROL_PEER_LIMIT_KEY,
    ENROL_PEER_RATE_PER_S,
    ENROL_PEERS,
    make_app,
)
from tmb.ingest.service import Ingest


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = Clock()
    limit = RateLimit(2.0, 3, clock)
    assert [limit.take("a") for _ in range(4)] == [True, True, True, False]
    assert limit.take("b")  # another key has its own bucket
    clock.t += 0.5  # one token
    assert [limit.take("a") for _ in range(2)] == [True, False]
    clock.t += 100.0  # never more than the burst
    assert [limit.take("a") for _ in range(4)] == [True, True, True, False]


def test_a_zero_rate_is_no_limit() -> None:
    limit = RateLimit(0.0, 1, Clock(), max_keys=2)
    assert all(limit.take(str(i)) for i in range(100)) and limit.held == 0


def test_the_table_is_bounded_and_keeps_the_busy_keys() -> None:
    clock = Clock()
    limit = RateLimit(1.0, 2, clock, max_keys=8)
    assert [limit.take("flood") for _ in range(3)] == [True, True, False]
    for i in range(10_000):  # ever new addresses: the table never grows past its bound
        assert limit.take(f"spoofed-{i}")
        assert limit.take("flood") is False  # the flooder, used most recently, is never evicted: still empty
        assert limit.held <= 8
    assert limit.held == 8
    clock.t += 10.0
    assert limit.take("spoofed-0")  # evicted long ago: a new, full bucket


def test_peer_key_groups_ipv6_by_64() -> None:
    assert peer_key("127.0.0.1") == "127.0.0.1"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert peer_key("::ffff:192.0.2.7") == "192.0.2.7"  # IPv4-mapped: the IPv4 client
    assert peer_key("fe80::1%eth0") == "fe80::/64"
    assert peer_key(None) == peer_key("") == ""


@pytest.mark.parametrize("remote", ["192.0.2.1", "2001:db8::1"])
def test_enrolment_counts_each_address_in_a_bounded_table(remote: str) -> None:
    ingest = Ingest(":memory:", policy=policy_from_dict({"version": 1}))
    try:
        limit = make_app(ingest)[ENROL_PEER_LIMIT_KEY]
        assert (limit.rate, limit.burst, limit.max_keys) == (
            ENROL_PEER_RATE_PER_S,
            ENROL_PEER_BURST,
            ENROL_PEERS,
        )
        assert sum(limit.take(peer_key(remote)) for _ in range(ENROL_PEER_BURST + 5)) == ENROL_PEER_BURST
    finally:
        ingest.close()
