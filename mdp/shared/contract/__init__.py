"""The contract between the services, in one place.

- `names`: every subject, header, stream, KV bucket and key, and message-id builder;
- `messages`: market data (`Tick`, `TickBatch`, `Bar`, `BarBatch`, `EndOfStream`, dead letters);
- `events`: the `ingest.events.*` union and its one decoder;
- `control`: control requests and replies, the desired jobs (`JobSpec`);
- `records`: what else lives in KV (provider states, stop records, URLs, leases);
- `streams`: stream and bucket definitions built from `names`;
- `codec`: encoding by `Content-Type` (JSON, msgpack).
"""
