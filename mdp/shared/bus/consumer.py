"""Consuming: a hand-written pull loop (no `fetch()`), batch handler, ack after the handler."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from prometheus_client import Counter, Gauge
from structlog.typing import FilteringBoundLogger

from mdp.shared import tracing

_LAG_LABELS = ["stream", "consumer"]
CONSUMER_PENDING = Gauge(
    "mdp_consumer_pending_messages",
    "Messages of the stream the consumer has not been delivered yet (JetStream num_pending)",
    _LAG_LABELS,
)
CONSUMER_ACK_PENDING = Gauge(
    "mdp_consumer_ack_pending_messages",
    "Messages delivered and not yet acknowledged (JetStream num_ack_pending)",
    _LAG_LABELS,
)
CONSUMER_ACK_FLOOR = Gauge(
    "mdp_consumer_ack_floor_sequence",
    "Stream sequence up to which everything is acknowledged (JetStream ack floor)",
    _LAG_LABELS,
)
CONSUMER_DELIVERED = Gauge(
    "mdp_consumer_delivered_sequence",
    "Last stream sequence delivered to the consumer",
    _LAG_LABELS,
)
CONSUMER_INFO_ERRORS = Counter(
    "mdp_consumer_info_errors_total",
    "Consumer info requests (for the lag gauges) that failed",
    _LAG_LABELS,
)
LAG_EVERY_S = 5.0  # how often each consumer reads its own consumer info

PoisonHandler = Callable[[Msg, str], Awaitable[None]]


def is_transient(exc: BaseException) -> bool:
    """Whether an error is an outage (retry forever) rather than something in the message."""
    return isinstance(exc, (NatsError, OSError, TimeoutError, asyncio.TimeoutError))


def timestamp_ns(msg: Msg) -> int:
    """When JetStream stored the message, in ns since the epoch (from its ack subject)."""
    tokens = _ack_tokens(msg)
    if tokens is None:
        return int(msg.metadata.timestamp.timestamp() * 1e9)  # raises, clearly
    return int(tokens[_V1_TS if len(tokens) == _V1_TOKENS else _V2_TS])


def stream_sequence(msg: Msg) -> int:
    """The stream sequence of a JetStream message (from its ack subject)."""
    return _sequences(msg)[0]


def consumer_sequence(msg: Msg) -> int:
    """The consumer's delivery sequence of a JetStream message (one more per delivery)."""
    return _sequences(msg)[1]


# The ack subject's layout, as nats-py reads it: `$JS.ACK.<stream>.<consumer>.<delivered>.
# <sseq>.<cseq>.<ts>.<pending>` (9 tokens), or with domain and account hash first (12).
_V1_TOKENS = 9
_V1_SEQ, _V2_SEQ = 5, Msg.Ack.StreamSeq
_V1_TS, _V2_TS = 7, Msg.Ack.Timestamp


def _ack_tokens(msg: Msg) -> list[str] | None:
    """The ack subject's tokens, or None when it is not one. By hand: nats-py's
    `Msg.metadata` also builds a datetime and a dataclass per message, a measurable share
    of a busy consumer's time."""
    reply = msg.reply
    tokens: list[str] = reply.split(".", 10) if reply else []
    if len(tokens) < _V1_TOKENS or tokens[0] != Msg.Ack.Prefix0 or tokens[1] != Msg.Ack.Prefix1:
        return None
    return tokens


def _sequences(msg: Msg) -> tuple[int, int]:
    """(stream, consumer) sequence, from the ack subject."""
    tokens = _ack_tokens(msg)
    if tokens is None:
        return msg.metadata.sequence.stream, msg.metadata.sequence.consumer  # raises, clearly
    at = _V1_SEQ if len(tokens) == _V1_TOKENS else _V2_SEQ
    return int(tokens[at]), int(tokens[at + 1])


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """How far behind a consumer is, as JetStream's consumer info says."""

    pending: int
    ack_pending: int
    ack_floor: int
    delivered: int


def lag_of(info: ConsumerInfo) -> ConsumerLag:
    """The lag figures of one consumer info (absent fields count as 0)."""
    return ConsumerLag(
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
        delivered=info.delivered.stream_seq if info.delivered else 0,
    )


BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class StopConsuming(Exception):
    """Raised by a handler that must stop at once without acking (e.g. it was fenced off)."""


