"""The breakers' shell: a provider's `CircuitRecord` in KV, changed by one call of the pure core.

Every change loads `circuit.<provider>` from `ingest_state`, restores `mdp.shared.breaker`'s
`CircuitBreaker`, applies one call (`record_failure`, `record_success`, `allow`, `reset`) at the
clock's now and stores the result with compare-and-swap: `create` when the key is absent,
`update` at the revision read otherwise, and on a concurrent write (`KeyWrongLastSequenceError`)
all over again from a fresh read. So two processes counting failures at once never lose one,
and one probe slot is never granted twice. A call that changes nothing writes nothing. Each
transition is then published on `ingest.events.circuit`, its `Nats-Msg-Id` named after the
revision that stored it (a resend is de-duplicated).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from structlog.typing import FilteringBoundLogger

from mdp.shared.breaker import (
    BreakerConfig,
    CircuitBreaker,
    FailureKind,
    Transition,
    same_state,
)
from mdp.shared.bus.publisher import JsPublisher, publish_event
from mdp.shared.contract import names
from mdp.shared.contract.events import Circuit
from mdp.shared.contract.records import CircuitRecord, CircuitState

T = TypeVar("T")
Op = Callable[[CircuitBreaker, int], T]
"""One call of the pure breaker at a time in ns (e.g. `lambda b, now: b.allow(now)`)."""

MAX_ATTEMPTS = 50  # compare-and-swap rounds before giving up (each loses only to a real write)


class CircuitConflict(RuntimeError):
    """The record kept changing under us for `MAX_ATTEMPTS` rounds."""


@dataclass(frozen=True)
class CircuitView:
    """A breaker as of one instant: what `status` and the state gauge show."""

    provider: str
    state: CircuitState
    failures: int  # in the window ending now
    opened_at_ns: int | None
    next_allowed_ns: int  # when `allow` may next say yes (now when it would now)


def view(
    provider: str, record: CircuitRecord | None, config: BreakerConfig, now_ns: int
) -> CircuitView:
    """The breaker of `record` read at `now_ns` (an open one past its recovery is half_open)."""
    breaker = (
        CircuitBreaker(provider, config)
        if record is None
        else CircuitBreaker.restore(record, config)
    )
    state = breaker.state(now_ns)
    return CircuitView(
        provider,
        state,
        breaker.failures_in_window(now_ns),
        breaker.opened_at_ns,
        breaker.next_allowed_ns(now_ns),
    )


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one applied call returned, the record as it now stands, and what changed."""

    result: T
    record: CircuitRecord
    view: CircuitView
    transitions: list[Transition] = field(default_factory=list)
    revision: int = 0  # the record's KV revision (0: never stored)


class Circuits:
    """The breakers of every provider, kept in `ingest_state` under `circuit.<provider>`."""

    def __init__(
        self,
        kv: KeyValue,
        publisher: JsPublisher,
        config: BreakerConfig,
        log: FilteringBoundLogger,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """`config` may be replaced at any time (a new policy): it applies from the next call."""
        self.kv = kv
        self.publisher = publisher
        self.config = config
        self.log = log
        self.clock = clock

    async def load(self, provider: str) -> tuple[CircuitRecord | None, int]:
        """The stored record and its revision; `(None, 0)` when there is none."""
        try:
            entry = await self.kv.get(names.circuit_key(provider))
        except KeyNotFoundError:
            return None, 0
        revision = int(entry.revision or 0)
        if not entry.value:
            return None, revision
        try:
            return msgspec.json.decode(entry.value, type=CircuitRecord), revision
        except msgspec.DecodeError as exc:
            # Overwritten by the next change: one bad write must not wedge a provider's breaker.
            self.log.error("bad_circuit_record", provider=provider, error=str(exc))
            return None, revision

    async def read(self, provider: str) -> CircuitView:
        """The breaker as of now, without writing (an elapsed recovery reads half_open)."""
        record, _ = await self.load(provider)
        return view(provider, record, self.config, self.clock())

    async def apply(self, provider: str, op: Op[T]) -> Outcome[T]:
        """Apply `op` to the stored breaker and store the result with compare-and-swap."""
        key = names.circuit_key(provider)
        for _ in range(MAX_ATTEMPTS):
            record, revision = await self.load(provider)
            config = self.config
            breaker = (
                CircuitBreaker(provider, config)
                if record is None
                else CircuitBreaker.restore(record, config)
            )
            now = self.clock()
            result = op(breaker, now)
            transitions = breaker.take_transitions()
            after = breaker.snapshot(now)
            if record is not None and same_state(record, after):
                return Outcome(result, record, view(provider, record, config, now), [], revision)
            if (
                record is None
                and not transitions
                and after.state == "closed"
                and not (after.failures_ns)
            ):
                # Nothing recorded and nothing to record: keep the bucket free of empty records.
                return Outcome(result, after, view(provider, None, config, now), [], revision)
            data = msgspec.json.encode(after)
            try:
                if revision:
                    stored = await self.kv.update(key, data, last=revision)
                else:
                    stored = await self.kv.create(key, data)
            except KeyWrongLastSequenceError:
                continue  # another writer came first: apply to what it stored
            for index, transition in enumerate(transitions):
                await self._announce(transition, names.circuit_event_id(provider, stored, index))
            return Outcome(result, after, view(provider, after, config, now), transitions, stored)
        raise CircuitConflict(f"{key}: still changing after {MAX_ATTEMPTS} compare-and-swap rounds")

    async def record_failure(self, provider: str, kind: FailureKind) -> Outcome[Transition | None]:
        """Count one failure of `provider`."""
        return await self.apply(provider, lambda b, now: b.record_failure(kind, now))

    async def record_success(self, provider: str) -> Outcome[Transition | None]:
        """Report that `provider` served (closes a half-open breaker)."""
        return await self.apply(provider, lambda b, now: b.record_success(now))

    async def allow(self, provider: str) -> Outcome[bool]:
        """Whether a call to `provider` may go ahead now (a half-open yes is the one probe)."""
        return await self.apply(provider, lambda b, now: b.allow(now))

    async def reset(self, provider: str) -> Outcome[Transition | None]:
        """Close the breaker by hand."""
        return await self.apply(provider, lambda b, now: b.reset(now))

    async def _announce(self, transition: Transition, msg_id: str) -> None:
        event = Circuit(
            transition.at_ns,
            transition.provider,
            transition.from_state,
            transition.to_state,
            transition.reason,
        )
        report = self.log.warning if transition.to_state == "open" else self.log.info
        report(
            "circuit",
            provider=transition.provider,
            from_state=transition.from_state,
            to_state=transition.to_state,
            reason=transition.reason,
        )
        await publish_event(self.publisher, event, msg_id)
