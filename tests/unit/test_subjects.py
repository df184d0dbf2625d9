"""Symbol tokens and subject builders."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdp.shared.contract import names
from mdp.shared.contract.names import escape_symbol, unescape_symbol


@pytest.mark.parametrize(
    ("symbol", "token"),
    [
        ("AAPL", "AAPL"),
        ("BRK.B", "BRK_2EB"),
        ("BTC/USD", "BTC_2FUSD"),
        ("ES 202412", "ES_20202412"),
        ("BTCUSD_PERP.BINANCE", "BTCUSD_5FPERP_2EBINANCE"),
        ("ETHUSDT-PERP.BINANCE", "ETHUSDT-PERP_2EBINANCE"),
        ("Nestlé", "Nestl_C3_A9"),
        ("日経225", "_E6_97_A5_E7_B5_8C225"),
        ("a*b>c", "a_2Ab_3Ec"),
    ],
)
def test_escape_matches_the_contract_and_round_trips(symbol: str, token: str) -> None:
    assert escape_symbol(symbol) == token
    assert unescape_symbol(token) == symbol


@given(st.text(min_size=1, max_size=40))
def test_any_text_round_trips_into_one_safe_token(symbol: str) -> None:
    token = escape_symbol(symbol)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert unescape_symbol(token) == symbol


@pytest.mark.parametrize("token", ["A_2", "A_ZZ", "A.B", "A B", "_FF", "é"])
def test_unescape_rejects_tokens_escape_cannot_produce(token: str) -> None:
    with pytest.raises(ValueError):
        unescape_symbol(token)


def test_empty_symbol_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        escape_symbol("")


def test_builders_escape_the_symbol_and_refuse_bad_tokens() -> None:
    assert names.raw("replay", "BRK.B") == "md.raw.replay.BRK_2EB"
    assert names.quotes("BTC/USD") == "md.quotes.BTC_2FUSD"
    assert names.bars("1m", "ES 202412") == "md.bars.1m.ES_20202412"
    assert names.symbol_of("md.bars.1m.ES_20202412") == "ES 202412"
    with pytest.raises(ValueError, match="provider"):
        names.raw("bad.provider", "AAPL")
    with pytest.raises(ValueError, match="interval"):
        names.bars("1 m", "AAPL")


def test_the_rate_key_is_one_token_per_provider() -> None:
    assert names.rate_key("ibkr") == "rate.ibkr"
    with pytest.raises(ValueError, match="provider"):
        names.rate_key("ib.kr")  # would fall under another provider's key pattern