@dataclass
class PullConsumer:
    """A durable pull consumer driven by its own loop: pull, hand a batch over, then ack.

    With `AckPolicy.ALL` only the last message of a processed batch is acked. A handler that
    raises is retried with the same batch after a backoff (nothing newer is pulled meanwhile,
    which is the backpressure). Redelivered messages already processed are skipped by sequence.

    A poison message is handled once: with `poison` set, a batch that fails `max_failures`
    times with an error that is not an outage (see `is_transient`) is retried one message at
    a time, and a message that alone fails `max_failures` times is handed to `poison` (which
    dead-letters it) and counted as processed. Outages (NATS, sockets, timeouts) retry forever.
    """

    nc: NATS
    js: JetStreamContext
    stream: str
    durable: str
    filter_subjects: Sequence[str]
    handler: BatchHandler
    log: FilteringBoundLogger
    batch: int = 256
    ack_policy: AckPolicy = AckPolicy.ALL
    ack_wait: float = 60.0
    max_ack_pending: int = 4096
    expires: float = 2.0
    poison: PoisonHandler | None = None
    max_failures: int = 5
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _buffer: list[Msg] = field(default_factory=list, init=False)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _outstanding: int = field(default=0, init=False)
    _last_seq: int = field(default=0, init=False)
    _last_cseq: int | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    _last_error: str = field(default="", init=False)
    lag_every: float = LAG_EVERY_S  # 0: no lag gauges
    _lag_task: asyncio.Task[None] | None = field(default=None, init=False)

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
        if self.lag_every > 0:
            self._lag_task = asyncio.create_task(self._watch_lag(), name=f"lag-{self.durable}")

    async def stop(self) -> None:
        """Finish the batch in hand, then stop pulling."""
        self._stopping = True
        self._arrived.set()
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _watch_lag(self) -> None:
        """Every `lag_every` seconds, read this consumer's info into the lag gauges."""
        labels = (self.stream, self.durable)
        while not self._stopping:
            try:
                lag = lag_of(await self.js.consumer_info(self.stream, self.durable, timeout=2))
            except Exception:  # an outage or a leader election: the gauges keep their values
                CONSUMER_INFO_ERRORS.labels(*labels).inc()
            else:
                CONSUMER_PENDING.labels(*labels).set(lag.pending)
                CONSUMER_ACK_PENDING.labels(*labels).set(lag.ack_pending)
                CONSUMER_ACK_FLOOR.labels(*labels).set(lag.ack_floor)
                CONSUMER_DELIVERED.labels(*labels).set(lag.delivered)
            await asyncio.sleep(self.lag_every)

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
        if await self._attempt(msgs):
            return
        # The batch holds a poison message: find it by going one message at a time.
        for msg in msgs:
            if stream_sequence(msg) > self._last_seq and not await self._attempt([msg]):
                assert self.poison is not None
                self.log.error("poison_message", consumer=self.durable, seq=stream_sequence(msg))
                await self.poison(msg, self._last_error)
                self._last_seq = max(self._last_seq, stream_sequence(msg))

    async def _attempt(self, msgs: list[Msg]) -> bool:
        """Run the handler until it succeeds (True), or False after `max_failures` poison-like
        failures when a poison handler is set."""
        backoff = 0.1
        failures = 0
        while True:
            try:
                if tracing.ON:
                    with tracing.consuming(self.stream, self.durable, msgs):
                        await self.handler(msgs)
                else:
                    await self.handler(msgs)
                self._last_seq = max(self._last_seq, stream_sequence(msgs[-1]))
                return True
            except (asyncio.CancelledError, StopConsuming):
                self._stopping = True
                raise
            except Exception as exc:
                if not is_transient(exc):
                    failures += 1
                    self._last_error = repr(exc)
                    if self.poison is not None and failures >= self.max_failures:
                        return False
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


FOLLOW_BATCH = 256
FOLLOW_IDLE_S = 1.0  # an empty fetch this long, then the consumer is checked to still exist
FOLLOW_INACTIVE_S = 30.0  # the server removes a follower's consumer once unused this long


async def follow_stream(
    js: JetStreamContext, stream: str, subject: str, start_seq: int
) -> AsyncIterator[Msg]:
    """Every message of `subject` in `stream` from `start_seq` on, in order, each once.

    An ephemeral pull consumer that is re-created from the next sequence whenever it is lost
    (a cluster node killed with it, a server restart), which nats-py's ordered push consumer
    does not always survive: after a leader kill it can stay silent for good.
    """
    next_seq = max(1, start_seq)
    psub: JetStreamContext.PullSubscription | None = None
    try:
        while True:
            try:
                if psub is None:
                    config = ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=next_seq,
                        ack_policy=AckPolicy.NONE,
                        inactive_threshold=FOLLOW_INACTIVE_S,
                        num_replicas=1,
                        mem_storage=True,
                    )
                    psub = await js.pull_subscribe(subject, stream=stream, config=config)
                msgs = await psub.fetch(FOLLOW_BATCH, timeout=FOLLOW_IDLE_S)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                if psub is not None and not await _consumer_alive(psub):
                    await _drop(psub)
                    psub = None
                continue
            except Exception:  # the consumer or the connection went: start again from next_seq
                await _drop(psub)
                psub = None
                await asyncio.sleep(0.25)
                continue
            for msg in msgs:
                seq = stream_sequence(msg)
                if seq >= next_seq:
                    next_seq = seq + 1
                    yield msg
    finally:
        await _drop(psub)


async def _consumer_alive(psub: JetStreamContext.PullSubscription) -> bool:
    try:
        await psub.consumer_info()
    except Exception:
        return False
    return True


async def _drop(psub: JetStreamContext.PullSubscription | None) -> None:
    if psub is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(psub.unsubscribe(), 2)
