"""The operator's config files, `data_providers.yaml` and `ingestion_policy.yaml`, as typed models.

Loading is: find the config directory, read each YAML file (a missing file means the built-in
defaults, which equal the shipped files), apply `MDP_*` environment overrides, validate. Every
problem is reported as `<source>: <key path>: <problem>`, where the source is the file or the
environment variable that supplied the bad value, so an operator knows exactly what to fix.

Environment overrides follow the YAML path, `__` between keys, upper case, values parsed as YAML:

    MDP_CONFIG_DIR=/etc/mdp                          the directory holding both files
    MDP_POLICY__WRITE_PATH__ENABLED=false            ingestion_policy.yaml: write_path.enabled
    MDP_POLICY__STORE_SYNC__MODE=http                ingestion_policy.yaml: store_sync.mode
    MDP_PROVIDERS__SYNTHETIC__SYMBOLS='[AAPL, MSFT]' data_providers.yaml: synthetic.symbols
    MDP_PROVIDERS__SYNTHETIC__PARAMS__RATE=500       data_providers.yaml: synthetic.params.rate

A provider's `params:` are checked by its adapter's own `Params` model (`SyntheticAdapter.Params`,
`ReplayAdapter.Params`, `IbkrAdapter.Params`), the very one that checks a job's params in control
and in the adapter: the caller passes those models in (`params_models`), so this module needs no
adapter.

Settings of one process that do not belong in a shared file (ports, bearer tokens, timeouts) are
sections of `mdp.shared.settings.Settings` (`MDP_CONTROL__*`, `MDP_STORE__*`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from mdp.shared.breaker import BreakerConfig
from mdp.shared.contract.messages import check_intervals
from mdp.shared.contract.names import escape_symbol

PROVIDERS_FILE = "data_providers.yaml"
POLICY_FILE = "ingestion_policy.yaml"
ENV_PREFIXES = {POLICY_FILE: "MDP_POLICY__", PROVIDERS_FILE: "MDP_PROVIDERS__"}
CONFIG_DIR_ENV = "MDP_CONFIG_DIR"

# Printable, 1-64 characters, no leading or trailing blank: what survives as a subject token,
# a database key and a CSV field without surprises.
DEFAULT_SYMBOL_PATTERN = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,62}[^\s\x00-\x1f\x7f])?$"


class ConfigError(Exception):
    """Invalid configuration; `problems` are `<source>: <key path>: <problem>` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One line for one problem, else a header and one indented line per problem."""
        if len(self.problems) == 1:
            return f"invalid configuration: {self.problems[0]}"
        return "invalid configuration:\n  " + "\n  ".join(self.problems)


class _Model(BaseModel):
    # Strict: a YAML `"5"` where a number belongs is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------------------------------------
# data_providers.yaml


class PacingSection(_Model):
    """`<provider>.pacing:`: the budget all processes of a provider share (absent: unlimited).

    A key left out takes the `ibkr` default: Interactive Brokers' limits (docs: ibkr notes),
    except 40 messages/s with a burst of 4 for IB's 50/s, so that any one-second window of one
    or two processes stays below 50 (burst + rate + a block of burst/2 each). The request limits
    bind only requests an adapter marks as such (a `key`, a `contract`, `historical`); every
    acquire spends message tokens.
    """

    messages_per_second: float = Field(40, gt=0, allow_inf_nan=False)
    message_burst: int = Field(4, gt=0)
    historical_requests: int = Field(60, gt=0)
    historical_window_seconds: float = Field(600, gt=0, allow_inf_nan=False)
    identical_interval_seconds: float = Field(15, gt=0, allow_inf_nan=False)
    per_contract_requests: int = Field(6, gt=0)
    per_contract_window_seconds: float = Field(2, gt=0, allow_inf_nan=False)
    block_ttl_seconds: float = Field(
        1, gt=0, allow_inf_nan=False, description="how long a process may hold unspent tokens"
    )


class _ProviderBase(_Model):
    enabled: bool = True
    symbols: list[str] = []
    symbols_from_source: bool = False
    pacing: PacingSection | None = None  # None: unlimited


class SyntheticProvider(_ProviderBase):
    """`synthetic:` in data_providers.yaml; `params` are checked by the adapter's model."""

    params: dict[str, Any] = {"rate": 100.0, "seed": 1}


