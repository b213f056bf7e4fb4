"""The spool behind the streamer's producer (k2_resources/kafka/: spool, outbox, spool_store,
spool_replay), against a fake producer whose acknowledgements the test gives by hand. The real broker outage is in
tests/integration/test_broker_outage_spool.py."""

from __future__ import annotations

import threading

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from k2_resources.kafka.outbox import TopicOutbox
from k2_resources.kafka.spool import SpoolingKafkaProducer
from k2_resources.kafka.spool_store import SEGMENT_SUFFIX, SpoolRecord, decode_records, encode_record
from tests.support.waiting import wait_for


class FakeFuture:
    """Like kafka-python's future: a callback added after the outcome runs at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.callbacks, self.errbacks = [], []
        self.outcome: tuple[str, object] | None = None

    def add_callback(self, fn):
        return self._add("ok", fn)

    def add_errback(self, fn):
        return self._add("error", fn)

    def _add(self, kind, fn):
        with self.lock:
            if self.outcome is None:
                (self.callbacks if kind == "ok" else self.errbacks).append(fn)
                return self
        if self.outcome[0] == kind:
            fn(self.outcome[1])
        return self

    def finish(self, kind, value=None):
        with self.lock:
            self.outcome = (kind, value)
            handlers = list(self.callbacks if kind == "ok" else self.errbacks)
        for fn in handlers:
            fn(value)


class FakeProducer:
    """Takes records like KafkaProducer.send; the test acknowledges or fails them (in any order)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: list[tuple[bytes, FakeFuture]] = []
        self.refuse_sends = False  # True: send raises as with no metadata (broker away)
        self.closed_with = "open"

    def send(self, topic, key=None, value=None, headers=None):
        if self.refuse_sends:
            raise KafkaTimeoutError("Failed to update metadata after 2.0 secs.")
        future = FakeFuture()
        with self.lock:
            self.sent.append((value, future))
        return future

    def ack_all(self) -> int:
        with self.lock:
            pending, self.sent = self.sent, []
        for _value, future in pending:
            future.finish("ok")
        return len(pending)

    def values(self) -> list[bytes]:
        with self.lock:
            return [value for value, _ in self.sent]

    def close(self, timeout=None):
        self.closed_with = timeout


def _values(count: int, start: int = 0) -> list[bytes]:
    return [f"r{i:05d}".encode() for i in range(start, start + count)]


def _segments(directory) -> list:
    return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"))


def test_framing_round_trips_and_a_torn_tail_is_left_out():
    records = [
        SpoolRecord(b"v1"),
        SpoolRecord(b"", key=b"BTCUSDT", headers=(("k2.reason", b"bad"), ("x", b""))),
        SpoolRecord("é€".encode() * 100, key=b""),
    ]
    data = b"".join(encode_record(r) for r in records)
    assert decode_records(data) == (records, len(data))
    torn = data + encode_record(SpoolRecord(b"half"))[:-2]
    assert decode_records(torn) == (records, len(data))
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    assert decode_records(bytes(corrupt))[0] == records[:2]


def test_a_full_window_spools_then_replays_in_order_and_deletes_only_acknowledged_segments(tmp_path):
    producer = FakeProducer()
    out = TopicOutbox(producer, "t", tmp_path, max_buffered=10, segment_records=25)
    try:
        for value in _values(100):
            out.send(value, key=b"k")
        # 10 in the window (never acknowledged: the broker is away), 90 in the spool
        assert producer.values() == _values(10)
        assert out.stats.sent_direct == 10 and out.stats.spooled == 90 and out.spooling
        assert len(_segments(tmp_path)) == 4  # 25 + 25 + 25 + 15 records
        for value in _values(20, start=100):  # more while spooling: behind the spool, never ahead of it
            out.send(value)
        assert out.stats.spooled == 110

        # the broker is back: acknowledge whatever is in flight until everything is delivered
        delivered: list[bytes] = []

        def step() -> bool:
            delivered.extend(producer.values())
            producer.ack_all()
            return out.drained()

        wait_for(step, timeout_s=20, what="the spool to drain", interval_s=0.01)
        assert delivered == _values(120)  # every record exactly once, in order
        assert _segments(tmp_path) == [] and out.stats.replayed == 110
        assert not out.spooling
        out.send(b"after")  # straight to Kafka again
        assert producer.values() == [b"after"] and out.stats.sent_direct == 11
    finally:
        out.close(timeout_s=0)


