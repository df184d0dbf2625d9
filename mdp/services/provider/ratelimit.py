"""Token buckets, sliding windows, minimum intervals and cooldowns on an injected clock (pure).

This is the core of the rate coordinator that every provider process draws from. The shell,
`mdp/services/provider/pacing.py`, keeps one provider's `Budget` in one KV record (`RateRecord`,
`to_record` / `from_record`) and changes it only by compare-and-swap: a provider process takes
a block of message tokens (`take_block`), spends them locally without a round trip per message,
and takes another when the block runs out (`BlockSizer` decides how many to ask for).

Why blocks never strand tokens: a block is taken from the bucket at grant time and carries an
expiry (`block_ttl_s` after the grant). The holder may spend it only before that instant; a
process that dies simply stops spending, and nobody hands the tokens back (nobody can know
whether they were spent), so nothing is counted twice. What a dead holder costs is bounded: at
most one block of capacity, once, because the bucket keeps refilling at `rate` regardless of
outstanding blocks, and the record holds nothing that belongs to one process. Bounds (proven by
the property tests):

* `TokenBucket(r, B)`: tokens granted in any closed window of length T are at most
  `B + r * T` (the level is at most B when the window opens, and refill adds at most r * T).
  For 50/s and a 1 s window: at most `50 + B`.
* A holder spending a block any time before its expiry spends, in any window of length T, at
  most `B + r * (T + block_ttl_ns)`: its tokens were granted inside the window widened by the ttl.
* `SlidingWindowLimit(m, W)`: any half-open window `[s, s + W)` holds at most m grants.
* `Cooldown`: nothing is granted before `until_ns`.
"""

from __future__ import annotations

from collections import deque
from fractions import Fraction

import msgspec

from mdp.shared.contract.records import RateRecord

_NS_PER_S = 1_000_000_000


class TokenBucket:
    """A bucket of `burst` tokens refilled continuously at `rate_per_s`, starting full."""

    def __init__(self, rate_per_s: float, burst: int, now_ns: int = 0) -> None:
        """Validate and fill the bucket."""
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
        if not (isinstance(burst, int) and burst >= 1):
            raise ValueError(f"burst must be a positive integer, got {burst!r}")
        # Fractions keep refill exact: no rounding drift can ever add a token. From the decimal
        # text, so 0.1/s is 1/10 (what the operator wrote) and the level's denominator stays small.
        self._rate_per_ns = Fraction(str(rate_per_s)) / _NS_PER_S
        self.burst = burst
        self._level = Fraction(burst)
        self._stamp_ns = now_ns

    def _refill(self, now_ns: int) -> None:
        if now_ns > self._stamp_ns:
            elapsed = now_ns - self._stamp_ns
            self._level = min(Fraction(self.burst), self._level + elapsed * self._rate_per_ns)
            self._stamp_ns = now_ns

    def state(self) -> tuple[Fraction, int]:
        """The exact level and the instant it was computed for (for a snapshot)."""
        return self._level, self._stamp_ns

    def restore(self, level: Fraction, stamp_ns: int) -> None:
        """Set the level as of `stamp_ns`, capped at the burst (a smaller burst after a reload)."""
        if level < 0:
            raise ValueError(f"a bucket level cannot be negative, got {level}")
        self._level = min(Fraction(self.burst), level)
        self._stamp_ns = stamp_ns

    def available(self, now_ns: int) -> int:
        """Whole tokens available now."""
        self._refill(now_ns)
        return int(self._level)

    def try_take(self, n: int, now_ns: int) -> bool:
        """Take `n` tokens if they are all there now."""
        self._refill(now_ns)
        if n <= self._level:
            self._level -= n
            return True
        return False

    def take_up_to(self, n: int, now_ns: int) -> int:
        """Take as many whole tokens as are there, at most `n`; return how many."""
        taken = max(0, min(n, self.available(now_ns)))
        self._level -= taken
        return taken

    def wait_ns(self, n: int, now_ns: int) -> int:
        """Nanoseconds until `n` tokens are there (0 if now); `n` above `burst` never is."""
        if n > self.burst:
            raise ValueError(f"{n} tokens exceed the burst of {self.burst}")
        self._refill(now_ns)
        missing = n - self._level
        if missing <= 0:
            return 0
        wait = missing / self._rate_per_ns
        return int(wait) + (0 if wait.denominator == 1 else 1)  # round up: never early


