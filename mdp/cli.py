"""`mdp`: run the system, replay files, get bars out, watch it live, control ingestion."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mdp.services.registry import SERVICES
from mdp.shared.bus.consumer import follow_stream
from mdp.shared.contract import names
from mdp.shared.contract.events import Failed, Stopped, decode_event
from mdp.shared.contract.messages import EndOfStream
from mdp.shared.contract.names import dlq
from mdp.shared.logging import configure_logging
from mdp.shared.tasks import cancel_until_done, cancellable
from mdp.supervisor import DataDirBusy, Supervisor, running_system

DEFAULT_SYMBOLS = "AAPL,MSFT,BRK.B,BTC/USD"


class CliError(Exception):
    """A failure to report in one line and exit with `code` (1 unless said otherwise)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats",
        help="NATS URL (env MDP_NATS_URL); default: the server of the system `mdp up` runs "
        "on --data-dir, else (up, replay) a new embedded one",
    )
    parser.add_argument(
        "--store",
        help="sqlite:///PATH or postgresql://... (env MDP_STORE_URL); default: the running "
        "system's, else sqlite:///DATA_DIR/mdp.db",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("MDP_DATA_DIR", "var")),
        help="where `mdp up` keeps its state and records its URLs (env MDP_DATA_DIR; ./var)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="mdp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole system locally until Ctrl-C or --duration")
    _common(up)
    up.add_argument("--duration", type=float, default=0, help="stop after S seconds (0: never)")
    up.add_argument("--provider", default="synthetic", help="provider to start (default synthetic)")
    up.add_argument("--symbols", default=DEFAULT_SYMBOLS, help="comma-separated symbols")
    up.add_argument("--rate", type=float, default=200, help="synthetic ticks/s per symbol")

    service = sub.add_parser("service", help="run one service in the foreground")
    _common(service)
    service.add_argument("name", choices=sorted(SERVICES))
    service.add_argument(
        "--adapters",
        help="provider only: adapters to host, comma-separated names or module:Class "
        "(env MDP_PROVIDER__ADAPTERS; default: every registered adapter)",
    )

    replay = sub.add_parser("replay", help="run a recorded CSV(.gz) through the whole system")
    _common(replay)
    replay.add_argument("file", type=Path)
    replay.add_argument("--speed", default="max", help="'max' (default) or a factor (1 = real)")
    replay.add_argument("--timeout", type=float, default=0, help="give up after S seconds")

    bars = sub.add_parser("bars", help="read stored bars")
    bars_sub = bars.add_subparsers(dest="bars_command", required=True, metavar="ACTION")
    export = bars_sub.add_parser(
        "export",
        help="stream stored bars out as CSV, JSON lines or Parquet (exit 4: nothing matched)",
    )
    _common(export)
    export.add_argument("--symbol", help="one symbol (default: every symbol)")
    export.add_argument("--interval", help="one interval, e.g. 1s or 1m (default: every one)")
    export.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    export.add_argument(
        "--from", dest="start", help="bars starting at or after this UTC time (ISO 8601 or ns)"
    )
    export.add_argument("--to", dest="end", help="bars starting before this UTC time")
    export.add_argument("--out", type=Path, help="write to FILE (default stdout; parquet: needed)")

    tail = sub.add_parser("tail", help="print quotes, bars or events as they pass")
    _common(tail)
    tail.add_argument("kind", choices=["quotes", "bars", "events"])
    tail.add_argument("symbols", nargs="*", metavar="SYMBOL", help="only these (default: all)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--count", type=int, default=0, help="exit after N lines (0: never)")

    dlq = sub.add_parser("dlq", help="inspect and re-drive the dead letters (md.dlq.>)")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", help="every dead letter with its reason")
    dlq_show = dlq_sub.add_parser("show", help="one dead letter: headers and decoded body")
    dlq_redrive = dlq_sub.add_parser(
        "redrive", help="send dead letters fixed upstream back to their original subject"
    )
    for action in (dlq_list, dlq_show, dlq_redrive):
        _common(action)
        action.add_argument("--json", action="store_true", help="JSON, one object per line")
    dlq_show.add_argument("seq", type=int, help="its stream sequence (from `mdp dlq list`)")
    dlq_redrive.add_argument("seqs", type=int, nargs="*", metavar="SEQ")
    for action in (dlq_list, dlq_redrive):
        action.add_argument("--service", help="only md.dlq.SERVICE")
        action.add_argument("--reason", help="only those whose reason contains TEXT")
    dlq_list.add_argument("--limit", type=int, default=500, help="show at most N (500)")
    dlq_redrive.add_argument("--all", action="store_true", help="every redrivable one")
    dlq_redrive.add_argument("--dry-run", action="store_true", help="say what would go back")
    dlq_redrive.add_argument("--keep", action="store_true", help="keep them in MD_DLQ too")

    chart = sub.add_parser(
        "chart", help="write a candlestick chart of stored bars (.html: no dependency; .png)"
    )
    _common(chart)
    chart.add_argument("symbol")
    chart.add_argument("--interval", default="1m", help="bar interval (1m)")
    chart.add_argument("--from", dest="start", help="bars starting at or after this UTC time")
    chart.add_argument("--to", dest="end", help="bars starting before this UTC time")
    chart.add_argument("--out", type=Path, required=True, help="FILE.html or FILE.png")

    top = sub.add_parser(
        "top", help="per service: rates, consumer lag, tick-to-bar latency, dead letters, stalls"
    )
    _common(top)
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--interval", type=float, default=2.0, help="seconds per snapshot (2)")
    top.add_argument("--json", action="store_true", help="one JSON array of rows per snapshot")

    ingest = sub.add_parser("ingest", help="send ingest.control requests")
    ingest_sub = ingest.add_subparsers(dest="verb", required=True, metavar="VERB")
    start = ingest_sub.add_parser("start", help="start a job")
    _common(start)
    start.add_argument("--provider", required=True)
    start.add_argument("--symbols", default="", help="comma-separated symbols")
    start.add_argument("--job", default="default")
    start.add_argument("--dry-run", action="store_true", default=None)
    start.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="provider parameter"
    )
    stop = ingest_sub.add_parser("stop", help="stop a job")
    _common(stop)
    stop.add_argument("--job", default="default")
    stop.add_argument("--reason", default="operator_request")
    for verb in ("status", "reload"):
        _common(ingest_sub.add_parser(verb, help=f"{verb} request"))
    reset = ingest_sub.add_parser("reset", help="close a provider's circuit breaker by hand")
    _common(reset)
    reset.add_argument("provider")

    config = sub.add_parser("config", help="copy out or check the configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate data_providers.yaml and ingestion_policy.yaml with their MDP_* overrides",
    )
    check.add_argument(
        "--config-dir",
        type=Path,
        help="default: $MDP_CONFIG_DIR, else ./configs, else the examples shipped with mdp",
    )
    init = config_sub.add_parser(
        "init", help="copy the shipped data_providers.yaml and ingestion_policy.yaml out to edit"
    )
    init.add_argument("dir", nargs="?", type=Path, default=Path("configs"), help="(./configs)")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")

    bench = sub.add_parser(
        "bench", help="run the benchmarks of a checkout, each beside its same-run baseline"
    )
    bench.add_argument("--quick", action="store_true", help="small inputs: minutes, not an hour")
    bench.add_argument(
        "--only", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        help="comma-separated: engine,replay,postgres,live (default: all)",
    )  # fmt: skip

    schema = sub.add_parser("schema", help="write the AsyncAPI document and JSON Schemas")
    schema.add_argument("--out", type=Path, default=Path("."), help="writes OUT/docs/... (.)")
    schema.add_argument(
        "--check", action="store_true", help="exit 1 if the files under OUT differ instead"
    )
    return parser