class ReplayProvider(_ProviderBase):
    """`replay:` in data_providers.yaml; its symbols default to every symbol of the file."""

    symbols_from_source: bool = True
    params: dict[str, Any] = {}


class IbkrProvider(_ProviderBase):
    """`ibkr:` in data_providers.yaml; `params` are checked by the adapter's model (IbkrParams)."""

    enabled: bool = False
    params: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 7497,
        "client_id": 17,
        "market_data_type": "live",
    }
    pacing: PacingSection | None = PacingSection()  # IB's limits; `pacing: null` lifts them


class PluginProvider(_ProviderBase):
    """A provider of a third-party adapter: its params are passed through unchecked."""

    params: dict[str, Any] = {}


ProviderConfig = SyntheticProvider | ReplayProvider | IbkrProvider | PluginProvider

DEFAULT_SYMBOLS = ["AAPL", "MSFT", "BRK.B", "BTC/USD"]


class FallbackConfig(_Model):
    """`fallback:`: which source feeds a symbol, by default and per symbol."""

    default: list[str] | None = Field(
        None, description="unset: the configured providers, ibkr before replay before synthetic"
    )
    symbols: dict[str, list[str]] = {}
    strategy: Literal["first_available", "round_robin", "lowest_latency"] = "first_available"
    detect_seconds: float = Field(
        3.0, gt=0, le=3600, description="a source silent this long is stale: fail over"
    )
    hysteresis_seconds: float = Field(
        10.0, ge=0, le=86400, description="a preferred source healthy this long: fail back"
    )


class DataProviders(_Model):
    """data_providers.yaml: one section per configured provider, and the fallback order."""

    # Any other top-level key is a plugin provider of that name.
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    __pydantic_extra__: dict[str, PluginProvider]

    # A provider whose section is absent (or null) is not configured: starting it answers
    # `unknown_provider`. Without any file, `BUILTIN_PROVIDERS` applies.
    synthetic: SyntheticProvider | None = None
    replay: ReplayProvider | None = None
    ibkr: IbkrProvider | None = None
    fallback: FallbackConfig = FallbackConfig()

    @property
    def providers(self) -> dict[str, ProviderConfig]:
        """Every configured provider by name (a section set to null is not configured)."""
        found: dict[str, ProviderConfig] = {}
        for name in ("synthetic", "replay", "ibkr"):
            value = getattr(self, name)
            if value is not None:
                found[name] = value
        found.update(self.model_extra or {})
        return found

    @property
    def default_order(self) -> list[str]:
        """`fallback.default`, or the configured providers in the order of preference."""
        if self.fallback.default is not None:
            return list(self.fallback.default)
        preferred = [n for n in PREFERENCE if n in self.providers]
        return preferred + sorted(n for n in self.providers if n not in PREFERENCE)

    def source_order(self, symbol: str) -> list[str]:
        """The providers to try for `symbol`, first available wins."""
        return list(self.fallback.symbols.get(symbol, self.default_order))


# The providers of a deployment without data_providers.yaml (equal to the shipped file).
BUILTIN_PROVIDERS: dict[str, Any] = {
    "synthetic": {"symbols": list(DEFAULT_SYMBOLS)},
    "replay": {},
    "ibkr": {},
    "fallback": {"default": ["ibkr", "replay", "synthetic"]},
}
PREFERENCE = ("ibkr", "replay", "synthetic")


# ---------------------------------------------------------------------------------------------
# ingestion_policy.yaml


class WritePathConfig(_Model):
    """`write_path:`: whether bars reach the store, and how long a job may run."""

    enabled: bool = True
    dry_run: bool = False
    max_runtime_seconds: float = Field(0.0, ge=0, description="auto-stop after this; 0 = never")


