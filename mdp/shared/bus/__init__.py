"""The NATS edge: connection, stream declarations, publisher, consumer, KV helpers, dead letters.

- `connection`: one connection per process, and request/reply;
- `declare`: streams and buckets of the contract, created idempotently;
- `publisher`: the ordered, windowed JetStream publisher (its use of nats-py internals is in
  `_nats_internals`);
- `consumer`: the pull consumer loop, and `Consumer`, a one-line declaration of one;
- `kv`: following and listing KV keys;
- `deadletter`: rejected messages to `md.dlq.<service>`.
"""
