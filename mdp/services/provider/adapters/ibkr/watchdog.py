"""Data that stops while the socket is up: tick age per symbol and market hours (pure).

The failure users report most in every IB integration is a feed whose socket stays up while
ticks silently stop (after a reconnect, a farm flap, or 10182). So the adapter never trusts
the connection state: it feeds every tick and subscription to a `Watchdog`, and every
`check()` tells it which symbols to resubscribe.

A symbol is **stale** when, while its market is open, its tick age passes its threshold:
`stale_factor` times its usual tick interval (an exponential average of the intervals seen),
at least `stale_min_s`, at most `stale_max_s` (and `stale_max_s` before its first tick). A
stale symbol is resubscribed and **probed**: a tick within `probe_timeout_s` ends the probe,
otherwise the probe **failed** (the shell counts a `data_stopped` failure against the breaker)
and the symbol is resubscribed again, each probe twice as long as the last, up to
`stale_max_s`. `verify()` (after 1102 or 2104) probes every symbol at once. While the feed is
degraded (1100, 2110, 2103) the watchdog is paused: the gateway said why data stops.

**Market hours** are a simple weekly calendar per exchange (`is_open`), no holidays: US stock
venues 04:00-20:00 New York time Monday to Friday (IB streams pre- and post-market), CBOE
indices 09:30-16:15 New York, CME group futures Sunday 17:00 to Friday 16:00 Chicago with the
daily 16:00-17:00 halt, IDEALPRO FX Sunday 17:15 to Friday 17:00 New York; any other exchange
is always open (tick age alone decides). A symbol's silence is measured from its last tick or
from when its market last opened, whichever is later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

US_STOCK_VENUES = frozenset(
    [
        "SMART",
        "NYSE",
        "NASDAQ",
        "ISLAND",
        "ARCA",
        "AMEX",
        "BATS",
        "BYX",
        "EDGEA",
        "EDGX",
        "IEX",
        "PSX",
        "BEX",
        "CHX",
        "NYSENAT",
        "LTSE",
        "MEMX",
        "PEARL",
        "DRCTEDGE",
        "IBKRATS",
    ]
)
CME_VENUES = frozenset(["CME", "CBOT", "NYMEX", "COMEX", "GLOBEX", "ECBOT", "NYBOT", "CFE"])
EWMA_WEIGHT = 0.2  # how fast a symbol's usual tick interval follows a change of pace


# ---------------------------------------------------------------------------------------------
# The market-hours calendar


@lru_cache(maxsize=8)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:  # no tz database: tick age alone decides
        return None


def _minutes(local: datetime) -> int:
    return local.hour * 60 + local.minute


def _us_stocks(local: datetime) -> bool:
    return local.weekday() < 5 and 4 * 60 <= _minutes(local) < 20 * 60


def _cboe_index(local: datetime) -> bool:
    return local.weekday() < 5 and 9 * 60 + 30 <= _minutes(local) < 16 * 60 + 15


def _cme(local: datetime) -> bool:
    day, minute = local.weekday(), _minutes(local)  # Monday 0 .. Sunday 6
    if day == 5:
        return False
    if day == 6:
        return minute >= 17 * 60
    if day == 4:
        return minute < 16 * 60
    return not 16 * 60 <= minute < 17 * 60


def _idealpro(local: datetime) -> bool:
    day, minute = local.weekday(), _minutes(local)
    if day == 5:
        return False
    if day == 6:
        return minute >= 17 * 60 + 15
    if day == 4:
        return minute < 17 * 60
    return True


def session(exchange: str, sec_type: str) -> tuple[str, Callable[[datetime], bool]] | None:
    """The (time zone, is-open rule) of an exchange; None when it is always open."""
    exchange = exchange.upper()
    if sec_type == "CASH" or exchange == "IDEALPRO":
        return "America/New_York", _idealpro
    if sec_type == "IND" and exchange == "CBOE":
        return "America/New_York", _cboe_index
    if exchange in CME_VENUES:
        return "America/Chicago", _cme
    if sec_type == "STK" and exchange in US_STOCK_VENUES:
        return "America/New_York", _us_stocks
    return None


def is_open(exchange: str, sec_type: str, when: datetime) -> bool:
    """Whether the exchange's market is open at `when` (an aware datetime)."""
    rule = session(exchange, sec_type)
    if rule is None:
        return True
    zone = _zone(rule[0])
    return True if zone is None else rule[1](when.astimezone(zone))


# ---------------------------------------------------------------------------------------------
# Tick age


@dataclass(frozen=True)
class WatchConfig:
    """The watchdog's thresholds (the adapter's params of the same names)."""

    stale_factor: float = 20.0
    stale_min_s: float = 5.0
    stale_max_s: float = 120.0
    probe_timeout_s: float = 5.0


class VerdictKind(StrEnum):
    """What `check` found."""

    STALE = "stale"  # silent past its threshold: resubscribe and probe
    PROBE_FAILED = "probe_failed"  # still silent after a probe: count a failure, again


@dataclass(frozen=True)
class Verdict:
    """One symbol to act on, and how long it has been silent."""

    symbol: str
    kind: VerdictKind
    silent_s: float
    resubscribed: bool = False  # a failed probe of a resubscription (not of a verification)


