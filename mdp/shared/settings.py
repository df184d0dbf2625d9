"""One settings model for every process: defaults, overridden by `MDP_*` environment variables.

The operator's shared files (`data_providers.yaml`, `ingestion_policy.yaml`) are not settings of a
process: `mdp.shared.config` loads them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mdp.shared.contract.messages import interval_ns


class ProviderSettings(BaseModel):
    """Which adapters a provider process hosts, how it batches ticks, when a feed is silent."""

    adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="adapter names or module:Class to host, comma-separated; empty: every one",
    )
    host_ttl_s: float = Field(6.0, gt=0, description="a host record older than this is dead")

    batch_max_ticks: int = Field(1000, ge=1, le=100_000)
    batch_max_delay_ms: int = Field(
        100, ge=1, le=10_000, description="a partial batch waits at most this long (unstretched)"
    )
    batch_messages_per_s: float = Field(
        2000,
        ge=0,
        description="per job: the partial batches' delay stretches so that N symbols waiting "
        "send about this many batches per second (N / this s of delay); 0: off",
    )
    batch_stretch_max_ms: int = Field(
        250,
        ge=1,
        le=10_000,
        description="the stretched delay's ceiling; keep it well below the bars' grace_ms, or "
        "ticks arrive after their bar closed",
    )
    max_in_flight: int = Field(256, ge=1, description="unacknowledged publishes per provider")
    # A live feed that stays connected but delivers nothing (a stalled subscription) is as
    # broken as one that raises: after this much silence its breaker counts a `data_stopped`.
    data_stopped_after_s: float = Field(
        30.0, ge=0, description="a running live job silent this long counts a failure; 0: off"
    )

    @field_validator("adapters", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


class RouterSettings(BaseModel):
    """The router's own knobs; the source order and timing are the policy's `fallback`."""

    handover_batches: int = Field(
        64, ge=1, le=10_000, description="backup batches kept per symbol and source for a switch"
    )


class AggregatorSettings(BaseModel):
    """The aggregator's process knobs; bars and batching are the policy's (`bars`, `batching`)."""

    partition: int | None = Field(
        None, ge=0, description="consume only this quote partition (one replica per partition)"
    )
    gap_intervals: int = Field(
        10, ge=0, description="silent intervals before a gap event for a subscribed symbol; 0: off"
    )
    gap_interval: str = Field("", description="the interval gaps are counted in; default: smallest")
    checkpoint_interval_ms: int = Field(
        2000,
        ge=0,
        le=60_000,
        description="write the state at most this often (0: after every pulled batch); a restart "
        "folds again what came after the last one",
    )
    late_ticks_by_symbol: bool = Field(
        False,
        description="also count late ticks per symbol (mdp_aggregator_late_ticks_by_symbol_total;"
        " one series per symbol, so off by default)",
    )

    @field_validator("gap_interval")
    @classmethod
    def _gap_interval_parses(cls, value: str) -> str:
        if value:
            interval_ns(value)
        return value


class StreamSettings(BaseModel):
    """JetStream stream and bucket parameters, created idempotently at start."""

    replicas: int = Field(1, ge=1, le=5)
    raw_max_age_s: float = Field(3600, gt=0)
    quotes_max_age_s: float = Field(24 * 3600, gt=0)
    bars_max_age_s: float = Field(7 * 24 * 3600, gt=0)
    # Bytes as well as ages (at 50,000 ticks/s an hour of raw ticks is ~16 GB on disk). The
    # oldest messages go first, so a consumer further behind than this loses them; the server
    # reserves a stream's bytes against its `max_file_store` at creation, which fails when they
    # do not fit. Unlimited by default (ages only); the deployments set them.
    raw_max_bytes: int = Field(-1, ge=-1, description="-1: unlimited")
    quotes_max_bytes: int = Field(-1, ge=-1, description="-1: unlimited")
    bars_max_bytes: int = Field(-1, ge=-1, description="-1: unlimited (events, DLQ too)")
    # The server keeps every message id of the window in memory: at 1,000 symbols x 10 batches/s
    # a tick stream remembers 600,000 ids a minute. Ticks are republished only seconds
    # after the original (a publish retry, a standby taking a job over, a router restart; the
    # router and aggregator also drop repeated batch ids and seqs themselves), bars and events
    # also after an aggregator or store is restarted much later: hence two windows.
    tick_duplicate_window_s: float = Field(
        60, gt=0, description="MD_RAW and MD_QUOTES: how long a message id is remembered"
    )
    duplicate_window_s: float = Field(
        300, gt=0, description="every other stream: how long a message id is remembered"
    )
    quote_partitions: int = Field(
        1, ge=1, le=64, description="MD_QUOTES stores md.quotes.<p>.<sym> when above 1"
    )

    @model_validator(mode="after")
    def _windows_fit_the_ages(self) -> StreamSettings:
        # JetStream refuses a stream whose duplicate window is longer than its max age; said
        # here, by name, rather than as a server error on every start-up retry.
        for age, window in (
            ("raw_max_age_s", "tick_duplicate_window_s"),
            ("quotes_max_age_s", "tick_duplicate_window_s"),
            ("bars_max_age_s", "duplicate_window_s"),
        ):
            if getattr(self, age) < getattr(self, window):
                raise ValueError(
                    f"{age} ({getattr(self, age):g} s) is shorter than {window} "
                    f"({getattr(self, window):g} s): JetStream keeps a message id no longer "
                    "than the message; shorten the window too"
                )
        return self


class StoreSettings(BaseModel):
    """The store's ingest API, its http-mode forwarder and its writes: `MDP_STORE__*`."""

    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    http_token: str = Field("", description="bearer token the ingest API requires when set")
    forward_token: str = Field(
        "", description="bearer token sent to an external store_sync.http_url"
    )
    # SQLite: the busy timeout for the write lock; PostgreSQL: the statement timeout. A failed
    # attempt is retried with backoff, so a shorter timeout only makes an outage visible sooner.
    write_timeout_s: float = Field(30.0, gt=0, le=3600)
    # TimescaleDB only (mdp/services/store/timescale.py): how the bars hypertable ages.
    chunk_hours: float = Field(
        6, gt=0, le=24 * 30, description="chunk size; 6 h of 1 s bars is ~21,600 rows a symbol"
    )
    compress_after_days: float = Field(7, ge=0, description="compress older chunks; 0: never")
    retention_days: float = Field(
        365,
        ge=0,
        description="drop chunks older than this (the 5m/1h/1d rollups stay); 0: keep all",
    )

    @field_validator("retention_days")
    @classmethod
    def _retention_outlives_the_rollups(cls, value: float) -> float:
        # The 1d rollup refreshes the last 10 days: dropping them first would empty its buckets.
        if 0 < value <= 10:
            raise ValueError("retention_days must be 0 (keep all) or more than 10")
        return value


