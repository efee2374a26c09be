"""The sampler loop: absolute deadlines under a controllable clock, overrun skipping, dedup, threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from tmb.errors import ConfigError
from tmb.telemetry import Sample, SampleBatch
from tmb.telemetry.source import Sampler, sampled_batches

PERIOD = 50_000_000  # 20 Hz


class FakeClock:
    """Monotonic ns that only moves when told; ``sleep`` moves it by the request plus a wake-up latency."""

    def __init__(self, latency_ns: int = 0) -> None:
        self.now = 5_000_000_000
        self.latency_ns = latency_ns
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * 1e9) + self.latency_ns
        await asyncio.sleep(0)


async def direct(poll: object) -> Sequence[Sample]:
    return poll()  # type: ignore[operator,no-any-return]


def make_poll(
    clock: FakeClock, costs_ns: Sequence[int], value: float | None = None
) -> tuple[list[int], object]:
    calls: list[int] = []

    def poll() -> list[Sample]:
        calls.append(clock.now)
        clock.now += costs_ns[(len(calls) - 1) % len(costs_ns)]
        power = float(len(calls)) if value is None else value
        return [Sample(t_ns=clock.now, gpu="GPU-x", power_w=power)]

    return calls, poll


async def test_ticks_stay_on_the_grid() -> None:
    clock = FakeClock()
    calls, poll = make_poll(clock, [3_000_000, 17_000_000, 41_000_000, 0])
    sampler = Sampler(poll, rate_hz=20.0, clock=clock, sleep=clock.sleep, run_blocking=direct)  # type: ignore[arg-type]
    await sampler.run(lambda s: None, max_ticks=1000)
    start = calls[0]
    assert [c - start for c in calls] == [k * PERIOD for k in range(1000)]
    assert sampler.stats.ticks == 1000 and sampler.stats.missed == 0


async def test_wakeup_latency_does_not_accumulate() -> None:
    clock = FakeClock(latency_ns=2_000_000)  # every sleep wakes 2 ms late
    calls, poll = make_poll(clock, [10_000_000])
    sampler = Sampler(poll, rate_hz=20.0, clock=clock, sleep=clock.sleep, run_blocking=direct)  # type: ignore[arg-type]
    await sampler.run(lambda s: None, max_ticks=2000)
    lateness = [c - calls[0] - k * PERIOD for k, c in enumerate(calls)]
    assert max(lateness) <= 2_000_000  # a relative-sleep loop would be 4 s late by now
    assert calls[-1] - calls[0] < 1999 * PERIOD + 2_000_001


async def test_overrun_skips_missed_ticks_and_stays_on_grid() -> None:
    clock = FakeClock()
    calls, poll = make_poll(clock, [1_000_000, 1_000_000, 130_000_000, 1_000_000, 60_000_000, 1_000_000])
    sampler = Sampler(poll, rate_hz=20.0, clock=clock, sleep=clock.sleep, run_blocking=direct)  # type: ignore[arg-type]
    emitted: list[int] = []
    await sampler.run(lambda s: emitted.append(len(s)), ticks_per_emit=4, max_ticks=6)
    offsets = [c - calls[0] for c in calls]
    # Tick 2 runs 130 ms: slot 3 (150 ms) is more than a period gone and skipped; slot 4 (200 ms) is
    # less than a period gone and runs late at 230 ms; slot 5 is back on the grid at 250 ms. Tick 5 runs
    # 60 ms, so slot 6 (300 ms) runs 10 ms late.
    assert offsets == [0, 50_000_000, 100_000_000, 230_000_000, 250_000_000, 310_000_000]
    assert sampler.stats.missed == 1
    assert emitted == [3, 3]  # the emit due at grid slot 4 carried the three samples taken


async def test_dedup_drops_unchanged_readings_with_heartbeat() -> None:
    clock = FakeClock()
    _, poll = make_poll(clock, [0], value=42.0)
    sampler = Sampler(
        poll,  # type: ignore[arg-type]
        rate_hz=20.0,
        heartbeat_s=0.5,
        clock=clock,
        sleep=clock.sleep,
        run_blocking=direct,
    )
    kept: list[Sample] = []
    await sampler.run(kept.extend, max_ticks=40)  # 2 s of an unchanging GPU
    assert [s.t_ns - kept[0].t_ns for s in kept] == [0, 500_000_000, 1_000_000_000, 1_500_000_000]
    assert sampler.stats.deduplicated == 36 and sampler.stats.samples == 4
    _, changing = make_poll(clock, [0])
    no_dedup = Sampler(changing, dedup=True, clock=clock, sleep=clock.sleep, run_blocking=direct)  # type: ignore[arg-type]
    await no_dedup.run(lambda s: None, max_ticks=10)
    assert no_dedup.stats.samples == 10 and no_dedup.stats.deduplicated == 0


async def test_poll_runs_off_the_event_loop_thread() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def poll() -> list[Sample]:
        threads.append(threading.get_ident())
        return []

    sampler = Sampler(poll, rate_hz=1000.0)
    await sampler.run(lambda s: None, max_ticks=3)
    assert threads and loop_thread not in threads


async def test_sampled_batches_keep_sampling_while_consumer_is_busy() -> None:
    clock = FakeClock()
    _, poll = make_poll(clock, [1_000_000])
    sampler = Sampler(poll, rate_hz=20.0, clock=clock, sleep=clock.sleep, run_blocking=direct)  # type: ignore[arg-type]

    def build(samples: list[Sample]) -> SampleBatch:
        return SampleBatch.from_samples(samples, source="nvml")

    stream = sampled_batches(sampler, build, 0.5)
    sizes = []
    async for batch in stream:
        sizes.append(len(batch))
        if len(sizes) == 3:
            break
    await stream.aclose()
    assert sizes == [10, 10, 10]


async def test_sampler_failure_surfaces_in_the_stream() -> None:
    def poll() -> list[Sample]:
        raise RuntimeError("driver exploded")

    stream = sampled_batches(
        Sampler(poll, rate_hz=100.0), lambda s: SampleBatch.from_samples(s, source="nvml"), 0.1
    )
    with pytest.raises(RuntimeError, match="driver exploded"):
        async for _ in stream:
            pass


def test_rate_is_validated() -> None:
    with pytest.raises(ConfigError):
        Sampler(lambda: [], rate_hz=0.0)
