"""Validation of control requests into job specs (pure): every refusal has a stable code.

The guards of a start request run in this order, the first failure answering:
`invalid_request` (malformed JSON, wrong types, bad job name) -> `unknown_provider` (not in
data_providers.yaml) -> `provider_disabled` -> `symbols_empty` -> `symbol_invalid` (fails the
pattern, or would not survive as text) -> `invalid_request` (too many symbols, bad params) ->
`path_not_allowed` (a replay path outside `MDP_REPLAY__ROOTS`) -> `already_running` (the same
job is live, or the job limit is reached). A reset request is `invalid_request` (malformed, no
text `provider`) or `unknown_provider`.

Every body is decoded strictly into its struct of `mdp.shared.contract.control`: any other JSON
type anywhere, an unknown field, invalid JSON or UTF-8, or no body where one is required is
`invalid_request`, its message naming the JSON path (msgspec's `- at `$.provider``; `$` for the
body itself; a provider's `params` as `params.<key>`, as the adapter says it).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgspec
from pydantic import BaseModel

from mdp.services.provider.adapters.base import (
    Adapter,
    AdapterError,
    check_params,
    load_adapters,
    params_model,
    params_models,
)
from mdp.services.provider.adapters.replay import PathNotAllowed
from mdp.shared.config import DEFAULT_SYMBOL_PATTERN, Config, ProviderConfig, load_from_environment
from mdp.shared.contract.control import (
    JobSpec,
    ReloadRequest,
    ResetRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
)
from mdp.shared.contract.names import escape_symbol
from mdp.shared.contract.records import ProviderHost, ProviderState
from mdp.shared.runtime import ServiceError

JOB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REASON = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

# HTTP status per error code, for the HTTP facade and the micro error code header.
HTTP_STATUS = {
    "invalid_request": 400,
    "symbols_empty": 400,
    "symbol_invalid": 400,
    "config_invalid": 400,
    "unknown_provider": 404,
    "provider_disabled": 409,
    "already_running": 409,
    "no_fallback": 400,
    "path_not_allowed": 403,
    "internal": 500,
}


class ControlError(ServiceError):
    """A refused control request: `code` is one of the stable codes of the contract."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, HTTP_STATUS.get(code, 500))


R = TypeVar("R")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _invalid(what: str, problem: str) -> ControlError:
    """`invalid_request` whose message always names a JSON path (`$` for the body itself)."""
    # msgspec names the path only below the root: say `$` for a wrong body type too.
    where = "" if " - at `$" in problem else " - at `$`"
    return ControlError("invalid_request", f"{what}: {problem}{where}")


def _decode(body: bytes, typ: type[R], what: str) -> R:
    """`body` decoded strictly as `typ`; any other JSON (or none) is `invalid_request`."""
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        raise _invalid(what, str(exc)) from None
    except RecursionError:
        raise _invalid(what, "JSON nested too deeply") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec refuses `"\ud800"` (a lone surrogate): valid JSON that is no text. Decode it
        # leniently so that such a symbol is refused as `symbol_invalid`, like any other bad one;
        # NaN and Infinity stay refused, as msgspec refuses them.
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise _invalid(what, f"malformed JSON: {exc}") from None
        try:
            return msgspec.convert(data, type=typ)
        except msgspec.ValidationError as err:
            raise _invalid(what, str(err)) from None
        except RecursionError:
            raise _invalid(what, "JSON nested too deeply") from None


def parse_start(body: bytes) -> StartRequest:
    """Decode a start request; malformed JSON or wrong types are `invalid_request`."""
    request: StartRequest = _decode(body.strip() or b"{}", StartRequest, "start request")
    if not JOB_NAME.match(request.job):
        raise ControlError(
            "invalid_request",
            f"start request: job name {request.job!r} is not 1-64 characters of "
            "[A-Za-z0-9_-] - at `$.job`",
        )
    return request


def parse_stop(body: bytes) -> StopRequest:
    """Decode a stop request (the body is optional)."""
    request: StopRequest = _decode(body.strip() or b"{}", StopRequest, "stop request")
    if not JOB_NAME.match(request.job):
        raise ControlError(
            "invalid_request",
            f"stop request: job name {request.job!r} is not 1-64 characters of "
            "[A-Za-z0-9_-] - at `$.job`",
        )
    if not REASON.match(request.reason):
        raise ControlError(
            "invalid_request",
            f"stop request: reason {request.reason!r} is not 1-64 characters of "
            "[A-Za-z0-9_.:-] - at `$.reason`",
        )
    return request


def parse_status(body: bytes) -> StatusRequest:
    """Decode a status request: no body, or `{}`."""
    request: StatusRequest = _decode(body.strip() or b"{}", StatusRequest, "status request")
    return request


