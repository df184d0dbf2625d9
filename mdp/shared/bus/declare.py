"""Streams and buckets of the contract, created (or updated) idempotently by whoever starts."""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from mdp.shared.contract.streams import StreamLimits, bucket_configs, stream_configs


async def ensure_streams(js: JetStreamContext, limits: StreamLimits) -> None:
    """Create every stream, or bring an existing one to this configuration."""
    for config in stream_configs(limits):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


async def ensure_buckets(js: JetStreamContext, limits: StreamLimits) -> None:
    """Create the KV buckets of the contract if they are missing."""
    for config in bucket_configs(limits):
        try:
            await js.key_value(config.bucket)
        except (NotFoundError, BucketNotFoundError):
            with contextlib.suppress(BadRequestError):
                await js.create_key_value(config)
