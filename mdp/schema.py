"""The wire contract as documents: an AsyncAPI 3 description and JSON Schemas of every message.

Both are generated from the msgspec structs of `mdp.shared.contract` (and the pydantic policy
model), so they cannot say anything the code does not do. `mdp schema` writes them to `docs/`;
`tests/unit/test_schema.py` fails when the checked-in copies drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import yaml

from mdp.shared.config import EffectivePolicy
from mdp.shared.contract import control, events, messages, names, records
from mdp.shared.version import VERSION

REF = "#/components/schemas/{name}"

# Every struct that crosses a process boundary or lives in KV, by the name it is documented as.
MESSAGES: dict[str, type[Any]] = {
    "TickBatch": messages.TickBatch,
    "Bar": messages.Bar,
    "BarBatch": messages.BarBatch,
    "EndOfStream": messages.EndOfStream,
    "DeadTick": messages.DeadTick,
    "BadRow": messages.BadRow,
}
EVENTS: dict[str, type[Any]] = {name: typ for typ, name in events.EVENT_NAMES.items()}
REQUESTS = control.ENDPOINTS
RECORDS: dict[str, type[Any]] = {
    "JobSpec": control.JobSpec,
    "ProviderState": records.ProviderState,
    "StopRecord": records.StopRecord,
    "ServiceUrl": records.ServiceUrl,
    "LeaseRecord": records.LeaseRecord,
    "ProviderHost": records.ProviderHost,
    "CircuitRecord": records.CircuitRecord,
    "RateRecord": records.RateRecord,
}

HEADERS = {
    names.CONTENT_TYPE: "application/json (default) or application/msgpack",
    names.MSG_ID: "deterministic message id: JetStream de-duplication",
    names.CLOCK_RATE: "event-time seconds per wall second of the source (1 live, 0 full speed)",
    names.END_OF_STREAM: "an EndOfStream marker (JSON): the end of a bounded run of the symbol",
    names.RUN: "the provider run the ticks belong to",
    names.DRY_RUN: "1: bars of these ticks are published, never stored",
    names.REJECTED_SEQS: "seqs of the batch's ticks the router dead-lettered (comma-separated)",
    names.PRODUCER: "the process instance that built a bar",
}
DLQ_HEADERS = {
    names.DLQ_REASON: "why the message was rejected",
    names.DLQ_SUBJECT: "the subject it was on (or meant for)",
    names.DLQ_SERVICE: "the service that rejected it",
    names.DLQ_SIZE: "the original payload's length in bytes",
    names.DLQ_SHA256: "the original payload's SHA-256 (hex)",
    names.DLQ_TRUNCATED: "present when only this many bytes of the payload are kept",
}


def json_schemas() -> dict[str, Any]:
    """JSON Schema (2020-12) components of every documented message, record and reply."""
    types: list[Any] = [*MESSAGES.values(), *EVENTS.values(), *RECORDS.values()]
    for request, reply in REQUESTS.values():
        types += [t for t in (request, reply) if t is not None]
    types.append(control.ErrorReply)
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    policy = EffectivePolicy.model_json_schema(ref_template=REF.replace("{name}", "{model}"))
    components.update(policy.pop("$defs", {}))
    components["EffectivePolicy"] = policy
    return dict(sorted(components.items()))


def _message(name: str, summary: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "name": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": {"$ref": REF.format(name=name)},
    }
    if headers:
        msg["headers"] = {
            "type": "object",
            "properties": {k: {"type": "string", "description": v} for k, v in headers.items()},
        }
    return msg


def _param(description: str) -> dict[str, str]:
    return {"description": description}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of mdp's subjects, messages and control requests."""
    symbol = _param("the symbol as a subject token: A-Z a-z 0-9 - kept, other bytes as _XX")
    channels: dict[str, Any] = {
        "raw": {
            "address": "md.raw.{provider}.{symbol}",
            "parameters": {"provider": _param("the provider name"), "symbol": symbol},
            "messages": {"TickBatch": {"$ref": "#/components/messages/TickBatch"}},
            "description": "internal: ticks as each provider publishes them (stream MD_RAW)",
        },
        "quotes": {
            "address": "md.quotes.{symbol}",
            "parameters": {"symbol": symbol},
            "messages": {"TickBatch": {"$ref": "#/components/messages/TickBatch"}},
            "description": "public: one chosen source per symbol (stream MD_QUOTES)",
        },
        "bars": {
            "address": "md.bars.{interval}.{symbol}",
            "parameters": {"interval": _param("1s, 1m, 5m, 1h, 1d, ..."), "symbol": symbol},
            "messages": {"Bar": {"$ref": "#/components/messages/Bar"}},
            "description": "public: closed and revised bars, the highest rev wins (MD_BARS)",
        },
        "storeSync": {
            "address": "store.sync.{mode}",
            "parameters": {"mode": {"enum": ["bus", "http"], "description": "store path"}},
            "messages": {"BarBatch": {"$ref": "#/components/messages/BarBatch"}},
            "description": "bar batches towards the store (stream STORE_SYNC, work queue)",
        },
        "deadLetters": {
            "address": "md.dlq.{service}",
            "parameters": {"service": _param("the service that rejected the message")},
            "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
            "description": "rejected messages with their reasons (stream MD_DLQ)",
        },
    }
    operations: dict[str, Any] = {
        "publishRaw": {"action": "send", "channel": {"$ref": "#/channels/raw"}},
        "routeRaw": {"action": "receive", "channel": {"$ref": "#/channels/raw"}},
        "publishQuotes": {"action": "send", "channel": {"$ref": "#/channels/quotes"}},
        "subscribeQuotes": {"action": "receive", "channel": {"$ref": "#/channels/quotes"}},
        "publishBars": {"action": "send", "channel": {"$ref": "#/channels/bars"}},
        "subscribeBars": {"action": "receive", "channel": {"$ref": "#/channels/bars"}},
        "syncStore": {"action": "receive", "channel": {"$ref": "#/channels/storeSync"}},
        "deadLetter": {"action": "send", "channel": {"$ref": "#/channels/deadLetters"}},
    }
    component_messages: dict[str, Any] = {
        "TickBatch": _message("TickBatch", "1..N ticks of one symbol from one provider", HEADERS),
        "Bar": _message("Bar", "an OHLCV bar over [start, end) by event time", HEADERS),
        "BarBatch": _message("BarBatch", "bars on their way to the store", HEADERS),
        "DeadLetter": {
            "name": "DeadLetter",
            "summary": "the rejected payload (DeadTick, BadRow, or the original bytes)",
            "headers": {
                "type": "object",
                "properties": {
                    k: {"type": "string", "description": v} for k, v in DLQ_HEADERS.items()
                },
            },
        },
    }
    for name, typ in sorted(EVENTS.items(), key=lambda item: item[0]):
        channel = f"event_{name}"
        channels[channel] = {
            "address": names.event(name),
            "messages": {typ.__name__: {"$ref": f"#/components/messages/{typ.__name__}"}},
            "description": (typ.__doc__ or "").strip().splitlines()[0],
        }
        operations[f"on_{name}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
        }
        component_messages[typ.__name__] = _message(typ.__name__, channels[channel]["description"])
    for verb, (request, reply) in REQUESTS.items():
        channel = f"control_{verb}"
        request_name = request.__name__ if request is not None else "Empty"
        channels[channel] = {
            "address": names.control(verb),
            "messages": {
                request_name: {"$ref": f"#/components/messages/{request_name}"},
            },
            "description": f"request/reply: `{verb}` (the HTTP facade: /runtime/ingest/{verb})",
        }
        channels[f"{channel}_reply"] = {
            "address": None,
            "messages": {
                reply.__name__: {"$ref": f"#/components/messages/{reply.__name__}"},
                "ErrorReply": {"$ref": "#/components/messages/ErrorReply"},
            },
        }
        operations[f"control_{verb}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "reply": {"channel": {"$ref": f"#/channels/{channel}_reply"}},
        }
        component_messages[request_name] = _message(request_name, f"`{verb}` request")
        component_messages[reply.__name__] = _message(reply.__name__, f"`{verb}` success reply")
    component_messages["ErrorReply"] = _message("ErrorReply", "a refused request: code, message")
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "mdp market-data pipeline",
            "version": VERSION,
            "description": "Subjects, messages and control of mdp over NATS JetStream; the "
            "contract in prose is docs/DESIGN.md. KV records are under components/schemas.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": component_messages, "schemas": json_schemas()},
    }


def render() -> dict[str, str]:
    """The generated files by path relative to the repository: the AsyncAPI YAML, the schemas."""
    document = asyncapi()
    out = {"docs/asyncapi.yaml": yaml.safe_dump(document, sort_keys=False, width=100)}
    out["docs/schemas.json"] = json.dumps(document["components"]["schemas"], indent=2) + "\n"
    return out


def write(root: Path) -> list[Path]:
    """Write the generated files under `root`; return their paths."""
    written = []
    for relative, text in render().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def stale(root: Path) -> list[Path]:
    """The generated files under `root` that differ from what the code generates now."""
    out = []
    for relative, text in render().items():
        path = root / relative
        if not path.is_file() or path.read_text() != text:
            out.append(path)
    return out
