"""Validation of control requests into job specs (pure): every refusal has a stable code."""

from __future__ import annotations

import re
from collections.abc import Collection

import msgspec

from shared.schemas import JobSpec, StartRequest, StopRequest
from shared.subjects import escape_symbol

JOB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_SYMBOL_PATTERN = r"^[^\x00-\x1f\x7f]{1,64}$"

# HTTP status per error code, for the HTTP facade and the micro error code header.
HTTP_STATUS = {
    "invalid_request": 400,
    "symbols_empty": 400,
    "symbol_invalid": 400,
    "config_invalid": 400,
    "unknown_provider": 404,
    "provider_disabled": 409,
    "already_running": 409,
    "internal": 500,
}


class ControlError(Exception):
    """A refused control request: `code` is one of the stable codes of the contract."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status the facade answers with."""
        return HTTP_STATUS.get(self.code, 500)


def parse_start(body: bytes) -> StartRequest:
    """Decode a start request; malformed JSON or wrong types are `invalid_request`."""
    try:
        request = msgspec.json.decode(body or b"{}", type=StartRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ControlError("invalid_request", f"start request: {exc}") from None
    if not JOB_NAME.match(request.job):
        raise ControlError(
            "invalid_request",
            f"job name {request.job!r} must be 1-64 characters of A-Z a-z 0-9 _ -",
        )
    return request


def parse_stop(body: bytes) -> StopRequest:
    """Decode a stop request (the body is optional)."""
    try:
        request = msgspec.json.decode(body.strip() or b"{}", type=StopRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ControlError("invalid_request", f"stop request: {exc}") from None
    if not JOB_NAME.match(request.job):
        raise ControlError("invalid_request", f"job name {request.job!r} is not valid")
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


def build_job(
    request: StartRequest,
    providers: Collection[str],
    symbols_optional: Collection[str],
    default_dry_run: bool,
    now_ns: int,
    max_runtime_s: float = 0.0,
) -> JobSpec:
    """Apply the guards in order and return the job to write into `ingest_jobs`."""
    if request.provider not in providers:
        known = ", ".join(sorted(providers)) or "none"
        raise ControlError(
            "unknown_provider", f"provider {request.provider!r} is not configured (known: {known})"
        )
    symbols = check_symbols(request.symbols or [])
    if not symbols and request.provider not in symbols_optional:
        raise ControlError(
            "symbols_empty",
            f'no symbols to ingest for provider {request.provider!r}: pass "symbols"',
        )
    return JobSpec(
        job=request.job,
        provider=request.provider,
        symbols=symbols,
        params=dict(request.params),
        dry_run=default_dry_run if request.dry_run is None else request.dry_run,
        started_ns=now_ns,
        deadline_ns=now_ns + int(max_runtime_s * 1e9) if max_runtime_s > 0 else 0,
        run=f"{request.job}-{now_ns:x}",
    )
