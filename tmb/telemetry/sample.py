"""Telemetry samples: one reading (:class:`Sample`) and the columnar batch (:class:`SampleBatch`).

Units are fixed by the field names: watts, millijoules, bytes, MHz, degrees Celsius, wall-clock nanoseconds.
Utilisation from NVML (``gpu_util``, ``mem_util``) is in percent (0..100, integer steps on real drivers);
GPM activities (``sm_active``, ``tensor_*``, ``dram_active``) are fractions (0..1). A field the driver does
not offer is *absent*: ``None`` in a :class:`Sample`, NaN in a :class:`SampleBatch`, never 0.

The canonical byte encoding of a batch lives in :mod:`tmb.telemetry._codec` and is documented in
``docs/telemetry.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from tmb.errors import InputError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

SourceKind = Literal["nvml", "synthetic", "replay", "import"]
PowerField = Literal["instant", "average", "none"]
SOURCES: Final = ("nvml", "synthetic", "replay", "import")
POWER_FIELDS: Final = ("instant", "average", "none")

#: The optional float fields of a sample, in canonical order (the encoding's field-mask bit order).
FLOAT_FIELDS: Final[tuple[str, ...]] = (
    "power_w",  # board power, W (instant where the driver has it: see SampleBatch.power_field)
    "energy_mj",  # total energy counter since driver load, mJ
    "gpu_util",  # percent of time a kernel was running, 0..100
    "mem_util",  # percent of time device memory was read or written, 0..100
    "sm_active",  # GPM: fraction of SMs busy, 0..1
    "tensor_active",  # GPM: fraction of cycles any tensor pipe was active, 0..1
    "tensor_hmma",  # GPM: half-precision (HMMA) tensor pipe activity, 0..1
    "tensor_imma",  # GPM: integer (IMMA) tensor pipe activity, 0..1
    "tensor_dfma",  # GPM: double-precision (DFMA) tensor pipe activity, 0..1
    "dram_active",  # GPM: DRAM bandwidth utilisation, 0..1
    "mem_used_bytes",  # device memory in use, bytes
    "mem_total_bytes",  # device memory total, bytes
    "sm_clock_mhz",  # SM clock, MHz
    "mem_clock_mhz",  # memory clock, MHz
    "temp_c",  # GPU temperature, degrees Celsius
    "power_limit_w",  # enforced power limit, W
)

Process = tuple[int, int | None]
"""A GPU compute process: (pid, used device memory in bytes, or None where the driver does not say)."""


@dataclass(frozen=True)
class Sample:
    """One telemetry reading of one GPU at wall-clock time ``t_ns`` (ns since the Unix epoch)."""

    t_ns: int
    gpu: str
    power_w: float | None = None
    energy_mj: float | None = None
    gpu_util: float | None = None
    mem_util: float | None = None
    sm_active: float | None = None
    tensor_active: float | None = None
    tensor_hmma: float | None = None
    tensor_imma: float | None = None
    tensor_dfma: float | None = None
    dram_active: float | None = None
    mem_used_bytes: float | None = None
    mem_total_bytes: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    temp_c: float | None = None
    power_limit_w: float | None = None
    processes: tuple[Process, ...] = ()

    def values(self) -> tuple[float | None, ...]:
        """The float fields in :data:`FLOAT_FIELDS` order."""
        return tuple(getattr(self, name) for name in FLOAT_FIELDS)

    def same_reading(self, other: Sample) -> bool:
        """True when ``other`` reads the same values for the same GPU (time ignored): used for dedup."""
        return self.gpu == other.gpu and self.values() == other.values() and self.processes == other.processes


assert tuple(f.name for f in fields(Sample))[2:-1] == FLOAT_FIELDS  # noqa: S101 (import-time layout check)


def _readonly_float(values: Any, n: int, name: str) -> FloatArray:
    arr = np.array(values, dtype=np.float64)
    if arr.shape != (n,):
        raise InputError(f"column {name!r} has shape {arr.shape}, expected ({n},)", column=name)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class SampleBatch:
    """Samples in columnar form, sorted by time (ties keep their order).

    ``t_ns`` is int64 wall-clock ns; ``gpu`` is an int64 index into ``gpus`` (UUIDs); every name in
    :data:`FLOAT_FIELDS` is a float64 column with NaN for absent; ``processes`` holds one tuple per sample.
    ``source`` says where the samples came from and ``synthetic`` is True for anything synthetic, also when
    a synthetic trace is replayed. ``power_field`` says which NVML power reading ``power_w`` holds.
    Arrays are read-only. Build with :meth:`from_columns` or :meth:`from_samples`.
    """

    t_ns: IntArray
    gpu: IntArray
    gpus: tuple[str, ...]
    power_w: FloatArray
    energy_mj: FloatArray
    gpu_util: FloatArray
    mem_util: FloatArray
    sm_active: FloatArray
    tensor_active: FloatArray
    tensor_hmma: FloatArray
    tensor_imma: FloatArray
    tensor_dfma: FloatArray
    dram_active: FloatArray
    mem_used_bytes: FloatArray
    mem_total_bytes: FloatArray
    sm_clock_mhz: FloatArray
    mem_clock_mhz: FloatArray
    temp_c: FloatArray
    power_limit_w: FloatArray
    processes: tuple[tuple[Process, ...], ...]
    source: SourceKind
    synthetic: bool
    power_field: PowerField = field(default="none")

    def __post_init__(self) -> None:
        t = np.array(self.t_ns, dtype=np.int64)
        n = t.shape[0] if t.ndim == 1 else -1
        if n < 0:
            raise InputError("t_ns must be one-dimensional")
        t.setflags(write=False)
        g = np.array(self.gpu, dtype=np.int64)
        if g.shape != (n,):
            raise InputError(f"gpu column has shape {g.shape}, expected ({n},)")
        g.setflags(write=False)
        object.__setattr__(self, "t_ns", t)
        object.__setattr__(self, "gpu", g)
        for name in FLOAT_FIELDS:
            object.__setattr__(self, name, _readonly_float(getattr(self, name), n, name))
        gpus = tuple(self.gpus)
        object.__setattr__(self, "gpus", gpus)
        procs = tuple(
            tuple((int(p), None if m is None else int(m)) for p, m in row) for row in self.processes
        )
        object.__setattr__(self, "processes", procs)
        if len(procs) != n:
            raise InputError(f"processes has {len(procs)} rows, expected {n}")
        if len(set(gpus)) != len(gpus):
            raise InputError("duplicate GPU uuid in batch", gpus=list(gpus))
        if n and (int(g.min()) < 0 or int(g.max()) >= len(gpus)):
            raise InputError("gpu index out of range", gpus=len(gpus))
        if n > 1 and bool(np.any(np.diff(t) < 0)):
            raise InputError("samples are not sorted by time", index=int(np.argmax(np.diff(t) < 0)) + 1)
        if self.source not in SOURCES:
            raise InputError(f"unknown telemetry source {self.source!r}", expected=list(SOURCES))
        if self.power_field not in POWER_FIELDS:
            raise InputError(f"unknown power field {self.power_field!r}", expected=list(POWER_FIELDS))
        if self.source == "synthetic" and not self.synthetic:
            raise InputError("a batch from the synthetic source must be labelled synthetic")

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_columns(
        cls,
        t_ns: Sequence[int] | IntArray,
        gpus: Sequence[str],
        *,
        source: SourceKind,
        synthetic: bool | None = None,
        power_field: PowerField = "none",
        gpu: Sequence[int] | IntArray | None = None,
        processes: Sequence[Sequence[Process]] | None = None,
        **columns: Sequence[float] | FloatArray,
    ) -> SampleBatch:
        """A batch from columns; omitted float columns are absent (all NaN), omitted ``gpu`` means index 0."""
        unknown = sorted(set(columns) - set(FLOAT_FIELDS))
        if unknown:
            raise InputError(f"unknown telemetry field(s) {unknown}", expected=list(FLOAT_FIELDS))
        n = len(t_ns)
        nan = np.full(n, np.nan)
        cols: dict[str, Any] = {name: columns.get(name, nan) for name in FLOAT_FIELDS}
        return cls(
            t_ns=np.asarray(t_ns, dtype=np.int64),
            gpu=np.zeros(n, dtype=np.int64) if gpu is None else np.asarray(gpu, dtype=np.int64),
            gpus=tuple(gpus),
            processes=tuple(tuple(row) for row in processes) if processes is not None else ((),) * n,
            source=source,
            synthetic=(source == "synthetic") if synthetic is None else synthetic,
            power_field=power_field,
            **cols,
        )

    @classmethod
    def empty(
        cls, source: SourceKind, *, synthetic: bool | None = None, power_field: PowerField = "none"
    ) -> SampleBatch:
        """A batch with no samples."""
        return cls.from_columns([], (), source=source, synthetic=synthetic, power_field=power_field)

    @classmethod
    def from_samples(
        cls,
        samples: Iterable[Sample],
        *,
        source: SourceKind,
        synthetic: bool | None = None,
        power_field: PowerField = "none",
    ) -> SampleBatch:
        """Columns from samples (stably sorted by time); GPUs are indexed in order of first appearance."""
        rows = sorted(samples, key=lambda s: s.t_ns)
        gpus: dict[str, int] = {}
        for s in rows:
            gpus.setdefault(s.gpu, len(gpus))
        cols = {
            name: np.array(
                [math.nan if (v := getattr(s, name)) is None else v for s in rows], dtype=np.float64
            )
            for name in FLOAT_FIELDS
        }
        return cls.from_columns(
            [s.t_ns for s in rows],
            tuple(gpus),
            gpu=[gpus[s.gpu] for s in rows],
            processes=[s.processes for s in rows],
            source=source,
            synthetic=synthetic,
            power_field=power_field,
            **cols,
        )

    # -- access ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.t_ns.shape[0])

    def column(self, name: str) -> FloatArray:
        """The float column ``name`` (one of :data:`FLOAT_FIELDS`)."""
        if name not in FLOAT_FIELDS:
            raise InputError(f"unknown telemetry field {name!r}", expected=list(FLOAT_FIELDS))
        col: FloatArray = getattr(self, name)
        return col

    def columns(self) -> dict[str, FloatArray]:
        """Every float column by name."""
        return {name: self.column(name) for name in FLOAT_FIELDS}

    def present_fields(self) -> tuple[str, ...]:
        """The float fields with at least one non-NaN value, in canonical order."""
        return tuple(name for name in FLOAT_FIELDS if bool(np.any(~np.isnan(self.column(name)))))

    def to_samples(self) -> list[Sample]:
        """Row form; NaN becomes None."""
        cols = [self.column(name).tolist() for name in FLOAT_FIELDS]
        out = []
        for i in range(len(self)):
            vals = {
                name: (None if math.isnan(c[i]) else c[i]) for name, c in zip(FLOAT_FIELDS, cols, strict=True)
            }
            out.append(
                Sample(
                    t_ns=int(self.t_ns[i]),
                    gpu=self.gpus[int(self.gpu[i])],
                    processes=self.processes[i],
                    **vals,
                )
            )
        return out

    def _take(self, index: npt.NDArray[np.intp] | slice) -> SampleBatch:
        if isinstance(index, slice):  # views of the (read-only) columns
            procs = self.processes[index]
        else:
            procs = tuple(map(self.processes.__getitem__, index.tolist()))
        return _derived(
            {
                "t_ns": self.t_ns[index],
                "gpu": self.gpu[index],
                "gpus": self.gpus,
                "processes": procs,
                "source": self.source,
                "synthetic": self.synthetic,
                "power_field": self.power_field,
                **{name: self.column(name)[index] for name in FLOAT_FIELDS},
            },
            (self,),
            index,
        )

    def slice_time(self, t0_ns: int, t1_ns: int) -> SampleBatch:
        """The samples with ``t0_ns <= t_ns < t1_ns`` (same GPU table)."""
        lo = int(np.searchsorted(self.t_ns, t0_ns, side="left"))
        hi = int(np.searchsorted(self.t_ns, t1_ns, side="left"))
        return self._take(slice(lo, max(lo, hi)))

    def for_gpu(self, uuid: str) -> SampleBatch:
        """The samples of one GPU, with a one-entry GPU table (empty when the batch has none for it)."""
        if uuid not in self.gpus:
            return _derived({**self._take(slice(0, 0))._fields(), "gpus": ()}, (self,), slice(0, 0))
        index = np.flatnonzero(self.gpu == self.gpus.index(uuid))
        part = self._take(index)
        return _derived(
            {**part._fields(), "gpus": (uuid,), "gpu": np.zeros(len(part), dtype=np.int64)}, (self,), index
        )

    def with_source(self, source: SourceKind) -> SampleBatch:
        """The same samples relabelled (``synthetic`` is kept: a replayed synthetic trace stays synthetic)."""
        return SampleBatch(**{**self._fields(), "source": source})

    def shift_time(self, delta_ns: int) -> SampleBatch:
        """The same samples with every timestamp moved by ``delta_ns``."""
        return SampleBatch(**{**self._fields(), "t_ns": self.t_ns + np.int64(delta_ns)})

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def concat(batches: Sequence[SampleBatch]) -> SampleBatch:
        """One batch from several, merged by time (stable). GPU tables are unified in order of appearance.

        ``synthetic`` is True if any part is; sources and power fields must agree (else :class:`InputError`).
        """
        if not batches:
            raise InputError("concat needs at least one batch")
        return _concat([(b, 0, len(b)) for b in batches])

    @staticmethod
    def cut_time(batches: Sequence[SampleBatch], t0_ns: int, t1_ns: int) -> SampleBatch | None:
        """``concat`` of the batches' ``slice_time(t0_ns, t1_ns)`` that have samples (the one slice when
        only one has; None when none has), without building the slices: a window cut from stored batches."""
        pieces = []
        for b in batches:
            lo = int(np.searchsorted(b.t_ns, t0_ns, side="left"))
            hi = int(np.searchsorted(b.t_ns, t1_ns, side="left"))
            if hi > lo:
                pieces.append((b, lo, hi))
        if not pieces:
            return None
        if len(pieces) == 1:
            b, lo, hi = pieces[0]
            return b._take(slice(lo, hi))
        return _concat(pieces)

    # -- per-sample memo ----------------------------------------------------------------------------------

    def memoised(self) -> SampleBatch:
        """This batch, keeping what :meth:`per_sample` computes from now on, also for the batches cut from
        it (``slice_time``, ``for_gpu``, ``concat`` of such batches): they gather their rows from it
        instead of computing them again. For a batch many windows are cut from (the ingest's decoded
        batches); a batch cut from it keeps it alive while it lives."""
        self.__dict__.setdefault("_memo", {})
        return self

    def per_sample(self, key: str, compute: Callable[[SampleBatch], npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """``compute(self)``: an array with one row per sample, where row ``i`` depends on sample ``i``'s
        time, readings and processes alone (not on other samples, nor on the GPU table). Kept under ``key``
        on a :meth:`memoised` batch and on the batches cut from one, whose rows are then gathered from
        their parents' (the same values: row ``i`` is a function of sample ``i``). Thread-safe: two threads
        may compute the same rows; either result is kept, and they are equal."""
        memo: dict[str, npt.NDArray[Any]] | None = self.__dict__.get("_memo")
        if memo is None:
            return compute(self)
        got = memo.get(key)
        if got is not None:
            return got
        origin: tuple[tuple[SampleBatch, ...], npt.NDArray[np.intp] | slice] | None = self.__dict__.get(
            "_origin"
        )
        if origin is None:
            got = compute(self)
        else:
            parents, index = origin
            rows = [p.per_sample(key, compute) for p in parents]
            got = (rows[0] if len(rows) == 1 else np.concatenate(rows))[index]
        if got.shape[:1] != (len(self),):
            raise InputError(f"per-sample {key!r} has {got.shape[:1]} rows, expected {len(self)}")
        got.setflags(write=False)
        memo[key] = got
        return got

    # -- comparison and encoding ------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleBatch):
            return NotImplemented
        return self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]

    def encode(self) -> bytes:
        """The canonical byte encoding (see docs/telemetry.md); deterministic, hash-chained by the probe."""
        from tmb.telemetry._codec import encode_batch

        return encode_batch(self)

    @staticmethod
    def decode(data: bytes) -> SampleBatch:
        """Parse :meth:`encode`'s output; raises :class:`~tmb.errors.ParseError` naming the offset."""
        from tmb.telemetry._codec import decode_batch

        return decode_batch(data)

    def summary(self) -> Mapping[str, Any]:
        """A small JSON-able description: samples, span, GPUs, fields present, labels."""
        span = (int(self.t_ns[-1]) - int(self.t_ns[0])) / 1e9 if len(self) > 1 else 0.0
        per_gpu = max((int(np.sum(self.gpu == i)) for i in range(len(self.gpus))), default=0)
        return {
            "samples": len(self),
            "gpus": list(self.gpus),
            "span_s": span,
            "rate_hz": (per_gpu - 1) / span if span > 0 else 0.0,
            "fields": list(self.present_fields()),
            "source": self.source,
            "synthetic": self.synthetic,
            "power_field": self.power_field,
        }