def _apply_overrides(args: argparse.Namespace) -> None:
    """Flags win over the environment; children inherit them through it."""
    if getattr(args, "nats", None):
        os.environ["MDP_NATS_URL"] = args.nats
    if getattr(args, "store", None):
        os.environ["MDP_STORE_URL"] = args.store
    if getattr(args, "adapters", None):
        if args.name != "provider":
            print(f"mdp: --adapters is for the provider service, not {args.name}", file=sys.stderr)
            raise SystemExit(2)
        os.environ["MDP_PROVIDER__ADAPTERS"] = args.adapters


def _nats_url(data_dir: Path) -> str:
    """--nats or MDP_NATS_URL, else the server of the system running on `data_dir`."""
    url = os.environ.get("MDP_NATS_URL")
    if url:
        return url
    running = running_system(data_dir)
    if running is None:
        raise CliError(
            f"no NATS server: pass --nats URL, set MDP_NATS_URL, or run `mdp up` "
            f"(nothing runs on {data_dir}/; --data-dir says where to look)"
        )
    return running.nats_url


def _store_url(data_dir: Path) -> str:
    """--store or MDP_STORE_URL, else the running system's store, else DATA_DIR/mdp.db."""
    url = os.environ.get("MDP_STORE_URL")
    if url:
        return url
    running = running_system(data_dir)
    return running.store_url if running else f"sqlite:///{data_dir / 'mdp.db'}"


CONNECT_TIMEOUT_S = 5.0


