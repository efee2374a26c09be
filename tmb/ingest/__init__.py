"""The daemon's evidence ingest: what the probes send (telemetry batches, IMA deltas, the event log, quotes,
process bindings) checked, stored and turned into attested windows for the verdict engine.

Modules, from the wire inwards:

- :mod:`~tmb.ingest.wire`: the types shared with the probe (``TelemetryBatch``, ``Head``, the batch digest,
  the quote's qualifying data); the probe imports only this module.
- :mod:`~tmb.ingest.service`: :class:`~tmb.ingest.service.Ingest`, which takes evidence and answers
  :class:`~tmb.ingest.results.IngestResult` (never an HTTP status), runs its checks off the event loop, and
  wakes the verdict engine when a quote attests new batches.
- :mod:`~tmb.ingest.batches`, :mod:`~tmb.ingest.quotes`, :mod:`~tmb.ingest.policy`, :mod:`~tmb.ingest.boot`:
  the chain, quote, runtime-policy and boot-chain checks, built on the pure verifiers of :mod:`tmb.attest`.
- :mod:`~tmb.ingest.state` (the typed ``NodeState``, nonces) and :mod:`~tmb.ingest.store` (SQLite).
- :mod:`~tmb.ingest.results`: ``IngestResult``, ``AttestationSummary``, ``AttestedWindow``.
- :mod:`~tmb.ingest.routes`: the HTTP routes (one finding -> status table, the daemon's error envelope);
  ``python -m tmb.ingest`` serves them alone.

The ingest knows nothing of the daemon that mounts it: the admin token comes from the caller.
Nothing is imported here, so the probe's ``tmb.ingest.wire`` stays light.
"""
