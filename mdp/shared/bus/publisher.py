"""Publishing: a window of in-flight acks on one inbox, retries with the same Nats-Msg-Id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from structlog.typing import FilteringBoundLogger

from mdp.shared import tracing
from mdp.shared.bus import _nats_internals
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON
from mdp.shared.contract.events import Event, encode_event, event_subject
from mdp.shared.metrics import PUBLISH_RETRIES


@dataclass(slots=True)
class _InFlight:
    subject: str
    data: bytes
    headers: dict[str, str] | None
    sent: float


class PayloadTooLarge(ValueError):
    """A message (payload and headers) larger than the server's `max_payload`: never sent.

    The server would close the connection over it; raising here keeps the connection.
    """


def message_size(data: bytes, headers: dict[str, str] | None) -> int:
    """Bytes the server counts against `max_payload`: the payload and the encoded headers."""
    if not headers:
        return len(data)
    # NATS/1.0\r\n, then `key: value\r\n` per header, then \r\n
    return len(data) + 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


RETRY_CHECK_S = 0.25
"""How often unacknowledged messages are looked at when nobody publishes or flushes."""


class JsPublisher:
    """JetStream publishes without awaiting each ack: a bounded window, `flush()` awaits all.

    A publish that fails (error ack, no responders during an election, or no ack within
    `ack_timeout`) is sent again with the same headers, so `Nats-Msg-Id` makes it idempotent.
    Retries do not wait for the next publish or flush: a process's last message (a job's
    `stopped` event) rejected during a leader election is sent again all the same.
    """

    def __init__(
        self,
        nc: NATS,
        max_in_flight: int = 1024,
        ack_timeout: float = 5.0,
        log: FilteringBoundLogger | None = None,
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
        self._sub: Subscription | None = None
        self._retrier: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the ack inbox; start retrying what is not acknowledged."""
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_ack)
        self._retrier = asyncio.create_task(self._retry_loop(), name="publisher-retries")

    async def _retry_loop(self) -> None:
        """Resend, in order, what was rejected or went unacknowledged, even when idle."""
        while True:
            await asyncio.sleep(RETRY_CHECK_S)
            if not self._pending or self._order.locked():
                continue  # nothing to do, or a publish is under way (it resends first)
            try:
                async with self._order:  # no new message overtakes the resent ones
                    await self._resend_due()
            except Exception as exc:  # a lost connection: the next round tries again
                if self._log is not None:
                    self._log.debug("publish_retry_failed", error=repr(exc))

    @property
    def max_payload(self) -> int:
        """The largest message (payload and headers) the server accepts."""
        return int(self._nc.max_payload or 1024 * 1024)

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
        _nats_internals.drop_buffered_publishes(self._nc, self._prefix)

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
        if tracing.ON:
            headers = tracing.outgoing(subject, headers)
        size = message_size(data, headers)
        if size > self.max_payload:
            raise PayloadTooLarge(
                f"{size} bytes for {subject}, more than the server's max_payload {self.max_payload}"
            )
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
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as its inner wait ends, and a flush cancelled by a stop budget must stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await self._changed.wait()
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
        """Stop retrying and listening for acks."""
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._retrier
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def publish_event(publisher: JsPublisher, event: Event, msg_id: str | None = None) -> None:
    """Publish one `ingest.events.*` event (JSON), de-duplicated by `msg_id` when given."""
    headers = {names.CONTENT_TYPE: JSON}
    if msg_id is not None:
        headers[names.MSG_ID] = msg_id
    await publisher.publish(event_subject(event), encode_event(event), headers)
