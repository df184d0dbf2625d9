"""Where the aggregator's results go: one list of outgoing messages per step (pure, no I/O).

`OutputRouter` turns what the bar engine emitted, gap events and end-of-stream markers into
`Outgoing` messages, in the order they must be published: each bar on `md.bars.<interval>.<sym>`
followed by any store batch it completed, then the dead letters of its invalid and late ticks.
It owns the batchers towards the store: the one for bars the store should get, and one per
suppression reason (dry run, write path disabled) for bars kept from it, which still count and
are announced as `suppressed` events. The shell publishes the lists and awaits their PubAcks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from mdp.services.aggregator.bars import Emitted
from mdp.services.aggregator.batcher import BarBatcher
from mdp.services.aggregator.builders import new_batcher
from mdp.shared.config import EffectivePolicy
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON, encode
from mdp.shared.contract.events import Event, Gap, Suppressed, encode_event, event_subject
from mdp.shared.contract.messages import Bar, BarBatch, DeadTick, EndOfStream

__all__ = [
    "BARS_EMITTED",
    "BATCHES_SENT",
    "LATE_TICKS",
    "LATE_TICKS_BY_SYMBOL",
    "SUPPRESSED",
    "TICK_TO_BAR",
    "Outgoing",
    "OutputRouter",
]

BARS_EMITTED = Counter(
    "mdp_aggregator_bars_emitted_total", "Bars published (revisions included)", ["interval"]
)
BATCHES_SENT = Counter(
    "mdp_aggregator_batches_sent_total", "Bar batches sent towards the store", ["mode"]
)
SUPPRESSED = Counter(
    "mdp_aggregator_writes_suppressed_total", "Bar batches kept from the store", ["reason"]
)
LATE_TICKS = Counter(
    "mdp_aggregator_late_ticks_total", "Ticks beyond the revise window, dead-lettered", ["interval"]
)
# Opt-in (MDP_AGGREGATOR__LATE_TICKS_BY_SYMBOL): one series per symbol is unbounded.
LATE_TICKS_BY_SYMBOL = Counter(
    "mdp_aggregator_late_ticks_by_symbol_total",
    "Ticks beyond the revise window, by symbol (only with late_ticks_by_symbol)",
    ["symbol"],
)
TICK_TO_BAR = Histogram(
    "mdp_aggregator_tick_to_bar_seconds",
    "Wall time a bar is first published minus its end (not revisions, replays, backfills)",
    ["interval"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
LATENCY_MAX_S = 3600.0
_TICK_TO_BAR_BY: dict[str, Histogram] = {}  # the labelled children, by interval


def _observe_latency(bar: Bar) -> None:
    """Tick-to-bar latency of a bar's first publication (a revision is late by design). A bar
    that ends more than `LATENCY_MAX_S` before now is a replay or a backfill, not latency."""
    if bar.rev:
        return
    seconds = (time.time_ns() - bar.end) / 1e9
    if seconds < LATENCY_MAX_S:
        child = _TICK_TO_BAR_BY.get(bar.interval)
        if child is None:
            child = _TICK_TO_BAR_BY[bar.interval] = TICK_TO_BAR.labels(bar.interval)
        child.observe(max(0.0, seconds))


def _count_late(interval: str, symbol: str, by_symbol: bool) -> None:
    """Count one late tick by interval, and by symbol when that was asked for."""
    LATE_TICKS.labels(interval).inc()
    if by_symbol:
        LATE_TICKS_BY_SYMBOL.labels(symbol).inc()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: subject, encoded body, headers."""

    subject: str
    data: bytes
    headers: dict[str, str]


def event_message(event: Event, msg_id: str | None = None) -> Outgoing:
    """An `ingest.events.*` event as `publish_event` sends it (JSON, optional `Nats-Msg-Id`)."""
    headers = {names.CONTENT_TYPE: JSON}
    if msg_id is not None:
        headers[names.MSG_ID] = msg_id
    return Outgoing(event_subject(event), encode_event(event), headers)


