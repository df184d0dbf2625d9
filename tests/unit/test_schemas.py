"""Message schemas and the codec: both wire formats, strict validation."""

from __future__ import annotations

import msgspec
import pytest

from mdp.shared.contract.codec import MSGPACK, Codec, DecodeError, encode
from mdp.shared.contract.messages import Bar, BarBatch, Tick, TickBatch, interval_ns

BATCH = TickBatch(
    "BRK.B",
    "replay",
    [Tick(1_700_000_000_000_000_000, 1_700_000_000_000_000_001, 1, 412.5, 10.0)],
)


@pytest.mark.parametrize("content_type", ["application/json", MSGPACK])
def test_tick_batch_round_trips_in_both_formats(content_type: str) -> None:
    data = encode(BATCH, content_type)
    assert Codec(TickBatch).decode(data, {"Content-Type": content_type}) == BATCH


def test_json_field_names_are_the_public_api() -> None:
    decoded = msgspec.json.decode(encode(BATCH))
    assert set(decoded) == {"symbol", "provider", "ticks"}
    assert decoded["ticks"][0] == {
        "ts": 1_700_000_000_000_000_000,
        "recv": 1_700_000_000_000_000_001,
        "seq": 1,
        "price": 412.5,
        "size": 10.0,
    }


def test_quote_fields_are_optional_and_carried() -> None:
    tick = Tick(1, 1, 1, 10.0, 1.0, bid=9.99, ask=10.01, bid_size=5.0, ask_size=7.0)
    assert msgspec.json.decode(encode(tick), type=Tick) == tick


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"{not json", "malformed"),
        (b'{"symbol": "A", "provider": "p", "ticks": [{"ts": "x"}]}', "int"),
        (
            b'{"symbol": "A", "provider": "p", "ticks": '
            b'[{"ts": 1, "recv": 1, "seq": 1, "price": 1.0, "size": -5}]}',
            r"`float` >= 0",
        ),
        (
            b'{"symbol": "A", "provider": "p", "ticks": '
            b'[{"ts": 0, "recv": 1, "seq": 1, "price": 1.0, "size": 5}]}',
            r"`int` >= 1",
        ),
    ],
)
def test_invalid_payloads_raise_decode_error(payload: bytes, problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        Codec(TickBatch).decode(payload, None)


def test_unknown_content_type_is_refused() -> None:
    with pytest.raises(DecodeError, match="Content-Type"):
        Codec(TickBatch).decode(encode(BATCH), {"Content-Type": "text/csv"})


def test_bar_id_is_deterministic() -> None:
    bar = Bar("BRK.B", "1m", 60, 120, 1.0, 2.0, 0.5, 1.5, 10.0, 3, 1.2, "replay", rev=2)
    assert bar.bar_id == "1m:BRK.B:60:2"
    batch = BarBatch("b1", [bar])
    assert msgspec.json.decode(encode(batch), type=BarBatch) == batch


@pytest.mark.parametrize(
    ("interval", "ns"),
    [("1s", 10**9), ("5s", 5 * 10**9), ("15m", 900 * 10**9), ("1h", 3600 * 10**9),
     ("250ms", 250 * 10**6), ("1d", 86400 * 10**9)],
)  # fmt: skip
def test_interval_widths(interval: str, ns: int) -> None:
    assert interval_ns(interval) == ns


@pytest.mark.parametrize("interval", ["", "0s", "1", "1x", "-1s", "1.5m", "01s"])
def test_bad_intervals_are_refused(interval: str) -> None:
    with pytest.raises(ValueError, match="interval"):
        interval_ns(interval)
