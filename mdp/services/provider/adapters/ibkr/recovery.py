"""What the ibkr adapter does about each TWS API error code: one table, no I/O (pure).

The shell (`adapter.py`) looks every error up with `policy(code, text)` and carries out the
action; nothing else decides. The table follows IB's documented codes (docs: the README's
recovery table, which is generated from this one by `recovery_table()`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from mdp.shared.breaker import FailureKind


class Action(StrEnum):
    """What an error code makes the adapter do."""

    IGNORE = "ignore"  # informational
    WARN = "warn"  # logged and shown in status, nothing else
    DEGRADE = "degrade"  # mark the feed degraded, pause the watchdog (socket stays up)
    RESUBSCRIBE_ALL = "resubscribe_all"  # data was lost: every subscription again
    VERIFY = "verify"  # data should flow again: probe every symbol's tick age
    RESUBSCRIBE = "resubscribe"  # that one subscription died: request it again
    RECONNECT = "reconnect"  # the socket is gone or must move: reconnect with backoff
    COOLDOWN = "cooldown"  # pacing: every process pauses through the rate coordinator
    REFUSE = "refuse"  # that symbol cannot be served: refuse it alone, with the reason
    DELAYED = "delayed"  # the gateway serves delayed data: mark it, never mix it with live
    FALLBACK = "fallback"  # tick-by-tick refused: fall back to reqMktData for that symbol
    FAIL_OVER = "fail_over"  # no data for a while (competing session): alert, count a failure


@dataclass(frozen=True)
class Policy:
    """One row of the table: the action, whether it counts against the breaker, why."""

    code: int
    action: Action
    meaning: str
    failure: FailureKind | None = None  # counted against the provider's circuit breaker
    cooldown_s: float = 0.0  # COOLDOWN: how long every process pauses
    clears: tuple[int, ...] = ()  # the degradations this code ends (2104 ends 2103)


_ROWS = [
    Policy(100, Action.COOLDOWN, "outbound message rate exceeded", "pacing", cooldown_s=1.0),
    Policy(101, Action.REFUSE, "max number of tickers reached (capacity)"),
    Policy(102, Action.RESUBSCRIBE, "duplicate ticker id: request it again under a new id"),
    Policy(162, Action.WARN, "historical data error (not a pacing violation)"),
    Policy(200, Action.REFUSE, "no security definition found"),
    Policy(326, Action.RECONNECT, "client id in use: the next id of the range", "connection"),
    Policy(354, Action.REFUSE, "market data not subscribed"),
    Policy(10167, Action.DELAYED, "delayed market data displayed (live not subscribed)"),
    Policy(10168, Action.REFUSE, "delayed market data not enabled"),
    Policy(420, Action.COOLDOWN, "invalid real-time query (pacing)", "pacing", cooldown_s=10.0),
    Policy(502, Action.RECONNECT, "cannot connect to TWS", "connection"),
    Policy(504, Action.RECONNECT, "not connected", "connection"),
    Policy(1100, Action.DEGRADE, "connectivity between IB and TWS lost", "connection"),
    Policy(1101, Action.RESUBSCRIBE_ALL, "connectivity restored, data lost", clears=(1100, 2110)),
    Policy(1102, Action.VERIFY, "connectivity restored, data maintained", clears=(1100, 2110)),
    Policy(1300, Action.RECONNECT, "socket port reset: reconnect on the new port"),
    Policy(2103, Action.DEGRADE, "market data farm connection broken"),
    Policy(2104, Action.VERIFY, "market data farm connection OK", clears=(2103,)),
    Policy(2105, Action.DEGRADE, "historical data farm connection broken"),
    Policy(2106, Action.IGNORE, "historical data farm connection OK", clears=(2105,)),
    Policy(2107, Action.IGNORE, "historical data farm inactive, available on demand"),
    Policy(2108, Action.IGNORE, "market data farm inactive, available on demand"),
    Policy(2110, Action.DEGRADE, "TWS to IB server connectivity broken", "connection"),
    Policy(2157, Action.DEGRADE, "sec-def data farm connection broken"),
    Policy(2158, Action.IGNORE, "sec-def data farm connection OK", clears=(2157,)),
    Policy(10089, Action.WARN, "additional market data subscription needed"),
    Policy(10090, Action.WARN, "part of the requested market data is not subscribed"),
    Policy(10182, Action.RESUBSCRIBE, "live updates failed: the stream died (socket up)"),
    Policy(10189, Action.FALLBACK, "tick-by-tick request failed"),
    Policy(10190, Action.FALLBACK, "max number of tick-by-tick requests reached"),
    Policy(10197, Action.FAIL_OVER, "no market data during a competing session", "data_stopped"),
]
POLICIES: dict[int, Policy] = {row.code: row for row in _ROWS}

# 162 is pacing only when its text says so; it also means "no data" or "query cancelled".
_PACING_162 = Policy(162, Action.COOLDOWN, "historical pacing violation", "pacing", cooldown_s=15.0)
_PACING_TEXT = re.compile(r"pacing violation", re.IGNORECASE)
_PORT_TEXT = re.compile(r"new port\D*(\d{2,5})", re.IGNORECASE)


def policy(code: int, text: str = "") -> Policy:
    """The row for `code` (its text decides 162); an unknown code is a warning."""
    if code == 162 and _PACING_TEXT.search(text):
        return _PACING_162
    row = POLICIES.get(code)
    if row is not None:
        return row
    if 2100 <= code < 2200:  # IB's range of informational "warnings"
        return Policy(code, Action.IGNORE, "informational notice")
    return Policy(code, Action.WARN, "not in the table: logged and shown in status")


def new_port(text: str) -> int | None:
    """The port a 1300 message names ("... reconnect on the new port - 7498"), if any."""
    match = _PORT_TEXT.search(text)
    if match is None:
        return None
    port = int(match.group(1))
    return port if 0 < port < 65536 else None


def recovery_table() -> str:
    """The table as Markdown (the README's recovery table)."""
    lines = ["| code | meaning | action | counts against the breaker |", "|---|---|---|---|"]
    for row in sorted([*_ROWS, _PACING_162], key=lambda r: (r.code, r.action != Action.WARN)):
        extra = f" ({row.cooldown_s:g} s)" if row.cooldown_s else ""
        lines.append(
            f"| {row.code} | {row.meaning} | `{row.action}`{extra} | {row.failure or '-'} |"
        )
    return "\n".join(lines)
