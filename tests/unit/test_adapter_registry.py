"""The adapter registry: built-ins, registration, module:Class specs, what a process hosts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from mdp.services.provider.adapters import base
from mdp.services.provider.adapters.base import (
    AdapterError,
    TickSink,
    load_adapters,
    register,
    resolve_hosted,
)
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.records import AdapterInfo
from mdp.shared.version import VERSION


class TinyAdapter:
    """A do-nothing adapter for the registry tests."""

    name = "tiny"

    def __init__(self, job: JobSpec) -> None:
        self.job = job

    @property
    def clock_rate(self) -> float:
        return 1.0

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        del sink, resume_after


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    saved = dict(base._REGISTERED)
    yield
    base._REGISTERED.clear()
    base._REGISTERED.update(saved)


def test_builtins_are_found_with_their_origin_and_version() -> None:
    origins: dict[str, AdapterInfo] = {}
    registry = load_adapters(origins=origins)
    assert {"synthetic", "replay"} <= set(registry)
    for name in ("synthetic", "replay"):
        assert origins[name].version == VERSION
        assert origins[name].origin in ("builtin", "entry-point:mdp")


def test_a_registered_adapter_is_found_and_says_so() -> None:
    register("tiny", TinyAdapter)  # type: ignore[arg-type]
    origins: dict[str, AdapterInfo] = {}
    assert load_adapters(origins=origins)["tiny"] is TinyAdapter
    assert origins["tiny"] == AdapterInfo("tiny", VERSION, "registered")


def test_registering_something_that_is_no_adapter_is_refused() -> None:
    with pytest.raises(AdapterError, match="needs a run method"):
        register("bad", int)  # type: ignore[arg-type]


def test_a_process_hosts_what_it_is_told() -> None:
    registry = load_adapters()
    assert set(resolve_hosted([], registry)) == set(registry)
    assert set(resolve_hosted(["synthetic"], registry)) == {"synthetic"}
    with pytest.raises(AdapterError, match=r"unknown adapter 'polygon' \(registered: .*synthetic"):
        resolve_hosted(["synthetic", "polygon"], registry)


def test_a_module_class_spec_is_loaded_by_its_name() -> None:
    origins: dict[str, AdapterInfo] = {}
    spec = f"{__name__}:TinyAdapter"
    hosted = resolve_hosted([spec], {}, origins)
    assert hosted == {"tiny": TinyAdapter}
    assert origins["tiny"].origin == f"module:{spec}"
    with pytest.raises(AdapterError, match="cannot be loaded"):
        resolve_hosted(["no.such.module:Thing"], {})
    with pytest.raises(AdapterError, match="not an adapter class"):
        resolve_hosted([f"{__name__}:clean_registry"], {})
