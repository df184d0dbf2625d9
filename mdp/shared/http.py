"""The HTTP edge every service shares: an aiohttp server, bearer tokens, JSON replies."""

from __future__ import annotations

import asyncio
import hmac
from typing import cast

import msgspec
from aiohttp import web

from mdp.shared.contract.codec import JSON
from mdp.shared.contract.control import ErrorBody, ErrorReply


class HttpServer:
    """An aiohttp app of a service's: `routes` declares it, `start` listens, `stop` closes."""

    max_body = 1024 * 1024

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.runner: web.AppRunner | None = None
        self.url = ""

    def routes(self, app: web.Application) -> None:
        """Add the routes (each subclass its own)."""
        raise NotImplementedError

    def app(self) -> web.Application:
        """The application with its routes."""
        app = web.Application(client_max_size=self.max_body)
        self.routes(app)
        return app

    async def start(self) -> str:
        """Listen; return the base URL (the real port when 0 was asked for)."""
        self.runner, self.url = await serve_app(self.app(), self.host, self.port)
        return self.url

    async def stop(self) -> None:
        """Stop listening (requests in progress finish first)."""
        if self.runner is not None:
            await self.runner.cleanup()


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `token` (always true without a token)."""
    if not token:
        return True
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON reply of any msgspec-encodable value."""
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type=JSON, headers=headers
    )


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    """`{"ok": false, "error": {code, message}}`, the shape every failure has, NATS or HTTP."""
    return json_response(ErrorReply(ErrorBody(code, message)), status, headers or None)


def unauthorized(realm: str) -> web.Response:
    """401 for a missing or wrong bearer token."""
    return error_response(
        401,
        "unauthorized",
        "a bearer token is required",
        **{"WWW-Authenticate": f'Bearer realm="{realm}"'},
    )


async def serve_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Listen on `host:port` (0: a free port); return the runner and the base URL to reach it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = cast(asyncio.Server | None, site._server)
    bound = int(server.sockets[0].getsockname()[1]) if server and server.sockets else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return runner, f"http://{shown}:{bound}"
