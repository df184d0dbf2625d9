"""The aggregator's pure parts built from its settings, new or from a checkpoint's snapshot."""

from __future__ import annotations

from services.aggregator.bars import BarEngine
from services.aggregator.batcher import BarBatcher
from services.aggregator.gaps import GapDetector
from shared.settings import AggregatorSettings

__all__ = ["new_batcher", "new_engine", "new_gaps"]


def new_engine(cfg: AggregatorSettings, snapshot: bytes | None = None) -> BarEngine:
    """A bar engine, empty or restored from `snapshot`."""
    grace_ns, revise_window_ns = cfg.grace_ms * 1_000_000, int(cfg.revise_window_s * 1e9)
    if snapshot is None:
        return BarEngine(
            cfg.intervals,
            grace_ns=grace_ns,
            revise_window_ns=revise_window_ns,
            price_type=cfg.price_type,
        )
    return BarEngine.restore(
        snapshot,
        intervals=cfg.intervals,
        grace_ns=grace_ns,
        revise_window_ns=revise_window_ns,
        price_type=cfg.price_type,
    )


def new_gaps(cfg: AggregatorSettings, snapshot: bytes = b"") -> GapDetector | None:
    """A gap detector (restored from a non-empty `snapshot`), or None when gaps are off."""
    if not cfg.gap_intervals:
        return None
    interval = cfg.gap_interval or cfg.intervals[0]
    if snapshot:
        return GapDetector.restore(snapshot, interval=interval, missing_intervals=cfg.gap_intervals)
    return GapDetector(interval, cfg.gap_intervals)


def new_batcher(cfg: AggregatorSettings) -> BarBatcher:
    """An empty batcher towards the store, cut by the configured rows, bytes and delay."""
    return BarBatcher(cfg.batch_max_rows, cfg.batch_max_bytes, cfg.batch_max_delay_ms * 1_000_000)
