"""mdp's public NATS subjects and headers, built in one place (symbols escaped as the services do).

from mdp.subjects import bars, quotes
await nc.subscribe(bars("1m", "BRK.B"), cb=on_bar)
"""

from __future__ import annotations

from mdp.shared.contract.names import (
    BARS_ALL,
    CLOCK_RATE,
    CONTENT_TYPE,
    DLQ_ALL,
    DLQ_REASON,
    DLQ_SERVICE,
    DLQ_SUBJECT,
    DRY_RUN,
    END_OF_STREAM,
    EVENTS_ALL,
    MARKET_DATA,
    MSG_ID,
    QUOTES_ALL,
    STREAM_BARS,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_QUOTES,
    bars,
    bars_of,
    control,
    dlq,
    escape_symbol,
    event,
    quotes,
    symbol_of,
    unescape_symbol,
)

__all__ = [
    "BARS_ALL",
    "CLOCK_RATE",
    "CONTENT_TYPE",
    "DLQ_ALL",
    "DLQ_REASON",
    "DLQ_SERVICE",
    "DLQ_SUBJECT",
    "DRY_RUN",
    "END_OF_STREAM",
    "EVENTS_ALL",
    "MARKET_DATA",
    "MSG_ID",
    "QUOTES_ALL",
    "STREAM_BARS",
    "STREAM_DLQ",
    "STREAM_EVENTS",
    "STREAM_QUOTES",
    "bars",
    "bars_of",
    "control",
    "dlq",
    "escape_symbol",
    "event",
    "quotes",
    "symbol_of",
    "unescape_symbol",
]
