"""Strict decoding of control requests (pure): any input is its struct or `invalid_request`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.services.control.guards import (
    ControlError,
    parse_reload,
    parse_reset,
    parse_start,
    parse_status,
    parse_stop,
)
from mdp.shared.config import load_config

CONFIG = load_config(None, {})
PARSERS: dict[str, Callable[[bytes], object]] = {
    "start": parse_start,
    "stop": parse_stop,
    "status": parse_status,
    "reload": parse_reload,
    "reset": lambda body: parse_reset(body, CONFIG),
}

_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["provider", "symbols", "dry_run", "job", "params", "standby", "reason", "x"]
)
_objects = st.dictionaries(_field_names, _json, max_size=4).map(msgspec.json.encode)
_bodies = st.one_of(st.binary(max_size=80), _json.map(msgspec.json.encode), _objects)


def outcome(parse: Callable[[bytes], object], body: bytes) -> ControlError | None:
    """The refusal of `body`, None when it decodes; anything else raised fails the test."""
    try:
        parse(body)
    except ControlError as exc:
        return exc
    return None


@settings(max_examples=300, deadline=None)
@given(verb=st.sampled_from(sorted(PARSERS)), body=_bodies)
def test_any_body_decodes_or_is_invalid_request_with_a_path(verb: str, body: bytes) -> None:
    error = outcome(PARSERS[verb], body)
    if error is None:
        return
    if verb == "reset" and error.code == "unknown_provider":
        return
    assert (error.code, error.status) == ("invalid_request", 400), error.message
    assert error.message.startswith(f"{verb} request: ")
    assert " - at `$" in error.message, error.message


@pytest.mark.parametrize(
    ("verb", "body", "message"),
    [
        (
            "start",
            b'{"provider": ["x"]}',
            "start request: Expected `str`, got `array` - at `$.provider`",
        ),
        ("start", b"[]", "start request: Expected `object`, got `array` - at `$`"),
        ("start", b"", "start request: Object missing required field `provider` - at `$`"),
        ("start", b'{"provider": NaN}', "start request: malformed JSON: "),
        ("start", b'{"provider": "x", "job": "a b"}', "- at `$.job`"),
        ("stop", b'{"reason": "a b"}', "- at `$.reason`"),
        ("stop", b"null", "stop request: Expected `object`, got `null` - at `$`"),
        ("status", b"[]", "status request: Expected `object`, got `array` - at `$`"),
        ("status", b'{"job": "x"}', "status request: Object contains unknown field `job` - at `$`"),
        ("reload", b"5", "reload request: Expected `object`, got `int` - at `$`"),
        ("reload", b"\xff", "reload request: malformed JSON: "),
        (
            "start",
            b'{"params": {"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
            "nested too deeply",
        ),
    ],
)
def test_refusals_name_the_path(verb: str, body: bytes, message: str) -> None:
    error = outcome(PARSERS[verb], body)
    assert error is not None and error.code == "invalid_request"
    assert message in error.message


@pytest.mark.parametrize("verb", ["status", "reload", "stop"])
@pytest.mark.parametrize("body", [b"", b"  ", b"{}", b" {} "])
def test_optional_bodies(verb: str, body: bytes) -> None:
    assert outcome(PARSERS[verb], body) is None
