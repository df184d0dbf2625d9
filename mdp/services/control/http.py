"""The control service's HTTP facade: the same handlers and JSON as `ingest.control.*`.

    GET  /runtime/ingest/status
    POST /runtime/ingest/start | stop | reload | reset  (JSON body as on NATS; optional for stop)
    GET  /healthz                                       (no token needed)

Errors answer 400 (invalid request, symbols, config), 404 (unknown provider), 409 (disabled,
already running), 500 (internal); with `MDP_CONTROL__HTTP_TOKEN` set every `/runtime` route
wants `Authorization: Bearer <token>` and answers 401 without it. Every answer is JSON of the
documented shape, aiohttp's own refusals too (`not_found` 404, `method_not_allowed` 405, a body
over 1 MiB `invalid_request` 413), never a plain-text page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from mdp.shared.contract.codec import JSON
from mdp.shared.http import HttpServer, bearer_ok, error_response, json_response, unauthorized
from mdp.shared.settings import ControlSettings

Dispatch = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]

# aiohttp's refusals, by status, as codes of the contract.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request"}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no route, wrong method, body too large) as JSON error replies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "invalid_request" if exc.status < 500 else "internal")
        return error_response(exc.status, code, f"{request.method} {request.path}: {exc.reason}")


class ControlHttp(HttpServer):
    """An aiohttp server in the control process, calling the same dispatch as NATS."""

    def __init__(self, dispatch: Dispatch, settings: ControlSettings) -> None:
        super().__init__(settings.http_host, settings.http_port)
        self.dispatch = dispatch
        self.token = settings.http_token

    def app(self) -> web.Application:
        """The application, answering every refusal in JSON."""
        app = super().app()
        app.middlewares.append(json_errors)
        return app

    def routes(self, app: web.Application) -> None:
        """The facade's routes."""
        app.router.add_get("/runtime/ingest/status", self._status)
        app.router.add_post("/runtime/ingest/{verb:start|stop|reload|reset}", self._post)
        app.router.add_get("/healthz", self._health)

    async def _status(self, request: web.Request) -> web.Response:
        return await self._call(request, "status")

    async def _post(self, request: web.Request) -> web.Response:
        return await self._call(request, request.match_info["verb"])

    async def _call(self, request: web.Request, verb: str) -> web.Response:
        if not bearer_ok(request.headers.get("Authorization"), self.token):
            return unauthorized("mdp-control")
        # Decoded as strictly as on NATS (a GET status with a body too).
        status, reply = await self.dispatch(verb, await request.read())
        # The bytes NATS replies with, so both faces answer identically.
        return web.Response(body=reply, status=status, content_type=JSON)

    async def _health(self, request: web.Request) -> web.Response:
        del request
        return json_response({"ok": True})
