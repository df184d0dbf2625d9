"""Circuit breaker per provider: closed, open, half-open on an injected clock (pure).

CLOSED -> OPEN when `failure_threshold` failures fall inside the sliding `window_ns` ending at
the latest failure. OPEN -> HALF_OPEN once `recovery_ns` has passed since opening (reported by
the next `state(now)` / `allow(now)`). HALF_OPEN grants at most `half_open_max_probes`
concurrent probes (a probe with no reported outcome after `recovery_ns` is presumed lost, so a
crashed caller cannot wedge the breaker half open); a success closes the breaker (failures
cleared), a failure reopens it and restarts the recovery timer. `reset(now)` closes it by hand.
Every change of state yields a `Transition`, returned by the call that caused it and also
queued for `take_transitions()`.

The state travels as the contract's `CircuitRecord` (`snapshot` / `restore`): the provider
processes and control share one breaker per provider through KV, and `mdp.shared.circuit` is the
shell that loads, applies one call of this module and stores it back.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import msgspec

from mdp.shared.contract.records import CircuitRecord, CircuitState

BreakerState = CircuitState
FailureKind = Literal["connection", "adapter_exception", "pacing", "data_stopped"]
TransitionReason = Literal[
    "failure_threshold", "recovery_elapsed", "probe_succeeded", "probe_failed", "manual_reset"
]

_NS_PER_S = 1_000_000_000


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds of one breaker; every value must be positive."""

    # The defaults of `circuit:` in ingestion_policy.yaml (mdp.shared.config.CircuitConfig).
    failure_threshold: int = 3
    window_s: float = 60
    recovery_s: float = 15
    half_open_max_probes: int = 1

    def __post_init__(self) -> None:
        """Reject non-positive settings with a message naming the field."""
        for name in ("failure_threshold", "window_s", "recovery_s", "half_open_max_probes"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"BreakerConfig.{name} must be positive, got {value!r}")
        for name in ("failure_threshold", "half_open_max_probes"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"BreakerConfig.{name} must be an integer")

    @property
    def window_ns(self) -> int:
        """The failure window in nanoseconds."""
        return int(self.window_s * _NS_PER_S)

    @property
    def recovery_ns(self) -> int:
        """The time spent open before a probe is allowed, in nanoseconds."""
        return int(self.recovery_s * _NS_PER_S)


class Transition(msgspec.Struct, frozen=True):
    """One change of a breaker's state, for `ingest.events.circuit` and the state gauge."""

    provider: str
    from_state: BreakerState
    to_state: BreakerState
    reason: TransitionReason
    at_ns: int


def failure_kind(exc: BaseException) -> FailureKind:
    """How an adapter's exception counts: `connection` for network errors, else an exception."""
    # ConnectionError and TimeoutError are OSErrors; listed for the reader, not for isinstance.
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return "connection"
    return "adapter_exception"