class SlidingWindowLimit:
    """At most `max_requests` grants in any window of `window_ns`, exactly (a log of grants)."""

    def __init__(self, max_requests: int, window_ns: int) -> None:
        """Validate; no grants yet."""
        if max_requests < 1 or window_ns < 1:
            raise ValueError("max_requests and window_ns must be positive")
        self.max_requests = max_requests
        self.window_ns = window_ns
        self._grants: deque[tuple[int, int]] = deque()  # (time, count), oldest first
        self._count = 0

    def _expire(self, now_ns: int) -> None:
        # A grant at t shares a window with now iff now - t < window_ns.
        while self._grants and now_ns - self._grants[0][0] >= self.window_ns:
            self._count -= self._grants.popleft()[1]

    def wait_ns(self, n: int, now_ns: int) -> int:
        """Nanoseconds until `n` more grants fit (0 if now)."""
        if n > self.max_requests:
            raise ValueError(f"{n} requests exceed the window's {self.max_requests}")
        self._expire(now_ns)
        excess = self._count + n - self.max_requests
        if excess <= 0:
            return 0
        for at, count in self._grants:
            excess -= count
            if excess <= 0:
                return at + self.window_ns - now_ns
        raise AssertionError("unreachable: the log holds the whole count")

    def try_take(self, n: int, now_ns: int) -> bool:
        """Record `n` grants now if they fit."""
        if self.wait_ns(n, now_ns):
            return False
        self.commit(n, now_ns)
        return True

    def entries(self, now_ns: int) -> list[tuple[int, int]]:
        """The grants still inside the window at `now_ns`, oldest first (for a snapshot)."""
        self._expire(now_ns)
        return list(self._grants)

    def restore(self, entries: list[tuple[int, int]]) -> None:
        """Replace the log by `entries` (oldest first, as `entries` returned them)."""
        self._grants = deque((int(at), int(count)) for at, count in entries)
        self._count = sum(count for _, count in self._grants)

    def commit(self, n: int, now_ns: int) -> None:
        """Record `n` grants now (after `wait_ns` said 0)."""
        if self._grants and self._grants[-1][0] == now_ns:
            self._grants[-1] = (now_ns, self._grants[-1][1] + n)
        else:
            self._grants.append((now_ns, n))
        self._count += n


class MinInterval:
    """No two grants for the same key closer than `interval_ns` (identical requests)."""

    def __init__(self, interval_ns: int) -> None:
        """Validate; no keys yet."""
        if interval_ns < 1:
            raise ValueError("interval_ns must be positive")
        self.interval_ns = interval_ns
        self._last: dict[str, int] = {}

    def wait_ns(self, key: str, now_ns: int) -> int:
        """Nanoseconds until `key` may be granted again (0 if now)."""
        last = self._last.get(key)
        return 0 if last is None else max(0, last + self.interval_ns - now_ns)

    def commit(self, key: str, now_ns: int) -> None:
        """Record a grant of `key` now, forgetting keys whose interval has passed."""
        self._last = self.entries(now_ns)
        self._last[key] = now_ns

    def entries(self, now_ns: int) -> dict[str, int]:
        """The keys whose interval has not passed at `now_ns`, with their last grant."""
        return {k: t for k, t in self._last.items() if now_ns - t < self.interval_ns}

    def restore(self, entries: dict[str, int]) -> None:
        """Replace the keys by `entries`."""
        self._last = dict(entries)


class Cooldown:
    """After a pacing error nothing is granted until `until_ns`."""

    def __init__(self) -> None:
        """Not cooling down."""
        self.until_ns = 0

    def trip(self, until_ns: int) -> None:
        """Cool down until `until_ns` (a later trip extends, an earlier one never shortens)."""
        self.until_ns = max(self.until_ns, until_ns)

    def wait_ns(self, now_ns: int) -> int:
        """Nanoseconds until the cooldown ends (0 if it has)."""
        return max(0, self.until_ns - now_ns)


class PacingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One provider's limits; the defaults are Interactive Brokers' pacing rules."""

    # IB allows 50 messages/s; 40 with a burst of 4 keeps any 1 s window of one or two
    # processes below it (burst + rate + a block of burst/2 each: at most 48).
    messages_per_s: float = 40
    message_burst: int = 4
    historical_requests: int = 60
    historical_window_s: float = 600
    identical_interval_s: float = 15
    per_contract_requests: int = 6
    per_contract_window_s: float = 2
    block_ttl_s: float = 1

    def __post_init__(self) -> None:
        """Reject non-positive settings with a message naming the field."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"PacingConfig.{name} must be positive, got {value!r}")

    @property
    def max_block(self) -> int:
        """The most message tokens one process takes at once: half the burst (at least 1).

        Half, so that two processes drawing at once can both hold a block, and a block a dead
        process strands is never more than half of what the bucket can hold.
        """
        return max(1, self.message_burst // 2)


class Grant(msgspec.Struct, frozen=True):
    """The answer to `Budget.acquire`: granted, or how long to wait before asking again."""

    granted: bool
    retry_after_ns: int


class Block(msgspec.Struct, frozen=True):
    """Message tokens leased to one process, to spend before `expires_ns`."""

    tokens: int
    expires_ns: int


class BlockGrant(msgspec.Struct, frozen=True):
    """The answer to `Budget.take_block`: `tokens` taken (0: none), else when to ask again."""

    tokens: int
    retry_after_ns: int


class Budget:
    """Every limit of one provider, checked together and committed only if all allow."""

    def __init__(self, config: PacingConfig | None = None, now_ns: int = 0) -> None:
        """Build the limits from `config`."""
        self.config = cfg = config or PacingConfig()
        self.messages = TokenBucket(cfg.messages_per_s, cfg.message_burst, now_ns)
        self.historical = SlidingWindowLimit(
            cfg.historical_requests, int(cfg.historical_window_s * _NS_PER_S)
        )
        self.identical = MinInterval(int(cfg.identical_interval_s * _NS_PER_S))
        self.cooldown = Cooldown()
        self._per_contract: dict[str, SlidingWindowLimit] = {}
        self._blocks: list[Block] = []

    def _contract(self, contract: str, now_ns: int) -> SlidingWindowLimit:
        limit = self._per_contract.get(contract)
        if limit is None:
            # Forget contracts whose window has emptied, so the map tracks only recent ones.
            idle = [
                c for c, w in self._per_contract.items() if not w.wait_ns(w.max_requests, now_ns)
            ]
            for c in idle:
                del self._per_contract[c]
            window_ns = int(self.config.per_contract_window_s * _NS_PER_S)
            limit = SlidingWindowLimit(self.config.per_contract_requests, window_ns)
            self._per_contract[contract] = limit
        return limit

    def acquire(
        self,
        n: int,
        now_ns: int,
        key: str | None = None,
        *,
        contract: str | None = None,
        historical: bool = False,
    ) -> Grant:
        """Take `n` message tokens (plus the request limits that apply) or say when to retry.

        `key` identifies the request for the identical-request interval, `contract` selects the
        per-contract window, `historical` counts it against the historical window.
        """
        waits = [self.cooldown.wait_ns(now_ns), self.messages.wait_ns(n, now_ns)]
        if key is not None:
            waits.append(self.identical.wait_ns(key, now_ns))
        if contract is not None:
            waits.append(self._contract(contract, now_ns).wait_ns(1, now_ns))
        if historical:
            waits.append(self.historical.wait_ns(1, now_ns))
        retry = max(waits)
        if retry:
            return Grant(False, retry)
        # All limits allow: commit every one, so a refusal never consumes anything.
        self.messages.try_take(n, now_ns)
        if key is not None:
            self.identical.commit(key, now_ns)
        if contract is not None:
            self._contract(contract, now_ns).commit(1, now_ns)
        if historical:
            self.historical.commit(1, now_ns)
        return Grant(True, 0)

    def pacing_error(self, now_ns: int, cooldown_ns: int) -> None:
        """The provider reported a pacing violation: grant nothing for `cooldown_ns`."""
        self.cooldown.trip(now_ns + cooldown_ns)

    def grant_block(self, requested: int, now_ns: int) -> int:
        """Grant up to `requested` message tokens now (0 if none, or while cooling down)."""
        if self.cooldown.wait_ns(now_ns):
            return 0
        return self.messages.take_up_to(requested, now_ns)

    def lease_block(self, requested: int, now_ns: int) -> Block | None:
        """Grant a block and record it until it expires; None when nothing is available."""
        tokens = self.grant_block(requested, now_ns)
        if not tokens:
            return None
        block = Block(tokens, now_ns + int(self.config.block_ttl_s * _NS_PER_S))
        self._blocks.append(block)
        return block

    def take_block(self, tokens: int, now_ns: int) -> BlockGrant:
        """Take a block of exactly `tokens` message tokens now, or say when they will be there.

        All or nothing, never a partial block: processes that contend then wait for, and take,
        whole blocks, so the compare-and-swaps stay near `rate / block` per second. (Granting
        whatever is there lets one process take single tokens as they trickle in and leaves the
        other ones the remainder: many small blocks, and the first one starving the others.)
        """
        burst = self.config.message_burst
        if not 1 <= tokens <= burst:
            raise ValueError(f"a block of {tokens} tokens: must be between 1 and the burst {burst}")
        wait = max(self.cooldown.wait_ns(now_ns), self.messages.wait_ns(tokens, now_ns))
        if wait:
            return BlockGrant(0, wait)
        self.messages.try_take(tokens, now_ns)
        return BlockGrant(tokens, 0)

    def to_record(self, provider: str, now_ns: int) -> RateRecord:
        """The state every limit needs, as of `now_ns`, with what has left its window pruned."""
        self.messages.available(now_ns)  # brings the level and its stamp up to now
        level, stamp_ns = self.messages.state()
        contracts = {c: w.entries(now_ns) for c, w in self._per_contract.items()}
        return RateRecord(
            provider,
            level.numerator,
            level.denominator,
            stamp_ns,
            self.cooldown.until_ns if self.cooldown.until_ns > now_ns else 0,
            self.historical.entries(now_ns),
            self.identical.entries(now_ns),
            {c: log for c, log in contracts.items() if log},
        )

    @classmethod
    def from_record(cls, config: PacingConfig, record: RateRecord) -> Budget:
        """The budget a record describes, under `config` (which may differ from its writer's)."""
        budget = cls(config, record.stamp_ns)
        if record.level_den <= 0:
            raise ValueError(f"a bucket level needs a positive denominator: {record.level_den}")
        budget.messages.restore(Fraction(record.level_num, record.level_den), record.stamp_ns)
        budget.cooldown.trip(record.cooldown_until_ns)
        budget.historical.restore(record.historical)
        budget.identical.restore(record.identical)
        window_ns = int(config.per_contract_window_s * _NS_PER_S)
        for contract, log in record.per_contract.items():
            limit = SlidingWindowLimit(config.per_contract_requests, window_ns)
            limit.restore(log)
            budget._per_contract[contract] = limit
        return budget

    def outstanding(self, now_ns: int) -> int:
        """Tokens in blocks not yet expired (leased, maybe unspent); expired ones are dropped."""
        self._blocks = [b for b in self._blocks if b.expires_ns > now_ns]
        return sum(b.tokens for b in self._blocks)


class BlockSizer:
    """How many tokens a process asks for next: what its recent demand needs, up to `max_block`.

    A block that runs out before its expiry means demand outgrew it: ask for twice as many. A
    block that expires with tokens left means they were wasted (nobody else could have them):
    ask for what was used. So a busy process takes a few large blocks a second, and a process
    that sends now and then takes one token at a time and strands none.
    """

    def __init__(self, max_block: int) -> None:
        """Start at one token."""
        if max_block < 1:
            raise ValueError(f"max_block must be positive, got {max_block!r}")
        self.max_block = max_block
        self.want = 1

    def exhausted(self) -> None:
        """A block was used up before its expiry."""
        self.want = min(self.max_block, self.want * 2)

    def expired(self, used: int) -> None:
        """A block expired after `used` of its tokens were spent."""
        self.want = max(1, min(self.max_block, used))


def max_in_window(times: list[int], length_ns: int) -> int:
    """The most grants (at `times`, ns) in any closed window of `length_ns`: a bound's check."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] <= start + length_ns:
            j += 1
        best = max(best, j - i)
    return best
