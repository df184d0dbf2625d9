"""Prometheus metrics and the health endpoints: `/metrics`, `/healthz`, `/readyz` on one port.

`/healthz` answers 200 while the service's event loop is alive (it beats every second; a loop
stuck for `STUCK_AFTER_S` fails it, so an orchestrator restarts the process). `/readyz`
answers 200 once the service is connected to NATS, has declared its streams and has started,
and 503 otherwise (a lost connection makes it not ready); its JSON body says which check fails
and what the service adds (an aggregator's lease: `active` or `standby`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, make_wsgi_app

DEAD_LETTERS = Counter(
    "mdp_dead_letters_total", "Messages rejected to md.dlq.<service>", ["service", "reason"]
)
PUBLISH_RETRIES = Counter(
    "mdp_publish_retries_total", "JetStream publishes sent again after a failure or timeout"
)
STUCK_AFTER_S = 10.0


@dataclass
class Health:
    """What the health endpoints report; written by the service's loop, read by the server."""

    connected: Callable[[], bool] = lambda: False
    declared: bool = False
    started: bool = False
    beat: float = field(default_factory=time.monotonic)
    details: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        """Whether the event loop beat recently."""
        return time.monotonic() - self.beat < STUCK_AFTER_S

    def readiness(self) -> dict[str, Any]:
        """Every readiness check by name, and the service's own details."""
        checks = {"nats": self.connected(), "streams": self.declared, "started": self.started}
        return {"ready": all(checks.values()), "checks": checks, **self.details}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood stderr."""


def _app(health: Health) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = health.alive()
            body: dict[str, Any] = {"alive": ok}
        elif path == "/readyz":
            body = health.readiness()
            ok = bool(body["ready"])
        else:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    return app


def serve_metrics(port: int, host: str = "0.0.0.0", health: Health | None = None) -> int:
    """Serve `/metrics`, `/healthz`, `/readyz` on a background thread; return the bound port."""
    server = make_server(
        host, port, _app(health or Health()), server_class=_Server, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return int(server.server_port)
