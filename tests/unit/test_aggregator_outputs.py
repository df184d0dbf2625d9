"""The aggregator's output router: subjects, ids, headers and batching of everything it emits."""

from __future__ import annotations

import msgspec

from mdp.services.aggregator.bars import Emitted, InvalidTick, LateTick
from mdp.services.aggregator.outputs import Outgoing, OutputRouter
from mdp.shared.config import BatchingConfig, EffectivePolicy, StoreSyncConfig, WritePathConfig
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON, MSGPACK
from mdp.shared.contract.events import Gap, Suppressed
from mdp.shared.contract.messages import Bar, BarBatch, DeadTick, EndOfStream, Tick

MS = 1_000_000
NOW = 1_000_000 * MS
PRODUCER = "host-1-abc123"


def bar(i: int, symbol: str = "AAPL", interval: str = "1s", rev: int = 0) -> Bar:
    start = 1_700_000_000_000_000_000 + i * 1_000_000_000
    return Bar(
        symbol, interval, start, start + 1_000_000_000, 1.0, 2.0, 0.5, 1.5, 10.0, 3, 1.2, "t", rev
    )


def tick(seq: int, ts: int = 1_700_000_000_000_000_000) -> Tick:
    return Tick(ts=ts, recv=ts, seq=seq, price=1.0, size=1.0)


def router(
    mode: str = "bus",
    enabled: bool = True,
    content_type: str = JSON,
    max_rows: int = 2,
) -> OutputRouter:
    policy = EffectivePolicy(
        write_path=WritePathConfig(enabled=enabled),
        store_sync=StoreSyncConfig(mode=mode),
        batching=BatchingConfig(max_rows=max_rows, max_bytes=1_000_000, max_delay_ms=200),
    )
    return OutputRouter(
        policy,
        content_type,
        PRODUCER,
        "aggregator",
    )


def of(out: list[Outgoing], prefix: str) -> list[Outgoing]:
    return [m for m in out if m.subject.startswith(prefix)]


def test_bars_go_to_md_bars_with_their_id_and_the_producer() -> None:
    r = router(mode="none")
    b = bar(0)
    out = r.route(Emitted(bars=[b]), NOW)
    assert out == [
        Outgoing(
            "md.bars.1s.AAPL",
            msgspec.json.encode(b),
            {
                names.CONTENT_TYPE: JSON,
                names.MSG_ID: "1s:AAPL:1700000000000000000:0",
                names.PRODUCER: PRODUCER,
            },
        )
    ]


def test_bars_are_encoded_in_the_configured_content_type() -> None:
    r = router(mode="none", content_type=MSGPACK)
    b = bar(0, symbol="BRK.B")
    [message] = r.route(Emitted(bars=[b]), NOW)
    assert message.subject == "md.bars.1s.BRK_2EB"  # escaped symbol token
    assert message.headers[names.CONTENT_TYPE] == MSGPACK
    assert msgspec.msgpack.decode(message.data, type=Bar) == b


def test_no_store_path_batches_nothing() -> None:
    r = router(mode="none", max_rows=1)
    out = r.route(Emitted(bars=[bar(0), bar(1)]), NOW)
    assert [m.subject for m in out] == ["md.bars.1s.AAPL"] * 2
    assert r.pending_rows == 0
    assert r.flush() == [] and r.notices() == []


def test_bars_batch_to_the_store_on_bus_and_http() -> None:
    for mode, subject in (("bus", "store.sync.bus"), ("http", "store.sync.http")):
        r = router(mode=mode)
        bars = [bar(0), bar(1), bar(2)]
        out = r.route(Emitted(bars=bars), NOW)
        # Each bar, then the batch it completed (two rows), right after it.
        assert [m.subject for m in out] == [
            "md.bars.1s.AAPL",
            "md.bars.1s.AAPL",
            subject,
            "md.bars.1s.AAPL",
        ]
        batch = msgspec.json.decode(out[2].data, type=BarBatch)
        assert batch.bars == bars[:2]
        assert out[2].headers == {names.CONTENT_TYPE: JSON, names.MSG_ID: f"batch:{batch.batch_id}"}
        assert r.pending == [bars[2]]
        [rest] = r.flush()
        assert rest.subject == subject
        assert msgspec.json.decode(rest.data, type=BarBatch).bars == [bars[2]]


def test_a_batch_is_due_by_age() -> None:
    r = router(max_rows=10)
    r.route(Emitted(bars=[bar(0)]), NOW)
    assert not r.is_due(NOW + 199 * MS) and r.due(NOW + 199 * MS) == []
    assert r.is_due(NOW + 200 * MS)
    [batch] = r.due(NOW + 200 * MS)
    assert batch.subject == "store.sync.bus"
    assert r.pending_rows == 0 and not r.is_due(NOW + 10_000 * MS)


