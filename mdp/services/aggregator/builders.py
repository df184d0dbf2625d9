"""The aggregator's pure parts built from the policy and settings, new or from a snapshot."""

from __future__ import annotations

from mdp.services.aggregator.bars import BarEngine
from mdp.services.aggregator.batcher import BarBatcher
from mdp.services.aggregator.gaps import GapDetector
from mdp.shared.config import BarsConfig, BatchingConfig
from mdp.shared.contract.messages import interval_ns
from mdp.shared.settings import AggregatorSettings

__all__ = ["new_batcher", "new_engine", "new_gaps"]


def new_engine(bars: BarsConfig, snapshot: bytes | None = None) -> BarEngine:
    """A bar engine for the policy's `bars`, empty or restored from `snapshot`.

    From a snapshot, a changed grace or revise window applies from now on, an added interval
    starts empty (its first bar begins at the next tick), a removed one is dropped, and a
    changed price type raises ValueError (it would mix prices in open bars).
    """
    grace_ns, revise_window_ns = bars.grace_ms * 1_000_000, int(bars.revise_window_seconds * 1e9)
    max_jump_ns = int(bars.max_jump_seconds * 1e9)
    if snapshot is None:
        return BarEngine(
            bars.intervals,
            grace_ns=grace_ns,
            revise_window_ns=revise_window_ns,
            price_type=bars.price_type,
            max_jump_ns=max_jump_ns,
        )
    return BarEngine.restore(
        snapshot,
        intervals=bars.intervals,
        grace_ns=grace_ns,
        revise_window_ns=revise_window_ns,
        price_type=bars.price_type,
        max_jump_ns=max_jump_ns,
    )


def new_gaps(
    cfg: AggregatorSettings, bars: BarsConfig, snapshot: bytes = b""
) -> GapDetector | None:
    """A gap detector (restored from a non-empty `snapshot`), or None when gaps are off."""
    if not cfg.gap_intervals:
        return None
    interval = cfg.gap_interval or min(bars.intervals, key=interval_ns)
    if snapshot:
        return GapDetector.restore(snapshot, interval=interval, missing_intervals=cfg.gap_intervals)
    return GapDetector(interval, cfg.gap_intervals)


def new_batcher(batching: BatchingConfig) -> BarBatcher:
    """An empty batcher towards the store, cut by the policy's rows, bytes and delay."""
    return BarBatcher(batching.max_rows, batching.max_bytes, batching.max_delay_ms * 1_000_000)
