"""The one service runtime: connect, declare streams, register, serve metrics, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service as MicroService
from structlog.typing import FilteringBoundLogger

from mdp.shared import tracing
from mdp.shared.bus.connection import connect
from mdp.shared.bus.consumer import BatchHandler, PullConsumer
from mdp.shared.bus.deadletter import dead_letter
from mdp.shared.bus.declare import ensure_buckets, ensure_streams
from mdp.shared.bus.publisher import JsPublisher
from mdp.shared.contract import names
from mdp.shared.contract.control import ErrorBody, ErrorReply
from mdp.shared.logging import configure_logging
from mdp.shared.metrics import Health, serve_metrics
from mdp.shared.settings import Settings
from mdp.shared.tasks import cancel_until_done
from mdp.shared.version import VERSION

RequestHandler = Callable[[bytes], Awaitable[bytes]]


class ServiceError(Exception):
    """A refused request: the runtime answers it with an `ErrorReply` and micro error headers.

    `code` is a stable code of the contract; `status` the HTTP status it maps to (also the
    micro `Nats-Service-Error-Code`).
    """

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    @property
    def reply(self) -> ErrorReply:
        """The reply body of this refusal."""
        return ErrorReply(ErrorBody(self.code, self.message))


@dataclass
class Context:
    """What a running service gets from the runtime."""

    name: str
    settings: Settings
    nc: NATS
    js: JetStreamContext
    publisher: JsPublisher
    micro: MicroService
    log: FilteringBoundLogger
    metrics_port: int
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[object]] = field(default_factory=list)
    consumers: list[PullConsumer] = field(default_factory=list)
    crashed: bool = False  # a background task died: exit non-zero so a supervisor sees it
    health: Health = field(default_factory=Health)  # what /healthz and /readyz report

    def spawn(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        """Run a background task owned by the service; its crash is logged and stops the service."""
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[object]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                self.log.error("task_crashed", task=name, error=repr(exc))
                self.crashed = True
                self.stopping.set()

        task.add_done_callback(done)
        self.tasks.append(task)
        return task

    async def consume(
        self,
        stream: str,
        durable: str,
        subjects: Sequence[str],
        handler: BatchHandler,
        *,
        batch: int = 256,
        ack: AckPolicy = AckPolicy.ALL,
        resume_at: int | None = None,
        dead_letter_poison: bool = False,
    ) -> PullConsumer:
        """Declare a durable pull consumer and start it (from `resume_at`, else its ack floor).

        The runtime stops it, finishing the batch in hand, before the service's own `stop`.
        With `dead_letter_poison`, a message the handler keeps failing on (not an outage) is
        dead-lettered on `md.dlq.<service>` and passed over (see `PullConsumer`).
        """

        async def poison(msg: Msg, error: str) -> None:
            await dead_letter(self.publisher, self.name, msg, f"poison: {error}", "poison")

        consumer = PullConsumer(
            self.nc,
            self.js,
            stream,
            durable,
            subjects,
            handler,
            self.log,
            batch=batch,
            ack_policy=ack,
            poison=poison if dead_letter_poison else None,
        )
        await consumer.ensure()
        await consumer.rewind(resume_at)
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def add_endpoint(
        self,
        name: str,
        subject: str,
        handler: RequestHandler,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Answer requests on `subject` (a micro endpoint); a `ServiceError` becomes its reply.

        `metadata` (e.g. the request and reply JSON Schemas) is shown in `$SRV.INFO`.
        """

        async def endpoint(request: Request) -> None:
            try:
                reply = await handler(request.data)
            except ServiceError as exc:
                await request.respond_error(
                    str(exc.status),
                    f"{exc.code}: {exc.message}"[:1000],
                    msgspec.json.encode(exc.reply),
                )
                return
            await request.respond(reply)

        await self.micro.add_endpoint(
            name=name, subject=subject, handler=endpoint, metadata=metadata
        )


class Service(Protocol):
    """A process role: `start` wires subscriptions, `stop` flushes what it holds."""

    name: ClassVar[str]

    async def start(self, ctx: Context) -> None: ...

    async def stop(self) -> None: ...


async def _beat(health: Health) -> None:
    """Show `/healthz` that the event loop runs."""
    while True:
        health.beat = time.monotonic()
        await asyncio.sleep(1.0)


async def serve(service: Service, settings: Settings) -> int:
    """Run a service until SIGTERM/SIGINT (honoured in every state); return the exit code.

    0 after a requested stop, 1 when a task crashed, the service failed to start or its NATS
    connection closed on its own (so a supervisor restarts it), 2 for a setup error.
    """
    log = configure_logging(service.name, settings.log_level, settings.log_format)
    tracing.configure(service.name, settings.tracing, log)  # off unless MDP_TRACING__ENABLED
    stop_signal = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_signal.set)
    startup = _Startup(service, settings, log, stop_signal)
    starting = asyncio.create_task(startup.run(), name="start")
    stopped = asyncio.create_task(stop_signal.wait(), name="stop-signal")
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        # Stopped while connecting, declaring or starting: nothing was served, nothing to flush.
        log.info("stopped_while_starting", step=startup.step)
        await cancel_until_done(starting)  # nats-py's connect can swallow a single cancel
        await startup.close()
        return 1 if startup.lost else 0
    stopped.cancel()
    ctx = starting.result()
    if isinstance(ctx, int):
        await startup.close()
        return ctx
    return await _run(service, ctx, startup)


