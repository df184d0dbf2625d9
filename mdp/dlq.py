"""`mdp dlq list|show|redrive`: the dead letters on `md.dlq.<service>` (stream MD_DLQ).

A dead letter carries its reason, its service and (mostly) the subject it was on in `Mdp-Dlq-*`
headers (`mdp/shared/bus/deadletter.py`); its body is the original payload, or a `DeadTick` /
`BadRow` a service wrote about one tick or row. Re-driving is for messages whose cause was fixed
upstream (a store that refused them, a bug since fixed): the original payload goes back to its
original subject, then the dead letter is deleted. What cannot go back says why: a truncated or
altered payload, no original subject, a body that is a report rather than the message.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON, Codec, DecodeError, encode
from mdp.shared.contract.messages import BadRow, Bar, BarBatch, DeadTick, TickBatch

Body = TickBatch | BarBatch | Bar | DeadTick | BadRow

_CODECS: dict[type[Any], Codec[Any]] = {
    t: Codec(t) for t in (TickBatch, BarBatch, Bar, DeadTick, BadRow)
}


class DeadLetter(msgspec.Struct):
    """One dead letter as `list` and `show --json` print it (headers decoded, body named)."""

    seq: int
    time: str
    service: str
    reason: str
    subject: str = ""  # where the original was (or was meant to go); "" when not recorded
    body: str = "bytes"  # the contract type its payload decodes into
    size: int = 0
    truncated: bool = False
    msg_id: str = ""
    redrive: str = ""  # "" when it can go back, else why not


def _candidates(subject: str) -> tuple[type[Any], ...]:
    """The body types a dead letter of an original on `subject` can hold, likeliest first."""
    if subject.startswith(("md.raw.", "md.quotes.")):
        return (TickBatch, DeadTick)
    if subject.startswith("store.sync."):
        return (BarBatch, Bar)  # a whole batch, or one bad bar of a batch
    return (DeadTick, BadRow)


def decode_body(subject: str, headers: dict[str, str], data: bytes) -> Body | None:
    """The payload as its contract struct, None when it is none of them (or truncated)."""
    if names.DLQ_TRUNCATED in headers:
        return None
    for typ in _candidates(subject):
        try:
            body: Body = _CODECS[typ].decode(data, headers)
            return body
        except DecodeError:
            continue
    return None


def why_not_redrivable(subject: str, headers: dict[str, str], data: bytes, body: object) -> str:
    """Why a dead letter cannot go back to its subject ("" when it can)."""
    if not subject:
        return "no original subject recorded"
    if names.DLQ_TRUNCATED in headers:
        return "payload truncated"
    digest = headers.get(names.DLQ_SHA256)
    if digest and hashlib.sha256(data).hexdigest() != digest:
        return "payload does not match its recorded SHA-256"
    if isinstance(body, (DeadTick, BadRow)) or body is None:
        return f"the body is a {type(body).__name__ if body else 'payload off contract'}"
    return ""


def describe(seq: int, stamp: datetime | None, headers: dict[str, str], data: bytes) -> DeadLetter:
    """A stored dead letter (sequence, time, headers, payload) as a `DeadLetter`."""
    subject = headers.get(names.DLQ_SUBJECT, "")
    body = decode_body(subject, headers, data)
    when = (stamp or datetime.fromtimestamp(0, UTC)).astimezone(UTC)
    return DeadLetter(
        seq=seq,
        time=when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        service=headers.get(names.DLQ_SERVICE, ""),
        reason=headers.get(names.DLQ_REASON, ""),
        subject=subject,
        body=type(body).__name__ if body is not None else "bytes",
        size=int(headers.get(names.DLQ_SIZE, len(data))),
        truncated=names.DLQ_TRUNCATED in headers,
        msg_id=headers.get(names.MSG_ID, ""),
        redrive=why_not_redrivable(subject, headers, data, body),
    )


def list_header() -> str:
    """The column names of `list_line`."""
    return f"{'SEQ':>7}  {'TIME (UTC)':<24} {'SERVICE':<10} {'BODY':<9} {'SUBJECT':<28} REASON"


def list_line(letter: DeadLetter) -> str:
    """One row of `mdp dlq list`."""
    flag = "" if not letter.redrive else "  [not redrivable]"
    return (
        f"{letter.seq:>7}  {letter.time:<24} {letter.service:<10} {letter.body:<9} "
        f"{letter.subject or '-':<28} {letter.reason}{flag}"
    )


def reason_counts(letters: Iterable[DeadLetter]) -> list[tuple[str, str, int]]:
    """`(service, reason, count)` of the letters, most frequent first."""
    counts: dict[tuple[str, str], int] = {}
    for letter in letters:
        key = (letter.service, letter.reason)
        counts[key] = counts.get(key, 0) + 1
    return sorted(((s, r, n) for (s, r), n in counts.items()), key=lambda x: (-x[2], x[0], x[1]))


def show_text(letter: DeadLetter, headers: dict[str, str], body: Body | None, data: bytes) -> str:
    """`mdp dlq show SEQ`: every header, then the body as its struct's JSON."""
    lines = [f"dead letter {letter.seq} ({letter.time})"]
    lines += [f"  {key}: {value}" for key, value in sorted(headers.items())]
    lines.append(f"  redrive: {'yes' if not letter.redrive else 'no, ' + letter.redrive}")
    if body is not None:
        lines.append(f"body ({type(body).__name__}):")
        lines.append(msgspec.json.format(msgspec.json.encode(body), indent=2).decode())
    else:
        lines.append(f"body ({len(data)} bytes, not a contract message): {data[:300]!r}")
    return "\n".join(lines)


