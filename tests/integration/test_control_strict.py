"""Every control verb decodes its body strictly, over NATS and the HTTP facade (real processes).

Any JSON type in any field of any verb, any other body (an array, a number, null, invalid JSON
or UTF-8, no body where one is required) is `{"ok": false, "error": {"code":
"invalid_request", "message": "... - at `<path>` ..."}}` with status 400, never an empty reply,
a Python exception or a plain-text page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from msgspec import Struct

from mdp.shared.contract.control import (
    ReloadRequest,
    ResetRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
)
from tests.conftest_control import (  # noqa: F401 (fixtures)
    System,
    control_system_fixture,
    module_nats_fixture,
)

pytestmark = pytest.mark.integration

TOKEN = {"Authorization": "Bearer s3cret"}

# One value of each JSON type.
SAMPLES: dict[str, Any] = {
    "null": None,
    "bool": True,
    "int": 7,
    "float": 1.5,
    "str": "s",
    "array": [],
    "object": {},
}
STRUCTS: dict[str, type[Struct]] = {
    "start": StartRequest,
    "stop": StopRequest,
    "status": StatusRequest,
    "reload": ReloadRequest,
    "reset": ResetRequest,
}
# The JSON types each field accepts; every other type must be refused at `$.<field>`.
ACCEPTS: dict[str, dict[str, set[str]]] = {
    "start": {
        "provider": {"str"},
        "symbols": {"null", "array"},
        "dry_run": {"null", "bool"},
        "job": {"str"},
        "params": {"object"},
        "standby": {"bool"},
    },
    "stop": {"job": {"str"}, "reason": {"str"}},
    "status": {},
    "reload": {},
    "reset": {"provider": {"str"}},
}
# A body that each verb accepts, into which one bad field goes (nothing valid is ever sent).
BASE: dict[str, dict[str, Any]] = {
    "start": {"provider": "synthetic", "symbols": ["AAPL"], "job": "strict"},
    "stop": {"job": "strict"},
    "status": {},
    "reload": {},
    "reset": {"provider": "synthetic"},
}
REQUIRED_BODY = {"start", "reset"}
BAD_BODIES: list[bytes] = [
    b"[]",
    b'["synthetic"]',
    b"5",
    b"-1.5e3",
    b"null",
    b"true",
    b'"synthetic"',
    b"{not json",
    b'{"provider": "synthetic"',
    b"\xff\xfe{}",
    b'{"provider": "\xff"}',  # invalid UTF-8 inside a string
    b'{"provider": NaN}',
    b'{"bogus": 1}',
    b"[" * 20_000 + b"]" * 20_000,
    b'{"params": {"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}",
]

Case = tuple[str, bytes, str]  # verb, body, the path the message must name


def cases() -> list[Case]:
    """Every verb: each field with every JSON type it refuses, nested values, bad bodies."""
    out: list[Case] = []
    for verb, struct in STRUCTS.items():
        fields = {field.encode_name for field in msgspec.structs.fields(struct)}
        assert fields == set(ACCEPTS[verb]), f"{verb}: ACCEPTS must list every field"
        for field, accepted in ACCEPTS[verb].items():
            for kind, value in SAMPLES.items():
                if kind not in accepted:
                    body = msgspec.json.encode({**BASE[verb], field: value})
                    out.append((verb, body, f"$.{field}"))
        for body in BAD_BODIES:
            out.append((verb, body, "$"))
        if verb in REQUIRED_BODY:
            out += [(verb, b"", "$"), (verb, b"  ", "$"), (verb, b"{}", "$")]
    for kind, value in SAMPLES.items():
        if kind != "str":
            body = msgspec.json.encode({**BASE["start"], "symbols": ["AAPL", value]})
            out.append(("start", body, "$.symbols[1]"))
    for kind in ("str", "array", "object"):  # the adapter's own model checks params (null: default)
        body = msgspec.json.encode({**BASE["start"], "params": {"rate": SAMPLES[kind]}})
        out.append(("start", body, "params.rate"))
    out.append(("start", msgspec.json.encode({**BASE["start"], "params": {"zz": 1}}), "params.zz"))
    return out


Send = Callable[[str, bytes], Awaitable[tuple[str, bytes, str]]]


def problems_of(verb: str, body: bytes, path: str, status: str, reply: bytes, ctype: str) -> str:
    """What is wrong with one reply ('' when it is the documented refusal)."""
    shown = f"{verb} {body[:60]!r}: {status} {reply[:300]!r}"
    if status != "400" or not ctype.startswith("application/json"):
        return shown
    try:
        decoded = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        return shown
    if set(decoded) != {"ok", "error"} or decoded["ok"] is not False:
        return shown
    error = decoded["error"]
    if set(error) != {"code", "message"} or error["code"] != "invalid_request":
        return shown
    if f"at `{path}`" not in error["message"] and path not in error["message"]:
        return f"{shown}: no path {path}"
    if not error["message"].startswith(f"{verb} request: ") and not path.startswith("params"):
        return f"{shown}: does not say which request"
    return ""


async def run_cases(send: Send) -> list[str]:
    """Send every case; the problems found."""
    found = []
    for verb, body, path in cases():
        status, reply, ctype = await send(verb, body)
        problem = problems_of(verb, body, path, status, reply, ctype)
        if problem:
            found.append(problem)
    return found


async def test_every_json_type_in_every_field_over_nats(control_system: System) -> None:
    system = control_system
    pid = system.sup.children["control"].proc.pid  # type: ignore[union-attr]

    async def send(verb: str, body: bytes) -> tuple[str, bytes, str]:
        msg = await system.nc.request(f"ingest.control.{verb}", body, timeout=10)
        headers = msg.headers or {}
        status = headers.get("Nats-Service-Error-Code", "no error header")
        if not headers.get("Nats-Service-Error", "").startswith("invalid_request: "):
            status = f"{status} {headers.get('Nats-Service-Error')!r}"
        return status, msg.data, "application/json"

    try:
        found = await run_cases(send)
    finally:  # a case wrongly accepted must not leave a job behind for the next test
        await system.ok("stop", {"job": "strict"})
    assert not found, f"{len(found)} of {len(cases())} replies wrong:\n" + "\n".join(found[:20])
    # Nothing was started, the service did not restart and still answers.
    status = await system.ok("status")
    assert [job["job"] for job in status["jobs"]] == []
    assert system.sup.children["control"].proc.pid == pid  # type: ignore[union-attr]


async def test_every_json_type_in_every_field_over_http(control_system: System) -> None:
    system = control_system
    base = (await system.kv("ingest_state", "http.control"))["url"]
    async with aiohttp.ClientSession(base_url=base, headers=TOKEN) as http:

        async def send(verb: str, body: bytes) -> tuple[str, bytes, str]:
            method = "GET" if verb == "status" else "POST"
            async with http.request(method, f"/runtime/ingest/{verb}", data=body) as resp:
                return str(resp.status), await resp.read(), resp.content_type

        try:
            found = await run_cases(send)
        finally:
            await system.ok("stop", {"job": "strict"})
        assert not found, f"{len(found)} replies wrong:\n" + "\n".join(found[:20])

        # aiohttp's own refusals are JSON of the same shape too.
        for method, path, status, code in (
            ("GET", "/runtime/ingest/start", 405, "method_not_allowed"),
            ("POST", "/runtime/ingest/explode", 404, "not_found"),
            ("POST", "/runtime/ingest/start", 413, "invalid_request"),
        ):
            data = b"{" + b" " * (2 * 1024 * 1024) + b"}" if status == 413 else None
            async with http.request(method, path, data=data) as resp:
                assert resp.status == status, (method, path)
                reply = await resp.json()
                assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert (await system.ok("status"))["jobs"] == []
