"""The ibkr symbol grammar: a job's symbol string -> the contract to ask IB for (pure).

    symbol   = [kind ":"] body ["@" exchange [":" currency]]
    kind     = STK | CASH | FUT | IND               (absent: inferred from the body)
    body     = ticker                               a stock: AAPL, BRK.B (IB writes "BRK B")
             | base "." quote                       FX when both are currency codes: EUR.USD
             | root " " yyyymm[dd]                  a future by expiry: ES 202412
             | root month-code year                 a future by local symbol: ESZ4, ESZ24

Defaults: stocks on SMART in USD; FX on IDEALPRO (the quote currency is the currency); futures
and indices on the exchange given (none: IB's own match, refused if ambiguous) in USD. An
index needs its prefix (`IND:SPX@CBOE`), as does a stock that looks like something else
(`STK:ESZ4`). Symbols are case-insensitive and come back upper case in the contract; the bus
keeps the job's own spelling.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

SecType = Literal["STK", "CASH", "FUT", "IND"]

# ISO 4217 codes IDEALPRO quotes (and a few more): `X.Y` of two of these is FX, else a stock.
CURRENCIES = frozenset(
    [
        "USD",
        "EUR",
        "GBP",
        "JPY",
        "CHF",
        "CAD",
        "AUD",
        "NZD",
        "SEK",
        "NOK",
        "DKK",
        "HKD",
        "SGD",
        "CNH",
        "MXN",
        "ZAR",
        "PLN",
        "CZK",
        "HUF",
        "ILS",
        "TRY",
        "KRW",
        "INR",
        "RUB",
        "SAR",
        "AED",
    ]
)
MONTH_CODES = "FGHJKMNQUVXZ"  # January .. December, the futures month letters

DEFAULT_EXCHANGE: dict[str, str] = {"STK": "SMART", "CASH": "IDEALPRO", "FUT": "", "IND": ""}

_NAME = r"[A-Z0-9][A-Z0-9 ._/&-]{0,23}"
_EXCHANGE = re.compile(r"^[A-Z][A-Z0-9._]{0,15}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_TICKER = re.compile(r"^[A-Z0-9][A-Z0-9.]{0,11}$")
_EXPIRY = re.compile(r"^(" + _NAME + r") ((?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])?)$")
_LOCAL_FUTURE = re.compile(r"^([A-Z0-9]{1,5}?)([" + MONTH_CODES + r"])(\d{1,2})$")
_FX = re.compile(r"^([A-Z]{3})\.([A-Z]{3})$")


class SymbolError(ValueError):
    """A symbol outside the grammar; the message says what is wrong and how to write it."""


class ContractSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """The contract fields IB qualifies a symbol from (ib_async `Contract` keyword names)."""

    secType: SecType
    symbol: str
    exchange: str
    currency: str
    localSymbol: str = ""
    lastTradeDateOrContractMonth: str = ""

    def fields(self) -> dict[str, str]:
        """The set fields, for `ib_async.Contract(**fields)`."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v}


def parse(symbol: str) -> ContractSpec:
    """The contract a job's symbol names; `SymbolError` saying how to write it otherwise."""
    text = symbol.strip().upper()
    if not text:
        raise SymbolError("an empty symbol names no contract")
    kind: str | None = None
    head, sep, rest = text.partition(":")
    if sep and head in DEFAULT_EXCHANGE and "@" not in head:
        kind, text = head, rest
    body, at, venue = text.partition("@")
    exchange = currency = ""
    if at:
        exchange, colon, currency = venue.partition(":")
        if not _EXCHANGE.match(exchange):
            raise SymbolError(f"{symbol!r}: exchange {exchange!r} is not an IB exchange code")
        if colon and not _CURRENCY.match(currency):
            raise SymbolError(f"{symbol!r}: currency {currency!r} is not a 3-letter code")
    elif ":" in body:
        raise SymbolError(
            f"{symbol!r}: a currency follows the exchange (AAPL@SMART:USD); the prefix is one "
            "of STK:, CASH:, FUT:, IND:"
        )
    body = body.strip()
    if not body:
        raise SymbolError(f"{symbol!r}: no instrument before the exchange")
    spec = _body(symbol, body, kind)
    return msgspec.structs.replace(
        spec,
        exchange=exchange or spec.exchange,
        currency=currency or spec.currency,
    )


def _body(symbol: str, body: str, kind: str | None) -> ContractSpec:
    """The contract of the part before `@`, defaults filled in."""
    fx = _FX.match(body)
    expiry = _EXPIRY.match(body)
    local = _LOCAL_FUTURE.match(body)
    if kind is None:
        if fx and fx.group(1) in CURRENCIES and fx.group(2) in CURRENCIES:
            kind = "CASH"
        elif expiry or local:
            kind = "FUT"
        else:
            kind = "STK"
    if kind == "CASH":
        if not fx:
            raise SymbolError(f"{symbol!r}: FX is BASE.QUOTE, e.g. EUR.USD")
        base, quote = fx.groups()
        return ContractSpec("CASH", base, "IDEALPRO", quote, localSymbol=f"{base}.{quote}")
    if kind == "FUT":
        if expiry:
            root, when = expiry.group(1).strip(), expiry.group(2)
            return ContractSpec("FUT", root, "", "USD", lastTradeDateOrContractMonth=when)
        if local:
            return ContractSpec("FUT", local.group(1), "", "USD", localSymbol=body)
        raise SymbolError(
            f"{symbol!r}: a future is ROOT YYYYMM (ES 202412) or its local symbol (ESZ4)"
        )
    if not _TICKER.match(body) or ".." in body or body.endswith("."):
        raise SymbolError(
            f"{symbol!r}: {body!r} is not a ticker (letters, digits, one '.' for a share "
            "class as in BRK.B)"
        )
    if kind == "IND":
        return ContractSpec("IND", body, "", "USD")
    # IB writes share classes with a space: BRK.B is "BRK B".
    return ContractSpec("STK", body.replace(".", " "), "SMART", "USD")


def describe(spec: ContractSpec) -> str:
    """A short human form of a contract request, for reasons and logs."""
    parts = [spec.secType, spec.localSymbol or spec.symbol]
    if spec.lastTradeDateOrContractMonth:
        parts.append(spec.lastTradeDateOrContractMonth)
    where = spec.exchange or "any exchange"
    return f"{' '.join(parts)} on {where} in {spec.currency}"
