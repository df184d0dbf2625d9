"""Events on `ingest.events.<name>` (stream MD_EVENTS): one struct each, one decoder for all.

The event's name is its subject's last token, so payloads carry no tag of their own:
`decode_event(subject, data)` picks the type by subject, and readers dispatch with `match`.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from mdp.shared.contract import names
from mdp.shared.contract.messages import EndOfStream
from mdp.shared.contract.records import CircuitState


class Started(Struct):
    """Control started a job."""

    ts: int
    job: str
    run: str
    provider: str
    symbols: list[str]
    dry_run: bool
    deadline_ns: int


class Stopped(Struct, omit_defaults=True):
    """A job stopped: by request or deadline (control), or its source ended (`completed`)."""

    ts: int
    job: str
    run: str
    provider: str
    reason: str
    ticks: int | None = None
    # A bounded source that rejected rows (each dead-lettered on md.dlq.provider with its
    # reason): how many, and the first line numbers.
    rejected_rows: int | None = None
    rejected_lines: list[int] | None = None


class Failed(Struct, omit_defaults=True):
    """A job failed (provider), or a control request failed (`stage`: the verb)."""

    ts: int
    error: str
    job: str | None = None
    run: str | None = None
    provider: str | None = None
    stage: str | None = None
    code: str | None = None  # a stable code when there is one (e.g. `no_adapter_host`)


class Reloaded(Struct):
    """Control re-read its configuration."""

    ts: int
    revision: int
    providers: list[str]
    config: dict[str, str]


FailoverReason = Literal["first_source", "stale", "provider_down", "failback"]


class Failover(Struct, frozen=True):
    """The router switched a symbol's source (`from` is None for its first source).

    `reason`: `first_source`, `stale` (silent for the detection time), `provider_down` (its
    breaker opened or its job failed or is retrying), `failback` (the preferred source has been
    healthy for the hysteresis period).
    """

    ts: int
    symbol: str
    from_provider: str | None = msgspec.field(name="from")
    to_provider: str = msgspec.field(name="to")
    reason: FailoverReason = "first_source"


class Circuit(Struct, frozen=True):
    """A provider's circuit breaker changed state.

    `reason`: `failure_threshold`, `recovery_elapsed`, `probe_succeeded`, `probe_failed`,
    `manual_reset`.
    """

    ts: int
    provider: str
    from_state: CircuitState
    to_state: CircuitState
    reason: str


GapState = Literal["opened", "closed"]


class Gap(Struct, frozen=True, omit_defaults=True):
    """A gap in a symbol's feed: `opened` when detected, `closed` when ticks return.

    `since_ns` is when the symbol was last heard of (its last tick, or the subscription),
    `until_ns` when ticks came back (closed only), `duration_ns = until_ns - since_ns` (closed
    only); `missing_intervals` counts the whole `interval`s without a tick in between, and
    `at_ns` is when the event was produced. `reason` says why a gap closed: `ticks` or
    `unsubscribed`.
    """

    symbol: str
    state: GapState
    interval: str
    since_ns: int
    missing_intervals: int
    at_ns: int
    until_ns: int | None = None
    duration_ns: int | None = None
    reason: str | None = None

    @property
    def event_id(self) -> str:
        """A deterministic `Nats-Msg-Id`: one per gap and state, whoever detects it."""
        return names.gap_id(self.symbol, self.since_ns, self.state)


class Refused(Struct, frozen=True, omit_defaults=True):
    """A live source refused one symbol of a job; the job's other symbols go on.

    `code` is the source's own (Interactive Brokers: 200 no security definition, 354 not
    subscribed, 101 too many tickers, ...; 0 for a symbol that does not parse).
    """

    ts: int
    job: str
    run: str
    provider: str
    symbol: str
    code: int
    reason: str

    @property
    def event_id(self) -> str:
        """A deterministic `Nats-Msg-Id`: one per run, symbol and code."""
        return names.refused_id(self.run, self.symbol, self.code)


class Suppressed(Struct):
    """The aggregator kept a batch of `bars` bars from the store (dry run, disabled path)."""

    reason: str
    bars: int


# `completed`: every bar of a symbol's bounded run is stored; the body is its EndOfStream.
Completed = EndOfStream

Event = (
    Started
    | Stopped
    | Failed
    | Reloaded
    | Failover
    | Circuit
    | Gap
    | Suppressed
    | Completed
    | Refused
)

EVENT_NAMES: dict[type[Event], str] = {
    Started: "started",
    Stopped: "stopped",
    Failed: "failed",
    Reloaded: "reloaded",
    Failover: "failover",
    Circuit: "circuit",
    Gap: "gap",
    Suppressed: "suppressed",
    Completed: "completed",
    Refused: "refused",
}
_DECODERS = {name: msgspec.json.Decoder(typ) for typ, name in EVENT_NAMES.items()}
_encoder = msgspec.json.Encoder()


class UnknownEvent(ValueError):
    """An event subject this contract does not define."""


def event_name(event: Event) -> str:
    """The `<name>` of `ingest.events.<name>` for an event."""
    return EVENT_NAMES[type(event)]


def event_subject(event: Event) -> str:
    """The subject an event is published on."""
    return names.event(event_name(event))


def encode_event(event: Event) -> bytes:
    """An event's payload (JSON, as every event is)."""
    return _encoder.encode(event)


def decode_event(subject: str, data: bytes) -> Event:
    """Decode an event by its subject (or bare name); msgspec errors for a bad payload."""
    name = subject.rsplit(".", 1)[-1]
    decoder = _DECODERS.get(name)
    if decoder is None:
        raise UnknownEvent(f"no event {name!r} in the contract (subject {subject!r})")
    event: Event = decoder.decode(data)
    return event
