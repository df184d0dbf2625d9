"""When a failed live job tries again: capped exponential backoff with jitter (pure)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt `n` (1 = the first retry): `initial * factor**(n-1)`, capped, jittered.

    Jitter spreads the retries of many jobs that failed together (a gateway restart) instead of
    sending them all at once: the delay is drawn from `[d * (1 - jitter), d]`.
    """

    initial_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    # A run that lasted this long before failing was healthy: its next retry starts over.
    healthy_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.cap_s and self.factor >= 1 and 0 <= self.jitter < 1):
            raise ValueError(f"invalid backoff {self}")

    def delay_s(self, attempt: int, draw: float) -> float:
        """The wait before retry `attempt` (>= 1), `draw` uniform in [0, 1)."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        exponent = min(attempt - 1, 64)  # no float overflow for a job failing for days
        base = min(self.cap_s, self.initial_s * self.factor**exponent)
        return base * (1 - self.jitter * draw)

    def next_attempt(self, attempt: int, ran_s: float) -> int:
        """The attempt number after a failure of a run that lasted `ran_s` seconds."""
        return 1 if ran_s >= self.healthy_after_s else attempt + 1