def test_no_metadata_spools_at_once_and_never_blocks(tmp_path):
    producer = FakeProducer()
    producer.refuse_sends = True
    out = TopicOutbox(producer, "t", tmp_path, max_buffered=1000, retry_backoff_s=0.05)
    try:
        for value in _values(30):
            out.send(value)
        assert out.stats.spooled == 30 and producer.values() == []
        producer.refuse_sends = False
        delivered: list[bytes] = []

        def step() -> bool:
            delivered.extend(producer.values())
            producer.ack_all()
            return out.drained()

        wait_for(step, timeout_s=20, what="the spool to drain", interval_s=0.01)
        assert delivered == _values(30)
    finally:
        out.close(timeout_s=0)


def test_a_shutdown_with_kafka_away_keeps_everything_in_order_for_the_next_run(tmp_path):
    producer = FakeProducer()
    out = TopicOutbox(producer, "t", tmp_path, max_buffered=10)
    for value in _values(50):
        out.send(value)
    assert out.close(timeout_s=0.2) is False  # nothing acknowledged: 10 in memory, 40 spooled
    assert sum(len(decode_records(p.read_bytes())[0]) for p in _segments(tmp_path)) == 50

    # a torn write at the very end (a crash mid-append) is cut off when the spool is opened again
    with _segments(tmp_path)[-1].open("ab") as handle:
        handle.write(encode_record(SpoolRecord(b"torn"))[:5])
    later = FakeProducer()
    again = TopicOutbox(later, "t", tmp_path, max_buffered=10)
    try:
        again.send(b"new")
        delivered: list[bytes] = []

        def step() -> bool:
            delivered.extend(later.values())
            later.ack_all()
            return again.drained()

        wait_for(step, timeout_s=20, what="the leftover spool to drain", interval_s=0.01)
        assert delivered == [*_values(50), b"new"]
        assert _segments(tmp_path) == []
    finally:
        again.close(timeout_s=0)


def test_a_restart_resumes_after_the_acknowledged_part_of_a_segment(tmp_path):
    producer = FakeProducer()
    out = TopicOutbox(producer, "t", tmp_path, max_buffered=5)
    for value in _values(20):
        out.send(value)
    producer.ack_all()  # the 5 direct ones
    wait_for(lambda: len(producer.values()) == 5, timeout_s=10, what="the first replay batch")
    producer.ack_all()  # 5 replayed ones: the spool's first segment is acknowledged up to record 5
    wait_for(lambda: len(producer.values()) == 5, timeout_s=10, what="the second replay batch")
    out.close(timeout_s=0)
    later = FakeProducer()
    again = TopicOutbox(later, "t", tmp_path, max_buffered=100)
    try:
        wait_for(lambda: len(later.values()) == 10, timeout_s=10, what="the replay after the restart")
        assert later.values() == _values(10, start=10)  # from the first unacknowledged record on
    finally:
        again.close(timeout_s=0)


def test_the_spooling_producer_reports_records_refused_for_good(tmp_path):
    producer = FakeProducer()
    spooling = SpoolingKafkaProducer(
        producer, tmp_path, topics=("trades", "trades.dlq"), max_buffered=10, close_timeout_s=0.2
    )
    errors: list[BaseException] = []
    handle = spooling.send("trades", value=b"too big", key=b"k")
    assert handle.is_done and not handle.failed()
    handle.add_errback(errors.append)
    ((_value, future),) = producer.sent
    future.finish("error", MessageSizeTooLargeError("too large"))
    assert [type(e) for e in errors] == [MessageSizeTooLargeError]
    assert spooling.totals().failed == 1
    assert spooling.close() is True and producer.closed_with is None
    assert {p.name for p in tmp_path.iterdir()} == {"trades", "trades.dlq"}


@pytest.mark.parametrize("max_buffered", [0, -1])
def test_the_window_must_hold_a_record(tmp_path, max_buffered):
    with pytest.raises(ValueError, match="max_buffered"):
        TopicOutbox(FakeProducer(), "t", tmp_path, max_buffered=max_buffered)
