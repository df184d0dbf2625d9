"""What an adapter is, what it writes to, and how adapters are found (entry points `mdp.adapters`).

An adapter turns one `JobSpec` into ticks: it validates `job.params` when it is constructed
(raising `AdapterError` with a message that says what to fix), then `run` writes per-symbol
tick lists into a `TickSink` until the source ends (bounded sources) or it is cancelled (live
ones). The sink owns batching, publishing and backpressure; adapters do no network I/O.

An adapter that declares `Params`, a pydantic model (an `AdapterParams`), has its params checked
by that one model everywhere: its section of data_providers.yaml, control's start guards (which
find it through the registry, `params_model`) and its own constructor (`check_params`). The
params of an adapter without one pass through unchecked until it is constructed.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from mdp.shared.breaker import FailureKind
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick
from mdp.shared.contract.records import AdapterInfo, FeedStatus
from mdp.shared.version import VERSION

ENTRY_POINT_GROUP = "mdp.adapters"

# The adapters this distribution ships, used when its metadata is missing (e.g. running from a
# source tree that was never installed) so the provider still knows its own adapters.
BUILTIN_ADAPTERS: dict[str, str] = {
    "synthetic": "mdp.services.provider.adapters.synthetic:SyntheticAdapter",
    "replay": "mdp.services.provider.adapters.replay:ReplayAdapter",
    "ibkr": "mdp.services.provider.adapters.ibkr.adapter:IbkrAdapter",
}

log = structlog.get_logger(__name__)


class AdapterError(Exception):
    """A job an adapter cannot run (bad params, unreadable input); the message says what to fix."""


class Pacer(Protocol):
    """The provider's shared rate budget (`mdp.services.provider.pacing.Pacer`)."""

    async def acquire(
        self,
        n: int = 1,
        *,
        key: str | None = None,
        contract: str | None = None,
        historical: bool = False,
    ) -> None:
        """Wait until `n` messages (and the request limits that apply) may be sent."""
        ...

    async def pacing_error(self, cooldown_s: float) -> None:
        """The source refused a message for pacing: pause every process for `cooldown_s`."""
        ...


@runtime_checkable
class TickSink(Protocol):
    """Where an adapter delivers ticks; `put` may block to apply backpressure.

    An adapter that sends requests to a rate-limited source awaits `pacer.acquire()` before
    each, and reports the source's pacing errors with `pacer.pacing_error(cooldown_s)`.
    """

    @property
    def pacer(self) -> Pacer:
        """The provider's pacing budget (unlimited when its config has no `pacing:`)."""
        ...

    async def put(self, symbol: str, ticks: list[Tick]) -> None:
        """Take ownership of `ticks` of `symbol`, in per-symbol arrival order."""
        ...

    async def end_of_stream(
        self, symbols: Sequence[str], ticks_per_symbol: Mapping[str, int]
    ) -> None:
        """Called once by a bounded source after its last `put`."""
        ...


class Store(Protocol):
    """A small persistent key-value store a live adapter may cache in (keys: KV key syntax)."""

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, None when absent (or unreadable: it is a cache)."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (best effort)."""
        ...


@runtime_checkable
class FeedSink(TickSink, Protocol):
    """What the provider's sink offers a live feed beyond ticks (`JobSink`); all optional.

    An adapter checks `isinstance(sink, FeedSink)` and works without these when it is not.
    """

    @property
    def store(self) -> Store | None:
        """Where to cache what is costly to ask the source again (None: nowhere)."""
        ...

    async def failure(self, kind: FailureKind) -> None:
        """Count one failure the adapter survived against the provider's circuit breaker."""
        ...

    def report(self, feed: FeedStatus) -> None:
        """The feed's state for `status` (kept; written with the job's next state record)."""
        ...

    async def set_market_data(self, symbol: str, kind: str) -> None:
        """Mark `symbol`'s next ticks as `kind` data (`live`, `delayed`, ...): a batch header."""
        ...

    async def refuse(self, symbol: str, code: int, reason: str) -> None:
        """Announce that the source refused `symbol` (the job's others go on)."""
        ...


class Adapter(Protocol):
    """A source of ticks for one job.

    A class attribute `live = True` marks a live feed: when `run` fails the provider retries it
    with backoff; a bounded source (the default) that fails ends its job as `failed`.
    """

    name: ClassVar[str]

    def __init__(self, job: JobSpec) -> None:
        """Validate `job.params` and `job.symbols`; raise `AdapterError` on anything wrong."""
        ...

    @property
    def clock_rate(self) -> float:
        """Event-time seconds per wall second: 1.0 live, a replay's speed, 0.0 at full speed."""
        ...

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        """Deliver ticks to `sink`, skipping those with `seq <= resume_after[symbol]`."""
        ...


# Adapters registered in code (tests, embedding): they win over entry points of the same name.
_REGISTERED: dict[str, type[Adapter]] = {}


def register(name: str, cls: type[Adapter]) -> None:
    """Register an adapter class under `name` for this process (tests and embedding)."""
    if not (isinstance(cls, type) and callable(getattr(cls, "run", None))):
        raise AdapterError(f"{cls!r} is not an adapter class (it needs a run method)")
    _REGISTERED[name] = cls


