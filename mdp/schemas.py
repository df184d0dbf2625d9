"""The messages on mdp's public subjects, as typed msgspec structs: what other services decode.

    from mdp.schemas import Bar, BarBatch, decode_event
    batch = msgspec.json.decode(msg.data, type=BarBatch)

These are the structs the services themselves use (`mdp.shared.contract`), re-exported as the
stable public names; `docs/DESIGN.md` and `docs/asyncapi.yaml` describe the same contract.
"""

from __future__ import annotations

from mdp.shared.contract.events import (
    Circuit,
    Completed,
    Event,
    Failed,
    Failover,
    Gap,
    Refused,
    Reloaded,
    Started,
    Stopped,
    Suppressed,
    UnknownEvent,
    decode_event,
    encode_event,
    event_name,
    event_subject,
)
from mdp.shared.contract.messages import (
    BadRow,
    Bar,
    BarBatch,
    DeadTick,
    EndOfStream,
    Tick,
    TickBatch,
    interval_ns,
)

__all__ = [
    "BadRow",
    "Bar",
    "BarBatch",
    "Circuit",
    "Completed",
    "DeadTick",
    "EndOfStream",
    "Event",
    "Failed",
    "Failover",
    "Gap",
    "Refused",
    "Reloaded",
    "Started",
    "Stopped",
    "Suppressed",
    "Tick",
    "TickBatch",
    "UnknownEvent",
    "decode_event",
    "encode_event",
    "event_name",
    "event_subject",
    "interval_ns",
]