def parse_reload(body: bytes) -> ReloadRequest:
    """Decode a reload request: no body, or `{}`."""
    request: ReloadRequest = _decode(body.strip() or b"{}", ReloadRequest, "reload request")
    return request


def parse_reset(body: bytes, config: Config) -> ResetRequest:
    """Decode a reset request; its provider must be configured (`unknown_provider`)."""
    request: ResetRequest = _decode(body.strip() or b"{}", ResetRequest, "reset request")
    providers = config.providers.providers
    if request.provider not in providers:
        known = ", ".join(sorted(providers)) or "none"
        raise ControlError(
            "unknown_provider",
            f"reset request: provider {request.provider!r} is not configured (configured: {known})",
        )
    return request


def check_symbols(symbols: list[str], pattern: str = DEFAULT_SYMBOL_PATTERN) -> list[str]:
    """Return the symbols de-duplicated in order, or raise `symbol_invalid`."""
    regex = re.compile(pattern)
    seen: dict[str, None] = {}
    for symbol in symbols:
        if not isinstance(symbol, str) or not regex.match(symbol):
            raise ControlError(
                "symbol_invalid", f"symbol {symbol!r} does not match the pattern {pattern!r}"
            )
        try:
            escape_symbol(symbol)
        except (ValueError, UnicodeEncodeError):
            raise ControlError(
                "symbol_invalid", f"symbol {symbol!r} cannot be carried as UTF-8 text"
            ) from None
        seen.setdefault(symbol, None)
    return list(seen)


@functools.cache
def _adapters() -> dict[str, type[Adapter]]:
    """The adapter registry, loaded once per process."""
    return load_adapters()


def load_checked_config() -> Config:
    """The config files, each provider's params checked by its adapter's model."""
    return load_from_environment(params_models=params_models(_adapters()))


@runtime_checkable
class RootedParams(Protocol):
    """Params naming files (replay's `path`): confined to the data roots before a job starts."""

    def check_roots(self, roots: Sequence[Path]) -> None:
        """Raise an `AdapterError` (`PathNotAllowed`) for a path outside every root."""


