"""A JetStream cluster of embedded nats-servers on loopback, for the cluster tests."""

from __future__ import annotations

from pathlib import Path

from mdp.shared.natsserver import EmbeddedNats, free_port


class EmbeddedCluster:
    """Three (or more) nats-server processes on loopback forming one JetStream cluster."""

    def __init__(self, base_dir: Path, size: int = 3, name: str = "mdp") -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes: list[EmbeddedNats] = []
        for i in range(size):
            routes = ",".join(
                f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i
            )
            self.nodes.append(
                EmbeddedNats(
                    Path(base_dir) / f"n{i + 1}",
                    port=free_port(),
                    name=f"n{i + 1}",
                    log_file=Path(base_dir) / f"n{i + 1}.log",
                    extra_args=[
                        "--cluster_name",
                        name,
                        "--cluster",
                        f"nats://127.0.0.1:{cluster_ports[i]}",
                        "--routes",
                        routes,
                    ],
                )
            )

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (as MDP_NATS_URL takes them)."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> str:
        """Start every node; return the comma-separated URLs."""
        for node in self.nodes:
            node.start()
        return self.url

    def node(self, server_name: str) -> EmbeddedNats:
        """The node with this server name."""
        return next(n for n in self.nodes if n.name == server_name)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