def test_dry_run_bars_go_to_the_suppressed_batcher_and_are_announced() -> None:
    r = router()
    r.mark_dry_run("AAPL", True)
    out = r.route(Emitted(bars=[bar(0), bar(1), bar(2), bar(0, symbol="MSFT")]), NOW)
    assert [m.subject for m in out] == ["md.bars.1s.AAPL"] * 3 + ["md.bars.1s.MSFT"]
    assert r.pending == [bar(0, symbol="MSFT")]
    assert r.suppressed_pending == {"dry_run": [bar(2)]}
    [notice] = r.notices()
    assert notice == Outgoing(
        "ingest.events.suppressed",
        msgspec.json.encode(Suppressed("dry_run", 2)),
        {names.CONTENT_TYPE: JSON},
    )
    assert r.notices() == []  # each announced once
    assert r.is_due(NOW + 200 * MS)
    r.due_suppressed(NOW + 200 * MS)
    assert [m.data for m in r.notices()] == [msgspec.json.encode(Suppressed("dry_run", 1))]
    r.mark_dry_run("AAPL", False)
    [batch] = of(r.route(Emitted(bars=[bar(3)]), NOW), "store.sync.bus")
    assert msgspec.json.decode(batch.data, type=BarBatch).bars == [bar(0, symbol="MSFT"), bar(3)]


def test_a_disabled_write_path_suppresses_every_bar() -> None:
    r = router(enabled=False)
    r.mark_dry_run("AAPL", True)  # the disabled path wins over dry run
    out = r.route(Emitted(bars=[bar(0), bar(1)]), NOW)
    assert len(of(out, "store.")) == 0 and r.pending_rows == 0
    assert [msgspec.json.decode(m.data) for m in r.notices()] == [
        {"reason": "write_path_disabled", "bars": 2}
    ]


def test_late_and_invalid_ticks_become_dead_letters() -> None:
    r = router()
    late = LateTick("AAPL", "1m", tick(7, ts=123), "late: beyond the revise window")
    invalid = InvalidTick("AAPL", tick(8), "non-finite price")
    out = r.route(Emitted(bars=[bar(0)], late=[late], invalid=[invalid]), NOW)
    assert [m.subject for m in out] == ["md.bars.1s.AAPL", "md.dlq.aggregator", "md.dlq.aggregator"]
    assert out[1] == Outgoing(
        "md.dlq.aggregator",
        msgspec.json.encode(DeadTick("AAPL", invalid.tick)),
        {
            names.CONTENT_TYPE: JSON,
            names.MSG_ID: "invalid:AAPL:8",
            names.DLQ_REASON: "non-finite price",
            names.DLQ_SERVICE: "aggregator",
        },
    )
    assert out[2] == Outgoing(
        "md.dlq.aggregator",
        msgspec.json.encode(DeadTick("AAPL", late.tick, "1m")),
        {
            names.CONTENT_TYPE: JSON,
            names.MSG_ID: "late:1m:AAPL:7:123",
            names.DLQ_REASON: "late: beyond the revise window",
            names.DLQ_SERVICE: "aggregator",
        },
    )


def test_gap_events_carry_their_ids() -> None:
    gap = Gap("AAPL", "opened", "1s", since_ns=5, missing_intervals=10, at_ns=6)
    assert router().gap_events([gap]) == [
        Outgoing(
            "ingest.events.gap",
            msgspec.json.encode(gap),
            {names.CONTENT_TYPE: JSON, names.MSG_ID: "gap:AAPL:5:opened"},
        )
    ]


MARKER = EndOfStream(run="r1", symbol="AAPL", symbols_total=1, ticks=3)
HEADER = msgspec.json.encode(MARKER).decode()


def test_end_of_stream_flushes_and_sends_the_marker_to_the_store() -> None:
    r = router(max_rows=10)
    r.route(Emitted(bars=[bar(0)]), NOW)
    out = r.end_of_stream("AAPL", MARKER, HEADER)
    assert [m.subject for m in out] == ["store.sync.bus", "store.sync.bus"]
    assert msgspec.json.decode(out[0].data, type=BarBatch).bars == [bar(0)]
    assert out[1] == Outgoing(
        "store.sync.bus",
        msgspec.json.encode(BarBatch("eos:r1:AAPL", [])),
        {names.CONTENT_TYPE: JSON, names.MSG_ID: "eos:r1:AAPL", names.END_OF_STREAM: HEADER},
    )


