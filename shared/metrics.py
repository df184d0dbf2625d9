"""Prometheus metrics: the `/metrics` endpoint and the counters every service shares."""

from __future__ import annotations

from prometheus_client import Counter, start_http_server

DEAD_LETTERS = Counter(
    "mdp_dead_letters_total", "Messages rejected to md.dlq.<service>", ["service", "reason"]
)
PUBLISH_RETRIES = Counter(
    "mdp_publish_retries_total", "JetStream publishes sent again after a failure or timeout"
)


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """Serve `/metrics` on a background thread; return the bound port (0 picks a free one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
