"""`python -m mdp.services NAME` (or `python -m mdp.services.NAME`): run one service."""

from __future__ import annotations

import signal
import sys


def launch(name: str) -> None:
    """Run service `name` until SIGTERM/SIGINT; exits with its code."""
    # A stop request that arrives while the process is still importing: nothing to flush yet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from mdp.services.registry import SERVICES, service_factory
    from mdp.shared.runtime import main

    if name not in SERVICES:
        known = ", ".join(sorted(SERVICES))
        print(f"unknown service {name!r} (services: {known})", file=sys.stderr)
        raise SystemExit(2)
    main(service_factory(name))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m mdp.services NAME", file=sys.stderr)
        raise SystemExit(2)
    launch(sys.argv[1])
