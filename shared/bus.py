"""Bus helpers: connection, streams and buckets, a windowed JetStream publisher, a pull consumer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from shared import subjects
from shared.metrics import DEAD_LETTERS, PUBLISH_RETRIES
from shared.settings import Settings

MSG_ID = "Nats-Msg-Id"
DLQ_REASON = "Mdp-Dlq-Reason"
DLQ_SUBJECT = "Mdp-Dlq-Subject"
DLQ_SERVICE = "Mdp-Dlq-Service"
CLOCK_RATE = "Mdp-Clock-Rate"
END_OF_STREAM = "Mdp-End-Of-Stream"
DRY_RUN = "Mdp-Dry-Run"
RUN = "Mdp-Run"
PRODUCER = "Mdp-Producer"  # which process instance published a bar
POLICY_KEY = "policy"

KV_JOBS = "ingest_jobs"
KV_STATE = "ingest_state"
KV_CHECKPOINTS = "mdp_checkpoints"


# ---------------------------------------------------------------------------------------------
# Connection


async def connect(
    settings: Settings, name: str, log: Any, on_disconnect: Callable[[], None] | None = None
) -> NATS:
    """Connect with unlimited reconnects, logging callbacks and a per-service inbox prefix."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    async def on_disconnected() -> None:
        if on_disconnect is not None:
            on_disconnect()
        if not nc.is_draining and not nc.is_closed:
            log.warning("nats_disconnected")

    async def on_reconnected() -> None:
        log.info("nats_reconnected", url=str(nc.connected_url.netloc if nc.connected_url else ""))

    async def on_closed() -> None:
        log.info("nats_closed")

    nc = await nats.connect(
        servers=[u.strip() for u in settings.nats_url.split(",")],
        name=f"mdp-{name}",
        inbox_prefix=f"_INBOX.mdp-{name}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        closed_cb=on_closed,
        pending_size=64 * 1024 * 1024,
    )
    return nc