async def _connect(url: str) -> NATS:
    """Connect, reconnecting later without limit; an unreachable server fails in seconds."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)  # said once in the CliError, not as a traceback per attempt

    try:
        return await cancellable(  # not wait_for: nats-py can swallow a SIGTERM mid-connect
            nats.connect(
                url.split(","), max_reconnect_attempts=-1, connect_timeout=2, error_cb=on_error
            ),
            CONNECT_TIMEOUT_S,
        )
    except TimeoutError:
        last = f" (last error: {_reason(errors[-1])})" if errors else ""
        raise CliError(
            f"cannot connect to NATS at {url} within {CONNECT_TIMEOUT_S:g} s{last}: is it running?"
        ) from None
    except Exception as exc:
        raise CliError(f"cannot connect to NATS at {url}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def control_request(
    nc: NATS, verb: str, body: dict[str, Any], timeout: float = 10
) -> dict[str, Any]:
    """Send one `ingest.control.<verb>` request and return the decoded reply."""
    try:
        msg = await nc.request(names.control(verb), msgspec.json.encode(body), timeout=timeout)
    except Exception as exc:
        raise CliError(
            f"no reply on {names.control(verb)} ({type(exc).__name__}): is the control "
            "service running?"
        ) from None
    reply: dict[str, Any] = msgspec.json.decode(msg.data)
    return reply


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


async def cmd_ingest(args: argparse.Namespace) -> int:
    """`mdp ingest VERB`: print the reply; exit 1 on an error reply."""
    body: dict[str, Any] = {}
    if args.verb == "start":
        body = {"provider": args.provider, "job": args.job, "params": _parse_params(args.param)}
        if args.symbols:
            body["symbols"] = [s.strip() for s in args.symbols.split(",") if s.strip()]
        if args.dry_run is not None:
            body["dry_run"] = args.dry_run
    elif args.verb == "stop":
        body = {"job": args.job, "reason": args.reason}
    elif args.verb == "reset":
        body = {"provider": args.provider}
    nc = await _connect(_nats_url(args.data_dir))
    try:
        reply = await control_request(nc, args.verb, body)
    finally:
        await _close(nc)
    # The reply as JSON on stdout (for scripts), a one-glance summary on stderr (for people).
    print(json.dumps(reply, indent=2, sort_keys=True))
    if not reply.get("ok"):
        error = reply.get("error", {})
        print(f"error {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    for line in summarize(args.verb, reply):
        print(line, file=sys.stderr)
    return 0


def summarize(verb: str, reply: dict[str, Any]) -> list[str]:
    """Human-readable lines for a successful control reply."""
    if verb == "start":
        job = reply.get("job", {})
        lines = [
            f"started job {job.get('job')} (run {job.get('run')}): {job.get('provider')} "
            f"{', '.join(job.get('symbols') or []) or '(symbols from the source)'}"
            f"{', dry run' if job.get('dry_run') else ''}"
        ]
        if job.get("deadline_ns"):
            seconds = (job["deadline_ns"] - job.get("started_ns", 0)) / 1e9
            lines.append(f"auto-stop after {seconds:g} s")
        return lines
    if verb == "stop":
        if reply.get("status") == "idle":
            return [f"job {reply.get('job')} was not running"]
        return [f"stopped job {reply.get('job')} ({reply.get('reason')})"]
    if verb == "reload":
        return [f"reloaded: policy revision {reply.get('policy_revision')}"]
    if verb == "reset":
        before, after = reply.get("from_state"), reply.get("to_state")
        if before == after:
            return [f"circuit of {reply.get('provider')} was already {after}"]
        return [f"circuit of {reply.get('provider')}: {before} -> {after}"]
    if verb == "status":
        jobs = reply.get("jobs", [])
        lines = [f"{len(jobs)} job(s); policy revision {reply.get('policy_revision')}"]
        for job in jobs:
            ticks = (job.get("provider_state") or {}).get("ticks", 0)
            flags = " dry run" if job.get("dry_run") else ""
            lines.append(
                f"  {job.get('job')}: {job.get('state')} {job.get('provider')} "
                f"{','.join(job.get('symbols') or [])} ticks={ticks}{flags}"
            )
        for name, provider in sorted((reply.get("providers") or {}).items()):
            if provider.get("circuit", "closed") != "closed":
                lines.append(
                    f"  circuit of {name}: {provider['circuit']} "
                    f"({provider.get('failures_in_window', 0)} failure(s) in the window)"
                )
        return lines
    return []


def cmd_config_init(args: argparse.Namespace) -> int:
    """`mdp config init [DIR]`: the shipped example configs, copied where mdp looks for them."""
    from mdp.shared.config import POLICY_FILE, PROVIDERS_FILE, SHIPPED_CONFIG_DIR

    target: Path = args.dir
    names_ = (PROVIDERS_FILE, POLICY_FILE)
    existing = [target / n for n in names_ if (target / n).exists()]
    if existing and not args.force:
        for path in existing:
            print(f"mdp: {path} exists (--force overwrites it)", file=sys.stderr)
        return 1
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in names_:
            (target / name).write_bytes((SHIPPED_CONFIG_DIR / name).read_bytes())
            print(target / name)
    except OSError as exc:
        print(f"mdp: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if target.resolve() != (Path.cwd() / "configs").resolve():
        print(f"(mdp reads them with MDP_CONFIG_DIR={target} or --config-dir)", file=sys.stderr)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """`mdp config check`: validate both files; print where they came from, or every problem."""
    from mdp.services.provider.adapters.base import load_adapters, params_models
    from mdp.shared.config import ConfigError, find_config_dir, load_config

    env = dict(os.environ)
    if args.config_dir is not None:
        env["MDP_CONFIG_DIR"] = str(args.config_dir)
    try:
        models = params_models(load_adapters())
        config = load_config(find_config_dir(env, Path.cwd()), env, models)
    except ConfigError as exc:
        print(f"mdp: {exc.message}", file=sys.stderr)
        return 1
    for name, source in config.sources.items():
        print(f"{name}: ok ({source})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """`mdp schema`: (re)write docs/asyncapi.yaml and docs/schemas.json, or check them."""
    from mdp.schema import stale, write

    if args.check:
        drifted = stale(args.out)
        for path in drifted:
            print(f"mdp: {path} differs from the structs: run `mdp schema`", file=sys.stderr)
        return 1 if drifted else 0
    for path in write(args.out):
        print(path)
    return 0


async def cmd_bars_export(args: argparse.Namespace) -> int:
    """`mdp bars export`: stream the stored bars; exit 4 (said on stderr) when none matched."""
    from mdp import export
    from mdp.services.store.writers import stream_bars, symbol_known

    start, end = _time_arg("--from", args.start), _time_arg("--to", args.end)
    try:
        export.check_format(args.format)
    except export.MissingExtra as exc:
        raise CliError(str(exc)) from None
    if args.format == "parquet" and args.out is None:
        raise CliError("parquet needs a seekable file: pass --out FILE.parquet")
    url = _store_url(args.data_dir)
    _require_sqlite_file(url)
    chunks = stream_bars(url, args.symbol, args.interval, start, end)
    out: Path | None = args.out
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(contextlib.aclosing(chunks))

            def open_out() -> IO[bytes]:
                # Opened at the first row, so an export that matched nothing leaves no file.
                return sys.stdout.buffer if out is None else stack.enter_context(out.open("wb"))

            rows = await export.write_bars(chunks, args.format, open_out)
        if rows == 0 and args.symbol and not await symbol_known(url, args.symbol):
            print(f"mdp: no bars of symbol {args.symbol!r} in {url}", file=sys.stderr)
            return export.NOTHING_MATCHED
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"cannot read bars from {url}: {exc}") from None
    if rows == 0:
        print(f"mdp: no bars match {_filters(args)} in {url}", file=sys.stderr)
        return export.NOTHING_MATCHED
    if out is not None:
        print(f"{rows:,} bars written to {out}", file=sys.stderr)
    return 0


def _time_arg(flag: str, value: str | None) -> int | None:
    from mdp.export import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}", 2) from None


def _filters(args: argparse.Namespace) -> str:
    said = [f"{flag} {value}" for flag, value in (
        ("--symbol", args.symbol), ("--interval", args.interval), ("--from", args.start),
        ("--to", args.end),
    ) if value]  # fmt: skip
    return " ".join(said) or "(no filter)"


def _require_sqlite_file(url: str) -> None:
    if url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        if not path.is_file():
            raise CliError(f"no store at {url}: nothing was stored there (--store, --data-dir)")


async def cmd_tail(args: argparse.Namespace) -> int:
    """`mdp tail KIND [SYMBOL...]`: until Ctrl-C/SIGTERM, or --count lines."""
    from mdp.tail import tail

    nc = await _connect(_nats_url(args.data_dir))
    try:
        await tail(nc, args.kind, args.symbols, as_json=args.json, count=args.count)
    finally:
        await _close(nc)
    return 0


async def cmd_dlq(args: argparse.Namespace) -> int:
    """`mdp dlq list|show|redrive`; redrive exits 1 if a selected letter could not go back."""
    from mdp import dlq

    nc = await _connect(_nats_url(args.data_dir))
    try:
        js = nc.jetstream()
        if args.dlq_command == "show":
            stored = await dlq.get(js, args.seq)
            if stored is None:
                raise CliError(f"no dead letter {args.seq} in {names.STREAM_DLQ}")
            letter, headers, data = stored
            body = dlq.decode_body(letter.subject, headers, data)
            text = (
                msgspec.json.encode({"letter": letter, "headers": headers, "body": body}).decode()
                if args.json
                else dlq.show_text(letter, headers, body, data)
            )
            print(text)
            return 0
        if args.dlq_command == "list":
            return await _dlq_list(js, args)
        return await _dlq_redrive(js, args)
    finally:
        await _close(nc)


async def _dlq_list(js: Any, args: argparse.Namespace) -> int:
    from mdp import dlq

    shown: list[dlq.DeadLetter] = []
    more = 0
    async for letter, _, _ in dlq.read(js, args.service):
        if not dlq.matches(letter, set(), args.reason, None):
            continue
        if len(shown) >= args.limit:
            more += 1
            continue
        shown.append(letter)
        if args.json:
            print(msgspec.json.encode(letter).decode(), flush=True)
    if args.json:
        return 0
    if not shown:
        print("no dead letters", file=sys.stderr)
        return 0
    print(dlq.list_header())
    for letter in shown:
        print(dlq.list_line(letter))
    summary = ", ".join(f"{n} {s}: {r}" for s, r, n in dlq.reason_counts(shown)[:5])
    print(f"{len(shown) + more} dead letter(s){f' ({more} not shown)' if more else ''}; "
          f"by reason: {summary}", file=sys.stderr)  # fmt: skip
    return 0


async def _dlq_redrive(js: Any, args: argparse.Namespace) -> int:
    from mdp import dlq

    seqs = set(args.seqs)
    if not (seqs or args.reason or args.service or args.all):
        raise CliError("say which to re-drive: SEQ..., --reason TEXT, --service S or --all", 2)
    chosen = []
    async for letter, _, _ in dlq.read(js, args.service):
        if dlq.matches(letter, seqs, args.reason, None):
            chosen.append(letter.seq)
    missing = seqs - set(chosen)
    refused = 0
    for seq in chosen:
        stored = await dlq.get(js, seq)  # read again, one at a time: constant memory
        if stored is None:
            continue
        letter = stored[0]
        if letter.redrive:
            refused += 1
            print(f"mdp: {seq}: not re-driven: {letter.redrive}", file=sys.stderr)
            continue
        if not args.dry_run:
            await dlq.redrive(js, stored, keep=args.keep)
        verb = "would re-drive" if args.dry_run else "re-drove"
        print(f"{verb} {seq} to {letter.subject} ({letter.body}; was: {letter.reason})")
    for seq in sorted(missing):
        print(f"mdp: {seq}: no such dead letter", file=sys.stderr)
    return 1 if refused or missing else 0


async def cmd_chart(args: argparse.Namespace) -> int:
    """`mdp chart SYMBOL --out FILE`: exit 4 when no bar matched."""
    from mdp import chart, export
    from mdp.services.store.writers import stream_bars

    if args.out.suffix.lower() not in (".html", ".htm", ".png"):
        raise CliError(f"--out {args.out}: the chart is written as .html or .png", 2)
    if args.out.suffix.lower() == ".png":
        try:
            export.require("matplotlib", "chart")
        except export.MissingExtra as exc:
            raise CliError(f"{exc}; or write --out FILE.html, which needs nothing") from None
    start, end = _time_arg("--from", args.start), _time_arg("--to", args.end)
    url = _store_url(args.data_dir)
    _require_sqlite_file(url)
    bars: list[Any] = []
    try:
        chunks = stream_bars(url, args.symbol, args.interval, start, end)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                bars += chunk
                if len(bars) > chart.MAX_BARS:
                    raise CliError(
                        f"more than {chart.MAX_BARS:,} bars: narrow the range (--from, --to) "
                        "or take a wider --interval"
                    )
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"cannot read bars from {url}: {exc}") from None
    if not bars:
        print(f"mdp: no {args.interval} bars of {args.symbol!r} in {url}", file=sys.stderr)
        return export.NOTHING_MATCHED
    await asyncio.to_thread(chart.write, bars, args.out)
    print(f"{len(bars)} bars, {len(chart.gaps(bars))} gap(s): {args.out}", file=sys.stderr)
    return 0


async def cmd_top(args: argparse.Namespace) -> int:
    """`mdp top`: a snapshot every --interval s until Ctrl-C/SIGTERM (or one, --once)."""
    from mdp import top

    running = running_system(args.data_dir)
    log_dir = args.data_dir / "logs"
    nc = await _connect(_nats_url(args.data_dir))
    tty = sys.stdout.isatty() and not args.json
    # A signal sets `stop` rather than cancelling: a cancel landing in one of the many NATS
    # requests of a snapshot can be lost (asyncio.wait_for in Python 3.11).
    stop = asyncio.Event()
    args.interrupt.stop_gently(stop)
    try:
        while not stop.is_set():
            table = await top.snapshot(
                nc,
                max(args.interval, 0.2),
                log_dir if log_dir.is_dir() else None,
                running.started_ns if running else 0,
                stop,
            )
            if table is None:
                break
            text = msgspec.json.encode(table).decode() if args.json else top.render(table)
            print(("\x1b[H\x1b[2J" if tty else "") + text, flush=True)
            if args.once:
                return 0
    finally:
        await _close(nc)
    sig = int(args.interrupt.signal)
    print(f"mdp: stopped by {signal.Signals(sig).name}", file=sys.stderr)
    return 128 + sig


def _supervisor(data_dir: Path, env: dict[str, str] | None = None) -> Supervisor:
    store = os.environ.get("MDP_STORE_URL") or f"sqlite:///{data_dir / 'mdp.db'}"
    return Supervisor(
        data_dir=data_dir,
        store_url=store,
        nats_url=os.environ.get("MDP_NATS_URL") or None,
        env=env or {},
        say=lambda line: print(line, file=sys.stderr, flush=True),
        die_with_parent=True,
    )


def _refuse_busy(exc: DataDirBusy, data_dir: Path) -> CliError:
    return CliError(
        f"{exc}: stop it first, or pass another --data-dir (`mdp ingest status "
        f"--data-dir {data_dir}` talks to it)"
    )


class Progress:
    """The live line of `mdp up` (`mdp.top.progress_line`), from two looks a second apart."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.previous: Any = None
        self.dead_letters_before: int | None = None
        self.pids: dict[str, int] = {}
        self.restarts = 0

    async def line(self, nc: NATS, pids: dict[str, int] | None = None) -> str:
        """Look at the system and format one progress line; `pids` of the services (a new pid
        is a restart: the supervisor's own count resets once a service has run a while)."""
        from mdp import top

        for name, pid in (pids or {}).items():
            self.restarts += name in self.pids and self.pids[name] != pid
            self.pids[name] = pid
        current = await top.sample(nc)
        bars = await top.bars_by_interval(nc)
        dead = sum(current.dead_letters.values())
        if self.dead_letters_before is None:  # the stream outlives a run: count this run's
            self.dead_letters_before = dead
        previous, self.previous = self.previous or current, current
        table = top.rows(previous, current, [])
        seconds = max(current.at - previous.at, 1e-3)
        ticks = current.counters["provider"]["out"]
        rate = (ticks - previous.counters["provider"]["out"]) / seconds
        return top.progress_line(
            time.monotonic() - self.started,
            ticks,
            rate,
            bars,
            current.counters["store"]["out"],
            dead - self.dead_letters_before,
            self.restarts,
            [row.service for row in table if row.stalled],
        )