def job_params(
    name: str,
    provider: ProviderConfig,
    requested: Mapping[str, Any],
    adapters: Mapping[str, type[Adapter]] | None = None,
    roots: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """The provider's configured params overridden by the request's, checked when typed.

    The model is the adapter's own `Params` (found in the registry), else the typed params of
    the provider's section when it is a typed model; any other params pass through.
    With `roots`, params that name files must name them under a root (`path_not_allowed`).
    """
    adapter = (_adapters() if adapters is None else adapters).get(name)
    model: type[BaseModel] | None = params_model(adapter) if adapter is not None else None
    if isinstance(provider.params, BaseModel):
        configured: dict[str, Any] = provider.params.model_dump(exclude_none=True)
        model = model or type(provider.params)
    else:
        configured = dict(provider.params)
    merged = {**configured, **requested}
    if model is None:
        return merged
    try:
        checked = check_params(name, model, merged)
        if roots is not None and isinstance(checked, RootedParams):
            checked.check_roots(roots)
    except PathNotAllowed as exc:
        raise ControlError("path_not_allowed", str(exc)) from None
    except AdapterError as exc:
        raise ControlError("invalid_request", str(exc)) from None
    params: dict[str, Any] = checked.model_dump(exclude_none=True)
    return params


def build_job(
    request: StartRequest,
    config: Config,
    now_ns: int,
    adapters: Mapping[str, type[Adapter]] | None = None,
    roots: Sequence[Path] | None = None,
) -> JobSpec:
    """Apply the configuration's guards in order and return the job for `ingest_jobs`.

    `adapters` is the registry whose `Params` models check the params (default: the installed
    adapters, `load_adapters`); `roots` the directories a replay may read (None: any).
    """
    providers = config.providers.providers
    guards = config.policy.guards
    provider = providers.get(request.provider)
    if provider is None:
        known = ", ".join(sorted(providers)) or "none"
        raise ControlError(
            "unknown_provider",
            f"provider {request.provider!r} is not configured (configured: {known})",
        )
    if guards.require_provider_enabled and not provider.enabled:
        raise ControlError(
            "provider_disabled",
            f"provider {request.provider!r} is disabled (enabled: false in data_providers.yaml)",
        )
    symbols = list(provider.symbols) if request.symbols is None else request.symbols
    if not symbols and guards.require_symbols_nonempty and not provider.symbols_from_source:
        raise ControlError(
            "symbols_empty",
            f'no symbols to ingest for provider {request.provider!r}: pass "symbols" or '
            "configure them in data_providers.yaml",
        )
    symbols = check_symbols(symbols, guards.symbol_pattern)
    if len(symbols) > guards.max_symbols:
        raise ControlError(
            "invalid_request",
            f"{len(symbols)} symbols, more than guards.max_symbols = {guards.max_symbols}",
        )
    params = job_params(request.provider, provider, request.params, adapters, roots)
    max_runtime_s = config.policy.write_path.max_runtime_seconds
    return JobSpec(
        job=request.job,
        provider=request.provider,
        symbols=symbols,
        params=params,
        dry_run=config.policy.write_path.dry_run if request.dry_run is None else request.dry_run,
        started_ns=now_ns,
        deadline_ns=now_ns + int(max_runtime_s * 1e9) if max_runtime_s > 0 else 0,
        run=f"{request.job}-{now_ns:x}",
    )


def standby_jobs(
    spec: JobSpec,
    config: Config,
    live_adapters: Set[str],
    adapters: Mapping[str, type[Adapter]] | None = None,
    roots: Sequence[Path] | None = None,
) -> list[JobSpec]:
    """The hot standbys of a live job: one job per other source in its symbols' fallback order.

    A source qualifies when it is configured, enabled and hosted as a live adapter by a running
    provider process (`live_adapters`); it backs up the symbols whose order names it. Each
    standby runs with its provider's configured params, and stops with the job.
    """
    if spec.provider not in live_adapters:
        raise ControlError(
            "invalid_request",
            f"standby: provider {spec.provider!r} is not a live feed hosted by a running "
            "provider process; only a live job can have hot standbys",
        )
    providers = config.providers.providers
    symbols_of: dict[str, list[str]] = {}
    for symbol in spec.symbols:
        for name in config.providers.source_order(symbol):
            candidate = providers.get(name)
            if name == spec.provider or candidate is None or not candidate.enabled:
                continue
            if name in live_adapters:
                symbols_of.setdefault(name, []).append(symbol)
    if not symbols_of:
        orders = sorted({" > ".join(config.providers.source_order(s)) for s in spec.symbols})
        raise ControlError(
            "no_fallback",
            f"standby: nothing can back up {spec.provider!r}: the fallback order of its symbols "
            f"is {'; '.join(orders)} (data_providers.yaml: fallback.default, fallback.symbols), "
            "and a standby needs another configured, enabled provider there that a running "
            "provider process hosts as a live adapter",
        )
    standbys = []
    for name, symbols in symbols_of.items():
        job = f"{spec.job}-standby-{name}"
        if not JOB_NAME.match(job):
            raise ControlError(
                "invalid_request",
                f"standby job name {job!r} is longer than 64 characters; use a shorter job name",
            )
        params = job_params(name, providers[name], {}, adapters, roots)
        standbys.append(
            msgspec.structs.replace(
                spec,
                job=job,
                provider=name,
                symbols=symbols,
                params=params,
                run=f"{job}-{spec.started_ns:x}",
                standby_of=spec.job,
            )
        )
    return standbys


def check_capacity(spec: JobSpec, live: Mapping[str, JobSpec], max_jobs: int) -> None:
    """Refuse (`already_running`) a job that runs already, or one beyond the job limit."""
    current = live.get(spec.job)
    if current is not None:
        raise ControlError(
            "already_running",
            f"job {spec.job!r} is already running provider {current.provider!r}; "
            "stop it first or start another job name",
        )
    if len(live) >= max_jobs:
        raise ControlError(
            "already_running",
            f"{len(live)} jobs are running ({', '.join(sorted(live))}), the limit of "
            f"guards.max_concurrent_jobs = {max_jobs}; stop one first",
        )


def expired(jobs: Mapping[str, JobSpec], now_ns: int) -> list[JobSpec]:
    """The jobs whose deadline has passed, earliest first."""
    due = [spec for spec in jobs.values() if 0 < spec.deadline_ns <= now_ns]
    return sorted(due, key=lambda spec: spec.deadline_ns)


def next_deadline(jobs: Mapping[str, JobSpec]) -> int:
    """The earliest deadline of `jobs` in ns, 0 when none has one."""
    deadlines = [spec.deadline_ns for spec in jobs.values() if spec.deadline_ns > 0]
    return min(deadlines, default=0)


def job_state(spec: JobSpec, provider_state: ProviderState | None) -> str:
    """`pending` until a provider reports on this very run, then what it reports."""
    if provider_state is None or provider_state.run != spec.run:
        return "pending"
    return provider_state.state


def live_host(host: ProviderHost, now_ns: int) -> bool:
    """Whether a provider process's record is fresh (its heartbeat within its ttl)."""
    return now_ns - host.heartbeat_ns <= host.ttl_s * 1e9


def is_live(state: str) -> bool:
    """Whether a job in `state` counts as running (for `already_running` and the job limit)."""
    return state not in ("completed", "failed")