def load_adapters(
    errors: dict[str, str] | None = None, origins: dict[str, AdapterInfo] | None = None
) -> dict[str, type[Adapter]]:
    """Every adapter registered in code or under the `mdp.adapters` entry points, by name.

    An entry point that fails to import (say an optional dependency is missing) is left out with
    a warning, and its reason is stored in `errors` when given, so one broken plugin cannot keep
    the provider from starting. The built-in adapters are added directly when the distribution
    metadata does not list them. `origins`, when given, receives each adapter's version and
    where it came from.
    """
    found: dict[str, type[Adapter]] = dict(_REGISTERED)
    failed: dict[str, str] = {}
    seen: dict[str, AdapterInfo] = {n: AdapterInfo(n, VERSION, "registered") for n in found}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found or ep.name in failed:
            if ep.name not in _REGISTERED:
                log.warning("adapter_duplicate", adapter=ep.name, ignored=ep.value)
            continue
        _register(found, failed, ep.name, ep.value, ep.load)
        dist = ep.dist
        seen[ep.name] = AdapterInfo(
            ep.name,
            dist.version if dist is not None else "",
            f"entry-point:{dist.name}" if dist is not None else "entry-point",
        )
    for name, target in BUILTIN_ADAPTERS.items():
        if name not in found and name not in failed:
            _register(found, failed, name, target, functools.partial(_import, target))
            seen[name] = AdapterInfo(name, VERSION, "builtin")
    if errors is not None:
        errors.update(failed)
    if origins is not None:
        origins.update({name: info for name, info in seen.items() if name in found})
    return found


def resolve_hosted(
    wanted: Sequence[str],
    registry: Mapping[str, type[Adapter]],
    origins: dict[str, AdapterInfo] | None = None,
) -> dict[str, type[Adapter]]:
    """The adapters a provider process hosts: names from `registry`, or `module:Class` specs.

    Empty `wanted` means every registered adapter. `AdapterError` names what cannot be hosted.
    """
    if not wanted:
        return dict(registry)
    hosted: dict[str, type[Adapter]] = {}
    for spec in wanted:
        if ":" in spec:
            try:
                cls = _import(spec)
            except Exception as exc:
                raise AdapterError(f"adapter {spec!r} cannot be loaded: {exc!r}") from None
            name = getattr(cls, "name", None)
            if not isinstance(cls, type) or not callable(getattr(cls, "run", None)):
                raise AdapterError(f"{spec!r} is not an adapter class (it needs a run method)")
            if not isinstance(name, str) or not name:
                raise AdapterError(f"{spec!r} has no `name` class attribute")
            hosted[name] = cast(type[Adapter], cls)
            if origins is not None:
                origins[name] = AdapterInfo(name, VERSION, f"module:{spec}")
            continue
        if spec not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise AdapterError(f"unknown adapter {spec!r} (registered: {known})")
        hosted[spec] = registry[spec]
    return hosted


def get_adapter(name: str, adapters: Mapping[str, type[Adapter]] | None = None) -> type[Adapter]:
    """The adapter class registered as `name`; `AdapterError` naming the known ones otherwise."""
    registry = load_adapters() if adapters is None else adapters
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise AdapterError(f"unknown adapter {name!r} (registered: {known})") from None


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _register(
    found: dict[str, type[Adapter]],
    failed: dict[str, str],
    name: str,
    target: str,
    load: Callable[[], Any],
) -> None:
    try:
        obj = load()
    except Exception as exc:  # any import-time failure of a plugin must not stop the provider
        reason = f"cannot load {target!r}: {type(exc).__name__}: {exc}"
    else:
        if isinstance(obj, type) and callable(getattr(obj, "run", None)):
            found[name] = cast(type[Adapter], obj)
            return
        reason = f"{target!r} is not an adapter class (it needs a run method)"
    log.warning("adapter_unavailable", adapter=name, reason=reason)
    failed[name] = reason


# ---------------------------------------------------------------------------------------------
# Params: one model per adapter, one message shape, "<adapter>: params.<key>: <problem>".


class AdapterParams(BaseModel):
    """Base of an adapter's `Params`: strict types (a `"5"` is not 5), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def check_job(self, adapter: str) -> None:
        """Raise `AdapterError` when a job cannot run with these (complete) params."""


M = TypeVar("M", bound=BaseModel)


def params_model(adapter: type[Adapter]) -> type[AdapterParams] | None:
    """The adapter class's `Params` model, None when it declares none (params pass through)."""
    model = getattr(adapter, "Params", None)
    return model if isinstance(model, type) and issubclass(model, AdapterParams) else None


def params_models(adapters: Mapping[str, type[Adapter]]) -> dict[str, type[AdapterParams]]:
    """Every adapter's `Params` by adapter name (for checking the providers file)."""
    found = {name: params_model(cls) for name, cls in adapters.items()}
    return {name: model for name, model in found.items() if model is not None}


def check_params(adapter: str, model: type[M], params: Mapping[str, Any]) -> M:
    """A job's `params` validated by `model`; `AdapterError` naming every bad key otherwise."""
    try:
        checked = model.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(
            f"params.{'.'.join(str(p) for p in e['loc'] if p not in ('float', 'int'))}: "
            + ("unknown parameter" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors(include_url=False)
        )
        raise AdapterError(f"{adapter}: {problems}") from None
    if isinstance(checked, AdapterParams):
        checked.check_job(adapter)
    return checked


def job_symbols(job: JobSpec) -> list[str]:
    """The job's symbols, de-duplicated in order; `AdapterError` for an empty or non-str one."""
    for symbol in job.symbols:
        if not isinstance(symbol, str) or not symbol:
            raise AdapterError(
                f"{job.provider}: job.symbols must be non-empty strings, got {symbol!r}"
            )
    return list(dict.fromkeys(job.symbols))
