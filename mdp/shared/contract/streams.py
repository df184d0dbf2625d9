"""The streams and KV buckets of the contract, with this deployment's limits (pure)."""

from __future__ import annotations

from typing import Protocol

from nats.js.api import (
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)

from mdp.shared.contract import names


class StreamLimits(Protocol):
    """What a deployment chooses (`Settings.stream`): replicas, ages, dedup window, partitions."""

    @property
    def replicas(self) -> int: ...
    @property
    def raw_max_age_s(self) -> float: ...
    @property
    def quotes_max_age_s(self) -> float: ...
    @property
    def bars_max_age_s(self) -> float: ...
    @property
    def raw_max_bytes(self) -> int: ...
    @property
    def quotes_max_bytes(self) -> int: ...
    @property
    def bars_max_bytes(self) -> int: ...
    @property
    def tick_duplicate_window_s(self) -> float: ...
    @property
    def duplicate_window_s(self) -> float: ...
    @property
    def quote_partitions(self) -> int: ...


def stream_configs(limits: StreamLimits) -> list[StreamConfig]:
    """Every stream of the contract."""

    ticks = (names.STREAM_RAW, names.STREAM_QUOTES)

    def stream(name: str, subject: str, **extra: object) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            storage=StorageType.FILE,
            num_replicas=limits.replicas,
            duplicate_window=(
                limits.tick_duplicate_window_s if name in ticks else limits.duplicate_window_s
            ),
            **extra,  # type: ignore[arg-type]
        )

    # name, subjects, max age, max bytes: what is kept, and for how long
    kept = [
        (names.STREAM_RAW, names.RAW_ALL, limits.raw_max_age_s, limits.raw_max_bytes),
        (names.STREAM_QUOTES, names.QUOTES_SYMBOLS, limits.quotes_max_age_s,
         limits.quotes_max_bytes),
        (names.STREAM_BARS, names.BARS_ALL, limits.bars_max_age_s, limits.bars_max_bytes),
        (names.STREAM_EVENTS, names.EVENTS_ALL, limits.bars_max_age_s, limits.bars_max_bytes),
        (names.STREAM_DLQ, names.DLQ_ALL, limits.bars_max_age_s, limits.bars_max_bytes),
    ]  # fmt: skip
    transforms = {names.STREAM_QUOTES: quote_partitioning(limits.quote_partitions)}
    streams = [
        stream(name, subject, max_age=age, max_bytes=size, subject_transform=transforms.get(name))
        for name, subject, age, size in kept
    ]
    # A work queue: the store's backlog while it is down; never discarded (publishers wait).
    streams.insert(
        3,
        stream(names.STREAM_STORE_SYNC, names.STORE_SYNC_ALL, retention=RetentionPolicy.WORK_QUEUE),
    )
    return streams


def quote_partitioning(partitions: int) -> SubjectTransform | None:
    """Store `md.quotes.<sym>` as `md.quotes.<p>.<sym>`, p = FNV-1a(token) mod N (server side).

    One consumer per partition then sees every tick of its symbols, in order; subscribers of
    the core subject `md.quotes.<sym>` are unaffected.
    """
    if partitions <= 1:
        return None
    return SubjectTransform(
        src=names.QUOTES_SYMBOLS,
        dest=f"md.quotes.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
    )


def bucket_configs(limits: StreamLimits) -> list[KeyValueConfig]:
    """Every KV bucket of the contract."""
    return [
        KeyValueConfig(
            bucket=bucket, history=history, storage=StorageType.FILE, replicas=limits.replicas
        )
        for bucket, history in ((names.KV_JOBS, 5), (names.KV_STATE, 5), (names.KV_CHECKPOINTS, 1))
    ]