class Interrupt:
    """SIGINT/SIGTERM during a command: cancel it (its `finally` stops what it started), or,
    while a command has set `gentle`, set that event so it can wind down in its own way."""

    def __init__(self, task: asyncio.Task[int]) -> None:
        self.task = task
        self.signal = 0
        self.gentle: asyncio.Event | None = None

    def __call__(self, sig: int) -> None:
        """The signal handler."""
        first = not self.signal
        self.signal = sig
        if first and self.gentle is not None:
            self.gentle.set()
        else:  # a second signal never waits for the gentle path
            self.task.cancel()

    def stop_gently(self, stop: asyncio.Event) -> None:
        """From now on a first signal sets `stop`; one that came already sets it at once (its
        cancel may have been lost in a library on Python 3.11, where `wait_for` can swallow one)."""
        self.gentle = stop
        if self.signal:
            stop.set()


async def cmd_up(args: argparse.Namespace) -> int:
    """`mdp up`: embedded NATS, every service, the synthetic provider, a live progress line."""
    busy = running_system(args.data_dir)
    if busy is not None and not os.environ.get("MDP_NATS_URL"):
        raise _refuse_busy(DataDirBusy(args.data_dir, busy), args.data_dir)
    sup = _supervisor(args.data_dir)
    stop = asyncio.Event()
    try:
        try:
            url = sup.start_nats()
        except DataDirBusy as exc:  # lost a race with another `mdp up`
            raise _refuse_busy(exc, args.data_dir) from None
        print(f"nats: {url} (store: {sup.store_url}, logs: {sup.log_dir})", file=sys.stderr)
        for name in sup.services:
            sup.spawn(name)
        await sup.wait_ready()
        nc = await _connect(url)
        control_url = await sup.record_control_url(nc)
        if control_url:
            print(f"control: {control_url} (recorded in {args.data_dir}/)", file=sys.stderr)
        symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
        params = {"rate": args.rate} if args.provider == "synthetic" else {}
        reply = await control_request(
            nc, "start", {"provider": args.provider, "symbols": symbols, "params": params}
        )
        if not reply.get("ok"):
            raise CliError(f"start refused: {reply.get('error')}")
        print(f"started {args.provider} for {', '.join(symbols)}; Ctrl-C stops", file=sys.stderr)
        args.interrupt.stop_gently(stop)  # from here a signal stops the job, then the system
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        progress = Progress()
        tty = sys.stdout.isatty()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            if deadline is not None and time.monotonic() >= deadline:
                break
            sup.check()
            pids = {n: c.proc.pid for n, c in sup.children.items() if c.proc is not None}
            line = await progress.line(nc, pids)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        if tty:
            print()
        with contextlib.suppress(CliError):
            await control_request(nc, "stop", {"reason": "operator_request"})
        print("\n" + await progress.line(nc), flush=True)
        await _close(nc)
    finally:
        codes = sup.stop()
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        print(f"services exited uncleanly: {failed}", file=sys.stderr)
        return 1
    print("stopped cleanly", file=sys.stderr)
    return 0


