"""Evidence verification, pure and offline: TPM quotes, IMA measurement lists and PCR replay, the runtime
policy and dm-verity rules, UEFI event logs and the boot chain, evidence bundles and their audit.

The stable surface an auditor or integrator imports (everything else in the package is a helper)::

    from tmb.attest import verify_quote, load_ak        # TPM2 quote: signature, nonce, PCR digest, clock
    from tmb.attest import iter_log, replay              # IMA log entries; PCR 10 replay (resumable)
    from tmb.attest import load_policy, PolicyChecker    # runtime policy (TOML or Keylime JSON)
    from tmb.attest import read_eventlog, replay_eventlog, check_pcrs   # UEFI event log vs quoted PCRs
    from tmb.attest import check_boot_aggregate, check_boot              # boot_aggregate, [boot] policy
    from tmb.attest import load_bundle, audit_bundle, render_text        # offline audit of a bundle

Every check reports :class:`~tmb.errors.Finding` s with stable dotted ids into a
:class:`~tmb.errors.Report`; a parse failure raises :class:`~tmb.errors.ParseError`. This package knows
nothing of the daemon: its evidence ingest (:mod:`tmb.ingest`) is built on these verifiers. Names are
imported on first use, so ``import tmb.attest.<module>`` stays as light as that module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tmb.attest.bootagg import boot_aggregate, check_boot_aggregate
    from tmb.attest.bootpolicy import BootPolicy, check_boot
    from tmb.attest.dm import VerityRule, check_verity, dm_events
    from tmb.attest.eventlog import EventLog, Replay, check_pcrs, read_eventlog
    from tmb.attest.eventlog import replay as replay_eventlog
    from tmb.attest.evidence import AuditResult, Bundle, audit_bundle, load_bundle, render_text
    from tmb.attest.ima import ImaEntry, iter_log, parse_fields
    from tmb.attest.pcr import ReplayResult, ReplayState, replay, replay_file
    from tmb.attest.policy import PolicyChecker, RuntimePolicy, load_policy
    from tmb.attest.quote import AkPublic, QuoteResult, load_ak, verify_quote

__all__ = [
    "AkPublic",
    "AuditResult",
    "BootPolicy",
    "Bundle",
    "EventLog",
    "ImaEntry",
    "PolicyChecker",
    "QuoteResult",
    "Replay",
    "ReplayResult",
    "ReplayState",
    "RuntimePolicy",
    "VerityRule",
    "audit_bundle",
    "boot_aggregate",
    "check_boot",
    "check_boot_aggregate",
    "check_pcrs",
    "check_verity",
    "dm_events",
    "iter_log",
    "load_ak",
    "load_bundle",
    "load_policy",
    "parse_fields",
    "read_eventlog",
    "render_text",
    "replay",
    "replay_eventlog",
    "replay_file",
    "verify_quote",
]

_WHERE = {  # public name -> (module, name there)
    "boot_aggregate": ("bootagg", "boot_aggregate"),
    "check_boot_aggregate": ("bootagg", "check_boot_aggregate"),
    "BootPolicy": ("bootpolicy", "BootPolicy"),
    "check_boot": ("bootpolicy", "check_boot"),
    "VerityRule": ("dm", "VerityRule"),
    "check_verity": ("dm", "check_verity"),
    "dm_events": ("dm", "dm_events"),
    "EventLog": ("eventlog", "EventLog"),
    "Replay": ("eventlog", "Replay"),
    "check_pcrs": ("eventlog", "check_pcrs"),
    "read_eventlog": ("eventlog", "read_eventlog"),
    "replay_eventlog": ("eventlog", "replay"),
    "AuditResult": ("evidence", "AuditResult"),
    "Bundle": ("evidence", "Bundle"),
    "audit_bundle": ("evidence", "audit_bundle"),
    "load_bundle": ("evidence", "load_bundle"),
    "render_text": ("evidence", "render_text"),
    "ImaEntry": ("ima", "ImaEntry"),
    "iter_log": ("ima", "iter_log"),
    "parse_fields": ("ima", "parse_fields"),
    "ReplayResult": ("pcr", "ReplayResult"),
    "ReplayState": ("pcr", "ReplayState"),
    "replay": ("pcr", "replay"),
    "replay_file": ("pcr", "replay_file"),
    "PolicyChecker": ("policy", "PolicyChecker"),
    "RuntimePolicy": ("policy", "RuntimePolicy"),
    "load_policy": ("policy", "load_policy"),
    "AkPublic": ("quote", "AkPublic"),
    "QuoteResult": ("quote", "QuoteResult"),
    "load_ak": ("quote", "load_ak"),
    "verify_quote": ("quote", "verify_quote"),
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'tmb.attest' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tmb.attest.{where[0]}"), where[1])
    globals()[name] = value
    return value
