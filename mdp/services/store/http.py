"""The store's HTTP edge: its ingest API (`POST /v1/bars`) and the http-mode forwarder.

The ingest API takes one `BarBatch` (JSON, or msgpack by `Content-Type`) and writes it through
the same idempotent writer as the bus path, answering only after the commit:

    200 {"ok": true, "batch_id": ..., "rows": N}      committed (a repeat changes nothing)
    400 {"ok": false, "error": {"code": "invalid_request" | "invalid_bar", ...}}   do not retry
        (`invalid_bar`: a bar breaks an invariant of `mdp/services/store/invariants.py`; the batch
        is refused whole, nothing of it written)
    401 without the bearer token when `MDP_STORE__HTTP_TOKEN` is set
    415 another Content-Type;  503 the database is unavailable (retry)

The forwarder POSTs each batch of `store.sync.http` to the policy's `store_sync.http_url` (empty:
this process's own API) and reports the outcome; the service acknowledges only after a 2xx.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Histogram
from structlog.typing import FilteringBoundLogger

from mdp.services.store.invariants import split_bars
from mdp.services.store.writers import InvalidBarError, StoreError
from mdp.shared.contract.codec import JSON, MSGPACK, Codec, DecodeError
from mdp.shared.contract.messages import Bar, BarBatch
from mdp.shared.contract.names import CONTENT_TYPE
from mdp.shared.http import HttpServer, bearer_ok, error_response, json_response, unauthorized
from mdp.shared.settings import StoreSettings

INGEST_PATH = "/v1/bars"
MAX_BODY = 64 * 1024 * 1024

API_REQUESTS = Counter(
    "mdp_store_http_requests_total", "Requests to the store's ingest API by status", ["status"]
)
FORWARDED = Counter(
    "mdp_store_http_forwards_total",
    "Batches of store.sync.http forwarded by POST, by outcome (ok, retry, rejected)",
    ["outcome"],
)
FORWARD_SECONDS = Histogram("mdp_store_http_forward_seconds", "Time of one forwarding POST")

# Statuses that say the batch itself is wrong: retrying cannot help, so it is dead-lettered.
# Everything else that is not 2xx (5xx, 408, 429, 401/403 until the token is fixed) is retried.
PERMANENT = frozenset({400, 404, 405, 410, 413, 415, 422})

Write = Callable[[list[Bar]], Awaitable[None]]


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    API_REQUESTS.labels(str(status)).inc()
    return error_response(status, code, message, **headers)


class IngestApi(HttpServer):
    """`POST /v1/bars` and `GET /v1/health`, served from the store process."""

    max_body = MAX_BODY

    def __init__(self, write: Write, settings: StoreSettings, log: FilteringBoundLogger) -> None:
        super().__init__(settings.http_host, settings.http_port)
        self.write = write
        self.token = settings.http_token
        self.log = log
        self.codec = Codec(BarBatch)

    def routes(self, app: web.Application) -> None:
        """The ingest API's routes."""
        app.router.add_post(INGEST_PATH, self._post_bars)
        app.router.add_get("/v1/health", self._health)

    async def _post_bars(self, request: web.Request) -> web.Response:
        if not bearer_ok(request.headers.get("Authorization"), self.token):
            API_REQUESTS.labels("401").inc()
            return unauthorized("mdp-store")
        ctype = request.headers.get(CONTENT_TYPE, JSON)
        if not ctype.startswith((JSON, MSGPACK)):
            return _error(415, "invalid_request", f"Content-Type {ctype!r}: send {JSON}")
        body = await request.read()
        try:
            batch = self.codec.decode(body, {CONTENT_TYPE: ctype})
        except DecodeError as exc:
            return _error(400, "invalid_request", f"not a BarBatch: {exc}")
        _, bad = split_bars(batch.bars)
        if bad:
            index, bar, reason = bad[0]
            return _error(
                400,
                "invalid_bar",
                f"{len(bad)} of {len(batch.bars)} bars break the bar invariants; the first, "
                f"bars[{index}] ({bar.bar_id}): {reason}",
            )
        try:
            await self.write(batch.bars)
        except InvalidBarError as exc:
            return _error(400, "invalid_bar", str(exc))
        except StoreError as exc:
            self.log.warning("ingest_api_store_error", batch_id=batch.batch_id, error=str(exc))
            return _error(503, "internal", f"store unavailable: {exc}", **{"Retry-After": "1"})
        API_REQUESTS.labels("200").inc()
        return json_response({"ok": True, "batch_id": batch.batch_id, "rows": len(batch.bars)})

    async def _health(self, request: web.Request) -> web.Response:
        del request
        return json_response({"ok": True})


class RetryableForwardError(Exception):
    """The target did not take the batch this time (network error, 5xx, 429, 401...)."""


@dataclass(frozen=True)
class Rejected:
    """The target refused the batch for good (a 4xx such as 400): it is dead-lettered."""

    status: int
    reason: str


class Forwarder:
    """POSTs batches to the configured URL; `post` returns None on 2xx, `Rejected`, or raises."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def post(
        self, url: str, batch_id: str, body: bytes, token: str, timeout_s: float
    ) -> Rejected | None:
        """Send one JSON `BarBatch`; raise `RetryableForwardError` when it should be retried."""
        headers = {CONTENT_TYPE: JSON, "Idempotency-Key": batch_id}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        try:
            async with self.session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                status = resp.status
                text = (await resp.text(errors="replace"))[:500]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            FORWARDED.labels("retry").inc()
            raise RetryableForwardError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        finally:
            FORWARD_SECONDS.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            FORWARDED.labels("ok").inc()
            return None
        if status in PERMANENT:
            FORWARDED.labels("rejected").inc()
            return Rejected(status, f"POST {url} answered {status}: {text}")
        FORWARDED.labels("retry").inc()
        raise RetryableForwardError(f"POST {url} answered {status}: {text}")
