"""Subject builders: the only place subjects are assembled, always from escaped symbol tokens."""

from __future__ import annotations

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_HEX = "0123456789ABCDEF"
_TOKEN_CACHE: dict[str, str] = {}


def escape_symbol(symbol: str) -> str:
    """Escape a symbol into one subject token: keep `A-Z a-z 0-9 -`, write other bytes as `_XX`."""
    token = _TOKEN_CACHE.get(symbol)
    if token is not None:
        return token
    if not symbol:
        raise ValueError("a symbol must not be empty")
    parts = []
    for byte in symbol.encode("utf-8"):
        if byte in _SAFE:
            parts.append(chr(byte))
        else:
            parts.append("_" + _HEX[byte >> 4] + _HEX[byte & 15])
    token = "".join(parts)
    if len(_TOKEN_CACHE) < 100_000:
        _TOKEN_CACHE[symbol] = token
    return token


def unescape_symbol(token: str) -> str:
    """Invert `escape_symbol`; raise ValueError on a token it could not have produced."""
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "_":
            pair = token[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise ValueError(f"bad escape {token[i : i + 3]!r} in symbol token {token!r}")
            out.append(int(pair, 16))
            i += 3
        elif ord(ch) < 128 and ord(ch) in _SAFE:
            out.append(ord(ch))
            i += 1
        else:
            raise ValueError(f"character {ch!r} cannot appear in symbol token {token!r}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"symbol token {token!r} is not UTF-8 once unescaped") from exc


def _check_name(kind: str, name: str) -> str:
    if not name or any(c in name for c in " .*>\t\r\n\0"):
        raise ValueError(f"{kind} {name!r} cannot be a subject token")
    return name


def raw(provider: str, symbol: str) -> str:
    """`md.raw.<provider>.<sym>`: ticks as a provider delivers them."""
    return f"md.raw.{_check_name('provider', provider)}.{escape_symbol(symbol)}"


def quotes(symbol: str) -> str:
    """`md.quotes.<sym>`: the routed, public tick feed."""
    return f"md.quotes.{escape_symbol(symbol)}"


def bars(interval: str, symbol: str) -> str:
    """`md.bars.<interval>.<sym>`: closed (and revised) bars."""
    return f"md.bars.{_check_name('interval', interval)}.{escape_symbol(symbol)}"


def dlq(service: str) -> str:
    """`md.dlq.<service>`: rejected messages with reason headers."""
    return f"md.dlq.{_check_name('service', service)}"


def event(name: str) -> str:
    """`ingest.events.<event>`."""
    return f"ingest.events.{_check_name('event', name)}"


def control(verb: str) -> str:
    """`ingest.control.<verb>`."""
    return f"ingest.control.{_check_name('verb', verb)}"


STORE_SYNC_BUS = "store.sync.bus"
STORE_SYNC_HTTP = "store.sync.http"
RAW_ALL = "md.raw.>"
QUOTES_ALL = "md.quotes.>"
BARS_ALL = "md.bars.>"


def symbol_of(subject: str) -> str:
    """The real symbol of an `md.raw`, `md.quotes` or `md.bars` subject (its last token)."""
    return unescape_symbol(subject.rsplit(".", 1)[-1])
