"""The control service's HTTP facade: the same handlers and JSON as `ingest.control.*`.

    GET  /runtime/ingest/status
    POST /runtime/ingest/start | stop | reload      (JSON body as on NATS; optional for stop)
    GET  /healthz                                   (no token needed)

Errors answer 400 (invalid request, symbols, config), 404 (unknown provider), 409 (disabled,
already running), 500 (internal); with `MDP_CONTROL__HTTP_TOKEN` set every `/runtime` route
wants `Authorization: Bearer <token>` and answers 401 without it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from shared.http import serve_app
from shared.settings import ControlSettings

Dispatch = Callable[[str, bytes], Awaitable[tuple[int, dict[str, Any]]]]

MAX_BODY = 1024 * 1024


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `token` (always true without a token)."""
    if not token:
        return True
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


def unauthorized() -> web.Response:
    """401 with the control reply shape, so clients parse every failure the same way."""
    return web.json_response(
        {"ok": False, "error": {"code": "unauthorized", "message": "a bearer token is required"}},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="mdp-control"'},
    )


class ControlHttp:
    """An aiohttp server in the control process, calling the same dispatch as NATS."""

    def __init__(self, dispatch: Dispatch, settings: ControlSettings, log: Any) -> None:
        self.dispatch = dispatch
        self.settings = settings
        self.log = log
        self.runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        """The routes."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/runtime/ingest/status", self._status)
        app.router.add_post("/runtime/ingest/{verb:start|stop|reload}", self._post)
        app.router.add_get("/healthz", self._health)
        return app

    async def start(self) -> str:
        """Listen; return the base URL (the real port when 0 was asked for)."""
        self.runner, self.url = await serve_app(
            self.app(), self.settings.http_host, self.settings.http_port
        )
        return self.url

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            await self.runner.cleanup()

    async def _status(self, request: web.Request) -> web.Response:
        return await self._call(request, "status", b"")

    async def _post(self, request: web.Request) -> web.Response:
        return await self._call(request, request.match_info["verb"], None)

    async def _call(self, request: web.Request, verb: str, body: bytes | None) -> web.Response:
        if not bearer_ok(request.headers.get("Authorization"), self.settings.http_token):
            return unauthorized()
        data = await request.read() if body is None else body
        status, reply = await self.dispatch(verb, data)
        # The bytes NATS replies with, so both faces answer identically.
        return web.Response(
            body=msgspec.json.encode(reply), status=status, content_type="application/json"
        )

    async def _health(self, request: web.Request) -> web.Response:
        del request
        return web.json_response({"ok": True})
