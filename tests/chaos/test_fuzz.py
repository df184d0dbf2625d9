"""Fuzz: generated garbage on every subject and header while a real slice replays.

Hypothesis draws a few hundred messages: random bytes, arbitrary JSON and msgpack, tick batches
and bar batches with extreme values (NaN, infinities, 1e308, negative, huge integers, times in
seconds, years ahead), under random or contradicting headers (`Content-Type`, `Mdp-Clock-Rate`,
`Mdp-End-Of-Stream`, `Mdp-Run`, `Mdp-Dry-Run`, `Nats-Msg-Id`), on `md.raw`, `md.quotes`,
`store.sync.*`, `ingest.events.suppressed` and the control requests. Messages that could be
valid data use symbols of their own (`FZ...`), so the replayed slice must still be stored
exactly as its reference; no service may restart, every one must answer `$SRV.PING`, and every
control request must get a JSON reply.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdp.cli import replay_file
from mdp.services.store.writers import read_bars
from mdp.shared.contract import names
from mdp.shared.natsserver import EmbeddedNats
from mdp.supervisor import Supervisor
from tests.conftest import DATA
from tests.reference import compare_bars, load_reference

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

STEM = "lean_equity_20131008_slice"
SLICE_SYMBOLS = ["SPY", "AIG", "BAC", "IBM", "BRK.B"]
FUZZ_SYMBOLS = ["FZA", "FZ.B", "FZ/C", "FZ D"]
TS = 1_381_239_000_000_000_000

Message = tuple[str, bytes, dict[str, str]]

_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1e308, -1e308, 5e-324, 2e10, 1e-8]),
    st.integers(-(2**70), 2**70),
)
_times = st.one_of(
    st.integers(TS - 10**12, TS + 10**12),
    st.sampled_from([0, -1, 1, TS // 10**9, TS * 1000, 2**63 - 1, TS + 20 * 3600 * 10**9]),
    st.integers(-(2**70), 2**70),
)
_json = st.recursive(
    st.none() | st.booleans() | _numbers | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_header_text = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
)


@st.composite
def tick(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ts": draw(_times),
        "recv": draw(_times),
        "seq": draw(st.integers(-5, 2**40)),
        "price": draw(_numbers),
        "size": draw(_numbers),
    }
    if draw(st.booleans()):
        body.update(bid=draw(_numbers), ask=draw(_numbers), bid_size=draw(_numbers))
    if draw(st.booleans()):
        body[draw(st.sampled_from(["price", "ts", "extra"]))] = draw(_json)
    return body


@st.composite
def bar(draw: st.DrawFn, symbol: str) -> dict[str, Any]:
    start = draw(_times)
    return {
        "symbol": symbol,
        "interval": draw(st.sampled_from(["1s", "1m", "0s", "x", "1h"])),
        "start": start,
        "end": draw(st.one_of(st.just(start + 10**9), _times)),
        "open": draw(_numbers),
        "high": draw(_numbers),
        "low": draw(_numbers),
        "close": draw(_numbers),
        "volume": draw(_numbers),
        "trade_count": draw(st.integers(-3, 2**40)),
        "vwap": draw(st.one_of(st.none(), _numbers)),
        "provider": "fuzz",
        "rev": draw(st.integers(-2, 5)),
    }


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    keys = [
        names.CONTENT_TYPE,
        names.CLOCK_RATE,
        names.END_OF_STREAM,
        names.RUN,
        names.DRY_RUN,
        names.MSG_ID,
    ]
    out = {}
    for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=4)):
        if key == names.CONTENT_TYPE:
            out[key] = draw(
                st.sampled_from(["application/json", "application/msgpack"]) | _header_text
            )
        elif key == names.CLOCK_RATE:
            out[key] = draw(st.sampled_from(["nan", "-1", "inf", "1e400", "0"]) | _header_text)
        elif key == names.MSG_ID:
            out[key] = "fuzz-" + draw(_header_text)  # never a real batch's id
        else:
            out[key] = draw(_header_text)
    return out


def encode(body: Any, hdrs: dict[str, str]) -> bytes:
    try:
        if hdrs.get(names.CONTENT_TYPE) == "application/msgpack":
            return msgspec.msgpack.encode(body)
        return msgspec.json.encode(body)
    except (OverflowError, TypeError, msgspec.EncodeError):
        return b"\x00not encodable"


@st.composite
def message(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(["raw", "quotes", "store", "event", "bytes"]))
    hdrs = draw(headers())
    if kind == "bytes":  # undecodable garbage may go anywhere, real symbols included
        symbol = draw(st.sampled_from(SLICE_SYMBOLS + FUZZ_SYMBOLS))
        subject = draw(
            st.sampled_from(
                [names.raw("replay", symbol), names.quotes(symbol), names.STORE_SYNC_BUS]
            )
        )
        data = draw(st.binary(max_size=300).filter(lambda b: not b.lstrip().startswith(b"{")))
        return subject, b"\xc1" + data, hdrs  # 0xc1 is never valid msgpack, nor JSON
    symbol = draw(st.sampled_from(FUZZ_SYMBOLS))
    if kind in ("raw", "quotes"):
        provider = draw(st.sampled_from(["replay", "synthetic", "fz"]))
        body: Any = {
            "symbol": draw(st.sampled_from([symbol, *FUZZ_SYMBOLS])),
            "provider": draw(st.sampled_from([provider, "other"])),
            "ticks": draw(st.lists(tick(), max_size=5)),
        }
        if draw(st.booleans()):
            body = draw(_json)
        subject = names.raw(provider, symbol) if kind == "raw" else names.quotes(symbol)
        return subject, encode(body, hdrs), hdrs
    if kind == "store":
        body = {"batch_id": draw(_header_text), "bars": draw(st.lists(bar(symbol), max_size=3))}
        subject = draw(st.sampled_from([names.STORE_SYNC_BUS, names.STORE_SYNC_HTTP]))
        return subject, encode(body, hdrs), hdrs
    return names.event("suppressed"), encode(draw(_json), hdrs), hdrs


_requests = st.tuples(
    st.sampled_from(["start", "status", "reset", "stop"]),
    st.one_of(st.binary(max_size=60), _json.map(lambda v: msgspec.json.encode(v))),
).filter(
    # `stop` with an object body could stop the replay itself: only non-objects for it
    lambda r: r[0] != "stop" or not r[1].lstrip().startswith(b"{")
)


async def scenario(tmp: Path, messages: list[Message], requests: list[tuple[str, bytes]]) -> None:
    server = EmbeddedNats(tmp / "nats", log_file=tmp / "nats.log")
    server.start()
    store_url = f"sqlite:///{tmp / 'bars.db'}"
    sup = Supervisor(
        data_dir=tmp / "pipeline",
        store_url=store_url,
        nats_url=server.url,
        services=("provider", "router", "aggregator", "store", "control"),
        env={"MDP_LOG_LEVEL": "WARNING", "MDP_PROVIDER__BATCH_MAX_TICKS": "200"},
        say=print,
    )
    sup.start()
    nc = None
    try:
        await sup.wait_ready()
        pids = {n: c.proc.pid for n, c in sup.children.items() if c.proc}
        nc = await nats.connect(server.url)
        js = nc.jetstream()

        async def inject() -> None:
            for subject, data, hdrs in messages:
                await js.publish(subject, data, headers=hdrs or None)
            for verb, body in requests:
                reply = await nc.request(f"ingest.control.{verb}", body, timeout=10)
                decoded = msgspec.json.decode(reply.data)
                assert isinstance(decoded, dict) and "ok" in decoded, (verb, body, reply.data)
                if not decoded["ok"]:
                    assert decoded["error"]["code"] != "internal", (verb, body, decoded)

        injector = asyncio.create_task(inject())
        await replay_file(nc, DATA / f"{STEM}.ticks.csv.gz", "max", timeout=180)
        await injector
        bars = [b for b in await read_bars(store_url) if b.symbol in SLICE_SYMBOLS]
        for interval in ("1s", "1m"):
            reference = load_reference(DATA / f"{STEM}.bars_{interval}.csv")
            problems = compare_bars(
                [b for b in bars if b.interval == interval], reference, interval
            )
            assert not problems, f"{interval}: {len(problems)} problems, e.g. {problems[:5]}"
        for service in ("provider", "router", "aggregator", "store", "control"):
            await nc.request(f"$SRV.PING.mdp-{service}", b"", timeout=5)
        # The garbage is in the DLQ, each dead letter with its reason and origin.
        info = await js.stream_info(names.STREAM_DLQ)
        assert info.state.messages > len(messages) // 4, info.state
        for seq in range(info.state.first_seq, info.state.first_seq + 50):
            dead = await js.get_msg(names.STREAM_DLQ, seq)
            assert dead.headers and dead.headers.get(names.DLQ_REASON), dead
            assert dead.headers.get(names.DLQ_SERVICE), dead
        assert pids == {n: c.proc.pid for n, c in sup.children.items() if c.proc}, "a restart"
    finally:
        if nc is not None:
            await nc.close()
        codes = sup.stop()
        server.stop()
    assert all(code == 0 for code in codes.values()), codes


@settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    messages=st.lists(message(), min_size=150, max_size=300),
    requests=st.lists(_requests, min_size=10, max_size=30),
)
def test_garbage_everywhere_leaves_the_replayed_bars_exact(
    messages: list[Message], requests: list[tuple[str, bytes]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), messages, requests))
