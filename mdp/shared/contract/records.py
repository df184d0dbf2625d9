"""What the services keep in KV (`ingest_state`, `mdp_checkpoints`) besides jobs and policy."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

CircuitState = Literal["closed", "open", "half_open"]

JobState = Literal[
    "running", "retrying", "completed", "failed", "stopped", "interrupted", "replaced"
]


class ProviderState(Struct, omit_defaults=True):
    """A provider's report on one run of a job (`ingest_state`, key `provider.<job>`).

    `resume` holds, per symbol, the last seq the stream has stored: a provider taking the run
    over resumes after it.
    """

    job: str
    run: str
    provider: str
    state: JobState
    updated_ns: int
    ticks: int = 0
    error: str | None = None
    resume: dict[str, int] = {}
    owner: str = ""  # the provider process (its instance) that runs the job
    attempts: int = 0  # retries of a live job since it last ran healthily
    next_attempt_ns: int = 0  # while `retrying`: when the next attempt starts
    feed: FeedStatus | None = None  # a live feed's own report (the ibkr adapter's connection)


FeedConnection = Literal["connecting", "connected", "degraded", "disconnected"]
SymbolFeedState = Literal["qualifying", "subscribing", "live", "stale", "refused"]


class SymbolFeed(Struct, omit_defaults=True):
    """One symbol of a live feed: its state, data type, tick age and recoveries.

    `market_data` is what the gateway serves it (`live`, `frozen`, `delayed`,
    `delayed_frozen`); `age_s` the seconds since its last tick as of the report's `updated_ns`
    (absent before the first tick); `gaps` the silences the feed detected and recovered from,
    `last_gap_s` the length of the latest; `reason` why it is refused or stale.
    """

    state: SymbolFeedState
    market_data: str = ""
    last_tick_ns: int = 0
    age_s: float | None = None
    ticks: int = 0
    resubscriptions: int = 0
    gaps: int = 0
    last_gap_s: float | None = None
    reason: str | None = None
    code: int | None = None  # the gateway's error code behind `reason`, if any


class FeedStatus(Struct, omit_defaults=True):
    """A live feed's report on its connection (`ProviderState.feed`, shown in `status`).

    `market_data_type` is the type requested; a symbol the gateway serves otherwise says so in
    its own `market_data`. `last_error_code` / `last_error` are the gateway's latest error.
    """

    connection: FeedConnection
    updated_ns: int
    host: str = ""
    port: int = 0
    client_id: int = 0
    server_version: int = 0
    market_data_type: str = ""
    connected_since_ns: int = 0
    reconnects: int = 0
    resubscriptions: int = 0
    data_stopped: int = 0  # silences the watchdog detected
    last_error_code: int | None = None
    last_error: str | None = None
    degraded: list[str] = []  # why the feed is degraded (1100, 2103, ...), empty when healthy
    symbols: dict[str, SymbolFeed] = {}


class IbkrContract(Struct, omit_defaults=True):
    """A qualified Interactive Brokers contract, cached (`mdp_checkpoints`, `ibkr.contract.<sym>`).

    Written once a symbol qualifies, so a restarted provider does not ask the gateway again;
    `spec` is the symbol as the job names it, `qualified_ns` when the gateway confirmed it.
    """

    spec: str
    con_id: int
    symbol: str
    sec_type: str
    exchange: str
    currency: str
    qualified_ns: int
    primary_exchange: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    last_trade_date: str = ""
    multiplier: str = ""
    time_zone: str = ""


class StopRecord(Struct):
    """The last stop of a job (`ingest_state`, key `stopped.<job>`)."""

    job: str
    run: str
    provider: str
    reason: str
    started_ns: int
    stopped_ns: int


class ServiceUrl(Struct):
    """Where a service's HTTP endpoint listens (`ingest_state`, keys `http.<service>`)."""

    url: str


class LeaseRecord(Struct):
    """What a lease key holds (`mdp_checkpoints`, keys `lease.<consumer>`)."""

    owner: str
    expires_ns: int


class AdapterInfo(Struct):
    """An adapter a provider process hosts: its name, version and where it came from.

    `origin` is `builtin`, `entry-point:<distribution>`, `module:<module:Class>` or `registered`.
    """

    name: str
    version: str
    origin: str
    live: bool = False  # a live feed (retried, may be a hot standby), not a bounded input


class ProviderHost(Struct):
    """A running provider process and what it hosts (`ingest_state`, key `hosts.<instance>`).

    Renewed every few seconds; a record older than `ttl_s` is a process that died.
    """

    instance: str
    adapters: list[AdapterInfo]
    heartbeat_ns: int
    ttl_s: float


class CircuitRecord(Struct):
    """A provider's circuit breaker (`ingest_state`, key `circuit.<provider>`).

    Written with compare-and-swap by whoever changes it (the provider process that saw a
    failure or a success, control on `reset`); `state` is as of `updated_ns`: an `open` record
    whose recovery has elapsed reads as `half_open` (the breaker core computes it).
    """

    provider: str
    state: CircuitState
    failures_ns: list[int]
    opened_at_ns: int | None
    probes_started_ns: list[int]
    updated_ns: int


class RateRecord(Struct, omit_defaults=True):
    """A provider's pacing budget, shared by its processes (`mdp_checkpoints`, `rate.<provider>`).

    Written only with compare-and-swap, by whichever provider process takes tokens or reports a
    pacing error; nothing in it belongs to one process, so a process that dies leaves nothing
    behind. The message bucket holds exactly `level_num / level_den` tokens as of `stamp_ns`
    (it refills from there at the configured rate, up to the burst). The logs hold what is still
    inside their windows, oldest first, as `(grant time ns, count)`: entries that have left a
    window are pruned at every write. Times are wall-clock ns of the writing process.
    """

    provider: str
    level_num: int
    level_den: int
    stamp_ns: int
    cooldown_until_ns: int = 0  # after a pacing error nothing is granted before this
    historical: list[tuple[int, int]] = []  # historical requests within the historical window
    identical: dict[str, int] = {}  # request key -> its last grant, within the identical interval
    per_contract: dict[str, list[tuple[int, int]]] = {}  # contract -> its requests in its window
