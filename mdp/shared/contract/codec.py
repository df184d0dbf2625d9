"""Encoding by `Content-Type`: JSON by default, msgpack accepted (and produced when configured)."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from mdp.shared.contract.names import CONTENT_TYPE

JSON = "application/json"
MSGPACK = "application/msgpack"

T = TypeVar("T")


class DecodeError(ValueError):
    """A payload that does not decode into the expected message."""


class Codec(Generic[T]):
    """Encode and decode one message type in both wire formats."""

    def __init__(self, typ: type[T]) -> None:
        self._json = msgspec.json.Decoder(typ)
        self._msgpack = msgspec.msgpack.Decoder(typ)

    def decode(self, data: bytes, headers: dict[str, str] | None) -> T:
        """Decode by the `Content-Type` header (JSON when absent)."""
        ctype = headers.get(CONTENT_TYPE, JSON) if headers else JSON
        try:
            if ctype.startswith(MSGPACK):
                return self._msgpack.decode(data)
            if ctype.startswith(JSON):
                return self._json.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(str(exc)) from exc
        raise DecodeError(f"unsupported Content-Type {ctype!r}")


_json_enc = msgspec.json.Encoder()
_msgpack_enc = msgspec.msgpack.Encoder()


def encode(obj: object, content_type: str = JSON) -> bytes:
    """Encode a message in the given wire format."""
    if content_type == MSGPACK:
        return _msgpack_enc.encode(obj)
    return _json_enc.encode(obj)
