"""The replay reader's limits: a line over 1 MiB is one bad row read in constant memory, bad
values are bad rows, reasons never echo the file, and paths are confined to the data roots."""

from __future__ import annotations

import asyncio
import os
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdp.services.control.guards import HTTP_STATUS, ControlError, build_job, parse_start
from mdp.services.provider.adapters.replay import (
    MAX_LINE_BYTES,
    PathNotAllowed,
    ReplayAdapter,
    confine,
)
from mdp.shared.config import load_config
from mdp.shared.settings import Settings
from tests.unit.test_adapters import HEADER, RecordingSink, as_rows, job, run_replay, write

# ---------------------------------------------------------------------------------------------
# A line over the limit


async def test_a_50_mb_line_is_one_bad_row_read_in_constant_memory(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    with path.open("wb") as out:
        out.write(f"{HEADER}\n1000,x,A,1.5,1\n".encode())
        out.write(b"2000,x,A," + b"9" * (50 * 1024 * 1024) + b",1\n")  # line 3
        out.write(b"3000,x,A,2.5,2\n")
    adapter = ReplayAdapter(job("replay", path=str(path)))
    sink = RecordingSink()
    tracemalloc.start()
    try:
        await adapter.run(sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(t.ts, t.seq) for t in sink.by_symbol()["A"]] == [(1000, 1), (3000, 2)]
    assert adapter.bad_rows == [
        (3, f"the line is longer than {MAX_LINE_BYTES} bytes (the row limit)")
    ]
    # A chunk and at most one line of the limit are held, never the 50 MB.
    assert peak < 6 * MAX_LINE_BYTES, peak


_line = st.one_of(
    st.tuples(st.integers(1, 10**12), st.sampled_from(["A", "B"])).map(
        lambda r: f"{r[0]},x,{r[1]},1.5,1"
    ),
    st.integers(0, 300).map(lambda n: "9" * n),  # over the limit of 64 when n > 64
    st.just(""),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_line, max_size=60),
    chunk_bytes=st.sampled_from([1, 5, 17, 64, 100, 4096]),
    final_newline=st.booleans(),
)
def test_long_lines_anywhere_cost_exactly_themselves(
    lines: list[str], chunk_bytes: int, final_newline: bool
) -> None:
    limit = 64
    text = "\n".join([HEADER, *lines]) + ("\n" if final_newline else "")
    too_long = [n for n, line in enumerate(lines, start=2) if len(line) > limit]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "l.csv", text)
        sink, adapter = asyncio.run(run_replay(path, chunk_bytes=chunk_bytes, max_line_bytes=limit))
    good = [line for line in lines if "," in line]
    expected: dict[str, list[tuple[int, int, int, float, float]]] = {}
    for line in good:
        ts, _, symbol, _, _ = line.split(",")
        rows = expected.setdefault(symbol, [])
        rows.append((int(ts), int(ts), len(rows) + 1, 1.5, 1.0))
    assert as_rows(sink) == expected
    long_reasons = [n for n, reason in adapter.bad_rows if "longer than 64 bytes" in reason]
    assert long_reasons == too_long


# ---------------------------------------------------------------------------------------------
# Bad values, and reasons that never echo the file


async def test_bad_values_are_bad_rows_and_no_reason_echoes_the_file(tmp_path: Path) -> None:
    secret = "s3cr3t-hash"
    rows = [
        "1,x,A,1.5,1",  # 2: good
        f"2,x,A,{secret},1",  # 3
        f"3,x,A,1.5,{secret}",  # 4
        "4,x,A,NaN,1",  # 5
        "5,x,A,1.5,inf",  # 6
        "6,x,A,-1.5,1",  # 7: a negative price
        "7,x,A,1.5,-1",  # 8
        f"{secret},x,A,1.5,1",  # 9
        "10,x," + "S" * 65 + ",1.5,1",  # 10: a symbol too long to carry
        f'11,x,"{secret}\x01",1.5,1',  # 11: a control character, quoted
        "12,x,A,2.5,2",  # 12: good
    ]
    sink, adapter = await run_replay(write(tmp_path / "v.csv", "\n".join([HEADER, *rows]) + "\n"))
    assert [t.ts for t in sink.by_symbol()["A"]] == [1, 12]
    assert [line for line, _ in adapter.bad_rows] == list(range(3, 12))
    for _, reason in adapter.bad_rows:
        assert secret not in reason and "SSSS" not in reason and "-1" not in reason, reason
    reasons = dict(adapter.bad_rows)
    assert reasons[7] == "price is negative"
    assert reasons[10].startswith("symbol is empty, over 64 characters")


def test_a_header_of_another_file_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path / "shadow", "root:$6$secret-hash:19000:0:99999:7:::\nx\n")
    with pytest.raises(Exception) as refused:
        ReplayAdapter(job("replay", path=str(path)))
    assert "secret-hash" not in str(refused.value) and "19000" not in str(refused.value)
    assert "line 1 (the header, 1 column) has no column 'ts_ns'" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# Paths confined to the roots


def test_confine_resolves_dots_and_symlinks_and_opens_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.csv"
    outside.write_text("never read\n")
    os.chmod(outside, 0)  # opening it would fail: confine must not try
    (root / "link.csv").symlink_to(outside)
    roots = [root.resolve()]
    assert confine(str(root / "sub" / "x.csv"), roots) == root.resolve() / "sub" / "x.csv"
    assert confine(str(root / "sub" / ".." / "y.csv"), roots) == root.resolve() / "y.csv"
    for escape in (str(root / ".." / "secret.csv"), str(root / "link.csv"), "/etc/shadow"):
        with pytest.raises(PathNotAllowed) as refused:
            confine(escape, roots)
        message = str(refused.value)
        assert repr(escape) in message and str(root.resolve()) in message
        assert "MDP_REPLAY__ROOTS" in message
    with pytest.raises(PathNotAllowed, match=r"resolves to '.*secret\.csv'"):
        confine(str(root / "link.csv"), roots)
    # A sibling whose name merely starts like the root is outside it.
    with pytest.raises(PathNotAllowed):
        confine(str(tmp_path / "data2" / "x.csv"), roots)


def test_roots_setting_defaults_to_cwd_and_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MDP_REPLAY__ROOTS", raising=False)
    monkeypatch.setenv("MDP_DATA_DIR", str(tmp_path / "var"))
    assert Settings().replay_roots() == [tmp_path.resolve(), (tmp_path / "var").resolve()]
    monkeypatch.setenv("MDP_REPLAY__ROOTS", f"{tmp_path}/a:{tmp_path}/b, {tmp_path}/c")
    assert Settings().replay_roots() == [(tmp_path / n).resolve() for n in "abc"]


def test_a_start_outside_the_roots_is_path_not_allowed(tmp_path: Path) -> None:
    cfg = load_config(None, {})
    inside = write(tmp_path / "ok.csv", f"{HEADER}\n1,x,A,1,1\n")
    body = f'{{"provider": "replay", "params": {{"path": "{inside}"}}}}'.encode()
    roots = [tmp_path.resolve()]
    assert build_job(parse_start(body), cfg, 1, roots=roots).params["path"] == str(inside)
    with pytest.raises(ControlError) as refused:
        build_job(parse_start(b'{"provider": "replay", "params": {"path": "/etc/shadow"}}'),
                  cfg, 1, roots=roots)  # fmt: skip
    assert refused.value.code == "path_not_allowed" and refused.value.status == 403
    assert "'/etc/shadow' is outside the replay roots" in refused.value.message
    assert HTTP_STATUS["path_not_allowed"] == 403