def test_end_of_stream_announces_completion_when_no_store_sees_it() -> None:
    completed = Outgoing(
        "ingest.events.completed",
        msgspec.json.encode(MARKER),
        {names.CONTENT_TYPE: JSON, names.MSG_ID: "completed:r1:AAPL"},
    )
    assert router(mode="none").end_of_stream("AAPL", MARKER, HEADER) == [completed]
    assert router(enabled=False).end_of_stream("AAPL", MARKER, HEADER) == [completed]
    r = router(max_rows=10)
    r.mark_dry_run("AAPL", True)
    r.route(Emitted(bars=[bar(0)]), NOW)
    assert r.end_of_stream("AAPL", MARKER, HEADER) == [completed]
    assert [msgspec.json.decode(m.data) for m in r.notices()] == [{"reason": "dry_run", "bars": 1}]


def test_restore_refills_the_batchers() -> None:
    r = router(max_rows=2)
    out = r.restore([bar(0), bar(1), bar(2)], {"dry_run": [bar(3)]}, NOW)
    assert [msgspec.json.decode(m.data, type=BarBatch).bars for m in out] == [[bar(0), bar(1)]]
    assert r.pending == [bar(2)]
    assert r.suppressed_pending == {"dry_run": [bar(3)]}
    r.reset()
    assert r.pending == [] and r.suppressed_pending == {}


def test_a_new_policy_retunes_the_batch_being_filled() -> None:
    r = router(max_rows=10)
    r.route(Emitted(bars=[bar(0), bar(1), bar(2)]), NOW)
    assert r.pending_rows == 3
    smaller = r.policy.model_copy(
        update={"batching": BatchingConfig(max_rows=2, max_bytes=1_000_000, max_delay_ms=50)}
    )
    r.apply(smaller)
    assert r.policy is smaller
    # The next bar cuts the batch that is now over the limit, and the new delay applies.
    out = r.route(Emitted(bars=[bar(3)]), NOW)
    batches = of(out, "store.sync.bus")
    assert [len(msgspec.json.decode(b.data, type=BarBatch).bars) for b in batches] == [4]
    r.route(Emitted(bars=[bar(4)]), NOW)
    assert r.is_due(NOW + 50 * MS) and not r.is_due(NOW + 49 * MS)


def test_the_transit_credit_applies_to_live_batches_only_and_is_capped() -> None:
    from mdp.services.aggregator.service import transit_credited

    ms = 1_000_000
    now = 10_000 * ms
    assert transit_credited(now, now - 40 * ms, 1.0, 100 * ms) == now - 40 * ms  # all of it
    assert transit_credited(now, now - 900 * ms, 1.0, 100 * ms) == now - 100 * ms  # capped
    assert transit_credited(now, now - 40 * ms, 1000.0, 100 * ms) == now  # a paced replay
    assert transit_credited(now, now - 40 * ms, 0.0, 100 * ms) == now  # full speed
    assert transit_credited(now, now + 5 * ms, 1.0, 100 * ms) == now  # recv from the future
    assert transit_credited(now, 0, 1.0, 100 * ms) == now  # no recv
    assert transit_credited(now, now - 40 * ms, 1.0, 0) == now  # off


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_late_ticks_are_counted_by_interval_and_by_symbol_only_when_asked() -> None:
    late = LateTick("LATE1", "5m", tick(7, ts=123), "late: beyond the revise window")
    by_interval = _sample("mdp_aggregator_late_ticks_total", interval="5m")
    router().route(Emitted(late=[late]), NOW)
    assert _sample("mdp_aggregator_late_ticks_total", interval="5m") == by_interval + 1
    assert _sample("mdp_aggregator_late_ticks_by_symbol_total", symbol="LATE1") == 0
    opted = OutputRouter(EffectivePolicy(), JSON, PRODUCER, "aggregator", late_by_symbol=True)
    opted.route(Emitted(late=[late]), NOW)
    assert _sample("mdp_aggregator_late_ticks_by_symbol_total", symbol="LATE1") == 1


def test_tick_to_bar_latency_is_observed_for_first_live_publications_only() -> None:
    import time

    def count() -> float:
        return _sample("mdp_aggregator_tick_to_bar_seconds_count", interval="7s")

    before = count()
    end = time.time_ns() - 500 * MS
    first = msgspec.structs.replace(bar(0, interval="7s"), start=end - 7000 * MS, end=end)
    revision = msgspec.structs.replace(first, rev=1)
    replayed = bar(0, interval="7s")  # ended in 2023: a replay, not latency
    router(mode="none").route(Emitted(bars=[first, revision, replayed]), NOW)
    assert count() == before + 1
    total = _sample("mdp_aggregator_tick_to_bar_seconds_sum", interval="7s")
    assert 0.5 <= total < 5