def matches(letter: DeadLetter, seqs: set[int], reason: str | None, service: str | None) -> bool:
    """Whether a dead letter is selected by sequence, reason substring and service."""
    if seqs and letter.seq not in seqs:
        return False
    if reason is not None and reason.lower() not in letter.reason.lower():
        return False
    return service is None or letter.service == service


def redrive_message(
    letter: DeadLetter, headers: dict[str, str], body: Body
) -> tuple[str, bytes, dict[str, str]]:
    """The `(subject, payload, headers)` that puts a dead letter back where it was: the
    original's own headers (not the `Mdp-Dlq-*` ones); one bad bar goes back as a batch of one.
    The id is the dead letter's, so a second re-drive within the duplicate window is dropped."""
    out = {k: v for k, v in headers.items() if not k.startswith("Mdp-Dlq-")}
    if letter.msg_id:
        out[names.MSG_ID] = f"redrive:{letter.msg_id}"
    if isinstance(body, Bar):
        batch = BarBatch(f"redrive-{letter.seq}", [body])
        ctype = out.get(names.CONTENT_TYPE, JSON)
        return letter.subject, encode(batch, ctype), out
    return letter.subject, encode(body, out.get(names.CONTENT_TYPE, JSON)), out


# ---------------------------------------------------------------------------------------------
# The edge: reading the stream, publishing, deleting


Stored = tuple[DeadLetter, dict[str, str], bytes]


def _stored(raw: RawStreamMsg) -> Stored:
    headers = {str(k): str(v) for k, v in (raw.headers or {}).items()}
    data = raw.data or b""
    return describe(raw.seq or 0, raw.time, headers, data), headers, data


async def read(js: JetStreamContext, service: str | None = None) -> AsyncIterator[Stored]:
    """Every dead letter (of one service, or all), oldest first, one stream request each."""
    subject = names.dlq(service) if service else names.DLQ_ALL
    seq = 1
    while True:
        try:
            raw = await js.get_msg(names.STREAM_DLQ, seq, subject=subject, next=True)
        except NotFoundError:
            return
        yield _stored(raw)
        seq = (raw.seq or seq) + 1


async def get(js: JetStreamContext, seq: int) -> Stored | None:
    """One dead letter by its stream sequence, None when there is none."""
    try:
        raw = await js.get_msg(names.STREAM_DLQ, seq)
    except NotFoundError:
        return None
    return _stored(raw)


async def redrive(js: JetStreamContext, stored: Stored, keep: bool = False) -> None:
    """Publish a dead letter back to its subject (acked by its stream), then delete it."""
    letter, headers, data = stored
    body = decode_body(letter.subject, headers, data)
    assert body is not None and not letter.redrive, letter.redrive
    subject, payload, out = redrive_message(letter, headers, body)
    await js.publish(subject, payload, headers=out)
    if not keep:
        await js.delete_msg(names.STREAM_DLQ, letter.seq)
