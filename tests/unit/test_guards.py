"""The guards of control requests: order, stable codes, defaults from the config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from mdp.services.control.guards import (
    ControlError,
    build_job,
    check_capacity,
    expired,
    is_live,
    job_state,
    next_deadline,
    parse_reset,
    parse_start,
    parse_stop,
    standby_jobs,
)
from mdp.services.provider.adapters.base import AdapterError, AdapterParams, TickSink
from mdp.services.provider.adapters.replay import ReplayAdapter
from mdp.services.provider.adapters.synthetic import SyntheticAdapter
from mdp.shared.config import Config, load_config
from mdp.shared.contract.control import JobSpec, StartRequest
from mdp.shared.contract.records import ProviderState

NOW = 1_800_000_000_000_000_000


def config(**env: str) -> Config:
    return load_config(None, env)


def code_of(fn: object, *args: object) -> str:
    with pytest.raises(ControlError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


def start(body: bytes, cfg: Config | None = None) -> JobSpec:
    return build_job(parse_start(body), cfg or config(), NOW)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"provider": 5}',
        b'{"symbols": ["AAPL"]}',
        b'{"provider": "synthetic", "symbols": "AAPL"}',
        b'{"provider": "synthetic", "dry_run": "yes"}',
        b'{"provider": "synthetic", "surprise": 1}',
        b'{"provider": "synthetic", "job": "no spaces"}',
        b'["synthetic"]',
        b"\xff\xfe",
    ],
)
def test_malformed_or_mistyped_requests_are_invalid_request(body: bytes) -> None:
    assert code_of(parse_start, body) == "invalid_request"


def test_codes_in_guard_order() -> None:
    cfg = config(MDP_PROVIDERS__SYNTHETIC__SYMBOLS="[]")
    # Each request fails several guards; the first in order answers.
    assert code_of(start, b'{"provider": "nope", "symbols": [" bad"]}', cfg) == "unknown_provider"
    assert code_of(start, b'{"provider": "ibkr", "symbols": []}', cfg) == "provider_disabled"
    assert code_of(start, b'{"provider": "synthetic"}', cfg) == "symbols_empty"
    assert code_of(start, b'{"provider": "synthetic", "symbols": []}', cfg) == "symbols_empty"
    body = b'{"provider": "synthetic", "symbols": ["OK", "\\u0000"], "params": {"x": 1}}'
    assert code_of(start, body, cfg) == "symbol_invalid"
    body = b'{"provider": "synthetic", "symbols": ["OK"], "params": {"rate": "fast"}}'
    assert code_of(start, body, cfg) == "invalid_request"


@pytest.mark.parametrize(
    "symbol",
    ["", " AAPL", "AAPL ", "A\tB", "A\nB", "\x7f", "X" * 65, "\\ud800"],
)
def test_symbols_that_fail_the_pattern_or_are_no_text(symbol: str) -> None:
    body = '{"provider": "synthetic", "symbols": ["' + symbol.replace("\n", "\\n") + '"]}'
    body = body.replace("\t", "\\t").replace("\x7f", "\\u007f")
    assert code_of(start, body.encode()) == "symbol_invalid"


def test_real_symbols_pass_and_are_deduplicated() -> None:
    symbols = ["BRK.B", "BTC/USD", "ES 202412", "BTCUSD_PERP.BINANCE", "^GSPC", "6E=F", "Ä"]
    body = msgspec_body({"provider": "synthetic", "symbols": [*symbols, "BRK.B"]})
    assert start(body).symbols == symbols


def msgspec_body(obj: object) -> bytes:
    import msgspec

    return msgspec.json.encode(obj)


def test_a_custom_pattern_applies() -> None:
    cfg = config(
        MDP_POLICY__GUARDS__SYMBOL_PATTERN="'^[A-Z]{1,5}$'",
        MDP_PROVIDERS__SYNTHETIC__SYMBOLS="[AAPL]",
    )
    assert start(b'{"provider": "synthetic", "symbols": ["AAPL"]}', cfg).symbols == ["AAPL"]
    body = b'{"provider": "synthetic", "symbols": ["BRK.B"]}'
    assert code_of(start, body, cfg) == "symbol_invalid"


def test_symbols_default_from_the_provider_config() -> None:
    assert start(b'{"provider": "synthetic"}').symbols == ["AAPL", "MSFT", "BRK.B", "BTC/USD"]


def test_a_source_provides_the_symbols_of_a_replay() -> None:
    spec = start(b'{"provider": "replay", "params": {"path": "/data/x.csv"}}')
    assert spec.symbols == []
    assert spec.params == {"path": "/data/x.csv", "speed": "max"}
    assert code_of(start, b'{"provider": "replay"}') == "invalid_request"  # no path


def test_guards_can_be_relaxed() -> None:
    cfg = config(
        MDP_POLICY__GUARDS__REQUIRE_PROVIDER_ENABLED="false",
        MDP_POLICY__GUARDS__REQUIRE_SYMBOLS_NONEMPTY="false",
    )
    assert start(b'{"provider": "ibkr", "symbols": ["AAPL"]}', cfg).provider == "ibkr"
    assert start(b'{"provider": "synthetic", "symbols": []}', cfg).symbols == []


def test_too_many_symbols() -> None:
    cfg = config(MDP_POLICY__GUARDS__MAX_SYMBOLS="2")
    body = b'{"provider": "synthetic", "symbols": ["A", "B", "C"]}'
    with pytest.raises(ControlError) as info:
        start(body, cfg)
    assert info.value.code == "invalid_request"
    assert "guards.max_symbols = 2" in info.value.message


def test_params_merge_config_and_request_and_are_checked() -> None:
    spec = start(b'{"provider": "synthetic", "params": {"rate": 500, "max_ticks": 10}}')
    assert spec.params == {"rate": 500, "seed": 1, "max_ticks": 10}
    body = b'{"provider": "synthetic", "params": {"rte": 5}}'
    with pytest.raises(ControlError) as info:
        start(body)
    assert info.value.code == "invalid_request"
    assert "params.rte: unknown parameter" in info.value.message
    ibkr = start(
        b'{"provider": "ibkr", "symbols": ["AAPL"], "params": {"port": 4002}}',
        config(MDP_PROVIDERS__IBKR__ENABLED="true"),
    )
    assert ibkr.params["port"] == 4002 and ibkr.params["client_id"] == 17


class PolygonAdapter:
    """A third-party adapter with its own params model."""

    name: ClassVar[str] = "polygon"

    class Params(AdapterParams):
        """Its params."""

        api_key_env: str

    def __init__(self, job: JobSpec) -> None:
        self.job = job

    @property
    def clock_rate(self) -> float:
        return 1.0

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        del sink, resume_after


class BarePolygonAdapter(PolygonAdapter):
    """The same adapter without a params model."""

    Params = None  # type: ignore[assignment]


def test_params_are_checked_by_the_adapter_model_from_the_registry() -> None:
    cfg = config(MDP_PROVIDERS__POLYGON__SYMBOLS="[AAPL]")
    request = parse_start(b'{"provider": "polygon", "params": {"api_key_env": 5}}')
    with pytest.raises(ControlError) as info:
        build_job(request, cfg, NOW, {"polygon": PolygonAdapter})
    assert info.value.code == "invalid_request"
    assert info.value.message == "polygon: params.api_key_env: Input should be a valid string"
    request = parse_start(b'{"provider": "polygon", "params": {"api_key_env": "K"}}')
    assert build_job(request, cfg, NOW, {"polygon": PolygonAdapter}).params == {"api_key_env": "K"}
    # Without a model (or without an adapter here), the params pass through unchecked.
    request = parse_start(b'{"provider": "polygon", "params": {"anything": [1]}}')
    assert build_job(request, cfg, NOW, {"polygon": BarePolygonAdapter}).params == {"anything": [1]}
    assert build_job(request, cfg, NOW, {}).params == {"anything": [1]}


@pytest.mark.parametrize(
    ("provider", "params"),
    [
        ("synthetic", {"rate": 0, "rte": 1}),
        ("synthetic", {"start_price": 0.01}),
        ("replay", {"speed": -1, "path": "/x.csv"}),
        ("replay", {"speed": 2}),
    ],
)
def test_guards_and_adapter_give_the_same_message(provider: str, params: dict[str, Any]) -> None:
    body = msgspec_body({"provider": provider, "symbols": ["A"], "params": params})
    with pytest.raises(ControlError) as refused:
        start(body)
    adapter = SyntheticAdapter if provider == "synthetic" else ReplayAdapter
    with pytest.raises(AdapterError) as failed:
        adapter(JobSpec(job="j", provider=provider, symbols=["A"], params=params))
    assert refused.value.message == str(failed.value)


def test_dry_run_from_request_else_policy() -> None:
    assert start(b'{"provider": "synthetic"}').dry_run is False
    assert start(b'{"provider": "synthetic", "dry_run": true}').dry_run is True
    cfg = config(MDP_POLICY__WRITE_PATH__DRY_RUN="true")
    assert start(b'{"provider": "synthetic"}', cfg).dry_run is True
    assert start(b'{"provider": "synthetic", "dry_run": false}', cfg).dry_run is False


def test_deadline_from_max_runtime() -> None:
    assert start(b'{"provider": "synthetic"}').deadline_ns == 0
    cfg = config(MDP_POLICY__WRITE_PATH__MAX_RUNTIME_SECONDS="2.5")
    spec = start(b'{"provider": "synthetic", "job": "j-1"}', cfg)
    assert spec.deadline_ns == NOW + 2_500_000_000
    assert spec.started_ns == NOW and spec.run == f"j-1-{NOW:x}" and spec.job == "j-1"


def job(name: str, deadline_ns: int = 0) -> JobSpec:
    return JobSpec(job=name, provider="synthetic", symbols=["A"], deadline_ns=deadline_ns)


def test_capacity_same_job_and_limit() -> None:
    live = {"a": job("a"), "b": job("b")}
    with pytest.raises(ControlError) as info:
        check_capacity(job("a"), live, 8)
    assert info.value.code == "already_running" and "'a' is already running" in info.value.message
    with pytest.raises(ControlError) as info:
        check_capacity(job("c"), live, 2)
    assert info.value.code == "already_running"
    assert "guards.max_concurrent_jobs = 2" in info.value.message
    check_capacity(job("c"), live, 3)


def test_deadlines() -> None:
    jobs = {"a": job("a", 30), "b": job("b", 10), "c": job("c", 0), "d": job("d", 50)}
    assert [spec.job for spec in expired(jobs, 30)] == ["b", "a"]
    assert next_deadline(jobs) == 10
    assert next_deadline({"c": job("c")}) == 0


def test_job_state_follows_the_provider_report_of_this_run() -> None:
    spec = JobSpec(job="a", provider="synthetic", symbols=["A"], run="a-1")
    assert job_state(spec, None) == "pending"
    assert job_state(spec, ProviderState("j", "a-0", "p", "completed", 1)) == "pending"
    assert job_state(spec, ProviderState("j", "a-1", "p", "running", 1)) == "running"
    assert is_live("pending") and is_live("running") and not is_live("completed")
    assert not is_live("failed")


def test_stop_request() -> None:
    assert parse_stop(b"").job == "default"
    request = parse_stop(b'{"job": "j1", "reason": "maintenance"}')
    assert (request.job, request.reason) == ("j1", "maintenance")
    assert code_of(parse_stop, b'{"job": 1}') == "invalid_request"
    assert code_of(parse_stop, b'{"reason": "has spaces"}') == "invalid_request"


def test_reset_request() -> None:
    assert parse_reset(b'{"provider": "ibkr"}', config()).provider == "ibkr"  # disabled is fine

    def refused(body: bytes) -> ControlError:
        with pytest.raises(ControlError) as info:
            parse_reset(body, config())
        return info.value

    unknown = refused(b'{"provider": "polygon"}')
    assert (unknown.code, unknown.status) == ("unknown_provider", 404)
    assert unknown.message == (
        "reset request: provider 'polygon' is not configured (configured: ibkr, replay, synthetic)"
    )
    for body, field in (
        (b"", "missing required field `provider`"),
        (b"{}", "missing required field `provider`"),
        (b'{"provider": 5}', "Expected `str`, got `int` - at `$.provider`"),
        (b'{"provider": "ibkr", "job": "x"}', "unknown field `job`"),
        (b"{oops", "malformed JSON"),
    ):
        error = refused(body)
        assert (error.code, error.status) == ("invalid_request", 400), body
        assert error.message.startswith("reset request: ") and field in error.message, body


def test_http_status_per_code() -> None:
    statuses = {
        code: ControlError(code, "x").status
        for code in (
            "invalid_request",
            "unknown_provider",
            "provider_disabled",
            "symbols_empty",
            "symbol_invalid",
            "already_running",
            "config_invalid",
            "internal",
        )
    }
    assert statuses == {
        "invalid_request": 400,
        "unknown_provider": 404,
        "provider_disabled": 409,
        "symbols_empty": 400,
        "symbol_invalid": 400,
        "already_running": 409,
        "config_invalid": 400,
        "internal": 500,
    }


def test_start_request_type_is_the_contract() -> None:
    assert StartRequest(provider="synthetic").job == "default"


def test_standbys_follow_the_fallback_order_of_each_symbol() -> None:
    cfg = config(
        MDP_PROVIDERS__FALLBACK__DEFAULT="[replay, synthetic, ibkr]",
        MDP_PROVIDERS__FALLBACK__SYMBOLS='{"BTC/USD": [synthetic]}',
        MDP_PROVIDERS__IBKR__ENABLED="true",
    )
    spec = start(b'{"provider": "synthetic", "symbols": ["AAPL", "BTC/USD"]}', cfg)
    # replay is not a live adapter; ibkr backs up AAPL only (BTC/USD names synthetic alone).
    [ibkr] = standby_jobs(spec, cfg, {"synthetic", "ibkr"})
    assert (ibkr.job, ibkr.provider, ibkr.symbols) == ("default-standby-ibkr", "ibkr", ["AAPL"])
    assert ibkr.standby_of == "default" and ibkr.deadline_ns == spec.deadline_ns
    assert ibkr.params["port"] == 7497  # the provider's own configured params
    assert code_of(standby_jobs, spec, cfg, {"synthetic"}) == "no_fallback"
    assert code_of(standby_jobs, spec, cfg, {"ibkr"}) == "invalid_request"  # not a live job
    disabled = config(MDP_PROVIDERS__FALLBACK__DEFAULT="[synthetic, ibkr]")
    assert code_of(standby_jobs, spec, disabled, {"synthetic", "ibkr"}) == "no_fallback"
