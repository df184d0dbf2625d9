"""The HTTP edge every service shares: start an aiohttp app and say where it listens."""

from __future__ import annotations

import asyncio
from typing import cast

from aiohttp import web


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