async def replay_file(nc: NATS, path: Path, speed: str, timeout: float = 0) -> dict[str, Any]:
    """Start a replay job; wait until the store has committed every symbol of it and the
    provider has said how it ended (`ticks`, `symbols`, `rejected_rows`, `rejected_lines`)."""
    completed: dict[str, int] = {}
    outcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    run = ""
    expected = -1
    ended: Stopped | None = None

    def on_event(msg: Msg) -> None:
        nonlocal expected, ended
        try:
            event = decode_event(msg.subject, msg.data)
        except ValueError:
            return  # not ours to judge: an event this client does not know, or a bad one
        match event:
            case EndOfStream(run=r, symbol=symbol, ticks=ticks, symbols_total=total) if r == run:
                completed[symbol] = ticks
                expected = total
            case Failed(run=r, error=error) if r == run:
                outcome.set_exception(CliError(f"replay failed: {error}"))
                return
            case Stopped(run=r, reason="completed") if r == run:
                ended = event
                if not event.ticks:
                    expected = 0
            case _:
                return
        if ended is not None and expected >= 0 and len(completed) >= expected:
            outcome.set_result(
                {
                    "symbols": len(completed),
                    "ticks": sum(completed.values()),
                    "rejected_rows": ended.rejected_rows or 0,
                    "rejected_lines": ended.rejected_lines or [],
                }
            )

    async def read_events(start_seq: int) -> None:
        # Read from the stream, not a core subscription: an event published while this client
        # is reconnecting, or while a cluster elects a new leader, is still delivered.
        async for msg in follow_stream(js, names.STREAM_EVENTS, names.EVENTS_ALL, start_seq):
            on_event(msg)
            if outcome.done():
                return

    absolute = os.path.abspath(path)  # noqa: ASYNC240 (no I/O; the provider has its own cwd)
    js = nc.jetstream()
    # Events are read from here on, once the job's run is known: none of them is missed.
    start_seq = (await js.stream_info(names.STREAM_EVENTS)).state.last_seq + 1
    reader: asyncio.Task[None] | None = None
    job = f"replay-{uuid.uuid4().hex[:12]}"
    try:
        started = time.perf_counter()
        reply = await control_request(
            nc,
            "start",
            {
                "provider": "replay",
                "job": job,
                "params": {"path": absolute, "speed": _speed(speed)},
            },
        )
        if not reply.get("ok"):
            error = reply.get("error", {})
            raise CliError(f"replay refused ({error.get('code')}): {error.get('message')}")
        run = reply["job"]["run"]
        reader = asyncio.create_task(read_events(start_seq), name="replay-events")
        result = await _while_connected(nc, outcome, timeout)
        result["seconds"] = time.perf_counter() - started
        result["job"] = job
        return result
    finally:
        if reader is not None:
            await cancel_until_done(reader, 2)  # bounded: its consumer goes on its own
        if nc.is_connected:
            with contextlib.suppress(CliError):
                await control_request(nc, "stop", {"job": job, "reason": "replay_done"}, 2)


