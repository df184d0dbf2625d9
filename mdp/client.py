"""The client API for other Python services: control requests and the quote and bar feeds.

`PipelineRuntime` hides subjects, symbol escaping, JetStream consumers and reconnects::

    async with PipelineRuntime("nats://127.0.0.1:4222") as rt:
        await rt.start("synthetic", symbols=["AAPL"], params={"rate": 100})
        async for batch in rt.stream_quotes(["AAPL", "BRK.B"]):
            ...

The feeds read the `MD_QUOTES` and `MD_BARS` streams through JetStream pull consumers, so they
survive reconnects and server restarts. Without `durable` the consumer is ordered: ephemeral,
unacknowledged, and re-created from the last stream sequence seen whenever it is lost (a
server restart, a gap in deliveries). With `durable` it is a durable pull consumer of that
name with explicit acks: an item is acked once the caller has taken it (asked for the next one
or closed the iterator), so a caller that restarts resumes where it left off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mdp.shared.contract import names
from mdp.shared.contract.codec import Codec, DecodeError
from mdp.shared.contract.control import (
    ErrorReply,
    ReloadReply,
    ResetReply,
    ResetRequest,
    StartReply,
    StartRequest,
    StatusReply,
    StopReply,
    StopRequest,
)
from mdp.shared.contract.messages import Bar, TickBatch, interval_ns
from mdp.shared.tasks import cancellable

__all__ = ["ControlRequestError", "PipelineRuntime", "read_bars", "read_bars_async"]

log = logging.getLogger("mdp.client")

T = TypeVar("T")
R = TypeVar("R", StartReply, StopReply, StatusReply, ReloadReply, ResetReply)

DEFAULT_URL = "nats://127.0.0.1:4222"


class ControlRequestError(Exception):
    """A control request the service refused: `code` is the stable error code."""

    def __init__(self, code: str, message: str, subject: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.subject = subject


class _Ok(msgspec.Struct):
    """Just the `ok` flag of a reply."""

    ok: bool = False


_OK = msgspec.json.Decoder(_Ok)
_ERROR = msgspec.json.Decoder(ErrorReply)
_TICK_BATCH: Codec[TickBatch] = Codec(TickBatch)
_BAR: Codec[Bar] = Codec(Bar)
_NATS_TRANSIENT = (nats.errors.Error, OSError, asyncio.TimeoutError)


class PipelineRuntime:
    """A connection to a running mdp system: control requests and the quote and bar feeds."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        name: str = "mdp-client",
        request_timeout: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.name = name
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._closing = False
        self._feeds: set[_Feed] = set()

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect with unlimited reconnects (called by `async with`)."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %r", exc)

        async def on_disconnected() -> None:
            if not self._closing:
                log.warning("disconnected from NATS, reconnecting")

        async def on_reconnected() -> None:
            log.info("reconnected to NATS")

        self._closing = False
        self._nc = await cancellable(  # a cancel mid-connect is never lost
            nats.connect(
                servers=self.servers,
                name=self.name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=self.connect_timeout,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        )
        self._js = self._nc.jetstream()

    async def close(self) -> None:
        """End the feeds (their iterators finish) and close the connection."""
        self._closing = True
        for feed in list(self._feeds):  # iterators left suspended (a `break` does not close)
            await feed.close()
        self._feeds.clear()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=2)
            await nc.close()

    async def __aenter__(self) -> PipelineRuntime:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def nc(self) -> NATS:
        """The underlying NATS connection."""
        if self._nc is None:
            raise RuntimeError("PipelineRuntime is not connected: use `async with` or connect()")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the connection."""
        if self._js is None:
            raise RuntimeError("PipelineRuntime is not connected: use `async with` or connect()")
        return self._js

    # -- control ---------------------------------------------------------------------------

    async def start(
        self,
        provider: str,
        symbols: Sequence[str] | None = None,
        params: dict[str, object] | None = None,
        job: str = "default",
        dry_run: bool | None = None,
    ) -> StartReply:
        """Start (or declare) a job: `ingest.control.start`."""
        request = StartRequest(
            provider=provider,
            symbols=list(symbols) if symbols is not None else None,
            dry_run=dry_run,
            job=job,
            params=dict(params or {}),
        )
        return await self._request("start", msgspec.json.encode(request), StartReply)

    async def stop(self, job: str = "default", reason: str = "operator_request") -> StopReply:
        """Stop a job: `ingest.control.stop`."""
        body = msgspec.json.encode(StopRequest(job=job, reason=reason))
        return await self._request("stop", body, StopReply)

    async def status(self) -> StatusReply:
        """Jobs, providers, policy and recent stops: `ingest.control.status`."""
        return await self._request("status", b"", StatusReply)

    async def reload(self) -> ReloadReply:
        """Re-read the configuration files: `ingest.control.reload`."""
        return await self._request("reload", b"", ReloadReply)

    async def reset(self, provider: str) -> ResetReply:
        """Close a provider's circuit breaker by hand: `ingest.control.reset`."""
        body = msgspec.json.encode(ResetRequest(provider=provider))
        return await self._request("reset", body, ResetReply)

    async def _request(self, verb: str, body: bytes, typ: type[R]) -> R:
        """Send one control request and decode its reply; raise on an error or no reply."""
        subject = names.control(verb)
        try:
            msg = await self.nc.request(subject, body, timeout=self.request_timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TimeoutError(
                f"no reply on {subject} within {self.request_timeout} s "
                f"({type(exc).__name__}): is the control service running?"
            ) from exc
        try:
            if not _OK.decode(msg.data).ok:
                error = _ERROR.decode(msg.data).error
                raise ControlRequestError(error.code, error.message, subject)
            return msgspec.json.decode(msg.data, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ControlRequestError(
                "invalid_reply", f"reply on {subject} does not decode: {exc}", subject
            ) from exc

    # -- feeds -----------------------------------------------------------------------------

    def stream_quotes(
        self,
        symbols: Sequence[str],
        durable: str | None = None,
        since_ns: int | None = None,
    ) -> AsyncIterator[TickBatch]:
        """Tick batches of `symbols` from `MD_QUOTES`: new ones unless resumed or `since_ns`."""
        filters: list[str] = []
        for symbol in _unique(symbols):
            subject = names.quotes(symbol)  # md.quotes.<token>
            # With quote partitioning (MDP_STREAM__QUOTE_PARTITIONS > 1) the stream stores
            # md.quotes.<p>.<token>; `*` stands for the partition. Both filters are always
            # given (they never overlap), so the feed works with and without partitions and
            # across a change of the partition count.
            prefix, token = subject.rsplit(".", 1)
            filters += [subject, f"{prefix}.*.{token}"]
        return self._consume(names.STREAM_QUOTES, filters, _TICK_BATCH, durable, since_ns, None)

    def stream_bars(
        self,
        symbols: Sequence[str],
        interval: str,
        durable: str | None = None,
        since_ns: int | None = None,
    ) -> AsyncIterator[Bar]:
        """Bars of `symbols` from `MD_BARS`, only the highest `rev` of each bar yielded."""
        interval_ns(interval)  # ValueError for an interval that cannot be a bar spec
        filters = [names.bars(interval, symbol) for symbol in _unique(symbols)]
        return self._consume(
            names.STREAM_BARS, filters, _BAR, durable, since_ns, _highest_rev_only()
        )

    async def _consume(
        self,
        stream: str,
        filters: list[str],
        codec: Codec[T],
        durable: str | None,
        since_ns: int | None,
        keep: Callable[[T], bool] | None,
    ) -> AsyncIterator[T]:
        """Decode and yield a consumer's messages; ack each once the caller has taken it."""
        if not filters:
            raise ValueError("at least one symbol is needed")
        feed = _Feed(self, stream, filters, durable, since_ns)
        await feed.open()
        self._feeds.add(feed)
        try:
            while not self._closing:
                feed.pending = await feed.next_batch()
                while feed.pending and not self._closing:
                    msg = feed.pending.pop(0)
                    try:
                        item = codec.decode(msg.data, msg.headers)
                    except DecodeError as exc:
                        log.warning("skipping undecodable message on %s: %s", msg.subject, exc)
                        await feed.ack(msg)
                        continue
                    if keep is not None and not keep(item):
                        await feed.ack(msg)
                        continue
                    # Taken once yielded: acked when the caller asks for the next item, closes
                    # the iterator, or closes the runtime (even after a bare `break`).
                    feed.taken = msg
                    yield item
                    feed.taken = None
                    await feed.ack(msg)
        finally:
            self._feeds.discard(feed)
            await feed.close()


def _unique(symbols: Sequence[str]) -> list[str]:
    """Symbols de-duplicated in order; a bare string is refused (it would iterate letters)."""
    if isinstance(symbols, str):
        raise TypeError("symbols must be a list of symbols, not one string")
    return list(dict.fromkeys(symbols))


def _highest_rev_only(limit: int = 200_000) -> Callable[[Bar], bool]:
    """A filter passing a bar only if its rev is above every rev seen for its identity."""
    seen: dict[tuple[str, str, int], int] = {}

    def keep(bar: Bar) -> bool:
        key = (bar.symbol, bar.interval, bar.start)
        previous = seen.get(key)
        if previous is not None and bar.rev <= previous:
            return False
        seen[key] = bar.rev
        if len(seen) > limit:  # forget the oldest identities (long closed)
            for old in list(seen)[: limit // 10]:
                del seen[old]
        return True

    return keep


class _Feed:
    """One pull consumer of the client, re-created or re-bound whenever the server lost it."""

    BATCH = 256
    EXPIRES_S = 1.0
    CHECK_IDLE_S = 3.0  # while idle, check this often that the consumer still exists
    ACK_WAIT_S = 30.0
    INACTIVE_S = 60.0  # an ephemeral consumer the client lost goes away after this

    def __init__(
        self,
        rt: PipelineRuntime,
        stream: str,
        filters: list[str],
        durable: str | None,
        since_ns: int | None,
    ) -> None:
        self.rt = rt
        self.stream = stream
        self.filters = filters
        self.durable = durable
        self.since_ns = since_ns
        self.name = durable or f"mdp-client-{uuid.uuid4().hex[:16]}"
        self.sub: JetStreamContext.PullSubscription | None = None
        self.start_seq = 0  # ephemeral: the first stream sequence wanted
        self.last_seq = 0  # the last stream sequence handed over
        self.last_cseq = 0  # ephemeral: the last consumer sequence (gap detection)
        self.checked_at = time.monotonic()
        self.taken: Msg | None = None  # yielded to the caller, not yet acked
        self.pending: list[Msg] = []  # fetched, not yet yielded
        self.closed = False

    async def open(self) -> None:
        """Create or bind the consumer (ephemeral: from the stream's end unless `since_ns`)."""
        if self.durable is None and self.since_ns is None:
            info = await self.rt.js.stream_info(self.stream)
            self.start_seq = info.state.last_seq + 1
        await self._create()

    def _config(self) -> ConsumerConfig:
        extra: dict[str, object] = {}
        if self.durable is not None:
            extra = {
                "durable_name": self.durable,
                "ack_policy": AckPolicy.EXPLICIT,
                "ack_wait": self.ACK_WAIT_S,
                "max_ack_pending": 4 * self.BATCH,
            }
        else:
            extra = {
                "name": self.name,
                "ack_policy": AckPolicy.NONE,
                "inactive_threshold": self.INACTIVE_S,
                "mem_storage": True,
                "num_replicas": 1,
            }
        if self.durable is None and (self.last_seq or self.start_seq):
            start: dict[str, object] = {
                "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": self.last_seq + 1 if self.last_seq else self.start_seq,
            }
        elif self.since_ns is not None:
            start = {
                "deliver_policy": DeliverPolicy.BY_START_TIME,
                "opt_start_time": datetime.fromtimestamp(self.since_ns / 1e9, tz=UTC),
            }
        else:
            start = {"deliver_policy": DeliverPolicy.NEW}
        return ConsumerConfig(
            filter_subjects=list(self.filters),
            max_waiting=16,
            **start,  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )

    async def _create(self) -> None:
        js = self.rt.js
        if self.durable is not None:
            try:
                info = await js.consumer_info(self.stream, self.durable)
            except nats.js.errors.NotFoundError:
                await js.add_consumer(self.stream, self._config())
            else:  # resume where it is; only follow a change of symbols
                existing = info.config.filter_subjects or [info.config.filter_subject or ""]
                if sorted(existing) != sorted(self.filters):
                    config = info.config
                    config.filter_subject = None
                    config.filter_subjects = list(self.filters)
                    await js.add_consumer(self.stream, config)
        else:
            self.name = f"mdp-client-{uuid.uuid4().hex[:16]}"
            await js.add_consumer(self.stream, self._config())
            self.last_cseq = 0
        self.sub = await js.pull_subscribe_bind(durable=self.name, stream=self.stream)
        self.checked_at = time.monotonic()

    async def _recreate(self, why: str) -> None:
        log.info("consumer %s on %s lost (%s): re-creating", self.name, self.stream, why)
        await self._drop_sub(delete=self.durable is None)
        try:
            await self._create()
        except _NATS_TRANSIENT as exc:
            log.info("re-creating consumer failed (%r), retrying", exc)
            self.sub = None
            await asyncio.sleep(0.25)

    async def next_batch(self) -> list[Msg]:
        """The next messages (maybe none after a short wait); never raises on a lost server."""
        if self.sub is None:
            await self._recreate("no consumer")
            return []
        try:
            msgs = await self.sub.fetch(self.BATCH, timeout=self.EXPIRES_S)
        except nats.errors.TimeoutError:
            if time.monotonic() - self.checked_at > self.CHECK_IDLE_S:
                await self._check()
            return []
        except (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError) as exc:
            await self._recreate(type(exc).__name__)  # the server forgot it (a restart)
            return []
        except _NATS_TRANSIENT:
            if self.rt._closing:
                return []
            await asyncio.sleep(0.25)
            return []
        self.checked_at = time.monotonic()
        return await self._in_order(msgs)

    async def _check(self) -> None:
        self.checked_at = time.monotonic()
        try:
            await self.rt.js.consumer_info(self.stream, self.name)
        except nats.js.errors.NotFoundError:
            await self._recreate("not found")
        except _NATS_TRANSIENT:
            pass

    async def _in_order(self, msgs: list[Msg]) -> list[Msg]:
        """Drop what was handed over already; an ephemeral consumer restarts over a gap."""
        fresh: list[Msg] = []
        for msg in msgs:
            meta = msg.metadata
            if self.durable is None:
                if meta.sequence.consumer != self.last_cseq + 1:
                    await self._recreate(f"delivery gap after {self.last_cseq}")
                    break
                self.last_cseq = meta.sequence.consumer
            if meta.sequence.stream <= self.last_seq:
                await self.ack(msg)
                continue
            self.last_seq = meta.sequence.stream
            fresh.append(msg)
        return fresh

    async def ack(self, msg: Msg, sync: bool = False) -> None:
        """Acknowledge one message (durable consumers only); best effort."""
        if self.durable is None:
            return
        with contextlib.suppress(Exception):
            if sync:
                await msg.ack_sync(timeout=2)
            else:
                await msg.ack()

    async def nak(self, msgs: list[Msg]) -> None:
        """Hand messages not taken back to a durable consumer at once."""
        if self.durable is None:
            return
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _drop_sub(self, delete: bool) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if delete and self.rt._js is not None:
            with contextlib.suppress(Exception):
                await self.rt.js.delete_consumer(self.stream, self.name)

    async def close(self) -> None:
        """Ack what was taken, hand back what was not; delete an ephemeral consumer (once)."""
        if self.closed:
            return
        self.closed = True
        taken, self.taken = self.taken, None
        pending, self.pending = self.pending, []
        if taken is not None:
            await self.ack(taken, sync=True)
        await self.nak(pending)
        await self._drop_sub(delete=self.durable is None)


# -- stored bars as a DataFrame -----------------------------------------------------------------


async def read_bars_async(
    store_url: str,
    symbol: str | None = None,
    interval: str | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
) -> Any:
    """`read_bars` for code already inside an event loop."""
    from mdp.export import columns, parse_time, require
    from mdp.services.store.writers import stream_bars

    pd = require("pandas", "pandas")
    start_ns = parse_time(start) if isinstance(start, str) else start
    end_ns = parse_time(end) if isinstance(end, str) else end
    parts = []
    async with contextlib.aclosing(
        stream_bars(store_url, symbol, interval, start_ns, end_ns)
    ) as chunks:
        async for bars in chunks:
            # One small frame per chunk: never a list of every Bar object at once.
            parts.append(pd.DataFrame(columns(bars)))
    frame = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame({name: [] for name in columns([])})
    )
    frame["start_utc"] = pd.to_datetime(frame["start_utc"].astype("int64"), unit="ns", utc=True)
    frame["vwap"] = frame["vwap"].astype("float64")  # None (no volume) becomes NaN
    return frame


def read_bars(
    store_url: str,
    symbol: str | None = None,
    interval: str | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
) -> Any:
    """Stored bars as a pandas DataFrame (`pip install 'mdp[pandas]'`), `start <= bar start <
    end` (ISO 8601 UTC or ns), ordered by symbol, interval, start; columns as `mdp bars export`.
    """
    coro = read_bars_async(store_url, symbol, interval, start, end)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from a running loop (a notebook): run it on a loop of its own in a thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