@dataclass
class _Startup:
    """Connect, declare, serve metrics, register and start the service; `step` says where."""

    service: Service
    settings: Settings
    log: FilteringBoundLogger
    stop_signal: asyncio.Event
    step: str = "connecting"
    nc: NATS | None = None
    publisher: JsPublisher | None = None
    stopping: bool = False  # set once this process closes its own connection
    lost: bool = False  # the connection closed without this process asking

    async def run(self) -> Context | int:
        """The started service's context, or an exit code when it cannot start."""
        settings, log, name = self.settings, self.log, self.service.name

        def on_disconnect() -> None:
            if self.publisher is not None:
                self.publisher.disconnected()

        def on_closed() -> None:
            if not self.stopping:  # nats-py gave up or the server closed us: never idle
                log.error("nats_connection_lost", step=self.step)
                self.lost = True
                self.stop_signal.set()

        try:
            nc = await connect(settings, name, log, on_disconnect, on_closed)
        except Exception as exc:
            log.error("nats_connect_failed", url=settings.nats_url, error=repr(exc))
            return 2
        self.nc = nc
        health = Health(connected=lambda: nc.is_connected)
        js = nc.jetstream(timeout=10)
        self.step = "declaring"
        await _with_retries(log, "declare_streams", lambda: _declare(js, settings))
        health.declared = True
        self.publisher = publisher = JsPublisher(nc, max_in_flight=4096, log=log)
        await publisher.start()
        try:
            metrics_port = serve_metrics(settings.metrics_port, health=health)
        except OSError as exc:
            log.error("metrics_port_unavailable", port=settings.metrics_port, error=str(exc))
            return 2
        micro = await add_service(
            nc,
            name=f"mdp-{name}",
            version=VERSION,
            description=f"mdp {name} service",
            metadata={"metrics_port": str(metrics_port)},
        )
        ctx = Context(name, settings, nc, js, publisher, micro, log, metrics_port)
        ctx.stopping = self.stop_signal
        ctx.health = health
        self.step = "starting"
        try:
            await self.service.start(ctx)
        except Exception as exc:
            log.error("start_failed", error=repr(exc), exc_info=True)
            return 1
        # Readiness: answered only once start() is done (PING answers as soon as it registers).
        await micro.add_endpoint(name="ready", subject=names.ready(name), handler=_answer_ready)
        health.started = True
        ctx.spawn(_beat(health), "health-beat")
        self.step = "running"
        log.info("started", nats=settings.nats_url, metrics_port=metrics_port, pid=os.getpid())
        return ctx

    async def close(self) -> None:
        """Close what was opened so far (a stop during start-up, or a failed start)."""
        self.stopping = True
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await self.publisher.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


STOP_BUDGET_S = 20.0  # the time a connected service takes to stop, at most
STOP_BUDGET_OFFLINE_S = 3.0  # the same without a server


async def _run(service: Service, ctx: Context, startup: _Startup) -> int:
    """Serve until the stop signal, then stop consumers, the service and the publisher."""
    log, publisher = ctx.log, ctx.publisher
    await ctx.stopping.wait()
    log.info("stopping", connection_lost=startup.lost)
    code = 1 if ctx.crashed or startup.lost else 0

    async def wind_down() -> None:
        for consumer in reversed(ctx.consumers):
            await consumer.stop()
        await service.stop()
        await publisher.flush()

    # The whole stop stays well under a supervisor's 30 s before SIGKILL. Without a server
    # nothing can be acknowledged or checkpointed: a short budget, and what was not
    # acknowledged is sent again after the restart (the ids make it harmless).
    budget = STOP_BUDGET_S if ctx.nc.is_connected else STOP_BUDGET_OFFLINE_S
    try:
        async with asyncio.timeout(budget):  # not wait_for: it can swallow a cancel on 3.11
            await wind_down()
    except Exception as exc:
        log.error("stop_failed", error=repr(exc), budget_s=budget)
        code = 1
    for task in ctx.tasks:
        task.cancel()
    for task in ctx.tasks:
        if not await cancel_until_done(task):
            log.error("task_ignores_cancel", task=task.get_name())  # left behind, not awaited
    startup.stopping = True
    with contextlib.suppress(Exception):
        await ctx.micro.stop()
    with contextlib.suppress(Exception):
        await publisher.close()
        await (ctx.nc.drain() if ctx.nc.is_connected else ctx.nc.close())
    log.info("stopped", code=code)
    return code


async def _declare(js: JetStreamContext, settings: Settings) -> None:
    await ensure_streams(js, settings.stream)
    await ensure_buckets(js, settings.stream)


async def _with_retries(
    log: FilteringBoundLogger, what: str, action: Callable[[], Awaitable[None]], attempts: int = 8
) -> None:
    """Retry an idempotent start-up step through passing outages (e.g. a cluster settling)."""
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            await action()
            return
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning(
                f"{what}_retry", error=str(exc) or repr(exc), attempt=attempt, retry_in_s=delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)


async def _answer_ready(request: Request) -> None:
    await request.respond(b"ok")


# A service allocates a few objects per tick and keeps many (open and retained bars, batches):
# with CPython's default thresholds (700, 10, 10) the full collections that walk all of them
# came every few seconds and stalled the loop for up to 50 ms. Cycles still die young in the
# first two generations; the third is collected 100x less often.
GC_THRESHOLDS = (50_000, 50, 1_000)


def tune_gc() -> None:
    """Freeze what start-up built (modules, models) out of the collector; collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(factory: Callable[[Settings], Service], argv: list[str] | None = None) -> None:
    """Entry point of `python -m mdp.services.<name>`: settings from the environment."""
    del argv
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError lists every bad variable
        print(f"invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    service = factory(settings)
    tune_gc()
    sys.exit(asyncio.run(serve(service, settings)))
