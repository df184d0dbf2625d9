"""The ibkr adapter's params: `ibkr.params` of data_providers.yaml and a job's `params`.

One model checks them everywhere (the providers file, control's start guard, the adapter), so
an error reads `ibkr: params.<key>: <problem>` or `<file>: ibkr.params.<key>: <problem>`, and
`MDP_PROVIDERS__IBKR__PARAMS__<KEY>` overrides a key as for any provider.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mdp.services.provider.adapters.base import AdapterParams

MarketDataName = Literal["live", "frozen", "delayed", "delayed_frozen"]
MARKET_DATA_TYPES: dict[str, int] = {"live": 1, "frozen": 2, "delayed": 3, "delayed_frozen": 4}
MARKET_DATA_NAMES: dict[int, str] = {n: name for name, n in MARKET_DATA_TYPES.items()}
CLIENT_ID_SPAN = 10  # client ids tried on 326 when `client_id_max` is not set


class IbkrParams(AdapterParams):
    """Where TWS / IB Gateway listens, what to ask it for, and when a feed counts as stopped."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(7497, ge=1, le=65535, description="7497/7496 TWS paper/live, 4002/4001 GW")
    client_id: int = Field(17, ge=0, description="the API client id; on 326 the next is tried")
    client_id_max: int | None = Field(
        None, ge=0, description="the last client id to try on 326 (unset: client_id + 9)"
    )
    market_data_type: MarketDataName | Literal[1, 2, 3, 4] = Field(
        "live", description="live, frozen, delayed or delayed_frozen (or IB's 1-4)"
    )
    tick_by_tick: bool = Field(
        False, description="AllLast + BidAsk tick-by-tick instead of reqMktData (capped by IB)"
    )
    quote_ticks: bool = Field(
        False, description="also a zero-size tick at the mid on every quote change (FX: always)"
    )
    account: str = Field("", description="the account ib_async syncs at connect; empty: none")
    readonly: bool = Field(True, description="connect read-only: this adapter places no orders")
    connect_timeout_s: float = Field(10.0, gt=0, le=300, allow_inf_nan=False)
    request_timeout_s: float = Field(10.0, gt=0, le=300, allow_inf_nan=False)
    reconnect_initial_s: float = Field(0.5, gt=0, le=60, allow_inf_nan=False)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    # The watchdog: a symbol is stale when its tick age passes `stale_factor` times its usual
    # tick interval, at least `stale_min_s`, at most `stale_max_s`, while its market is open.
    stale_factor: float = Field(20.0, ge=1, le=1000, allow_inf_nan=False)
    stale_min_s: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False)
    stale_max_s: float = Field(120.0, gt=0, le=86400, allow_inf_nan=False)
    probe_timeout_s: float = Field(
        5.0, gt=0, le=600, allow_inf_nan=False, description="a resubscription's wait for a tick"
    )
    market_hours: bool = Field(
        True, description="watch a symbol only while its exchange is open (false: always)"
    )
    contract_cache_days: float = Field(
        7.0, ge=0, le=366, allow_inf_nan=False, description="re-qualify older cache entries"
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if any(c.isspace() for c in value) or "/" in value:
            raise ValueError("must be a host name or an IP address (no scheme, path or blank)")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> IbkrParams:
        if self.client_id_max is not None and self.client_id_max < self.client_id:
            raise ValueError(
                f"client_id_max ({self.client_id_max}) is below client_id ({self.client_id})"
            )
        if self.stale_min_s > self.stale_max_s:
            raise ValueError(
                f"stale_min_s ({self.stale_min_s}) is above stale_max_s ({self.stale_max_s})"
            )
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_initial_s ({self.reconnect_initial_s}) is above reconnect_max_s "
                f"({self.reconnect_max_s})"
            )
        return self

    @property
    def market_data_code(self) -> int:
        """IB's number for the requested market data type (1 live .. 4 delayed frozen)."""
        value = self.market_data_type
        return value if isinstance(value, int) else MARKET_DATA_TYPES[value]

    @property
    def market_data_name(self) -> str:
        """The requested market data type by name."""
        return MARKET_DATA_NAMES[self.market_data_code]

    @property
    def client_ids(self) -> range:
        """The client ids to try, in order, when the gateway answers 326."""
        last = (
            self.client_id + CLIENT_ID_SPAN - 1
            if self.client_id_max is None
            else self.client_id_max
        )
        return range(self.client_id, last + 1)