LOST_AFTER_S = 10.0


async def _while_connected(
    nc: NATS, outcome: asyncio.Future[dict[str, Any]], timeout: float
) -> dict[str, Any]:
    """`outcome`, unless `timeout` passes (TimeoutError) or NATS stays away `LOST_AFTER_S`."""
    deadline = time.monotonic() + timeout if timeout else None
    away_since: float | None = None
    while True:
        done, _ = await asyncio.wait({outcome}, timeout=0.5)
        if done:
            return outcome.result()
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            outcome.cancel()
            raise TimeoutError
        away_since = None if nc.is_connected else (away_since or now)
        if away_since is not None and now - away_since >= LOST_AFTER_S:
            outcome.cancel()
            raise CliError(
                f"lost the NATS server for {LOST_AFTER_S:g} s: did the system stop? "
                "(the replay may be incomplete)"
            )


async def _close(nc: NATS) -> None:
    """Close a connection in bounded time, whatever state it is in."""
    with contextlib.suppress(Exception):
        await cancellable(nc.close(), 5)


def _speed(value: str) -> str | float:
    if value == "max":
        return value
    try:
        speed = float(value)
    except ValueError:
        raise CliError(f"--speed {value!r}: expected 'max' or a positive number") from None
    if speed <= 0:
        raise CliError(f"--speed {value!r}: expected a positive number")
    return speed