# ---------------------------------------------------------------------------------------------
# Streams and buckets: created idempotently by whoever starts.


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """Every stream of the contract with this deployment's limits."""
    s = settings.stream
    common: dict[str, Any] = {
        "storage": StorageType.FILE,
        "num_replicas": s.replicas,
        "duplicate_window": s.duplicate_window_s,
    }
    return [
        StreamConfig(name="MD_RAW", subjects=["md.raw.>"], max_age=s.raw_max_age_s, **common),
        StreamConfig(
            name="MD_QUOTES",
            subjects=["md.quotes.*"],
            max_age=s.quotes_max_age_s,
            subject_transform=quote_partitioning(s.quote_partitions),
            **common,
        ),
        StreamConfig(name="MD_BARS", subjects=["md.bars.>"], max_age=s.bars_max_age_s, **common),
        StreamConfig(
            name="STORE_SYNC",
            subjects=["store.sync.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,
        ),
        StreamConfig(
            name="MD_EVENTS", subjects=["ingest.events.>"], max_age=s.bars_max_age_s, **common
        ),
        StreamConfig(name="MD_DLQ", subjects=["md.dlq.>"], max_age=s.bars_max_age_s, **common),
    ]


def quote_partitioning(partitions: int) -> SubjectTransform | None:
    """Store `md.quotes.<sym>` as `md.quotes.<p>.<sym>`, p = FNV-1a(token) mod N (server side).

    One consumer per partition then sees every tick of its symbols, in order; subscribers of
    the core subject `md.quotes.<sym>` are unaffected.
    """
    if partitions <= 1:
        return None
    return SubjectTransform(
        src="md.quotes.*", dest=f"md.quotes.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"
    )


def quote_filter(partition: int | None) -> str:
    """The MD_QUOTES filter subject of one partition (or of all)."""
    return "md.quotes.>" if partition is None else f"md.quotes.{partition}.*"


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create every stream, or bring an existing one to this configuration."""
    for config in stream_configs(settings):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


async def ensure_buckets(js: JetStreamContext, settings: Settings) -> None:
    """Create the KV buckets of the contract if they are missing."""
    for bucket, history in ((KV_JOBS, 5), (KV_STATE, 5), (KV_CHECKPOINTS, 1)):
        try:
            await js.key_value(bucket)
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            with contextlib.suppress(BadRequestError):
                await js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        history=history,
                        storage=StorageType.FILE,
                        replicas=settings.stream.replicas,
                    )
                )


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
    kv: KeyValue, typ: type[T], log: Any, key: str = ">"
) -> AsyncIterator[tuple[str, T | None]]:
    """Every value of `key` (a KV key or pattern) now and after each change, decoded.

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
            yield entry.key, msgspec.json.decode(entry.value, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("bad_kv_value", key=entry.key, type=typ.__name__, error=str(exc))


# ---------------------------------------------------------------------------------------------
# Publishing: a window of in-flight acks on one inbox, retries with the same Nats-Msg-Id.


@dataclass(slots=True)
class _InFlight:
    subject: str
    data: bytes
    headers: dict[str, str] | None
    sent: float


class JsPublisher:
    """JetStream publishes without awaiting each ack: a bounded window, `flush()` awaits all.

    A publish that fails (error ack, no responders during an election, or no ack within
    `ack_timeout`) is sent again with the same headers, so `Nats-Msg-Id` makes it idempotent.
    """

    def __init__(
        self, nc: NATS, max_in_flight: int = 1024, ack_timeout: float = 5.0, log: Any = None
    ) -> None:
        self._nc = nc
        self._max = max_in_flight
        self._ack_timeout = ack_timeout
        self._log = log
        self._ids = itertools.count(1)
        self._pending: dict[int, _InFlight] = {}
        self._resync = False
        self._resync_pause = 0.0
        self._order = asyncio.Lock()
        self._changed = asyncio.Event()
        self._prefix = ""
        self._sub: Any = None

    async def start(self) -> None:
        """Subscribe to the ack inbox."""
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_ack)

    @property
    def in_flight(self) -> int:
        """Publishes sent and not yet acknowledged."""
        return len(self._pending)

    def disconnected(self) -> None:
        """Called on a disconnect: in-flight messages must go again, in order, before new ones.

        nats-py keeps unsent commands across a reconnect and sends them first; ours among them
        would then overtake older in-flight messages lost with the socket. So ours are taken
        out of its buffer here (they are all still tracked in `_pending`) and resent in order.
        """
        self._resync = True
        buffer = getattr(self._nc, "_pending", None)
        if not isinstance(buffer, list) or not self._prefix:
            return
        marker = f" {self._prefix}.".encode()
        kept = [cmd for cmd in buffer if not (cmd[:5] == b"HPUB " and marker in cmd[:512])]
        if len(kept) != len(buffer):
            removed = sum(len(cmd) for cmd in buffer) - sum(len(cmd) for cmd in kept)
            buffer[:] = kept
            self._nc._pending_data_size = max(0, self._nc._pending_data_size - removed)

    async def _resync_in_order(self) -> None:
        """After a reconnect, resend every unacknowledged message in its original order.

        New messages wait until then: otherwise they could be stored before older ones lost
        in the outage, and a symbol's ticks would reach the stream out of order.
        """
        if self._resync_pause:
            await asyncio.sleep(self._resync_pause)
            self._resync_pause = 0.0
        while not self._nc.is_connected:  # noqa: ASYNC110 (nats-py offers no event for it)
            await asyncio.sleep(0.05)
        self._resync = False
        now = time.monotonic()
        for token in sorted(self._pending):
            item = self._pending[token]
            item.sent = now
            PUBLISH_RETRIES.inc()
            await self._nc.publish(
                item.subject, item.data, reply=f"{self._prefix}.{token}", headers=item.headers
            )

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Send one message; waits only while the window is full or the connection is down.

        Concurrent callers are served first come, first served (the lock is FIFO), so the
        order of calls is the order in the stream, outages included.
        """
        async with self._order:
            if self._resync or not self._nc.is_connected:
                self._resync = True
                await self._resync_in_order()
            while len(self._pending) >= self._max:
                await self._wait_progress()
            token = next(self._ids)
            self._pending[token] = _InFlight(subject, data, headers, time.monotonic())
            await self._nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=headers)

    async def flush(self) -> None:
        """Return once every message published so far is stored by its stream."""
        while self._pending:
            await self._wait_progress()

    async def _wait_progress(self) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=0.5)
        await self._resend_due()

    async def _resend_due(self) -> None:
        if self._resync:
            await self._resync_in_order()
            return
        now = time.monotonic()
        overdue = [t for t, item in self._pending.items() if now - item.sent > self._ack_timeout]
        if overdue and self._nc.is_connected:
            # Resend from the oldest overdue message on, keeping the original order.
            first = min(overdue)
            for token in sorted(t for t in self._pending if t >= first):
                item = self._pending[token]
                item.sent = now
                PUBLISH_RETRIES.inc()
                await self._nc.publish(
                    item.subject, item.data, reply=f"{self._prefix}.{token}", headers=item.headers
                )

    async def _on_ack(self, msg: Msg) -> None:
        token = int(msg.subject.rpartition(".")[2])
        if token not in self._pending:
            return
        failed = (msg.headers is not None and msg.headers.get("Status") in ("503", "408")) or (
            b'"error"' in msg.data
        )
        if failed:
            # Stream unavailable (restart, leader election): pause new publishes and resend
            # everything unacknowledged in order, so later messages cannot overtake this one.
            if self._log is not None and not self._resync:
                self._log.warning(
                    "publish_rejected", subject=self._pending[token].subject, ack=msg.data[:200]
                )
            self._resync = True
            self._resync_pause = 0.25
        else:
            del self._pending[token]
        self._changed.set()

    async def close(self) -> None:
        """Stop listening for acks."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


# ---------------------------------------------------------------------------------------------
# Consuming: a hand-written pull loop (no `fetch()`), batch handler, ack after the handler.


def _ack_tokens(msg: Msg) -> list[str]:
    # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>
    #     .<pending>[.<token>]: normalised here to the v1 positions.
    tokens = msg.reply.split(".")
    return tokens if len(tokens) == 9 else tokens[:2] + tokens[4:11]


def stream_sequence(msg: Msg) -> int:
    """The stream sequence of a JetStream message, read from its ack subject."""
    return int(_ack_tokens(msg)[5])


def consumer_sequence(msg: Msg) -> int:
    """The consumer's delivery sequence of a JetStream message (one more per delivery)."""
    return int(_ack_tokens(msg)[6])


BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class StopConsuming(Exception):
    """Raised by a handler that must stop at once without acking (e.g. it was fenced off)."""


@dataclass
class PullConsumer:
    """A durable pull consumer driven by its own loop: pull, hand a batch over, then ack.

    With `AckPolicy.ALL` only the last message of a processed batch is acked. A handler that
    raises is retried with the same batch after a backoff (nothing newer is pulled meanwhile,
    which is the backpressure). Redelivered messages already processed are skipped by sequence.
    """

    nc: NATS
    js: JetStreamContext
    stream: str
    durable: str
    filter_subjects: Sequence[str]
    handler: BatchHandler
    log: Any
    batch: int = 256
    ack_policy: AckPolicy = AckPolicy.ALL
    ack_wait: float = 60.0
    max_ack_pending: int = 4096
    expires: float = 2.0
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _buffer: list[Msg] = field(default_factory=list, init=False)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _outstanding: int = field(default=0, init=False)
    _last_seq: int = field(default=0, init=False)
    _last_cseq: int | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)

    async def ensure(self, start_seq: int | None = None) -> None:
        """Create (or update) the durable consumer."""
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=self.ack_policy,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            max_waiting=64,
            deliver_policy=(DeliverPolicy.BY_START_SEQUENCE if start_seq else DeliverPolicy.ALL),
            opt_start_seq=start_seq,
            **(
                {"filter_subject": self.filter_subjects[0]}
                if len(self.filter_subjects) == 1
                else {"filter_subjects": list(self.filter_subjects)}
            ),
        )
        await self.js.add_consumer(self.stream, config)

    async def rewind(self, seq: int | None = None) -> None:
        """Redeliver from stream sequence `seq` (default: after the ack floor) at once.

        Without it a restarted instance would wait `ack_wait` for what its predecessor had in
        hand, and meanwhile receive (and, with AckAll, acknowledge past) newer messages.
        """
        await self.js.reset_consumer(self.stream, self.durable, seq=seq)
        self._last_cseq = 0  # deliveries restart at 1
        if seq is not None:
            self._last_seq = seq - 1

    async def start(self) -> None:
        """Start pulling."""
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
        self._task = asyncio.create_task(self._run(), name=f"pull-{self.durable}")

    async def stop(self) -> None:
        """Finish the batch in hand, then stop pulling."""
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers is not None and "Status" in headers and not msg.reply:
            status = headers["Status"]
            if status != "100":  # 404/408/409: this pull request is over
                pending = headers.get("Nats-Pending-Messages")
                self._outstanding = max(0, self._outstanding - int(pending)) if pending else 0
                self._arrived.set()
            return
        self._outstanding = max(0, self._outstanding - 1)
        self._buffer.append(msg)
        self._arrived.set()

    async def _pull(self) -> None:
        want = self.batch * 2 - self._outstanding
        if want < self.batch or not self.nc.is_connected:
            return
        request = msgspec.json.encode({"batch": want, "expires": int(self.expires * 1e9)})
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}", request, reply=self._inbox
        )
        self._outstanding += want
        self._pulled_at = time.monotonic()

    async def _run(self) -> None:
        self._pulled_at = 0.0
        while not self._stopping:
            if time.monotonic() - self._pulled_at > self.expires + 1.0:
                self._outstanding = 0  # the request expired unseen (e.g. across a reconnect)
            await self._pull()
            if not self._buffer:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout=self.expires)
                continue
            msgs, self._buffer = self._buffer, []
            msgs = await self._up_to_a_lost_delivery(msgs)
            if not msgs:
                continue
            fresh = [m for m in msgs if stream_sequence(m) > self._last_seq]
            if fresh:
                try:
                    await self._handle(fresh)
                except StopConsuming:
                    return
            # Ack even a batch of duplicates: the server must stop redelivering them.
            await self._ack(msgs[-1] if self.ack_policy == AckPolicy.ALL else None, msgs)

    async def _up_to_a_lost_delivery(self, msgs: list[Msg]) -> list[Msg]:
        """Keep the messages before a gap in delivery sequences; rewind over the gap.

        A delivery lost in transit (a consumer leader dying with it, a reconnect) would be
        redelivered only after `ack_wait`, and AckAll on a later message would acknowledge it
        unseen. So everything from the gap on is dropped and asked for again, in order.
        """
        for i, msg in enumerate(msgs):
            cseq = consumer_sequence(msg)
            expected = self._last_cseq + 1 if self._last_cseq is not None else cseq
            if cseq > expected:
                self.log.warning("delivery_gap", consumer=self.durable, expected=expected, got=cseq)
                kept = msgs[:i]
                resume = max([self._last_seq, *(stream_sequence(m) for m in kept)]) + 1
                self._buffer = []
                self._outstanding = 0
                try:
                    await self.js.reset_consumer(self.stream, self.durable, seq=resume)
                    # Deliveries restart at 1; stragglers from before count as gaps and go.
                    self._last_cseq = 0
                except Exception as exc:  # the next delivery shows the gap again
                    self.log.warning("rewind_failed", consumer=self.durable, error=repr(exc))
                    self._last_cseq = None
                return kept
            self._last_cseq = max(cseq, self._last_cseq or 0)
        return msgs

    async def _handle(self, msgs: list[Msg]) -> None:
        backoff = 0.1
        while True:
            try:
                await self.handler(msgs)
                self._last_seq = max(self._last_seq, stream_sequence(msgs[-1]))
                return
            except (asyncio.CancelledError, StopConsuming):
                self._stopping = True
                raise
            except Exception as exc:
                self.log.error(
                    "batch_failed_retrying",
                    consumer=self.durable,
                    messages=len(msgs),
                    error=repr(exc),
                    retry_in_s=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _ack(self, last: Msg | None, msgs: list[Msg]) -> None:
        targets = [last] if last is not None else msgs
        for msg in targets:
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, b"+ACK")


# ---------------------------------------------------------------------------------------------
# Dead letters


async def dead_letter(
    publisher: JsPublisher, service: str, msg: Msg, reason: str, reason_class: str
) -> None:
    """Publish a rejected message to `md.dlq.<service>` with the reason in headers."""
    headers = dict(msg.headers or {})
    headers.pop(MSG_ID, None)
    headers[DLQ_REASON] = reason[:1000].replace("\r", " ").replace("\n", " ")
    headers[DLQ_SUBJECT] = msg.subject
    headers[DLQ_SERVICE] = service
    with contextlib.suppress(Exception):
        headers[MSG_ID] = f"dlq:{service}:{msg.subject}:{stream_sequence(msg)}"
    DEAD_LETTERS.labels(service, reason_class).inc()
    await publisher.publish(subjects.dlq(service), msg.data, headers)


async def request_json(nc: NATS, subject: str, body: bytes, timeout: float = 5.0) -> Any:
    """Send a request and decode the JSON reply."""
    try:
        reply = await nc.request(subject, body, timeout=timeout)
    except NatsTimeoutError as exc:
        raise TimeoutError(f"no reply on {subject} within {timeout} s") from exc
    return msgspec.json.decode(reply.data)