class CircuitBreaker:
    """The closed / open / half-open state machine of one provider (or job)."""

    def __init__(self, provider: str, config: BreakerConfig | None = None) -> None:
        """Start closed, with no failures recorded."""
        self.provider = provider
        self.config = config or BreakerConfig()
        self._state: BreakerState = "closed"
        self._failures: deque[int] = deque()  # failure times inside the window, oldest first
        self._opened_at_ns: int | None = None
        self._probes: list[int] = []  # start times of the half-open probes in flight
        self._pending: list[Transition] = []

    def _move(self, to_state: BreakerState, reason: TransitionReason, now_ns: int) -> Transition:
        transition = Transition(self.provider, self._state, to_state, reason, now_ns)
        self._state = to_state
        self._pending.append(transition)
        return transition

    def _expire(self, now_ns: int) -> None:
        # A failure exactly window_ns old is outside the window: (now - window, now].
        horizon = now_ns - self.config.window_ns
        while self._failures and self._failures[0] <= horizon:
            self._failures.popleft()

    def _advance(self, now_ns: int) -> Transition | None:
        if (
            self._state == "open"
            and self._opened_at_ns is not None
            and now_ns - self._opened_at_ns >= self.config.recovery_ns
        ):
            self._probes = []
            return self._move("half_open", "recovery_elapsed", now_ns)
        return None

    def state(self, now_ns: int) -> BreakerState:
        """The state at `now_ns` (an open breaker whose recovery has elapsed reports half_open)."""
        self._advance(now_ns)
        return self._state

    def allow(self, now_ns: int) -> bool:
        """Whether a call may go ahead now; in half_open each True is one probe taken."""
        self._advance(now_ns)
        if self._state == "closed":
            return True
        if self._state != "half_open":
            return False
        self._probes = [t for t in self._probes if now_ns - t < self.config.recovery_ns]
        if len(self._probes) < self.config.half_open_max_probes:
            self._probes.append(now_ns)
            return True
        return False

    def record_failure(self, kind: FailureKind, now_ns: int) -> Transition | None:
        """Count one failure (every kind weighs alike); return the transition it caused."""
        del kind  # every kind means the provider cannot serve; the shell logs the kind
        self._advance(now_ns)
        if self._state == "half_open":
            self._opened_at_ns = now_ns
            self._probes = []
            return self._move("open", "probe_failed", now_ns)
        if self._state == "open":
            return None  # already open: a straggler failure must not extend recovery
        self._failures.append(now_ns)
        self._expire(now_ns)
        if len(self._failures) >= self.config.failure_threshold:
            self._opened_at_ns = now_ns
            return self._move("open", "failure_threshold", now_ns)
        return None

    def record_success(self, now_ns: int) -> Transition | None:
        """Report a successful call; in half_open that closes the breaker."""
        self._advance(now_ns)
        if self._state == "half_open":
            return self._close("probe_succeeded", now_ns)
        return None

    def reset(self, now_ns: int) -> Transition | None:
        """Close the breaker by hand (control `reset`); None when it already is closed."""
        self._advance(now_ns)
        if self._state == "closed":
            self._failures.clear()
            return None
        return self._close("manual_reset", now_ns)

    def _close(self, reason: TransitionReason, now_ns: int) -> Transition:
        self._failures.clear()
        self._opened_at_ns = None
        self._probes = []
        return self._move("closed", reason, now_ns)

    def next_allowed_ns(self, now_ns: int) -> int:
        """When `allow` may next say True: `now_ns` if it would now, else the earliest time after.

        Open: when it half-opens. Half-open with every probe slot taken: when the oldest probe
        is presumed lost (unless its outcome, reported earlier, closes or reopens it first).
        """
        self._advance(now_ns)
        if self._state == "open" and self._opened_at_ns is not None:
            return self._opened_at_ns + self.config.recovery_ns
        if self._state == "half_open":
            live = [t for t in self._probes if now_ns - t < self.config.recovery_ns]
            if len(live) >= self.config.half_open_max_probes:
                return min(live) + self.config.recovery_ns
        return now_ns

    @property
    def opened_at_ns(self) -> int | None:
        """When it last opened (None while closed)."""
        return self._opened_at_ns

    def failures_in_window(self, now_ns: int) -> int:
        """How many failures fall inside the window ending at `now_ns`."""
        self._expire(now_ns)
        return len(self._failures)

    def take_transitions(self) -> list[Transition]:
        """Every transition since the last call, oldest first (for the shell to publish)."""
        taken, self._pending = self._pending, []
        return taken

    def snapshot(self, updated_ns: int) -> CircuitRecord:
        """The state as the contract's KV record, stamped `updated_ns`."""
        return CircuitRecord(
            provider=self.provider,
            state=self._state,
            failures_ns=list(self._failures),
            opened_at_ns=self._opened_at_ns,
            probes_started_ns=list(self._probes),
            updated_ns=updated_ns,
        )

    @classmethod
    def restore(cls, record: CircuitRecord, config: BreakerConfig | None = None) -> CircuitBreaker:
        """A breaker continuing from `record` (the config comes from the current policy)."""
        breaker = cls(record.provider, config)
        breaker._state = record.state
        breaker._failures = deque(sorted(record.failures_ns))
        breaker._opened_at_ns = record.opened_at_ns
        breaker._probes = list(record.probes_started_ns)
        return breaker


def same_state(a: CircuitRecord, b: CircuitRecord) -> bool:
    """Whether two records hold the same breaker state (`updated_ns` aside)."""
    return (a.provider, a.state, a.failures_ns, a.opened_at_ns, a.probes_started_ns) == (
        b.provider,
        b.state,
        b.failures_ns,
        b.opened_at_ns,
        b.probes_started_ns,
    )
