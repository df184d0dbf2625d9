"""KV helpers: list keys, follow values as they change (decoded into typed records)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError
from structlog.typing import FilteringBoundLogger


async def kv_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """Keys of a bucket starting with `prefix`, deleted ones included (`get` tells them apart).

    Read from the stream's subject list, not `KeyValue.keys()`, whose end-of-initial-values
    marker races with delivery under load and can report an empty bucket.
    """
    stream_prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{stream_prefix}{prefix}>")
    return sorted(subject[len(stream_prefix) :] for subject in info.state.subjects or {})


T = TypeVar("T")


async def follow(
    kv: KeyValue, typ: type[T], log: FilteringBoundLogger, key: str = ">"
) -> AsyncIterator[tuple[str, T | None]]:
    """Every value of `key` (a KV key or pattern) now and after each change, decoded as `typ`.

    `typ` is a msgspec type, or a pydantic model (decoded with `model_validate_json`).

    Yields `(key, value)`, with `None` for a deleted key. A value that does not decode is
    logged and skipped: one bad write must not stop a service following its bucket.
    """
    watcher = await kv.watch(key)
    async for entry in watcher:
        if entry is None:
            continue  # the end of the initial values
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            yield entry.key, None
            continue
        try:
            value = (
                typ.model_validate_json(entry.value)
                if issubclass(typ, BaseModel)
                else msgspec.json.decode(entry.value, type=typ)
            )
        except (msgspec.DecodeError, ValidationError) as exc:
            log.error("bad_kv_value", key=entry.key, type=typ.__name__, error=str(exc))
            continue
        yield entry.key, value
