"""A checkpoint larger than the server's max_payload, through a real server's KV bucket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import nats
import pytest
import structlog

from mdp.services.aggregator.checkpoint import PARTED_MAGIC, Checkpoint, CheckpointStore
from mdp.shared.bus.declare import ensure_buckets
from mdp.shared.contract import names
from mdp.shared.contract.messages import Bar
from mdp.shared.natsserver import EmbeddedNats
from mdp.shared.settings import StreamSettings

pytestmark = pytest.mark.integration


async def test_a_checkpoint_over_max_payload_is_stored_in_parts_and_read_back(
    tmp_path: Path,
) -> None:
    config = tmp_path / "server.conf"
    config.write_text("max_payload: 65536\n")
    with EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(config)]) as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_buckets(js, StreamSettings())
            kv = await js.key_value(names.KV_CHECKPOINTS)
            ctx = SimpleNamespace(
                nc=nc, log=structlog.get_logger(), stopping=asyncio.Event(), crashed=False
            )
            key = names.checkpoint_key("aggregator")
            bars = [
                Bar(f"SYM{i:05d}", "1s", i * 10**9, (i + 1) * 10**9, 100 + i * 0.37,
                    101 + i * 0.41, 99 + i * 0.13, 100 + i * 0.29, i * 1.5, i, 100.2, "syn", 0)
                for i in range(20_000)
            ]  # fmt: skip
            state = Checkpoint(last_seq=42, engine=b"", pending=bars, suppressed={}, sources={},
                               dry_run=[])  # fmt: skip
            writer = CheckpointStore(ctx, kv, key)  # type: ignore[arg-type]
            await writer.save(state)
            head = await kv.get(key)
            assert head.value is not None and head.value.startswith(PARTED_MAGIC)
            reader = CheckpointStore(ctx, kv, key)  # type: ignore[arg-type]
            assert await reader.load() == state
            assert reader.revision == writer.revision
            state.last_seq = 43
            await reader.save(state)  # the reader took over: it swaps on the head it read
            assert (await CheckpointStore(ctx, kv, key).load()) == state  # type: ignore[arg-type]
            parts = [k for k in await kv.keys() if k.startswith(f"{key}.part.")]
            assert parts and len({k.split(".")[-2] for k in parts}) == 1  # one generation left
            assert not ctx.stopping.is_set() and not ctx.crashed
        finally:
            await nc.close()
