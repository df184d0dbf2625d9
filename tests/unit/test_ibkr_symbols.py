"""The ibkr symbol grammar: every documented form, its errors, properties of generated ones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdp.services.provider.adapters.ibkr.symbols import (
    CURRENCIES,
    MONTH_CODES,
    ContractSpec,
    SymbolError,
    describe,
    parse,
)


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("AAPL", ContractSpec("STK", "AAPL", "SMART", "USD")),
        ("aapl", ContractSpec("STK", "AAPL", "SMART", "USD")),
        ("BRK.B", ContractSpec("STK", "BRK B", "SMART", "USD")),
        ("AAPL@SMART", ContractSpec("STK", "AAPL", "SMART", "USD")),
        ("AAPL@NASDAQ", ContractSpec("STK", "AAPL", "NASDAQ", "USD")),
        ("SAP@IBIS:EUR", ContractSpec("STK", "SAP", "IBIS", "EUR")),
        ("EUR.USD", ContractSpec("CASH", "EUR", "IDEALPRO", "USD", localSymbol="EUR.USD")),
        ("CASH:GBP.JPY", ContractSpec("CASH", "GBP", "IDEALPRO", "JPY", localSymbol="GBP.JPY")),
        (
            "ES 202412",
            ContractSpec("FUT", "ES", "", "USD", lastTradeDateOrContractMonth="202412"),
        ),
        (
            "ES 202412@CME",
            ContractSpec("FUT", "ES", "CME", "USD", lastTradeDateOrContractMonth="202412"),
        ),
        (
            "FGBL 20250306@EUREX:EUR",
            ContractSpec("FUT", "FGBL", "EUREX", "EUR", lastTradeDateOrContractMonth="20250306"),
        ),
        ("ESZ4", ContractSpec("FUT", "ES", "", "USD", localSymbol="ESZ4")),
        ("ESZ24@CME", ContractSpec("FUT", "ES", "CME", "USD", localSymbol="ESZ24")),
        ("IND:SPX@CBOE", ContractSpec("IND", "SPX", "CBOE", "USD")),
        ("STK:ESZ4", ContractSpec("STK", "ESZ4", "SMART", "USD")),
        ("FUT:ESZ4@CME", ContractSpec("FUT", "ES", "CME", "USD", localSymbol="ESZ4")),
    ],
)
def test_documented_forms(symbol: str, expected: ContractSpec) -> None:
    assert parse(symbol) == expected


@pytest.mark.parametrize(
    ("symbol", "problem"),
    [
        ("", "empty"),
        ("AAPL@", "exchange ''"),
        ("AAPL@SMART:DOLLARS", "3-letter"),
        ("AAPL:USD", "currency follows the exchange"),
        ("@SMART", "no instrument"),
        ("BAD!!", "not a ticker"),
        ("A..B", "not a ticker"),
        ("CASH:AAPL", "BASE.QUOTE"),
        ("FUT:AAPL", "ROOT YYYYMM"),
        ("ES 202413", "not a ticker"),  # month 13: neither a future nor a ticker
    ],
)
def test_errors_say_what_to_write(symbol: str, problem: str) -> None:
    with pytest.raises(SymbolError, match=problem):
        parse(symbol)


def test_fields_are_the_contract_keywords_and_describe_reads() -> None:
    spec = parse("ES 202412@CME")
    assert spec.fields() == {
        "secType": "FUT",
        "symbol": "ES",
        "exchange": "CME",
        "currency": "USD",
        "lastTradeDateOrContractMonth": "202412",
    }
    assert describe(spec) == "FUT ES 202412 on CME in USD"
    assert describe(parse("ESZ4")) == "FUT ESZ4 on any exchange in USD"


tickers = st.from_regex(r"\A[A-Z]{1,5}(\.[A-Z])?\Z")
exchanges = st.sampled_from(["SMART", "NYSE", "NASDAQ", "ARCA", "IBIS", "LSE"])
currencies = st.sampled_from(sorted(CURRENCIES))


@given(tickers, exchanges, currencies)
def test_stocks_keep_their_ticker_exchange_and_currency(
    ticker: str, exchange: str, currency: str
) -> None:
    base, _, cls = ticker.partition(".")
    if base in CURRENCIES and cls in CURRENCIES:
        return  # that is FX
    spec = parse(f"STK:{ticker}@{exchange}:{currency}")
    assert (spec.secType, spec.symbol, spec.exchange, spec.currency) == (
        "STK",
        ticker.replace(".", " "),
        exchange,
        currency,
    )
    assert parse(ticker.lower()) == parse(ticker)  # case does not matter


@given(currencies, currencies)
def test_every_pair_of_currencies_is_fx_on_idealpro(base: str, quote: str) -> None:
    spec = parse(f"{base}.{quote}")
    assert (spec.secType, spec.symbol, spec.currency, spec.exchange) == (
        "CASH",
        base,
        quote,
        "IDEALPRO",
    )


@given(
    st.from_regex(r"\A[A-Z]{1,4}\Z"),
    st.integers(2000, 2099),
    st.integers(1, 12),
    st.sampled_from(MONTH_CODES),
    st.integers(0, 99),
)
def test_futures_by_month_and_by_local_symbol(
    root: str, year: int, month: int, code: str, short_year: int
) -> None:
    spec = parse(f"{root} {year}{month:02d}@CME")
    assert (spec.secType, spec.symbol, spec.lastTradeDateOrContractMonth) == (
        "FUT",
        root,
        f"{year}{month:02d}",
    )
    local = f"{root}{code}{short_year % 10}"
    parsed = parse(f"FUT:{local}")
    assert (parsed.secType, parsed.localSymbol) == ("FUT", local)


@given(st.text(max_size=30))
def test_anything_parses_or_raises_symbol_error(text: str) -> None:
    try:
        spec = parse(text)
    except SymbolError as exc:
        assert str(exc)
    else:
        assert spec.symbol and spec.currency