@dataclass
class Watch:
    """What the watchdog knows of one symbol (monotonic seconds)."""

    since: float  # subscribed, or its market opened: the start of a silence without ticks
    last_tick: float | None = None
    interval: float | None = None
    probe_until: float | None = None  # a probe waits for a tick until then
    probe_s: float = 0.0  # the length of the current probe
    stale_since: float | None = None  # the start of the silence being recovered from
    failed_probes: int = 0
    was_open: bool = True


@dataclass
class Watchdog:
    """Per-symbol tick age against the symbol's own pace and its market's hours."""

    config: WatchConfig = field(default_factory=WatchConfig)
    watches: dict[str, Watch] = field(default_factory=dict)
    paused: bool = False

    def subscribed(self, symbol: str, now: float) -> None:
        """`symbol` was (re)subscribed at `now`: its silence counts from here at the latest."""
        watch = self.watches.get(symbol)
        if watch is None:
            self.watches[symbol] = Watch(since=now)
        else:
            watch.since = now

    def forget(self, symbol: str) -> None:
        """Stop watching `symbol` (refused, unsubscribed)."""
        self.watches.pop(symbol, None)

    def tick(self, symbol: str, now: float) -> float | None:
        """A tick of `symbol` arrived; the length of the silence it ends, if it was stale."""
        watch = self.watches.get(symbol)
        if watch is None:
            return None
        if watch.last_tick is not None:
            gap = max(0.0, now - watch.last_tick)
            watch.interval = (
                gap
                if watch.interval is None
                else (1 - EWMA_WEIGHT) * watch.interval + EWMA_WEIGHT * gap
            )
        ended = None
        if watch.stale_since is not None:
            ended = max(0.0, now - watch.stale_since)
        watch.last_tick = now
        watch.probe_until = None
        watch.stale_since = None
        watch.failed_probes = 0
        return ended

    def threshold_s(self, symbol: str) -> float:
        """How long `symbol` may be silent before it is stale."""
        cfg = self.config
        watch = self.watches.get(symbol)
        if watch is None or watch.interval is None:
            return cfg.stale_max_s
        return min(cfg.stale_max_s, max(cfg.stale_min_s, cfg.stale_factor * watch.interval))

    def age_s(self, symbol: str, now: float) -> float | None:
        """Seconds since `symbol`'s last tick (None before its first)."""
        watch = self.watches.get(symbol)
        if watch is None or watch.last_tick is None:
            return None
        return max(0.0, now - watch.last_tick)

    def probe(self, symbol: str, now: float) -> None:
        """`symbol` was resubscribed because it is stale: wait for a tick, longer each time."""
        watch = self.watches.get(symbol)
        if watch is None:
            return
        if watch.stale_since is None:
            watch.stale_since = watch.last_tick if watch.last_tick is not None else watch.since
        cfg = self.config
        watch.probe_s = min(
            max(cfg.stale_max_s, cfg.probe_timeout_s), cfg.probe_timeout_s * 2**watch.failed_probes
        )
        watch.probe_until = now + watch.probe_s

    def interrupted(self) -> None:
        """The connection went: every symbol that ticked is in a gap until its next tick."""
        for watch in self.watches.values():
            if watch.stale_since is None and watch.last_tick is not None:
                watch.stale_since = watch.last_tick
            watch.probe_until = None

    def verify(self, now: float, symbols: Iterable[str] | None = None) -> None:
        """Probe symbols (all by default) that are not probed already: a tick must come soon."""
        for symbol in self.watches if symbols is None else symbols:
            watch = self.watches.get(symbol)
            if watch is not None and watch.probe_until is None:
                watch.probe_s = self.config.probe_timeout_s
                watch.probe_until = now + watch.probe_s

    def check(self, now: float, open_now: Callable[[str], bool]) -> list[Verdict]:
        """The symbols to resubscribe now; `open_now(symbol)` tells whether its market is open."""
        if self.paused:
            return []
        verdicts: list[Verdict] = []
        for symbol, watch in self.watches.items():
            is_open = open_now(symbol)
            if not is_open:
                watch.was_open = False
                watch.probe_until = None  # a closed market explains any silence
                continue
            if not watch.was_open:  # it just opened: the silence starts now
                watch.was_open = True
                watch.since = now
            start = watch.since if watch.last_tick is None else max(watch.since, watch.last_tick)
            silent = now - start
            if watch.probe_until is not None:
                if now >= watch.probe_until:
                    watch.probe_until = None
                    resubscribed = watch.stale_since is not None
                    watch.failed_probes += resubscribed
                    verdict = Verdict(symbol, VerdictKind.PROBE_FAILED, silent, resubscribed)
                    verdicts.append(verdict)
                continue
            if silent >= self.threshold_s(symbol):
                verdicts.append(Verdict(symbol, VerdictKind.STALE, silent))
        return verdicts


def utc_now_from(wall_s: float) -> datetime:
    """An aware UTC datetime from epoch seconds (for `is_open`)."""
    return datetime.fromtimestamp(wall_s, UTC)
