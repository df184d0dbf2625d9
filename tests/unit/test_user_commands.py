"""The pure cores of `mdp bars export`, `tail`, `dlq`, `chart` and `top`."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from mdp import chart, dlq, export, tail, top
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON
from mdp.shared.contract.events import Gap, Started
from mdp.shared.contract.messages import BadRow, Bar, BarBatch, DeadTick, Tick, TickBatch

T0 = 1_723_107_600_000_000_000  # 2024-08-08T09:00:00Z
M = 60 * 10**9


def bar(i: int, o: float = 10.0, h: float = 12.0, lo: float = 9.0, c: float = 11.0) -> Bar:
    return Bar("AAPL", "1m", T0 + i * M, T0 + (i + 1) * M, o, h, lo, c, 5.0, 3, 10.5, "synthetic")


# -- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2024-08-08T09:00Z", T0),
        ("2024-08-08T09:00:00Z", T0),
        ("2024-08-08 09:00", T0),
        ("2024-08-08T11:00+02:00", T0),
        ("2024-08-08T09:00:00.000000001Z", T0 + 1),
        ("2024-08-08", T0 - 9 * 3600 * 10**9),
        (str(T0), T0),
    ],
)
def test_parse_time_reads_iso_utc_and_ns(text: str, ns: int) -> None:
    assert export.parse_time(text) == ns


def test_parse_time_refuses_what_is_no_time() -> None:
    with pytest.raises(ValueError, match="neither an ISO 8601 time"):
        export.parse_time("yesterday")


def test_iso_utc_shows_a_fraction_only_when_there_is_one() -> None:
    assert export.iso_utc(T0) == "2024-08-08T09:00:00Z"
    assert export.iso_utc(T0 + 5) == "2024-08-08T09:00:00.000000005Z"


def test_csv_rows_keep_the_old_columns_first() -> None:
    row = export.csv_row(bar(0))
    assert export.CSV_COLUMNS[:10] == (
        "symbol", "interval", "bar_start_ns", "open", "high", "low", "close", "volume",
        "trade_count", "vwap",
    )  # fmt: skip
    assert row[:3] == ("AAPL", "1m", T0) and row[10:] == (
        T0 + M,
        "2024-08-08T09:00:00Z",
        0,
        "synthetic",
    )
    assert len(row) == len(export.CSV_COLUMNS)


def test_json_bars_carry_every_bar_field_and_utc_times() -> None:
    record = json.loads(msgspec.json.encode(export.json_bar(bar(1))))
    assert set(Bar.__struct_fields__) <= set(record)
    assert (
        record["start_utc"] == "2024-08-08T09:01:00Z"
        and record["end_utc"] == "2024-08-08T09:02:00Z"
    )


def test_a_missing_extra_names_the_extra() -> None:
    with pytest.raises(export.MissingExtra, match=r"pip install 'mdp\[nope\]'"):
        export.require("no_such_module_here", "nope")


# -- tail --------------------------------------------------------------------------------------


def test_tail_subjects_narrow_to_the_symbols() -> None:
    assert tail.subjects("quotes", []) == ["md.quotes.*"]
    assert tail.subjects("quotes", ["BRK.B"]) == ["md.quotes.BRK_2EB"]
    assert tail.subjects("bars", ["BRK.B", "BRK.B"]) == ["md.bars.*.BRK_2EB"]
    assert tail.subjects("events", ["AAPL"]) == ["ingest.events.>"]


def test_tail_lines_of_ticks_bars_and_events() -> None:
    batch = TickBatch("AAPL", "synthetic", [Tick(T0, T0, 7, 101.5, 3.0, 101.4, 101.6)])
    line = tail.tick_line(batch, batch.ticks[0])
    assert line.startswith("09:00:00.000  AAPL") and "101.5" in line and "101.4 x 101.6" in line
    assert json.loads(tail.tick_json(batch, batch.ticks[0]))["seq"] == 7
    assert "O 10" in tail.bar_line(bar(0)) and " 1m " in tail.bar_line(bar(0))
    started = Started(T0, "default", "r1", "synthetic", ["AAPL"], False, 0)
    assert tail.event_line(started).startswith("09:00:00.000  started    job=default")
    assert json.loads(tail.event_json(started))["event"] == "started"
    gap = Gap("MSFT", "opened", "1s", T0, 3, T0)
    assert tail.event_symbols(gap) == {"MSFT"} and tail.event_symbols(started) == {"AAPL"}


# -- dlq ---------------------------------------------------------------------------------------


def letter_headers(subject: str, data: bytes, **extra: str) -> dict[str, str]:
    return {
        names.CONTENT_TYPE: JSON,
        names.DLQ_REASON: "boom",
        names.DLQ_SERVICE: "store",
        names.DLQ_SUBJECT: subject,
        names.DLQ_SIZE: str(len(data)),
        names.DLQ_SHA256: hashlib.sha256(data).hexdigest(),
        names.MSG_ID: "dlq:store:x:1",
        **extra,
    }


def test_a_whole_batch_is_redrivable_to_its_subject_without_the_dlq_headers() -> None:
    batch = BarBatch("b1", [bar(0)])
    data = msgspec.json.encode(batch)
    headers = letter_headers(names.STORE_SYNC_BUS, data)
    letter = dlq.describe(5, None, headers, data)
    assert (letter.body, letter.redrive, letter.reason) == ("BarBatch", "", "boom")
    body = dlq.decode_body(letter.subject, headers, data)
    assert body == batch
    subject, payload, out = dlq.redrive_message(letter, headers, body)
    assert subject == names.STORE_SYNC_BUS and msgspec.json.decode(payload, type=BarBatch) == batch
    assert not any(k.startswith("Mdp-Dlq-") for k in out)
    assert out[names.MSG_ID] == "redrive:dlq:store:x:1"


def test_one_bad_bar_goes_back_as_a_batch_of_one() -> None:
    data = msgspec.json.encode(bar(2))
    headers = letter_headers(names.STORE_SYNC_BUS, data)
    letter = dlq.describe(9, None, headers, data)
    body = dlq.decode_body(letter.subject, headers, data)
    assert letter.body == "Bar" and isinstance(body, Bar)
    _, payload, _ = dlq.redrive_message(letter, headers, body)
    assert msgspec.json.decode(payload, type=BarBatch) == BarBatch("redrive-9", [bar(2)])


def test_what_cannot_go_back_says_why() -> None:
    dead = msgspec.json.encode(DeadTick("AAPL", Tick(T0, T0, 1, 1.0, 1.0)))
    assert "DeadTick" in dlq.describe(1, None, letter_headers("md.raw.p.AAPL", dead), dead).redrive
    row = msgspec.json.encode(BadRow("j", "r", 3))
    headers = {names.DLQ_REASON: "bad price", names.DLQ_SERVICE: "provider"}
    assert dlq.describe(2, None, headers, row).redrive == "no original subject recorded"
    data = msgspec.json.encode(BarBatch("b", [bar(0)]))
    cut = letter_headers(names.STORE_SYNC_BUS, data, **{names.DLQ_TRUNCATED: "10"})
    assert dlq.describe(3, None, cut, data[:10]).redrive == "payload truncated"
    altered = letter_headers(names.STORE_SYNC_BUS, data)
    changed = data.replace(b"AAPL", b"AAPX")
    assert "SHA-256" in dlq.describe(4, None, altered, changed).redrive


def test_selection_and_reason_counts() -> None:
    a = dlq.DeadLetter(1, "t", "store", "database down")
    b = dlq.DeadLetter(2, "t", "router", "undecodable: x")
    assert dlq.matches(a, set(), "DATABASE", None) and not dlq.matches(b, set(), "database", None)
    assert dlq.matches(b, {2}, None, "router") and not dlq.matches(a, {2}, None, None)
    assert dlq.reason_counts([a, b, a]) == [
        ("store", "database down", 2),
        ("router", "undecodable: x", 1),
    ]


# -- chart -------------------------------------------------------------------------------------


def test_candles_follow_their_bars_and_gaps_are_empty_time() -> None:
    bars = [bar(0, 10, 12, 9, 11), bar(1, 11, 11.5, 8, 8.5), bar(4, 8.5, 13, 8, 12)]
    lay = chart.layout(bars, width=1000, height=500)
    assert len(lay.candles) == 3 and (lay.low, lay.high) == (8, 13)
    top_y, bottom_y = chart.MARGIN_TOP, 500 - chart.MARGIN_BOTTOM

    def y(price: float) -> float:
        return top_y + (13 - price) / 5 * (bottom_y - top_y)

    for b, c in zip(bars, lay.candles, strict=True):
        assert c.wick_top == pytest.approx(y(b.high)) and c.wick_bottom == pytest.approx(y(b.low))
        assert c.body_top == pytest.approx(y(max(b.open, b.close)))
        assert c.body_bottom == pytest.approx(y(min(b.open, b.close)))
        assert c.up == (b.close >= b.open)
    assert [c.up for c in lay.candles] == [True, False, True]
    # x is time: bar 4 starts 4/5 of the way along, the missing minutes 2-3 are one gap.
    plot = 1000 - chart.MARGIN_LEFT - chart.MARGIN_RIGHT
    per_minute = plot / 5
    assert lay.candles[2].x == pytest.approx(chart.MARGIN_LEFT + 4 * per_minute + 0.15 * per_minute)
    assert chart.gaps(bars) == [(T0 + 2 * M, T0 + 4 * M)]
    (x0, x1, _, _) = lay.gaps[0]
    assert (x0, x1) == pytest.approx(
        (chart.MARGIN_LEFT + 2 * per_minute, chart.MARGIN_LEFT + 4 * per_minute)
    )
    svg = chart.svg(bars, "t")
    assert svg.count('<g class="candle"') == 3 and svg.count('class="gap"') == 1


def test_a_flat_series_and_no_bars() -> None:
    lay = chart.layout([bar(0, 5, 5, 5, 5)])
    assert lay.high > lay.low and lay.candles[0].body_bottom > lay.candles[0].body_top
    with pytest.raises(ValueError, match="no bars"):
        chart.layout([])


# -- top ---------------------------------------------------------------------------------------


def consumer(pending: int, delivered: int) -> top.Consumer:
    return top.Consumer("STORE_SYNC", "store-writer", pending, 0, delivered, delivered)


def test_a_stage_whose_input_waits_and_grows_while_it_produces_nothing_is_stalled() -> None:
    assert top.stalled([consumer(5, 10)], [consumer(9, 10)], 0.0)
    assert top.stalled([consumer(9, 10)], [consumer(9, 10)], 0.0)  # not taking anything
    assert not top.stalled([consumer(9, 10)], [consumer(4, 15)], 0.0)  # draining
    assert not top.stalled([consumer(5, 10)], [consumer(9, 12)], 3.0)  # producing
    assert not top.stalled([consumer(0, 10)], [consumer(0, 10)], 0.0)  # idle


def test_latency_ignores_revisions_and_replays() -> None:
    live = [(bar(0).end + 200_000_000, bar(0)), (bar(1).end + 400_000_000, bar(1))]
    revised = msgspec.structs.replace(bar(2), rev=1)
    assert top.latency([*live, (revised.end + 10**12, revised)]) == (300.0, 400.0)
    assert top.latency([(bar(0).end + 2 * top.REPLAY_LAG_NS, bar(0))]) == (None, None)


def test_rows_rates_and_render() -> None:
    def sample(at: float, out: float, pending: int, delivered: int) -> top.Sample:
        return top.Sample(
            at, dict.fromkeys(top.SERVICES, True), {"store": {"out": out}},
            {"store": [consumer(pending, delivered)]}, {"store": 2}, dict.fromkeys(top.SERVICES, 0),
        )  # fmt: skip

    rows = {r.service: r for r in top.rows(sample(0, 100, 1, 10), sample(2, 100, 7, 10), [])}
    store = rows["store"]
    assert (store.rate_out, store.rate_in, store.pending, store.dead_letters) == (0.0, 0.0, 7, 2)
    assert store.stalled and not rows["router"].stalled
    text = top.render(list(rows.values()))
    assert "warning: store is stalled: 7 message(s) wait" in text
    assert text.splitlines()[0].startswith("SERVICE")


def test_restarts_are_counted_from_started_lines_since_the_run() -> None:
    lines = [
        json.dumps({"event": "started", "timestamp": "2024-08-08T08:00:00Z"}),
        json.dumps({"event": "started", "timestamp": "2024-08-08T09:00:01Z"}),
        json.dumps({"event": "something else"}),
        json.dumps({"event": "started", "timestamp": "2024-08-08T09:05:00Z"}),
        'not json but says "started"',
    ]
    assert top.restarts_in_log(lines) == 2
    assert top.restarts_in_log(lines, since_ns=T0) == 1
    assert top.restarts_in_log([]) == 0


def test_progress_line_counts_intervals_apart_and_warns_of_stalls() -> None:
    line = top.progress_line(83, 1000, 200, {"1m": 2, "1s": 120}, 122, 3, 1, ["store"])
    assert line.startswith("00:01:23 | ticks in")
    assert "bars 1s 120 1m 2" in line and "dead letters 3" in line
    assert line.endswith("| restarts 1 | STALLED: store")
