"""The config files: shipped defaults, validation messages, environment overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mdp.services.provider.adapters.base import load_adapters, params_models
from mdp.services.provider.adapters.synthetic import SyntheticAdapter
from mdp.shared import config as config_module
from mdp.shared.breaker import BreakerConfig
from mdp.shared.config import (
    POLICY_FILE,
    PROVIDERS_FILE,
    CircuitConfig,
    Config,
    ConfigError,
    EffectivePolicy,
    PacingSection,
    find_config_dir,
)
from mdp.shared.settings import Settings

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "mdp" / "configs"
# As control loads them: each provider's params checked by its adapter's own model.
PARAMS_MODELS = params_models(load_adapters())


def load_config(config_dir: Path | None, env: dict[str, str] | None = None) -> Config:
    return config_module.load_config(config_dir, env, PARAMS_MODELS)


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def problems(config_dir: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(config_dir, env or {})
    return info.value.problems


def test_shipped_files_are_valid_and_equal_the_built_in_defaults() -> None:
    shipped = load_config(REPO_CONFIGS, {})
    defaults = load_config(None, {})
    assert shipped.providers == defaults.providers
    assert shipped.policy == defaults.policy
    assert shipped.sources[POLICY_FILE] == str(REPO_CONFIGS / POLICY_FILE)
    assert defaults.sources[POLICY_FILE] == "built-in defaults"


def test_shipped_defaults_are_a_safe_production_start() -> None:
    config = load_config(REPO_CONFIGS, {})
    assert config.policy.write_path.enabled and not config.policy.write_path.dry_run
    assert config.policy.store_sync.mode == "bus"
    assert config.policy.write_path.max_runtime_seconds == 0
    providers = config.providers.providers
    assert set(providers) == {"synthetic", "replay", "ibkr"}
    assert providers["synthetic"].enabled and providers["synthetic"].symbols
    assert providers["replay"].symbols_from_source
    assert not providers["ibkr"].enabled


def test_the_effective_policy_travels_through_json_with_every_field() -> None:
    config = load_config(
        None,
        {
            "MDP_POLICY__WRITE_PATH__DRY_RUN": "true",
            "MDP_POLICY__STORE_SYNC__MODE": "http",
            "MDP_POLICY__STORE_SYNC__HTTP_URL": "http://store:8080/v1/bars",
            "MDP_POLICY__BATCHING__MAX_ROWS": "100",
        },
    )
    published = config.effective_policy(7)
    policy = EffectivePolicy.model_validate_json(published.model_dump_json())
    assert policy == published
    assert policy.revision == 7
    assert policy.write_path.dry_run and policy.write_path.enabled
    assert policy.store_sync.mode == "http"
    assert policy.store_sync.http_url == "http://store:8080/v1/bars"
    assert policy.batching.max_rows == 100
    assert policy.fallback.default == ["ibkr", "replay", "synthetic"]
    assert policy.bars == config.policy.bars  # the config section itself, not a copy
    shape = json.loads(published.model_dump_json())
    assert shape == {
        "write_path": {"enabled": True, "dry_run": True, "max_runtime_seconds": 0.0},
        "store_sync": {
            "mode": "http",
            "http_url": "http://store:8080/v1/bars",
            "http_timeout_seconds": 10.0,
        },
        "batching": {"max_rows": 100, "max_bytes": 1_000_000, "max_delay_ms": 200},
        "bars": {
            "intervals": ["1s", "1m"],
            "grace_ms": 500,
            "revise_window_seconds": 60.0,
            "price_type": "LAST",
            "max_jump_seconds": 600.0,
            "transit_credit_ms": 100,
        },
        "fallback": {
            "default": ["ibkr", "replay", "synthetic"],
            "symbols": {},
            "strategy": "first_available",
            "detect_seconds": 3.0,
            "hysteresis_seconds": 10.0,
        },
        "circuit": {"failure_threshold": 3, "window_seconds": 60.0, "recovery_seconds": 15.0},
        "pacing": {
            "ibkr": {
                "messages_per_second": 40.0,
                "message_burst": 4,
                "historical_requests": 60,
                "historical_window_seconds": 600.0,
                "identical_interval_seconds": 15.0,
                "per_contract_requests": 6,
                "per_contract_window_seconds": 2.0,
                "block_ttl_seconds": 1.0,
            }
        },
        "revision": 7,
    }
    # A partial value (an older writer, a test) decodes with the defaults; a bad one is refused.
    assert EffectivePolicy.model_validate_json(b'{"revision": 3}').store_sync.mode == "bus"
    with pytest.raises(ValidationError):
        EffectivePolicy.model_validate_json(b'{"store_sync": {"mode": "kafka"}}')


def test_ibkr_is_paced_at_ib_limits_by_default_and_other_providers_are_unlimited() -> None:
    config = load_config(REPO_CONFIGS, {})
    providers = config.providers.providers
    assert providers["ibkr"].pacing == PacingSection()
    ib = providers["ibkr"].pacing
    assert ib is not None and (ib.messages_per_second, ib.historical_requests) == (40, 60)
    # IB allows 50 messages/s: burst + rate + a block of burst/2 for each of two processes.
    assert ib.message_burst + ib.messages_per_second + 2 * (ib.message_burst // 2) < 50
    assert (ib.historical_window_seconds, ib.identical_interval_seconds) == (600, 15)
    assert (ib.per_contract_requests, ib.per_contract_window_seconds) == (6, 2)
    assert providers["synthetic"].pacing is None and providers["replay"].pacing is None
    assert set(config.effective_policy(1).pacing) == {"ibkr"}
    # A plugin provider may be paced; ibkr's budget lifted with null; a partial section takes
    # IB's values for the keys left out.
    config = load_config(
        None,
        {
            "MDP_PROVIDERS__POLYGON__PACING": "{messages_per_second: 5, message_burst: 2}",
            "MDP_PROVIDERS__IBKR__PACING": "null",
        },
    )
    pacing = config.effective_policy(2).pacing
    assert set(pacing) == {"polygon"}
    assert pacing["polygon"].messages_per_second == 5 and pacing["polygon"].message_burst == 2
    assert pacing["polygon"].historical_requests == 60


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("messages_per_second", "0", "Input should be greater than 0 (got 0)"),
        ("message_burst", "-3", "Input should be greater than 0 (got -3)"),
        ("historical_requests", "0", "Input should be greater than 0 (got 0)"),
        ("historical_window_seconds", "-600.0", "Input should be greater than 0 (got -600.0)"),
        ("identical_interval_seconds", "0.0", "Input should be greater than 0 (got 0.0)"),
        ("per_contract_requests", "-1", "Input should be greater than 0 (got -1)"),
        ("per_contract_window_seconds", "0", "Input should be greater than 0 (got 0)"),
        ("block_ttl_seconds", "-1", "Input should be greater than 0 (got -1)"),
        ("messages_per_second", ".inf", "Input should be a finite number (got inf)"),
        ("message_burst", "2.5", "Input should be a valid integer (got 2.5)"),
    ],
)
def test_a_pacing_budget_that_is_not_positive_names_file_and_key_path(
    tmp_path: Path, key: str, value: str, problem: str
) -> None:
    text = (REPO_CONFIGS / PROVIDERS_FILE).read_text()
    assert f"\n    {key}: " in text  # every key is written out in the shipped ibkr section
    bad = "\n".join(
        f"    {key}: {value}" if line.startswith(f"    {key}: ") else line
        for line in text.splitlines()
    )
    path = write(tmp_path, PROVIDERS_FILE, bad)
    assert problems(tmp_path) == [f"{path}: ibkr.pacing.{key}: {problem}"]
    # The same through the environment, for a plugin provider: blamed on the variable.
    variable = f"MDP_PROVIDERS__POLYGON__PACING__{key.upper()}"
    assert problems(None, {variable: value}) == [
        f"{variable} (environment): polygon.pacing.{key}: {problem}"
    ]


def test_an_unknown_pacing_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = write(tmp_path, PROVIDERS_FILE, "synthetic:\n  pacing:\n    rate: 5\n")
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{path}: synthetic.pacing.rate: unknown key (allowed: ")
    assert "block_ttl_seconds, historical_requests" in problem


def test_unknown_key_names_file_path_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY_FILE, "write_path:\n  enabeld: false\n")
    [problem] = problems(tmp_path)
    assert problem == (
        f"{path}: write_path.enabeld: unknown key (allowed: dry_run, enabled, max_runtime_seconds)"
    )


def test_wrong_type_is_not_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY_FILE, 'write_path:\n  max_runtime_seconds: "ten"\n')
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{path}: write_path.max_runtime_seconds: ")
    assert "number" in problem and "'ten'" in problem
    write(tmp_path, POLICY_FILE, 'write_path:\n  enabled: "yes"\n')
    [problem] = problems(tmp_path)
    assert "write_path.enabled" in problem and "boolean" in problem


def test_bad_mode_lists_the_modes(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY_FILE, "store_sync:\n  mode: kafka\n")
    [problem] = problems(tmp_path)
    assert (
        problem == f"{path}: store_sync.mode: Input should be 'bus', 'http' or 'none' (got 'kafka')"
    )


def test_every_problem_of_both_files_is_reported(tmp_path: Path) -> None:
    write(tmp_path, POLICY_FILE, "store_sync:\n  mode: kafka\nguards:\n  max_symbols: 0\n")
    write(tmp_path, PROVIDERS_FILE, "synthetic:\n  params:\n    rate: -1\n")
    found = problems(tmp_path)
    assert len(found) == 3
    assert any("synthetic.params.rate" in p and "greater than 0" in p for p in found)
    assert any("guards.max_symbols" in p for p in found)
    message = ConfigError(found).message
    assert message.startswith("invalid configuration:\n  ")


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY_FILE, "write_path:\n  enabled: [true\n")
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{path}: line ")
    assert "YAML syntax error" in problem


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, PROVIDERS_FILE, "- synthetic\n")
    assert problems(tmp_path) == [f"{path}: (top level): must be a mapping of keys, got a list"]


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    write(tmp_path, POLICY_FILE, "# nothing set\n")
    assert load_config(tmp_path, {}).policy == load_config(None, {}).policy


def test_bad_symbol_pattern_and_intervals_and_url(tmp_path: Path) -> None:
    write(
        tmp_path,
        POLICY_FILE,
        "guards:\n  symbol_pattern: '(['\nbars:\n  intervals: [1x]\n"
        "store_sync:\n  http_url: ftp://x\n",
    )
    found = problems(tmp_path)
    assert any(p.endswith("(got '([')") and "guards.symbol_pattern" in p for p in found)
    assert any("bars.intervals" in p and "1x" in p for p in found)
    assert any("store_sync.http_url" in p and "http(s)" in p for p in found)


def test_circuit_section_defaults_overrides_and_the_breaker_it_makes(tmp_path: Path) -> None:
    shipped = load_config(REPO_CONFIGS, {}).policy.circuit
    assert shipped == CircuitConfig()
    # One set of defaults: the pure breaker's are the policy's.
    assert shipped.breaker() == BreakerConfig()
    config = load_config(None, {"MDP_POLICY__CIRCUIT__RECOVERY_SECONDS": "2.5"})
    assert config.policy.circuit.recovery_seconds == 2.5
    assert config.effective_policy(1).circuit.breaker().recovery_ns == 2_500_000_000
    write(tmp_path, POLICY_FILE, "circuit:\n  failure_threshold: 5\n  window_seconds: 30\n")
    circuit = load_config(tmp_path, {}).policy.circuit
    assert (circuit.failure_threshold, circuit.window_seconds, circuit.recovery_seconds) == (
        5,
        30,
        15,
    )


def test_bad_circuit_values_are_refused_with_their_key_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        POLICY_FILE,
        "circuit:\n  failure_threshold: 0\n  window_seconds: -1\n  recovery_seconds: soon\n",
    )
    found = problems(tmp_path)
    assert found == [
        f"{path}: circuit.failure_threshold: Input should be greater than or equal to 1 (got 0)",
        f"{path}: circuit.window_seconds: Input should be greater than 0 (got -1)",
        f"{path}: circuit.recovery_seconds: Input should be a valid number (got 'soon')",
    ]
    write(tmp_path, POLICY_FILE, "circuit:\n  failure_threshold: 2.5\n  treshold: 1\n")
    found = problems(tmp_path)
    assert f"{path}: circuit.failure_threshold: Input should be a valid integer (got 2.5)" in found
    assert (
        f"{path}: circuit.treshold: unknown key "
        "(allowed: failure_threshold, recovery_seconds, window_seconds)"
    ) in found
    [problem] = problems(None, {"MDP_POLICY__CIRCUIT__RECOVERY_SECONDS": "0"})
    assert problem == (
        "MDP_POLICY__CIRCUIT__RECOVERY_SECONDS (environment): circuit.recovery_seconds: "
        "Input should be greater than 0 (got 0)"
    )


def test_fallback_names_must_be_configured_providers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        PROVIDERS_FILE,
        "synthetic: {symbols: [AAPL]}\nfallback:\n  default: [synthetic, polygon]\n"
        "  symbols: {AAPL: [replay]}\n",
    )
    found = problems(tmp_path)
    assert f"{path}: fallback.default[1]: 'polygon' is not a configured provider" in found[0]
    assert "fallback.symbols.AAPL[0]: 'replay'" in found[1]


def test_configured_symbols_must_fit_the_pattern(tmp_path: Path) -> None:
    write(tmp_path, PROVIDERS_FILE, "synthetic:\n  symbols: [AAPL, ' MSFT']\n")
    [problem] = problems(tmp_path)
    assert "synthetic.symbols[1]: ' MSFT' does not match guards.symbol_pattern" in problem


def test_a_missing_section_means_the_provider_is_not_configured(tmp_path: Path) -> None:
    write(tmp_path, PROVIDERS_FILE, "synthetic: {symbols: [AAPL]}\npolygon: {}\n")
    config = load_config(tmp_path, {})
    assert list(config.providers.providers) == ["synthetic", "polygon"]
    # Without an explicit fallback order: the configured ones, built-ins first.
    assert config.providers.source_order("AAPL") == ["synthetic", "polygon"]


def test_null_section_unconfigures_a_provider_and_plugins_pass_params_through(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        PROVIDERS_FILE,
        "synthetic: {}\nibkr: null\npolygon:\n  symbols: [AAPL]\n"
        "  params: {api_key_env: POLYGON_KEY}\nfallback: {default: [polygon, synthetic]}\n",
    )
    providers = load_config(tmp_path, {}).providers.providers
    assert "ibkr" not in providers
    assert providers["polygon"].params == {"api_key_env": "POLYGON_KEY"}
    assert providers["polygon"].enabled


def test_environment_overrides_nested_keys_with_yaml_values(tmp_path: Path) -> None:
    write(tmp_path, POLICY_FILE, "write_path:\n  enabled: true\n")
    config = load_config(
        tmp_path,
        {
            "MDP_POLICY__WRITE_PATH__ENABLED": "false",
            "MDP_POLICY__WRITE_PATH__MAX_RUNTIME_SECONDS": "90",
            "MDP_PROVIDERS__SYNTHETIC__SYMBOLS": "[IBM, BRK.B]",
            "MDP_PROVIDERS__SYNTHETIC__PARAMS__RATE": "500",
            "MDP_PROVIDERS__FALLBACK__SYMBOLS": '{"BTC/USD": [synthetic]}',
            "MDP_UNRELATED": "x",
        },
    )
    assert config.policy.write_path.enabled is False
    assert config.policy.write_path.max_runtime_seconds == 90
    synthetic = config.providers.providers["synthetic"]
    assert synthetic.symbols == ["IBM", "BRK.B"]
    assert synthetic.params == {"rate": 500, "seed": 1}
    # The section's params are checked by the adapter's own model: one set of rules.
    assert PARAMS_MODELS["synthetic"] is SyntheticAdapter.Params
    assert config.providers.source_order("BTC/USD") == ["synthetic"]
    assert config.providers.source_order("AAPL") == ["ibkr", "replay", "synthetic"]


def test_a_bad_environment_override_is_blamed_on_the_variable(tmp_path: Path) -> None:
    write(tmp_path, POLICY_FILE, "store_sync:\n  mode: bus\n")
    found = problems(
        tmp_path,
        {"MDP_POLICY__STORE_SYNC__MODE": "kafka", "MDP_POLICY__WRITE_PATH__ENABLD": "1"},
    )
    assert "MDP_POLICY__STORE_SYNC__MODE (environment): store_sync.mode: " in found[1]
    assert found[0].startswith("MDP_POLICY__WRITE_PATH__ENABLD (environment): write_path.enabld")
    found = problems(None, {"MDP_PROVIDERS__FALLBACK__DEFAULT": "[nope]"})
    assert found[0].startswith("MDP_PROVIDERS__FALLBACK__DEFAULT (environment): fallback.default")


def test_an_override_below_a_scalar_is_refused() -> None:
    [problem] = problems(
        None, {"MDP_POLICY__WRITE_PATH": "5", "MDP_POLICY__WRITE_PATH__ENABLED": "true"}
    )
    assert problem.startswith("MDP_POLICY__WRITE_PATH__ENABLED (environment): write_path: ")
    assert "not a mapping" in problem


def test_config_dir_lookup(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    assert find_config_dir({}, tmp_path) == tmp_path / "configs"
    assert find_config_dir({"MDP_CONFIG_DIR": "configs"}, tmp_path) == tmp_path / "configs"
    with pytest.raises(ConfigError) as info:
        find_config_dir({"MDP_CONFIG_DIR": str(tmp_path / "nope")}, tmp_path)
    assert info.value.message == (
        f"invalid configuration: MDP_CONFIG_DIR={tmp_path / 'nope'}: not a directory"
    )
    # Without ./configs the source checkout's own files are found.
    assert find_config_dir({}, tmp_path / "configs") == REPO_CONFIGS


def test_service_http_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDP_CONTROL__HTTP_PORT", "8091")
    monkeypatch.setenv("MDP_CONTROL__HTTP_TOKEN", "s3cret")
    monkeypatch.setenv("MDP_STORE__HTTP_TOKEN", "other")
    monkeypatch.setenv("MDP_STORE__WRITE_TIMEOUT_S", "0.25")
    monkeypatch.delenv("MDP_STORE_URL", raising=False)
    settings = Settings()
    control = settings.control
    assert (control.http_port, control.http_token, control.http_host) == (
        8091,
        "s3cret",
        "127.0.0.1",
    )
    store = settings.store
    assert (store.http_port, store.http_token, store.forward_token) == (0, "other", "")
    assert store.write_timeout_s == 0.25
    assert settings.store_url == "sqlite:///var/mdp.db"  # MDP_STORE_URL is not a store key


def test_data_stopped_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MDP_PROVIDER__DATA_STOPPED_AFTER_S", raising=False)
    assert Settings().provider.data_stopped_after_s == 30
    monkeypatch.setenv("MDP_PROVIDER__DATA_STOPPED_AFTER_S", "0")
    assert Settings().provider.data_stopped_after_s == 0  # off
    monkeypatch.setenv("MDP_PROVIDER__DATA_STOPPED_AFTER_S", "-1")
    with pytest.raises(ValidationError, match="data_stopped_after_s"):
        Settings()


def test_a_stream_age_shorter_than_its_duplicate_window_names_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MDP_STREAM__RAW_MAX_AGE_S", "30")
    with pytest.raises(ValidationError, match=r"raw_max_age_s \(30 s\) is shorter than tick_dup"):
        Settings()
    monkeypatch.setenv("MDP_STREAM__TICK_DUPLICATE_WINDOW_S", "20")
    assert Settings().stream.raw_max_age_s == 30