async def cmd_replay(args: argparse.Namespace) -> int:
    """`mdp replay FILE`: returns once every bar of the file is stored; exit 3 if rows were
    rejected (each dead-lettered with its reason), 1 if nothing could be replayed."""
    if not args.file.is_file():
        raise CliError(f"{args.file}: no such file")
    if args.file.stat().st_size == 0:
        raise CliError(f"{args.file}: the file is empty")
    speed = _speed(args.speed)
    sup = None
    url = os.environ.get("MDP_NATS_URL")
    running = None if url else running_system(args.data_dir)
    if running is not None:
        url = running.nats_url  # join the system `mdp up` runs here, never a second server
        print(f"replaying into the system running on {args.data_dir}/ ({url})", file=sys.stderr)
    elif not url:
        # Its own embedded system may always read FILE, wherever it lies.
        sup = _supervisor(args.data_dir, {"MDP_REPLAY__ROOTS": str(args.file.resolve().parent)})
    try:
        if sup is not None:
            try:
                url = sup.start_nats()
            except DataDirBusy as exc:
                raise _refuse_busy(exc, args.data_dir) from None
            for name in sup.services:
                sup.spawn(name)
            await sup.wait_ready()
        assert url
        nc = await _connect(url)
        try:
            result = await replay_file(nc, args.file, str(speed), args.timeout)
        except TimeoutError:
            raise CliError(f"replay did not complete within {args.timeout} s") from None
        finally:
            await _close(nc)
    finally:
        if sup is not None:
            sup.stop()
    return _replay_report(args.file, result)


