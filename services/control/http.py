"""The control service's HTTP facade: the same handlers and JSON as `ingest.control.*`.

    GET  /runtime/ingest/status
    POST /runtime/ingest/start | stop | reload | reset  (JSON body as on NATS; optional for stop)
    GET  /healthz                                       (no token needed)

Errors answer 400 (invalid request, symbols, config), 404 (unknown provider), 409 (disabled,
already running), 500 (internal); with `MDP_CONTROL__HTTP_TOKEN` set every `/runtime` route
wants `Authorization: Bearer <token>` and answers 401 without it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from shared.contract.codec import JSON
from shared.http import HttpServer, bearer_ok, json_response, unauthorized
from shared.settings import ControlSettings

Dispatch = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]


class ControlHttp(HttpServer):
    """An aiohttp server in the control process, calling the same dispatch as NATS."""

    def __init__(self, dispatch: Dispatch, settings: ControlSettings) -> None:
        super().__init__(settings.http_host, settings.http_port)
        self.dispatch = dispatch
        self.token = settings.http_token

    def routes(self, app: web.Application) -> None:
        """The facade's routes."""
        app.router.add_get("/runtime/ingest/status", self._status)
        app.router.add_post("/runtime/ingest/{verb:start|stop|reload|reset}", self._post)
        app.router.add_get("/healthz", self._health)

    async def _status(self, request: web.Request) -> web.Response:
        return await self._call(request, "status", b"")

    async def _post(self, request: web.Request) -> web.Response:
        return await self._call(request, request.match_info["verb"], None)

    async def _call(self, request: web.Request, verb: str, body: bytes | None) -> web.Response:
        if not bearer_ok(request.headers.get("Authorization"), self.token):
            return unauthorized("mdp-control")
        data = await request.read() if body is None else body
        status, reply = await self.dispatch(verb, data)
        # The bytes NATS replies with, so both faces answer identically.
        return web.Response(body=reply, status=status, content_type=JSON)

    async def _health(self, request: web.Request) -> web.Response:
        del request
        return json_response({"ok": True})
