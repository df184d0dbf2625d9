"""Every name on the bus: subjects, headers, KV buckets and keys, message ids.

Nothing else formats one of these. Subjects are always built from escaped symbol tokens.
"""

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


def bars_of(interval: str) -> str:
    """`md.bars.<interval>.*`: every symbol's bars of one interval (for subscribers)."""
    return f"md.bars.{_check_name('interval', interval)}.*"


def dlq(service: str) -> str:
    """`md.dlq.<service>`: rejected messages with reason headers."""
    return f"md.dlq.{_check_name('service', service)}"


def event(name: str) -> str:
    """`ingest.events.<event>`."""
    return f"ingest.events.{_check_name('event', name)}"


def control(verb: str) -> str:
    """`ingest.control.<verb>`."""
    return f"ingest.control.{_check_name('verb', verb)}"


def ready(service: str) -> str:
    """`mdp.ready.<service>`: answered by an instance of `service` once it has started."""
    return f"mdp.ready.{_check_name('service', service)}"


def quote_partition(partition: int | None) -> str:
    """The MD_QUOTES filter subject of one partition (`md.quotes.<p>.*`), or of all."""
    return QUOTES_ALL if partition is None else f"md.quotes.{partition}.*"


STORE_SYNC_BUS = "store.sync.bus"
STORE_SYNC_HTTP = "store.sync.http"
STORE_SYNC = {"bus": STORE_SYNC_BUS, "http": STORE_SYNC_HTTP}  # by policy store_sync.mode
RAW_ALL = "md.raw.>"
QUOTES_ALL = "md.quotes.>"
QUOTES_SYMBOLS = "md.quotes.*"  # what publishers write: one token, the symbol
BARS_ALL = "md.bars.>"
EVENTS_ALL = "ingest.events.>"
DLQ_ALL = "md.dlq.>"
STORE_SYNC_ALL = "store.sync.>"


def symbol_of(subject: str) -> str:
    """The real symbol of an `md.raw`, `md.quotes` or `md.bars` subject (its last token)."""
    return unescape_symbol(subject.rsplit(".", 1)[-1])


# ---------------------------------------------------------------------------------------------
# Headers

MSG_ID = "Nats-Msg-Id"
CONTENT_TYPE = "Content-Type"
DLQ_REASON = "Mdp-Dlq-Reason"
DLQ_SUBJECT = "Mdp-Dlq-Subject"
DLQ_SERVICE = "Mdp-Dlq-Service"
DLQ_SIZE = "Mdp-Dlq-Size"  # the original payload's length in bytes
DLQ_SHA256 = "Mdp-Dlq-Sha256"  # the original payload's SHA-256, hex
DLQ_TRUNCATED = "Mdp-Dlq-Truncated"  # set when only this many bytes of it are kept
CLOCK_RATE = "Mdp-Clock-Rate"  # event-time seconds per wall second of the source
END_OF_STREAM = "Mdp-End-Of-Stream"  # an EndOfStream marker, JSON
DRY_RUN = "Mdp-Dry-Run"
RUN = "Mdp-Run"  # the provider run a tick batch belongs to
PRODUCER = "Mdp-Producer"  # which process instance published a bar
# The seqs of a batch's ticks the router dead-lettered (comma-separated): the aggregator counts
# them as delivered, so a bounded run still completes.
REJECTED_SEQS = "Mdp-Rejected-Seqs"
# What a live source serves a batch's symbol (`live`, `frozen`, `delayed`, `delayed_frozen`): a
# batch never mixes two, so delayed data is never taken for live (the ibkr adapter sets it).
MARKET_DATA = "Mdp-Market-Data"
# Carried from md.raw to md.quotes by the router, unchanged.
FORWARDED = (CLOCK_RATE, END_OF_STREAM, RUN, DRY_RUN, MARKET_DATA)

# ---------------------------------------------------------------------------------------------
# Streams, KV buckets and keys

STREAM_RAW = "MD_RAW"
STREAM_QUOTES = "MD_QUOTES"
STREAM_BARS = "MD_BARS"
STREAM_STORE_SYNC = "STORE_SYNC"
STREAM_EVENTS = "MD_EVENTS"
STREAM_DLQ = "MD_DLQ"

KV_JOBS = "ingest_jobs"  # desired jobs by name (JobSpec), written by control
KV_STATE = "ingest_state"  # status that survives restarts
KV_CHECKPOINTS = "mdp_checkpoints"  # consumer checkpoints, leases, pacing budgets

POLICY_KEY = "policy"  # KV_STATE: the effective Policy
STOPPED_PREFIX = "stopped."  # KV_STATE: the last StopRecord of each job
HTTP_CONTROL_KEY = "http.control"  # KV_STATE: where the control facade listens
HTTP_STORE_KEY = "http.store"  # KV_STATE: where the store's ingest API listens


def provider_state_key(job: str) -> str:
    """KV_STATE key of a job's ProviderState."""
    return f"provider.{job}"


