"""The rate coordinator's shell: one `Pacer` per provider, its budget shared through one KV record.

Every provider process of a provider draws on one budget, the `RateRecord` in `mdp_checkpoints`
under `rate.<provider>`. There is no coordinator process: a process reads the record, lets the
pure `Budget` (ratelimit.py) decide, and writes the result back with compare-and-swap on the
revision it read; when another process wrote first (`KeyWrongLastSequenceError`) it reads again.
Message tokens are taken a block at a time (`Budget.take_block`, sized by `BlockSizer`) and spent
locally until the block runs out or expires (`block_ttl_s` after the grant), so a process that
sends 50 messages a second writes the record a few times a second, not 50. Requests that count
against the request limits (an identical-request `key`, a `contract`, `historical`) are rare
and each is granted by its own compare-and-swap.

A process that dies strands at most the block it held: the record holds nothing that belongs to
a process, so nothing waits for it to expire. Times in the record are wall-clock (every process
must agree on them); a local block's expiry is measured on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from fractions import Fraction

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram
from structlog.typing import FilteringBoundLogger

from mdp.services.provider.ratelimit import BlockSizer, Budget, PacingConfig
from mdp.shared.config import PacingSection
from mdp.shared.contract import names
from mdp.shared.contract.records import RateRecord

TOKENS_GRANTED = Counter(
    "mdp_provider_rate_tokens_granted_total", "Message tokens granted to this process", ["provider"]
)
WAITS = Counter(
    "mdp_provider_rate_waits_total", "Acquires that had to wait for the pacing budget", ["provider"]
)
WAIT_SECONDS = Histogram(
    "mdp_provider_rate_wait_seconds",
    "How long an acquire that had to wait waited",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
)
COOLDOWNS = Counter(
    "mdp_provider_rate_cooldowns_total", "Pacing errors this process reported", ["provider"]
)
CONFLICTS = Counter(
    "mdp_provider_rate_cas_conflicts_total",
    "Writes of the shared budget refused because another process wrote first",
    ["provider"],
)

_NS_PER_S = 1_000_000_000
MAX_SLEEP_S = 1.0  # a waiting acquire looks again at least this often (a reload, a cooldown)
OUTAGE_RETRY_S = 0.5  # the bucket unreachable: fail closed, ask again after this
MIN_WAIT_NS = 1_000_000  # a refused process reads the record at most every millisecond


def pacing_config(section: PacingSection) -> PacingConfig:
    """The pure limits of a `pacing:` section of data_providers.yaml."""
    return PacingConfig(
        messages_per_s=section.messages_per_second,
        message_burst=section.message_burst,
        historical_requests=section.historical_requests,
        historical_window_s=section.historical_window_seconds,
        identical_interval_s=section.identical_interval_seconds,
        per_contract_requests=section.per_contract_requests,
        per_contract_window_s=section.per_contract_window_seconds,
        block_ttl_s=section.block_ttl_seconds,
    )


class Pacer:
    """This process's share of one provider's pacing budget; unlimited without a config."""

    def __init__(
        self,
        provider: str,
        kv: KeyValue | None,
        config: PacingConfig | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        """A pacer for `provider`, its budget in `kv` (unused, and may be None, when unlimited)."""
        self.provider = provider
        self.kv = kv
        self.log = log
        self.key = names.rate_key(provider) if provider else ""
        self.config: PacingConfig | None = None
        # One grant at a time per process: acquires of several jobs queue here in order (the
        # lock is fair) instead of racing each other's compare-and-swap.
        self._lock = asyncio.Lock()
        self._left = 0  # tokens of the block in hand
        self._used = 0  # tokens of the block in hand already spent
        self._expires_mono_ns = 0  # when the block in hand may no longer be spent
        self._sizer = BlockSizer(1)
        self._cooling_until_mono_ns = 0  # this process's own pacing error, before the record says
        self._outage_logged = False
        self.configure(config)

    @property
    def limited(self) -> bool:
        """Whether a budget applies."""
        return self.config is not None

    def configure(self, config: PacingConfig | None) -> None:
        """Apply a (re)loaded budget; None lifts it. The block in hand is dropped on a change."""
        if config == self.config:
            return
        if config is not None and self.kv is None:
            raise ValueError(f"pacer {self.provider!r}: a budget needs the KV bucket")
        self.config = config
        self._left = self._used = 0
        self._sizer = BlockSizer(config.max_block if config is not None else 1)

    async def acquire(
        self,
        n: int = 1,
        *,
        key: str | None = None,
        contract: str | None = None,
        historical: bool = False,
    ) -> None:
        """Wait until `n` message tokens (and the request limits that apply) are granted.

        `key` names the request for the identical-request interval, `contract` selects the
        per-contract window, `historical` counts it against the historical window. Cancellable
        at every wait; `n` above the burst can never be granted and raises ValueError.
        """
        if self.config is None:
            return
        request = key is not None or contract is not None or historical
        started = time.monotonic()
        waited = False
        async with self._lock:
            while True:
                cfg = self.config
                if cfg is None:
                    return  # lifted by a reload while waiting
                if not 1 <= n <= cfg.message_burst:
                    raise ValueError(
                        f"pacer {self.provider!r}: {n} tokens can never be granted "
                        f"(between 1 and message_burst {cfg.message_burst})"
                    )
                retry_ns = self._local_wait_ns()
                if not retry_ns:
                    if not request and self._spend_local(n):
                        break
                    retry_ns = await self._grant(cfg, n, key, contract, historical)
                    if not retry_ns:
                        break
                waited = True
                await asyncio.sleep(self._sleep_s(cfg, retry_ns))
        TOKENS_GRANTED.labels(self.provider).inc(n)
        if waited:
            WAITS.labels(self.provider).inc()
            WAIT_SECONDS.labels(self.provider).observe(time.monotonic() - started)

    async def pacing_error(self, cooldown_s: float) -> None:
        """The source refused us for pacing: grant nothing, in any process, for `cooldown_s`.

        Returns once the cooldown is in the shared record, or (NATS unreachable) once it has
        passed: this process itself stops at once either way.
        """
        cfg = self.config
        if cfg is None:
            if self.log is not None:  # no budget to pause: say so, the operator may want one
                self.log.warning("pacing_error_unpaced", provider=self.provider)
            return
        COOLDOWNS.labels(self.provider).inc()
        cooldown_ns = int(cooldown_s * _NS_PER_S)
        # Stop here at once (the shared record may take a moment), and spend no block in hand.
        until_mono_ns = time.monotonic_ns() + cooldown_ns
        self._cooling_until_mono_ns = max(self._cooling_until_mono_ns, until_mono_ns)
        self._left = 0
        if self.log is not None:
            self.log.warning("pacing_error", provider=self.provider, cooldown_s=cooldown_s)
        while time.monotonic_ns() < until_mono_ns:  # an expired cooldown is not worth writing
            try:
                record, revision = await self._read()
                now = time.time_ns()
                budget = self._budget(cfg, record, now)
                budget.pacing_error(now, cooldown_ns)
                if await self._write(budget.to_record(self.provider, now), revision):
                    return
            except Exception as exc:  # an outage: the local cooldown holds meanwhile
                if self.log is not None:
                    self.log.warning("pacing_cooldown_write_failed", error=repr(exc))
                await asyncio.sleep(OUTAGE_RETRY_S)

    # -- internals ------------------------------------------------------------------------------

    def _sleep_s(self, cfg: PacingConfig, retry_ns: int) -> float:
        """The hint, plus up to one token's time at random, at most `MAX_SLEEP_S`.

        Processes refused together are told the same instant; without the jitter they would
        wake together every time, and whichever the scheduler favours would win every race.
        Waking a little later is always safe: the hint is the earliest a grant can come.
        """
        jitter_s = random.uniform(0, 1 / cfg.messages_per_s)
        return min(retry_ns / _NS_PER_S + jitter_s, MAX_SLEEP_S)

    def _local_wait_ns(self) -> int:
        return max(0, self._cooling_until_mono_ns - time.monotonic_ns())

    def _spend_local(self, n: int) -> bool:
        """Spend `n` tokens of the block in hand if it has them and has not expired."""
        now = time.monotonic_ns()
        if now >= self._expires_mono_ns:
            if self._left:
                self._sizer.expired(self._used)  # asked for more than was used: ask for less
            self._left = self._used = 0
            return False
        if self._left >= n:
            self._left -= n
            self._used += n
            return True
        if self._used:
            # Demand outran the block within its lifetime: ask for more next time. The few
            # tokens left (fewer than n) are given up: n is usually 1, so this rarely wastes any.
            self._sizer.exhausted()
        self._left = self._used = 0
        return False

    async def _grant(
        self, cfg: PacingConfig, n: int, key: str | None, contract: str | None, historical: bool
    ) -> int:
        """One attempt at the shared budget: 0 once granted, else nanoseconds to wait."""
        block = key is None and contract is None and not historical
        while True:
            try:
                record, revision = await self._read()
            except Exception as exc:
                return self._outage(exc)
            now = time.time_ns()
            now_mono = time.monotonic_ns()
            budget = self._budget(cfg, record, now)
            if block:
                answer = budget.take_block(min(max(n, self._sizer.want), cfg.message_burst), now)
                if not answer.tokens:
                    return max(MIN_WAIT_NS, answer.retry_after_ns)  # a refusal writes nothing
            else:
                grant = budget.acquire(n, now, key, contract=contract, historical=historical)
                if not grant.granted:
                    return max(MIN_WAIT_NS, grant.retry_after_ns)
            try:
                written = await self._write(budget.to_record(self.provider, now), revision)
            except Exception as exc:
                return self._outage(exc)
            if not written:
                continue  # another process wrote first: decide again on what it wrote
            if self._outage_logged and self.log is not None:
                self.log.info("pacing_budget_reachable", provider=self.provider)
            self._outage_logged = False
            if block:
                # The block may be spent until block_ttl after `now`; counted from a monotonic
                # instant taken after `now`, the local expiry can only come early, never late.
                self._left = answer.tokens - n
                self._used = n
                self._expires_mono_ns = now_mono + int(cfg.block_ttl_s * _NS_PER_S)
            return 0

    def _outage(self, exc: Exception) -> int:
        # Fail closed: without the shared record nothing is granted (a burst over IB's limits
        # costs a disconnect); the acquire keeps waiting and asks again.
        if self.log is not None and not self._outage_logged:  # once per outage, not per retry
            self.log.warning("pacing_budget_unreachable", provider=self.provider, error=repr(exc))
        self._outage_logged = True
        return int(OUTAGE_RETRY_S * _NS_PER_S)

    async def _read(self) -> tuple[RateRecord | None, int | None]:
        """The record and its revision; (None, None) when there is none yet."""
        assert self.kv is not None
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            return None, None
        try:
            return msgspec.json.decode(entry.value or b"", type=RateRecord), entry.revision
        except msgspec.DecodeError as exc:
            # Overwritten below from an empty bucket: refusing for a while is safe, guessing
            # a full bucket is not.
            if self.log is not None:
                self.log.error("bad_rate_record", key=self.key, error=str(exc))
            return RateRecord(self.provider, 0, 1, time.time_ns()), entry.revision

    def _budget(self, cfg: PacingConfig, record: RateRecord | None, now_ns: int) -> Budget:
        if record is None:
            return Budget(cfg, now_ns)  # nobody drew on it yet: a full bucket
        try:
            return Budget.from_record(cfg, record)
        except ValueError as exc:  # a record no writer of ours produces
            if self.log is not None:
                self.log.error("bad_rate_record", key=self.key, error=str(exc))
            budget = Budget(cfg, now_ns)
            budget.messages.restore(Fraction(0), now_ns)
            return budget

    async def _write(self, record: RateRecord, revision: int | None) -> bool:
        """Compare-and-swap; False when another process wrote first."""
        assert self.kv is not None
        value = msgspec.json.encode(record)
        try:
            if revision is None:
                await self.kv.create(self.key, value)
            else:
                await self.kv.update(self.key, value, last=revision)
        except KeyWrongLastSequenceError:
            CONFLICTS.labels(self.provider).inc()
            return False
        return True


def unlimited(provider: str = "") -> Pacer:
    """A pacer without a budget: acquires return at once, no KV traffic."""
    return Pacer(provider, None, None)