class StoreSyncConfig(_Model):
    """`store_sync:`: how bar batches travel to the store."""

    mode: Literal["bus", "http", "none"] = "bus"
    http_url: str = ""
    http_timeout_seconds: float = Field(10.0, gt=0)

    @field_validator("http_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError("must be empty (the store's own API) or an http(s):// URL")
        return value


class GuardsConfig(_Model):
    """`guards:`: what a start request must satisfy."""

    require_provider_enabled: bool = True
    require_symbols_nonempty: bool = True
    symbol_pattern: str = DEFAULT_SYMBOL_PATTERN
    max_symbols: int = Field(1000, ge=1)
    max_concurrent_jobs: int = Field(8, ge=1)

    @field_validator("symbol_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class BatchingConfig(_Model):
    """`batching:`: the aggregator's hybrid batcher towards the store."""

    max_rows: int = Field(5000, ge=1)
    max_bytes: int = Field(1_000_000, ge=1024)
    max_delay_ms: int = Field(200, ge=1)


class BarsConfig(_Model):
    """`bars:`: intervals and closing rules."""

    intervals: list[str] = ["1s", "1m"]
    grace_ms: int = Field(500, ge=0)
    revise_window_seconds: float = Field(60.0, ge=0)
    price_type: Literal["LAST", "MID"] = "LAST"
    max_jump_seconds: float = Field(
        600.0, ge=0, description="a tick this far ahead of its symbol waits for confirmation"
    )
    transit_credit_ms: int = Field(
        100,
        ge=0,
        le=10_000,
        description="live sources: up to this much of a tick's time since its source received "
        "it counts as elapsed, so the pipeline's own delay does not hold bars back",
    )

    @field_validator("intervals")
    @classmethod
    def _parse(cls, value: list[str]) -> list[str]:
        check_intervals(value)
        return value  # as written: the policy shows what the operator wrote


class IngestConfig(_Model):
    """`ingest:`: how control treats jobs no provider process takes on."""

    host_timeout_seconds: float = Field(
        10, gt=0, description="a job no running provider can host fails after this"
    )


class CircuitConfig(_Model):
    """`circuit:`: when a provider's breaker opens, and how long it stays open before a probe."""

    failure_threshold: int = Field(3, ge=1, description="failures in the window that open it")
    window_seconds: float = Field(60.0, gt=0, description="the sliding window of failures")
    recovery_seconds: float = Field(15.0, gt=0, description="open this long, then one probe")

    def breaker(self) -> BreakerConfig:
        """The pure breaker's thresholds (one probe at a time when half open)."""
        return BreakerConfig(
            failure_threshold=self.failure_threshold,
            window_s=self.window_seconds,
            recovery_s=self.recovery_seconds,
        )


class IngestionPolicy(_Model):
    """ingestion_policy.yaml."""

    ingest: IngestConfig = IngestConfig()
    write_path: WritePathConfig = WritePathConfig()
    store_sync: StoreSyncConfig = StoreSyncConfig()
    guards: GuardsConfig = GuardsConfig()
    batching: BatchingConfig = BatchingConfig()
    bars: BarsConfig = BarsConfig()
    circuit: CircuitConfig = CircuitConfig()


class EffectivePolicy(_Model):
    """The policy in KV `ingest_state` key `policy`: written by control, read by every service.

    The sections of ingestion_policy.yaml that other services follow, under their YAML names,
    plus the resolved fallback order and a revision that grows with every publication. Control
    writes every field (`model_dump_json`); readers decode with `model_validate_json`:

        {"write_path": {"enabled": true, "dry_run": false, "max_runtime_seconds": 0.0},
         "store_sync": {"mode": "bus", "http_url": "", "http_timeout_seconds": 10.0},
         "batching": {"max_rows": 5000, "max_bytes": 1000000, "max_delay_ms": 200},
         "bars": {"intervals": ["1s", "1m"], "grace_ms": 500, "revise_window_seconds": 60.0,
                  "price_type": "LAST", "max_jump_seconds": 600.0,
                  "transit_credit_ms": 100},
         "circuit": {"failure_threshold": 3, "window_seconds": 60.0, "recovery_seconds": 15.0},
         "fallback": {"default": ["ibkr", "replay", "synthetic"], "symbols": {},
                      "strategy": "first_available", "detect_seconds": 3.0,
                      "hysteresis_seconds": 10.0},
         "pacing": {"ibkr": {"messages_per_second": 40.0, "message_burst": 4, ...}},
         "revision": 1}

    `pacing` holds the `pacing:` section of every provider that has one (the others are
    unlimited); provider processes build their rate limits from it.
    """

    write_path: WritePathConfig = WritePathConfig()
    store_sync: StoreSyncConfig = StoreSyncConfig()
    batching: BatchingConfig = BatchingConfig()
    bars: BarsConfig = BarsConfig()
    circuit: CircuitConfig = CircuitConfig()  # the provider processes' breakers
    fallback: FallbackConfig = FallbackConfig(default=list(PREFERENCE))
    # Until a policy says otherwise, what the built-in defaults say: only ibkr is paced.
    pacing: dict[str, PacingSection] = {"ibkr": PacingSection()}
    revision: int = 0


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Config:
    """Both files, validated, and where each came from."""

    providers: DataProviders = field(default_factory=DataProviders)
    policy: IngestionPolicy = field(default_factory=IngestionPolicy)
    sources: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, dict[tuple[str, ...], str]] = field(default_factory=dict)

    def blame(self, filename: str, path: tuple[str | int, ...]) -> str:
        """The environment variable that set `path` (or a parent of it), else the file."""
        keys = tuple(str(p) for p in path)
        for prefix, name in self.overrides.get(filename, {}).items():
            if keys[: len(prefix)] == prefix:
                return f"{name} (environment)"
        return self.sources.get(filename, filename)

    def effective_policy(self, revision: int) -> EffectivePolicy:
        """The policy control publishes: the followed sections and the resolved fallback order."""
        policy, providers = self.policy, self.providers
        return EffectivePolicy(
            write_path=policy.write_path,
            store_sync=policy.store_sync,
            batching=policy.batching,
            bars=policy.bars,
            circuit=policy.circuit,
            fallback=providers.fallback.model_copy(update={"default": providers.default_order}),
            pacing={
                name: provider.pacing
                for name, provider in providers.providers.items()
                if provider.pacing is not None
            },
            revision=revision,
        )


BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {PROVIDERS_FILE: BUILTIN_PROVIDERS, POLICY_FILE: {}}


SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The example configs installed with the package (`mdp config init` copies them out)."""


def find_config_dir(env: Mapping[str, str], cwd: Path) -> Path | None:
    """`MDP_CONFIG_DIR`, else `./configs`, else the configs shipped in the package, else None."""
    explicit = env.get(CONFIG_DIR_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            path = cwd / path
        if not path.is_dir():
            raise ConfigError([f"{CONFIG_DIR_ENV}={explicit}: not a directory"])
        return path
    for candidate in (cwd / "configs", SHIPPED_CONFIG_DIR):
        if candidate.is_dir():
            return candidate
    return None


def load_config(
    config_dir: Path | None,
    env: Mapping[str, str] | None = None,
    params_models: Mapping[str, type[BaseModel]] | None = None,
) -> Config:
    """Read, override and validate both files; raise `ConfigError` listing every problem.

    `params_models` check each named provider's `params:` (the adapters' own models).
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    sources: dict[str, str] = {}
    origins: dict[str, dict[tuple[str, ...], str]] = {}
    models: dict[str, BaseModel] = {}
    for filename, model in ((PROVIDERS_FILE, DataProviders), (POLICY_FILE, IngestionPolicy)):
        path = config_dir / filename if config_dir is not None else None
        source = str(path) if path is not None and path.is_file() else "built-in defaults"
        sources[filename] = source
        if source != "built-in defaults":
            raw, file_problems = _read_yaml(path)
        else:
            raw, file_problems = _deep_copy(BUILTIN_DEFAULTS[filename]), []
        if file_problems:
            problems.extend(file_problems)
            continue
        overrides = _env_overrides(env, ENV_PREFIXES[filename])
        origins[filename] = {keys: name for keys, (name, _value) in overrides.items()}
        data, override_problems = _apply_overrides(raw, overrides, source)
        if override_problems:
            problems.extend(override_problems)
            continue
        try:
            models[filename] = model.model_validate(data)
        except ValidationError as exc:
            problems.extend(_explain(exc, source, overrides, model))
            continue
        if filename == PROVIDERS_FILE:
            checked = _check_params(models[filename], params_models or {}, source, overrides)
            models[filename], params_problems = checked
            problems.extend(params_problems)
    if problems:
        raise ConfigError(problems)
    config = Config(
        providers=models[PROVIDERS_FILE],  # type: ignore[arg-type]
        policy=models[POLICY_FILE],  # type: ignore[arg-type]
        sources=sources,
        overrides=origins,
    )
    problems = cross_check(config)
    if problems:
        raise ConfigError(problems)
    return config


def _check_params(
    providers: BaseModel,
    models: Mapping[str, type[BaseModel]],
    source: str,
    overrides: Mapping[tuple[str, ...], tuple[str, Any]],
) -> tuple[BaseModel, list[str]]:
    """Each provider's `params:` validated by its adapter's model, blamed like any key.

    The built-in sections then hold the params as the model reads them, defaults filled in.
    """
    assert isinstance(providers, DataProviders)
    problems: list[str] = []
    normalised: dict[str, BaseModel] = {}
    for name, section in providers.providers.items():
        model = models.get(name)
        if model is None or not isinstance(section.params, dict):
            continue
        try:
            checked = model.model_validate(section.params)
        except ValidationError as exc:
            problems += _explain(exc, source, overrides, model, prefix=(name, "params"))
            continue
        if name in DataProviders.model_fields:
            params = checked.model_dump(exclude_none=True)
            normalised[name] = section.model_copy(update={"params": params})
    return providers.model_copy(update=normalised), problems


def load_from_environment(
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    params_models: Mapping[str, type[BaseModel]] | None = None,
) -> Config:
    """Find the config directory and load it, as a service does at start and on reload."""
    env = os.environ if env is None else env
    return load_config(find_config_dir(env, cwd or Path.cwd()), env, params_models)


def local_policy(service: str) -> EffectivePolicy:
    """The policy from this process's own config files and environment (revision 0).

    A service follows control's published policy; this is what it applies until that arrives
    (or when no control runs), from the same files and `MDP_*` overrides, so there is one model.
    An invalid configuration exits the process with the problems, as control does.
    """
    try:
        return load_from_environment().effective_policy(0)
    except ConfigError as exc:
        print(f"mdp {service}: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


def cross_check(config: Config) -> list[str]:
    """Rules spanning keys or files: fallback names are providers, symbols fit the pattern."""
    problems: list[str] = []
    providers = config.providers.providers
    fallback = config.providers.fallback
    lists: list[tuple[tuple[str, ...], list[str]]] = [
        (("fallback", "default"), fallback.default or [])
    ]
    lists += [(("fallback", "symbols", sym), order) for sym, order in fallback.symbols.items()]
    for where, names in lists:
        for i, name in enumerate(names):
            if name not in providers:
                known = ", ".join(sorted(providers)) or "none"
                problems.append(
                    f"{config.blame(PROVIDERS_FILE, where)}: {'.'.join(where)}[{i}]: "
                    f"{name!r} is not a configured provider (configured: {known})"
                )
    pattern_text = config.policy.guards.symbol_pattern
    pattern = re.compile(pattern_text)
    for name, provider in providers.items():
        for i, symbol in enumerate(provider.symbols):
            if not pattern.match(symbol) or not _is_text(symbol):
                problems.append(
                    f"{config.blame(PROVIDERS_FILE, (name, 'symbols'))}: {name}.symbols[{i}]: "
                    f"{symbol!r} does not match guards.symbol_pattern {pattern_text!r}"
                )
    return problems


def _is_text(symbol: str) -> bool:
    try:
        escape_symbol(symbol)
    except (ValueError, UnicodeEncodeError):
        return False
    return True


MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):  # type: ignore[misc]  # (PyYAML has no type stubs)
    """A YAML mapping names a key twice; `problems` are `line N: duplicate key ...` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's SafeLoader refusing a repeated key at any level (it keeps the last silently)."""

    def construct_document(self, node: Any) -> Any:
        """The document, after checking every mapping of its node tree for repeated keys."""
        problems = duplicate_keys(node, self)
        if problems:
            raise DuplicateKeyError(problems)
        return super().construct_document(node)


def duplicate_keys(root: Any, loader: Any) -> list[str]:
    """`line N: duplicate key 'k' in a.b (first at line M)` for each repeat, by line.

    Checked on the composed nodes, before `<<` merges are flattened: a key that overrides a
    merged one is written once, so it is no repeat.
    """
    found: list[tuple[int, str]] = []
    visited: set[int] = set()  # an alias is checked once, and cannot loop
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
            continue
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            child = where
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != MERGE_TAG:
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                inside = f" in {where}" if where else ""
                if key in first:
                    problem = f"duplicate key {key!r}{inside} (first at line {first[key]})"
                    found.append((line, f"line {line}: {problem}"))
                first.setdefault(key, line)
                child = f"{where}.{key}" if where else str(key)
            stack.append((value_node, child))
    return [problem for _line, problem in sorted(found)]


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely; `DuplicateKeyError` when a mapping repeats a key."""
    # A SafeLoader subclass: plain data only, never arbitrary Python objects.
    return yaml.load(text, Loader=UniqueKeyLoader)


def _read_yaml(path: Path | None) -> tuple[dict[str, Any], list[str]]:
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [f"{path}: cannot be read: {exc}"]
    try:
        data = load_yaml(text)
    except DuplicateKeyError as exc:
        return {}, [f"{path}: {problem}" for problem in exc.problems]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        return {}, [f"{path}: {where}: YAML syntax error: {problem}"]
    if data is None:
        return {}, []  # an empty file means every default
    if not isinstance(data, dict):
        return {}, [f"{path}: (top level): must be a mapping of keys, got {_kind(data)}"]
    return data, []


def _env_overrides(env: Mapping[str, str], prefix: str) -> dict[tuple[str, ...], tuple[str, Any]]:
    """`{key path: (variable name, parsed value)}` for every variable under `prefix`."""
    found: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name in sorted(env):
        if not name.upper().startswith(prefix):
            continue
        keys = tuple(part.lower() for part in name[len(prefix) :].split("__"))
        raw = env[name]
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: take the text as is, validation says if that is wrong
        found[keys] = (name, value)
    return found


def _apply_overrides(
    data: dict[str, Any], overrides: Mapping[tuple[str, ...], tuple[str, Any]], source: str
) -> tuple[dict[str, Any], list[str]]:
    merged = _deep_copy(data)
    problems: list[str] = []
    for keys, (name, value) in overrides.items():
        if not all(keys):
            problems.append(f"{name}: (environment): empty key in the variable name")
            continue
        node = merged
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                problems.append(
                    f"{name} (environment): {where}: cannot set a key below {where}, "
                    f"which is {_kind(child)} ({_show(child)}), not a mapping"
                )
                break
            node = child
        else:
            node[keys[-1]] = value
    return merged, problems


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _explain(
    exc: ValidationError,
    source: str,
    overrides: Mapping[tuple[str, ...], tuple[str, Any]],
    model: type[BaseModel],
    prefix: tuple[str, ...] = (),
) -> list[str]:
    """Turn pydantic errors into `<source>: <key path>: <problem>` lines (`model` at `prefix`)."""
    lines = []
    for error in exc.errors(include_url=False):
        inner = _clean_loc(error["loc"])
        loc = prefix + inner
        blamed = source
        for keys, (name, _value) in overrides.items():
            if tuple(str(p) for p in loc[: len(keys)]) == keys:
                blamed = f"{name} (environment)"
                break
        path = _dotted(loc) or "(top level)"
        problem = _problem(error)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, inner[:-1])
            if allowed:
                problem += f" (allowed: {', '.join(allowed)})"
        lines.append(f"{blamed}: {path}: {problem}")
    return lines


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the section at `loc` accepts (empty when it cannot be told)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        current = _model_of(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """The BaseModel inside `X`, `X | None`, else the annotation itself."""
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # Unions add the member's type name to the location (`speed.float`, `synthetic.function-...`):
    # keep only the keys an operator wrote.
    return tuple(
        p
        for p in loc
        if not (
            isinstance(p, str)
            and (p in ("float", "int", "str", "bool", "none") or p.startswith(("literal[", "func")))
        )
    )


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    got = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in ("missing",):
        return "required key is missing"
    return f"{message} (got {_show(got)})"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    kinds: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return kinds.get(type(value), type(value).__name__)


def known_keys(model: type[BaseModel]) -> list[str]:
    """The keys a section accepts, for error messages and docs."""
    return sorted(model.model_fields)