class OutputRouter:
    """Routes bars, dead ticks, gaps and end-of-stream markers to their subjects, with batching."""

    def __init__(
        self,
        policy: EffectivePolicy,
        content_type: str,
        producer: str,
        service: str,
        late_by_symbol: bool = False,
    ) -> None:
        self.policy = policy  # replaced by the shell whenever control publishes a new one
        self.dry_run: set[str] = set()  # symbols whose latest tick batch was marked dry-run
        self._content_type = content_type
        self._producer = producer
        self._service = service
        self._batcher = new_batcher(policy.batching)
        self._suppressed: dict[str, BarBatcher] = {}
        self._notices: list[Suppressed] = []
        self._late_by_symbol = late_by_symbol

    def apply(self, policy: EffectivePolicy) -> None:
        """Follow a new policy; changed batching limits apply to the batches being filled too."""
        batching = policy.batching
        if batching != self.policy.batching:
            for batcher in (self._batcher, *self._suppressed.values()):
                batcher.retune(
                    batching.max_rows, batching.max_bytes, batching.max_delay_ms * 1_000_000
                )
        self.policy = policy

    def mark_dry_run(self, symbol: str, dry_run: bool) -> None:
        """Record whether the latest tick batch of `symbol` was marked dry-run."""
        if dry_run:
            self.dry_run.add(symbol)
        else:
            self.dry_run.discard(symbol)

    # -- state for checkpoints ---------------------------------------------------------------

    def reset(self) -> None:
        """Empty every batcher (before a restore); the policy, dry-run marks and notices stay."""
        self._batcher = new_batcher(self.policy.batching)
        self._suppressed = {}

    @property
    def pending_rows(self) -> int:
        """Bars waiting in the batch towards the store."""
        return self._batcher.pending_rows

    @property
    def pending(self) -> list[Bar]:
        """A copy of the bars waiting in the batch towards the store."""
        return self._batcher.pending

    @property
    def suppressed_pending(self) -> dict[str, list[Bar]]:
        """The bars waiting in each non-empty suppressed batch, by reason."""
        return {reason: b.pending for reason, b in self._suppressed.items() if b.pending}

    def restore(
        self, pending: list[Bar], suppressed: dict[str, list[Bar]], now_ns: int
    ) -> list[Outgoing]:
        """Put checkpointed bars back into their batchers; return the batches that filled up."""
        out: list[Outgoing] = []
        # Sized as JSON whatever the content type, as they always were on restore.
        for bar in pending:
            out += self._to_store(self._batcher.add(bar, len(encode(bar)), now_ns))
        for reason, bars in suppressed.items():
            batcher = self._suppressed_batcher(reason)
            for bar in bars:
                self._count_suppressed(reason, batcher.add(bar, len(encode(bar)), now_ns))
        return out

    # -- routing -----------------------------------------------------------------------------

    def route(self, emitted: Emitted, now_ns: int) -> list[Outgoing]:
        """Bars (and the store batches they complete), then dead letters of invalid, late ticks."""
        out: list[Outgoing] = []
        to_store = self.policy.store_sync.mode in names.STORE_SYNC
        for bar in emitted.bars:
            body = encode(bar, self._content_type)
            headers = {
                names.CONTENT_TYPE: self._content_type,
                names.MSG_ID: bar.bar_id,
                names.PRODUCER: self._producer,
            }
            out.append(Outgoing(names.bars(bar.interval, bar.symbol), body, headers))
            BARS_EMITTED.labels(bar.interval).inc()
            _observe_latency(bar)
            if not to_store:
                continue
            reason = self._suppression(bar.symbol)
            if reason is None:
                out += self._to_store(self._batcher.add(bar, len(body), now_ns))
            else:
                batcher = self._suppressed_batcher(reason)
                self._count_suppressed(reason, batcher.add(bar, len(body), now_ns))
        for invalid in emitted.invalid:
            msg_id = names.invalid_tick_id(invalid.symbol, invalid.tick.seq)
            out.append(
                self._dead_tick(DeadTick(invalid.symbol, invalid.tick), msg_id, invalid.reason)
            )
        for late in emitted.late:
            _count_late(late.interval, late.symbol, self._late_by_symbol)
            msg_id = names.late_tick_id(late.interval, late.symbol, late.tick.seq, late.tick.ts)
            dead = DeadTick(late.symbol, late.tick, late.interval)
            out.append(self._dead_tick(dead, msg_id, late.reason))
        return out

    def gap_events(self, events: Iterable[Gap]) -> list[Outgoing]:
        """Gap events, each with its deterministic id (one per gap and state)."""
        return [event_message(event, event.event_id) for event in events]

    def is_due(self, now_ns: int) -> bool:
        """Whether any batch (towards the store or suppressed) has waited long enough."""
        batchers = [self._batcher, *self._suppressed.values()]
        return any(
            (deadline := b.next_deadline_ns) is not None and deadline <= now_ns for b in batchers
        )

    def due(self, now_ns: int) -> list[Outgoing]:
        """The batch towards the store, if it has waited long enough."""
        return self._to_store(self._batcher.due(now_ns))

    def due_suppressed(self, now_ns: int) -> None:
        """Cut the suppressed batches that have waited long enough (counted, to be announced)."""
        for reason, batcher in self._suppressed.items():
            self._count_suppressed(reason, batcher.due(now_ns))

    def flush(self) -> list[Outgoing]:
        """Whatever waits towards the store, as one batch."""
        return self._to_store(self._batcher.flush())

    def end_of_stream(self, symbol: str, marker: EndOfStream, header: str) -> list[Outgoing]:
        """A finished bounded stream: flush every batch, then the marker or `completed`."""
        out = self.flush()
        for reason, batcher in self._suppressed.items():
            self._count_suppressed(reason, batcher.flush())
        subject = names.STORE_SYNC.get(self.policy.store_sync.mode)
        if subject is None or symbol in self.dry_run or not self.policy.write_path.enabled:
            # No store will see the marker: announce completion here.
            out.append(event_message(marker, names.completed_id(marker.run, marker.symbol)))
            return out
        # An empty batch carries the marker: the store reports completion once it reaches it.
        headers = {
            names.CONTENT_TYPE: JSON,
            names.MSG_ID: names.end_of_stream_id(marker.run, symbol),
            names.END_OF_STREAM: header,
        }
        body = encode(BarBatch(f"eos:{marker.run}:{symbol}", []))
        out.append(Outgoing(subject, body, headers))
        return out

    def notices(self) -> list[Outgoing]:
        """The `suppressed` events of batches cut since the last call (taken: each once)."""
        notices, self._notices = self._notices, []
        return [event_message(notice) for notice in notices]

    # -- internals ---------------------------------------------------------------------------

    def _suppression(self, symbol: str) -> str | None:
        if not self.policy.write_path.enabled:
            return "write_path_disabled"
        if symbol in self.dry_run:
            return "dry_run"
        return None

    def _suppressed_batcher(self, reason: str) -> BarBatcher:
        batcher = self._suppressed.get(reason)
        if batcher is None:
            batcher = self._suppressed[reason] = new_batcher(self.policy.batching)
        return batcher

    def _count_suppressed(self, reason: str, batches: list[BarBatch]) -> None:
        for batch in batches:
            SUPPRESSED.labels(reason).inc()
            # Announced with the next checkpoint; control counts them in
            # ingest_writes_suppressed_total.
            self._notices.append(Suppressed(reason, len(batch.bars)))

    def _to_store(self, batches: list[BarBatch]) -> list[Outgoing]:
        mode = self.policy.store_sync.mode
        subject = names.STORE_SYNC.get(mode)
        if subject is None:
            return []  # no store path: the batches are dropped (the bars went to md.bars)
        out: list[Outgoing] = []
        for batch in batches:
            body = encode(batch, self._content_type)
            headers = {
                names.CONTENT_TYPE: self._content_type,
                names.MSG_ID: names.bar_batch_id(batch.batch_id),
            }
            out.append(Outgoing(subject, body, headers))
            BATCHES_SENT.labels(mode).inc()
        return out

    def _dead_tick(self, body: DeadTick, msg_id: str, reason: str) -> Outgoing:
        headers = {
            names.CONTENT_TYPE: JSON,
            names.MSG_ID: msg_id,
            names.DLQ_REASON: reason,
            names.DLQ_SERVICE: self._service,
        }
        return Outgoing(names.dlq(self._service), encode(body), headers)