def _replay_report(path: Path, result: dict[str, Any]) -> int:
    rate = result["ticks"] / result["seconds"] if result["seconds"] else 0.0
    rejected, lines = result["rejected_rows"], result["rejected_lines"]
    if not result["ticks"]:
        what = f"every one of its {rejected:,} rows was rejected" if rejected else "no rows"
        raise CliError(f"{path}: nothing to replay ({what})", 3 if rejected else 1)
    print(
        f"replayed {result['ticks']:,} ticks of {result['symbols']} symbols in "
        f"{result['seconds']:.2f} s ({rate:,.0f} ticks/s); every bar is stored"
    )
    if not rejected:
        return 0
    shown = ", ".join(str(n) for n in lines) + (", ..." if rejected > len(lines) else "")
    print(
        f"mdp: {rejected:,} row(s) rejected (lines {shown}); each is on {dlq('provider')} "
        "with its reason",
        file=sys.stderr,
    )
    return 3


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    _apply_overrides(args)
    if args.command == "config":
        sys.exit(cmd_config_init(args) if args.config_command == "init" else cmd_config_check(args))
    if args.command == "schema":
        sys.exit(cmd_schema(args))
    if args.command == "bench":
        from mdp.bench import run as run_benchmarks

        sys.exit(run_benchmarks(args.quick, args.only))
    if args.command == "service":
        from mdp.services.registry import service_factory
        from mdp.shared.runtime import main as run_service

        run_service(service_factory(args.name))
        return
    # Library logs go to stderr so that stdout stays clean for CSV and JSON output.
    configure_logging("cli", level="WARNING", fmt="console")
    handlers = {
        "up": cmd_up,
        "replay": cmd_replay,
        "ingest": cmd_ingest,
        "tail": cmd_tail,
        "dlq": cmd_dlq,
        "chart": cmd_chart,
        "top": cmd_top,
    }
    handler = cmd_bars_export if args.command == "bars" else handlers[args.command]
    try:
        code = asyncio.run(_interruptible(handler, args))
    except CliError as exc:
        print(f"mdp: {exc}", file=sys.stderr)
        code = exc.code
    except BrokenPipeError:
        # The reader went away (`mdp tail ... | head`): not a failure, and nothing to flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


async def _interruptible(
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace
) -> int:
    """Run a command; SIGINT/SIGTERM cancel it (or stop it gently) and give 128 + signal."""
    task: asyncio.Task[int] = asyncio.ensure_future(handler(args))
    args.interrupt = interrupt = Interrupt(task)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt, sig)
    try:
        return await task
    except asyncio.CancelledError:
        if not interrupt.signal:
            raise
        print(f"mdp: stopped by {signal.Signals(interrupt.signal).name}", file=sys.stderr)
        return 128 + interrupt.signal
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    main()
