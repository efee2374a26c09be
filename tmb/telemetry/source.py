"""The source protocol shared by the NVML, synthetic and replay sources, and the drift-free sampler loop.

A :class:`TelemetrySource` yields :class:`~tmb.telemetry.sample.SampleBatch` es every ``interval_s`` from
:meth:`~TelemetrySource.batches`, collects :class:`~tmb.errors.Finding` s about itself (a GPU fell off the
bus, a read failed), describes itself for trace metadata and releases what it holds on ``close``. The probe
picks one by config through :func:`open_source`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tmb.errors import ConfigError, Finding
from tmb.telemetry.sample import Sample, SampleBatch

Poll = Callable[[], Sequence[Sample]]
Clock = Callable[[], int]
Sleep = Callable[[float], Awaitable[None]]
RunBlocking = Callable[[Poll], Awaitable[Sequence[Sample]]]


@runtime_checkable
class TelemetrySource(Protocol):
    """What the probe needs from a telemetry source."""

    @property
    def kind(self) -> str:
        """``"nvml"``, ``"synthetic"`` or ``"replay"``."""
        ...

    def batches(self, interval_s: float = 1.0) -> AsyncGenerator[SampleBatch, None]:
        """A batch of the samples taken in each ``interval_s`` (live sources: forever)."""
        ...

    @property
    def findings(self) -> list[Finding]:
        """What went wrong with the source so far (GPU lost, read errors)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Metadata for traces: GPU names, driver version, supported fields, rate, workload."""
        ...

    def close(self) -> None:
        """Release the driver, files or tasks the source holds."""
        ...


@dataclass
class SamplerStats:
    """Counters of a :class:`Sampler`: ticks run, ticks skipped because a poll overran, readings dropped
    as unchanged, and readings kept."""

    ticks: int = 0
    missed: int = 0
    deduplicated: int = 0
    samples: int = 0


async def _to_thread(poll: Poll) -> Sequence[Sample]:
    return await asyncio.to_thread(poll)


class Sampler:
    """Calls a blocking ``poll`` at ``rate_hz`` on absolute deadlines ``start + k / rate_hz``.

    The poll runs in a worker thread (``run_blocking``) so the event loop never blocks. Lateness does not
    accumulate: a tick that starts late is still followed by the next tick on the grid, and when a poll
    overruns by a whole period or more the missed ticks are skipped (counted in ``stats.missed``). With
    ``dedup`` a reading equal to the previous one of its GPU (time aside) is dropped unless
    ``heartbeat_s`` has passed since the last kept one, so a quiet GPU still shows up.
    """

    def __init__(
        self,
        poll: Poll,
        *,
        rate_hz: float = 20.0,
        dedup: bool = True,
        heartbeat_s: float = 1.0,
        clock: Clock = time.monotonic_ns,
        sleep: Sleep = asyncio.sleep,
        run_blocking: RunBlocking = _to_thread,
    ) -> None:
        if not 0 < rate_hz <= 1000:
            raise ConfigError("sampling rate must be in (0, 1000] Hz", rate_hz=rate_hz)
        self.poll = poll
        self.period_ns = max(1, round(1e9 / rate_hz))
        self.dedup = dedup
        self.heartbeat_ns = round(heartbeat_s * 1e9)
        self.clock, self.sleep, self.run_blocking = clock, sleep, run_blocking
        self.stats = SamplerStats()
        self._last: dict[str, Sample] = {}

    def _keep(self, samples: Sequence[Sample]) -> list[Sample]:
        kept = []
        for s in samples:
            prev = self._last.get(s.gpu)
            if (
                self.dedup
                and prev is not None
                and s.same_reading(prev)
                and s.t_ns - prev.t_ns < self.heartbeat_ns
            ):
                self.stats.deduplicated += 1
                continue
            self._last[s.gpu] = s
            kept.append(s)
        self.stats.samples += len(kept)
        return kept

    async def run(
        self, emit: Callable[[list[Sample]], None], *, ticks_per_emit: int = 1, max_ticks: int | None = None
    ) -> None:
        """Poll until cancelled (or ``max_ticks`` polls); hand the kept samples to ``emit`` every
        ``ticks_per_emit`` grid ticks (skipped ticks count, so emits stay on the grid too)."""
        start = self.clock()
        k = 0
        next_emit = ticks_per_emit
        pending: list[Sample] = []
        while max_ticks is None or self.stats.ticks < max_ticks:
            deadline = start + k * self.period_ns
            now = self.clock()
            if deadline > now:
                await self.sleep((deadline - now) / 1e9)
            pending.extend(self._keep(await self.run_blocking(self.poll)))
            self.stats.ticks += 1
            k += 1
            behind = (self.clock() - (start + k * self.period_ns)) // self.period_ns
            if behind >= 1:
                self.stats.missed += behind
                k += behind
            if k >= next_emit:
                emit(pending)
                pending = []
                next_emit = (k // ticks_per_emit + 1) * ticks_per_emit
        if pending:
            emit(pending)


async def sampled_batches(
    sampler: Sampler, build: Callable[[list[Sample]], SampleBatch], interval_s: float
) -> AsyncGenerator[SampleBatch, None]:
    """Run ``sampler`` in a background task and yield a batch every ``interval_s`` of grid time.

    The task keeps sampling while the consumer is busy (awaiting the network, say); batches queue up.
    """
    queue: asyncio.Queue[SampleBatch] = asyncio.Queue()
    ticks = max(1, round(interval_s * 1e9 / sampler.period_ns))
    task = asyncio.create_task(
        sampler.run(lambda samples: queue.put_nowait(build(samples)), ticks_per_emit=ticks)
    )
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            task.result()  # re-raise what stopped the sampler
            while not queue.empty():
                yield queue.get_nowait()
            return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def open_source(kind: str, **options: Any) -> TelemetrySource:
    """A source by config name: ``nvml`` (options: rate_hz, dedup, ...), ``synthetic`` (model_name,
    rate_hz, seed, ...) or ``replay`` (trace path as ``path``, paced, speed, ...)."""
    if kind == "nvml":
        from tmb.telemetry.nvml import NvmlSource

        return NvmlSource(**options)
    if kind == "synthetic":
        from tmb.telemetry.synthetic import SyntheticSource

        return SyntheticSource(**options)
    if kind == "replay":
        from tmb.telemetry.replay import ReplaySource

        return ReplaySource(**options)
    raise ConfigError(f"unknown telemetry source {kind!r}", known=["nvml", "synthetic", "replay"])