def stopped_key(job: str) -> str:
    """KV_STATE key of a job's last StopRecord."""
    return STOPPED_PREFIX + job


HOSTS_PREFIX = "hosts."  # KV_STATE: one ProviderHost per running provider process
CIRCUIT_PREFIX = "circuit."  # KV_STATE: one CircuitRecord per provider with a breaker


def host_key(instance: str) -> str:
    """KV_STATE key of a provider process's ProviderHost record."""
    return HOSTS_PREFIX + instance


def circuit_key(provider: str) -> str:
    """`ingest_state` key of a provider's circuit breaker (a CircuitRecord)."""
    return CIRCUIT_PREFIX + _check_name("provider", provider)


def checkpoint_key(durable: str) -> str:
    """KV_CHECKPOINTS key of a consumer's checkpoint."""
    return f"aggregator.{durable}"


def checkpoint_part_key(key: str, generation: str, index: int) -> str:
    """KV_CHECKPOINTS key of one part of a checkpoint too large for one message."""
    return f"{key}.part.{_check_name('generation', generation)}.{index}"


def job_lease_key(job: str) -> str:
    """KV_CHECKPOINTS key of the lease that makes one provider process a job's owner."""
    return f"job.{job}"


def lease_key(durable: str) -> str:
    """KV_CHECKPOINTS key of a consumer's lease."""
    return f"lease.{durable}"


IBKR_CONTRACT_PREFIX = "ibkr.contract."  # KV_CHECKPOINTS: one IbkrContract per symbol


def ibkr_contract_key(symbol: str) -> str:
    """KV_CHECKPOINTS key of a symbol's qualified Interactive Brokers contract (IbkrContract)."""
    return IBKR_CONTRACT_PREFIX + escape_symbol(symbol)


def rate_key(provider: str) -> str:
    """KV_CHECKPOINTS key of a provider's shared pacing budget (a RateRecord)."""
    return f"rate.{_check_name('provider', provider)}"


# ---------------------------------------------------------------------------------------------
# Message ids (`Nats-Msg-Id`): deterministic, so a message sent again is de-duplicated.


def raw_batch_id(run: str, symbol: str, first_seq: int, last_seq: int) -> str:
    """A raw tick batch: its first and last seq, since a restarted provider may cut differently."""
    return f"raw:{run}:{escape_symbol(symbol)}:{first_seq}-{last_seq}"


def end_of_stream_id(run: str, symbol: str) -> str:
    """The end-of-stream marker of a symbol's run (on md.raw and store.sync alike)."""
    return f"eos:{run}:{escape_symbol(symbol)}"


def quote_id(raw_id: str) -> str:
    """The md.quotes copy of a routed raw message."""
    return "q:" + raw_id


def bar_id(interval: str, symbol: str, start: int, rev: int) -> str:
    """A bar: `interval:symbol:start:rev`."""
    return f"{interval}:{symbol}:{start}:{rev}"


def bar_batch_id(batch_id: str) -> str:
    """A bar batch on its way to the store."""
    return f"batch:{batch_id}"


def completed_id(run: str, symbol: str) -> str:
    """The `completed` event of a symbol's run."""
    return f"completed:{run}:{symbol}"


def circuit_event_id(provider: str, revision: int, index: int) -> str:
    """A circuit event: the `index`-th transition stored by KV revision `revision` of its key."""
    return f"circuit:{provider}:{revision}:{index}"


def refused_id(run: str, symbol: str, code: int) -> str:
    """A symbol a live source refused, once per run, symbol and code."""
    return f"refused:{run}:{escape_symbol(symbol)}:{code}"


def gap_id(symbol: str, since_ns: int, state: str) -> str:
    """A gap event: one per gap and state, whoever detects it."""
    return f"gap:{symbol}:{since_ns}:{state}"


def dead_letter_id(service: str, subject: str, stream_seq: int) -> str:
    """A dead-lettered stream message."""
    return f"dlq:{service}:{subject}:{stream_seq}"


def dead_part_id(service: str, subject: str, stream_seq: int, index: int) -> str:
    """One dead-lettered part (a bar of a batch) of a stream message; the rest went on."""
    return f"{dead_letter_id(service, subject, stream_seq)}:part{index}"


def late_tick_id(interval: str, symbol: str, seq: int, ts: int) -> str:
    """A tick dead-lettered as beyond the revise window of one interval."""
    return f"late:{interval}:{symbol}:{seq}:{ts}"


def rejected_tick_id(service: str, batch_id: str, seq: int) -> str:
    """A tick a service rejected on its own (the rest of its batch went on)."""
    return f"rejected:{service}:{batch_id}:{seq}"


def invalid_tick_id(symbol: str, seq: int) -> str:
    """A tick dead-lettered as invalid by the bar engine."""
    return f"invalid:{symbol}:{seq}"


def bad_row_id(run: str, line: int) -> str:
    """A source row an adapter rejected."""
    return f"badrow:{run}:{line}"
