"""The five services by name, for `mdp service <name>` and the supervisor."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mdp.shared.runtime import Service
from mdp.shared.settings import Settings

SERVICES = {
    "provider": "mdp.services.provider.service:ProviderService",
    "router": "mdp.services.router.service:RouterService",
    "aggregator": "mdp.services.aggregator.service:AggregatorService",
    "store": "mdp.services.store.service:StoreService",
    "control": "mdp.services.control.service:ControlService",
}


def service_factory(name: str) -> Callable[[Settings], Service]:
    """Import and return the service class registered under `name`."""
    module, _, attr = SERVICES[name].partition(":")
    factory: Callable[[Settings], Service] = getattr(importlib.import_module(module), attr)
    return factory