class ControlSettings(BaseModel):
    """The control service's HTTP facade: `MDP_CONTROL__HTTP_HOST`, `_PORT`, `_TOKEN`."""

    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    http_token: str = Field("", description="bearer token required when set")


class TracingSettings(BaseModel):
    """OpenTelemetry spans across hops (the `tracing` extra): `MDP_TRACING__*`, off by default."""

    enabled: bool = False
    endpoint: str = Field(
        "http://127.0.0.1:4318", description="OTLP/HTTP collector; spans go to <endpoint>/v1/traces"
    )
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of traces kept, by trace id")


class ReplaySettings(BaseModel):
    """Where a replay job may read its file: `MDP_REPLAY__ROOTS`, checked by control at start."""

    roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories replay paths must resolve into, colon- or comma-separated; "
        "empty: the working directory and MDP_DATA_DIR",
    )

    @field_validator("roots", mode="before")
    @classmethod
    def _separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in re.split(r"[:,]", value) if part.strip()]
        return value


class Settings(BaseSettings):
    """Everything a process reads at start; `MDP_AGGREGATOR__GRACE_MS=0` reaches nested fields."""

    model_config = SettingsConfigDict(
        env_prefix="MDP_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    nats_url: str = "nats://127.0.0.1:4222"
    store_url: str = "sqlite:///var/mdp.db"
    data_dir: Path = Path("var")
    config_dir: Path = Path("configs")
    metrics_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    encoding: Literal["json", "msgpack"] = "json"

    provider: ProviderSettings = ProviderSettings()
    router: RouterSettings = RouterSettings()
    aggregator: AggregatorSettings = AggregatorSettings()
    stream: StreamSettings = StreamSettings()
    store: StoreSettings = StoreSettings()
    control: ControlSettings = ControlSettings()
    replay: ReplaySettings = ReplaySettings()
    tracing: TracingSettings = TracingSettings()

    @field_validator("store_url")
    @classmethod
    def _store_url_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError(f"store URL {value!r} must start with sqlite:///PATH or postgresql://")
        return value

    def replay_roots(self) -> list[Path]:
        """The replay roots, absolute with symlinks resolved (default: cwd and the data dir)."""
        roots = self.replay.roots or [Path.cwd(), self.data_dir]
        return [Path(os.path.realpath(root.expanduser())) for root in roots]

    @property
    def content_type(self) -> str:
        """The Content-Type this process publishes with."""
        return "application/msgpack" if self.encoding == "msgpack" else "application/json"
