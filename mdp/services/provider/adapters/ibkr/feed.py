"""TWS tick messages -> `Tick`s for one symbol (pure: the caller passes every time).

- A **trade** (tickPrice of type last, 4 or delayed 68; or a tick-by-tick AllLast) becomes a
  tick with its price and size, and the quote as it stands; its `seq` is the symbol's next.
- A **quote** (bid 1/66, ask 2/67, their sizes 0/69 and 3/70; or a tick-by-tick BidAsk)
  updates the bid and ask the next trade carries. With `quote_ticks` (always for FX, which has
  no trades) a changed quote is also a tick of size 0 at the mid.
- **Event time**: tick-by-tick messages carry IB's time (whole seconds), used as `ts`;
  reqMktData carries none, so `ts` is the arrival time. `ts` never goes back within a symbol.
- **No tick twice**: after a (re)subscription the gateway first sends the current values, the
  last trade among them. That replay, equal to the last trade already delivered, is dropped;
  a trade that happened while the feed was down (a different one) is delivered.
- Delayed tick types (66-76) say the gateway serves delayed data (`delayed_seen`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mdp.shared.contract.messages import Tick

BID, ASK, LAST = frozenset({1, 66}), frozenset({2, 67}), frozenset({4, 68})
BID_SIZE, ASK_SIZE, LAST_SIZE = frozenset({0, 69}), frozenset({3, 70}), frozenset({5, 71})
DELAYED = frozenset(range(66, 77))


def _side(price: float | None) -> float | None:
    """IB sends -1 (or 0) for an empty side of the book."""
    return price if price is not None and price > 0 else None


@dataclass
class SymbolTicks:
    """One symbol's ticks so far: its seq, its quote, its last trade."""

    seq: int = 0  # the last seq delivered (a resumed job starts after its resume point)
    quote_ticks: bool = False
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None
    last_trade: tuple[float, float] | None = None
    last_ts: int = 0
    fresh: bool = False  # just (re)subscribed: the next trade may be the gateway's replay
    delayed_seen: bool = False
    ticks: int = 0  # ticks delivered by this process

    def resubscribed(self) -> None:
        """A new subscription: its first values are the gateway's current state."""
        self.fresh = True

    def price(self, tick_type: int, price: float, size: float, now_ns: int) -> Tick | None:
        """A tickPrice (with its size): the trade tick it makes, if any."""
        if tick_type in DELAYED:
            self.delayed_seen = True
        if tick_type in BID:
            return self._quote(_side(price), self.ask, size or None, self.ask_size, now_ns, now_ns)
        if tick_type in ASK:
            return self._quote(self.bid, _side(price), self.bid_size, size or None, now_ns, now_ns)
        if tick_type in LAST:
            replay = self.fresh and self.last_trade == (price, size)
            self.fresh = False
            if replay:
                return None
            return self.trade(now_ns, price, size, now_ns)
        return None

    def size(self, tick_type: int, size: float, now_ns: int) -> Tick | None:
        """A tickSize: a quote size changes (a last size alone repeats its trade's)."""
        if tick_type in DELAYED:
            self.delayed_seen = True
        if tick_type in BID_SIZE:
            return self._quote(self.bid, self.ask, size or None, self.ask_size, now_ns, now_ns)
        if tick_type in ASK_SIZE:
            return self._quote(self.bid, self.ask, self.bid_size, size or None, now_ns, now_ns)
        return None

    def trade(self, ts_ns: int, price: float, size: float, now_ns: int) -> Tick | None:
        """A trade at event time `ts_ns` (tick-by-tick AllLast, or a tickPrice of last)."""
        if price <= 0 and size <= 0:  # IB's "no trade yet"
            return None
        self.last_trade = (price, size)
        return self._tick(ts_ns, now_ns, price, max(0.0, size))

    def quote(
        self,
        bid: float,
        ask: float,
        bid_size: float,
        ask_size: float,
        ts_ns: int,
        now_ns: int,
    ) -> Tick | None:
        """A tick-by-tick BidAsk at event time `ts_ns`."""
        return self._quote(
            _side(bid), _side(ask), bid_size or None, ask_size or None, ts_ns, now_ns
        )

    def _quote(
        self,
        bid: float | None,
        ask: float | None,
        bid_size: float | None,
        ask_size: float | None,
        ts_ns: int,
        now_ns: int,
    ) -> Tick | None:
        before = (self.bid, self.ask, self.bid_size, self.ask_size)
        self.bid, self.ask, self.bid_size, self.ask_size = bid, ask, bid_size, ask_size
        if not self.quote_ticks or before == (bid, ask, bid_size, ask_size):
            return None
        if bid is None or ask is None:
            return None  # a one-sided book has no mid
        return self._tick(ts_ns, now_ns, (bid + ask) / 2, 0.0)

    def _tick(self, ts_ns: int, now_ns: int, price: float, size: float) -> Tick:
        ts = max(ts_ns, self.last_ts, 1)
        self.last_ts = ts
        self.seq += 1
        self.ticks += 1
        return Tick(
            ts,
            now_ns,
            self.seq,
            price,
            size,
            self.bid,
            self.ask,
            self.bid_size,
            self.ask_size,
        )