def _derived(
    values: dict[str, Any], parents: tuple[SampleBatch, ...], index: npt.NDArray[np.intp] | slice
) -> SampleBatch:
    """A batch cut from valid batches (``parents``: rows ``index`` of their concatenation), built without
    :meth:`SampleBatch.__post_init__`'s checks and copies: what it checks holds by construction (sorted
    times, GPU indices in the table, canonical process rows, read-only columns of the right type). Keeps
    the per-sample memo (:meth:`SampleBatch.per_sample`) when every parent has one."""
    out = object.__new__(SampleBatch)
    for name, value in values.items():
        if isinstance(value, np.ndarray) and value.flags.writeable:
            value.setflags(write=False)
        object.__setattr__(out, name, value)
    if all("_memo" in p.__dict__ for p in parents):
        out.__dict__["_memo"] = {}
        out.__dict__["_origin"] = (parents, index)
    return out


def _concat(pieces: Sequence[tuple[SampleBatch, int, int]]) -> SampleBatch:
    """:meth:`SampleBatch.concat` of rows ``lo:hi`` of each batch (each piece keeps its batch's GPU table)."""
    batches = [b for b, _, _ in pieces]
    first = batches[0]
    for b in batches[1:]:
        if b.source != first.source or b.power_field != first.power_field:
            raise InputError(
                "cannot concatenate batches of different source or power field",
                sources=sorted({x.source for x in batches}),
                power_fields=sorted({x.power_field for x in batches}),
            )
    table: dict[str, int] = {}
    for b in batches:
        for uuid in b.gpus:
            table.setdefault(uuid, len(table))
    whole = all(lo == 0 and hi == len(b) for b, lo, hi in pieces)
    t = np.concatenate([b.t_ns[lo:hi] for b, lo, hi in pieces])
    g = np.concatenate(
        [np.array([table[u] for u in b.gpus], dtype=np.int64)[b.gpu[lo:hi]] for b, lo, hi in pieces]
    )
    procs = tuple(row for b, lo, hi in pieces for row in b.processes[lo:hi])
    order: npt.NDArray[np.intp] | None = None
    if t.shape[0] > 1 and not bool((t[1:] >= t[:-1]).all()):  # else what the stable sort would give
        order = np.argsort(t, kind="stable")
        procs = tuple(map(procs.__getitem__, order.tolist()))
    index: npt.NDArray[np.intp] | slice = slice(None) if order is None else order
    values = {
        "t_ns": t[index],
        "gpu": g[index],
        "gpus": tuple(table),
        "processes": procs,
        "source": first.source,
        "synthetic": any(b.synthetic for b in batches),
        "power_field": first.power_field,
        **{
            name: np.concatenate([b.column(name)[lo:hi] for b, lo, hi in pieces])[index]
            for name in FLOAT_FIELDS
        },
    }
    # The rows of the whole batches, one after the other, that the result holds (for the per-sample memo).
    if not whole:
        offsets = np.cumsum([0] + [len(b) for b in batches[:-1]])
        rows = np.concatenate(
            [np.arange(lo, hi) + off for (_, lo, hi), off in zip(pieces, offsets, strict=True)]
        )
        index = rows if order is None else rows[order]
    # The parts are valid batches of one source and power field: so is their merge (not re-checked).
    return _derived(values, tuple(batches), index)
