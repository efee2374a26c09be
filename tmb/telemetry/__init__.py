"""GPU telemetry: samples and their canonical encoding, features, and the NVML, synthetic and replay sources.

Stable surface (formats in docs/telemetry.md):

* records: :class:`Sample`, :class:`SampleBatch` (``encode``/``decode``), :data:`FLOAT_FIELDS`;
* features: :data:`FEATURES`, :func:`features`, :func:`extract`, :func:`energy_per_token_j`;
* synthetic: :data:`MODELS`, :data:`REGIMES`, :class:`WorkloadModel`, :func:`generate`, :func:`simulate`,
  :class:`SyntheticSource`;
* sources: :class:`TelemetrySource`, :func:`open_source`, :class:`ReplaySource`
  (``tmb.telemetry.nvml.NvmlSource`` is imported on demand: it needs ``pynvml``);
* traces: :class:`Trace`, :func:`write_trace`, :func:`read_trace`, :func:`record`, :func:`record_async`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmb.lazy import lazy_names

# These two share their name with their submodule: importing the submodule (as any sibling may) would make
# the package attribute the module, so they are bound here, not on first use.
from tmb.telemetry.features import features
from tmb.telemetry.record import record

if TYPE_CHECKING:
    from tmb.telemetry.features import FEATURES, FeatureSet, energy_per_token_j, extract, features
    from tmb.telemetry.record import record, record_async
    from tmb.telemetry.replay import ReplaySource, Trace, read_trace, write_trace
    from tmb.telemetry.sample import FLOAT_FIELDS, Sample, SampleBatch
    from tmb.telemetry.source import TelemetrySource, open_source
    from tmb.telemetry.synthetic import MODELS, REGIMES, SyntheticSource, WorkloadModel, generate, simulate

_WHERE = {
    "FEATURES": "tmb.telemetry.features",
    "FeatureSet": "tmb.telemetry.features",
    "energy_per_token_j": "tmb.telemetry.features",
    "extract": "tmb.telemetry.features",
    "record_async": "tmb.telemetry.record",
    "ReplaySource": "tmb.telemetry.replay",
    "Trace": "tmb.telemetry.replay",
    "read_trace": "tmb.telemetry.replay",
    "write_trace": "tmb.telemetry.replay",
    "FLOAT_FIELDS": "tmb.telemetry.sample",
    "Sample": "tmb.telemetry.sample",
    "SampleBatch": "tmb.telemetry.sample",
    "TelemetrySource": "tmb.telemetry.source",
    "open_source": "tmb.telemetry.source",
    "MODELS": "tmb.telemetry.synthetic",
    "REGIMES": "tmb.telemetry.synthetic",
    "SyntheticSource": "tmb.telemetry.synthetic",
    "WorkloadModel": "tmb.telemetry.synthetic",
    "generate": "tmb.telemetry.synthetic",
    "simulate": "tmb.telemetry.synthetic",
}

__all__ = [
    "FEATURES",
    "FLOAT_FIELDS",
    "MODELS",
    "REGIMES",
    "FeatureSet",
    "ReplaySource",
    "Sample",
    "SampleBatch",
    "SyntheticSource",
    "TelemetrySource",
    "Trace",
    "WorkloadModel",
    "energy_per_token_j",
    "extract",
    "features",
    "generate",
    "open_source",
    "read_trace",
    "record",
    "record_async",
    "simulate",
    "write_trace",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
