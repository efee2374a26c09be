"""tmb.events: the event record shared by the ingest, the pipeline and the notifier."""

import pytest

from tmb.events import KINDS, Event, discard


def test_event_round_trips_to_dict() -> None:
    ev = Event("node.stale", "node-1", 5, {"missed": 5})
    assert ev.to_dict() == {"kind": "node.stale", "subject": "node-1", "t_ns": 5, "data": {"missed": 5}}
    assert discard(ev) is None
    assert "verdict.model_mismatch" in KINDS


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        Event("node.sad", "node-1", 0)
