"""The retry backoff of failed live jobs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdp.services.provider.retry import Backoff


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, cap_s=4, factor=2, jitter=0)
    assert [backoff.delay_s(n, 0.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]


@given(st.integers(1, 10_000), st.floats(0, 1, exclude_max=True))
def test_a_delay_is_within_the_jitter_band_and_never_above_the_cap(
    attempt: int, draw: float
) -> None:
    backoff = Backoff()
    delay = backoff.delay_s(attempt, draw)
    base = min(backoff.cap_s, backoff.initial_s * backoff.factor ** min(attempt - 1, 64))
    assert base * (1 - backoff.jitter) <= delay <= base <= backoff.cap_s


def test_a_healthy_run_starts_the_count_over() -> None:
    backoff = Backoff(healthy_after_s=60)
    assert backoff.next_attempt(5, ran_s=61) == 1
    assert backoff.next_attempt(5, ran_s=3) == 6


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s=0)
    with pytest.raises(ValueError):
        Backoff().delay_s(0, 0.5)
