"""The publisher relies on nats-py internals: these fail loudly when a release changes them."""

from __future__ import annotations

from importlib import metadata

from nats.aio.client import Client

from mdp.shared.bus import _nats_internals


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


def test_installed_nats_py_is_the_tested_range() -> None:
    low, high = (_version(bound.lstrip("<>=")) for bound in _nats_internals.TESTED_RANGE.split(","))
    installed = _version(metadata.version("nats-py"))
    assert low <= installed < high, (
        f"nats-py {metadata.version('nats-py')} is outside {_nats_internals.TESTED_RANGE}: "
        "check Client._pending and _pending_data_size, then widen the range here and in pyproject"
    )


def test_the_reconnect_buffer_has_the_shape_the_publisher_edits() -> None:
    nc = Client()
    assert _nats_internals.supported(nc), "Client._pending / _pending_data_size changed shape"


def test_only_our_buffered_publishes_are_dropped() -> None:
    nc = Client()
    ours = b"HPUB md.raw.p.A _INBOX.x.7 12 20\r\nhdr\r\n\r\npayload\r\n"
    theirs = b"HPUB md.raw.p.A _INBOX.other.1 12 20\r\nhdr\r\n\r\npayload\r\n"
    plain = b"PUB x 1\r\na\r\n"
    nc._pending[:] = [ours, theirs, plain]
    nc._pending_data_size = len(ours) + len(theirs) + len(plain)

    removed = _nats_internals.drop_buffered_publishes(nc, "_INBOX.x")

    assert removed == len(ours)
    assert nc._pending == [theirs, plain]
    assert nc._pending_data_size == len(theirs) + len(plain)


def test_a_client_without_the_buffer_is_left_alone() -> None:
    class Other:
        pass

    assert not _nats_internals.supported(Other())  # type: ignore[arg-type]
    assert _nats_internals.drop_buffered_publishes(Other(), "_INBOX.x") == 0  # type: ignore[arg-type]


def test_sequences_by_hand_equal_what_nats_py_parses() -> None:
    from nats.aio.msg import Msg

    from mdp.shared.bus.consumer import consumer_sequence, stream_sequence

    for reply in (
        "$JS.ACK.MD_QUOTES.aggregator.1.4711.42.1796289044002936324.7",  # v1: 9 tokens
        "$JS.ACK.hub.ACCHASH.MD_QUOTES.aggregator.2.4711.42.1796289044002936324.7.rnd",  # v2
        "$JS.ACK.hub.ACCHASH.MD_QUOTES.aggregator.2.4711.42.1796289044002936324.7",  # v2, 11
    ):
        msg = Msg(_client=None, subject="md.quotes.X", reply=reply)  # type: ignore[arg-type]
        assert (stream_sequence(msg), consumer_sequence(msg)) == (
            msg.metadata.sequence.stream,
            msg.metadata.sequence.consumer,
        ), reply


def test_timestamp_by_hand_equals_what_nats_py_parses() -> None:
    from nats.aio.msg import Msg

    from mdp.shared.bus.consumer import timestamp_ns

    for reply in (
        "$JS.ACK.MD_QUOTES.aggregator.1.4711.42.1796289044002936324.7",  # v1: 9 tokens
        "$JS.ACK.hub.ACCHASH.MD_QUOTES.aggregator.2.4711.42.1796289044002936324.7.rnd",  # v2
    ):
        msg = Msg(_client=None, subject="md.quotes.X", reply=reply)  # type: ignore[arg-type]
        assert timestamp_ns(msg) == 1796289044002936324
        # nats-py keeps microseconds (a datetime): equal to within one
        assert abs(timestamp_ns(msg) - msg.metadata.timestamp.timestamp() * 1e9) < 1e3


def test_lag_of_a_consumer_info() -> None:
    import datetime

    from nats.js.api import ConsumerConfig, ConsumerInfo, SequenceInfo

    from mdp.shared.bus.consumer import ConsumerLag, lag_of

    created = datetime.datetime.now(datetime.UTC)
    info = ConsumerInfo(
        name="store-writer",
        stream_name="STORE_SYNC",
        config=ConsumerConfig(),
        created=created,
        delivered=SequenceInfo(consumer_seq=9, stream_seq=120),
        ack_floor=SequenceInfo(consumer_seq=7, stream_seq=110),
        num_ack_pending=2,
        num_pending=30,
    )
    assert lag_of(info) == ConsumerLag(pending=30, ack_pending=2, ack_floor=110, delivered=120)
    bare = ConsumerInfo(name="x", stream_name="S", config=ConsumerConfig(), created=created)
    assert lag_of(bare) == ConsumerLag(0, 0, 0, 0)
