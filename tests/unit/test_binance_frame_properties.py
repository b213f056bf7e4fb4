"""Property tests: any sequence of WebSocket frames ends with every frame counted exactly once as
produced, duplicate or dead letter; the produced trades are exactly the valid, new ones; the
frame handler never raises (the streamer never stops).

The frame-handling core (FramePipeline) runs against a producer that records what it is handed
(a unit test: no broker). Valid trades are built by the test itself, so what should be produced
is known without asking the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kafka.errors import MessageSizeTooLargeError
from kafka.future import Future

from k2_resources.binance.streamer import FrameOutcome, FramePipeline, StreamerConfig, StreamMetrics
from k2_resources.kafka.dead_letters import STREAM, DeadLetter, read_dead_letter
from k2_resources.schemas import decode_trade

TOPIC, DLQ = "trades", "trades.dlq"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "XRPBTC")
MAX_LONG = 2**63 - 1
BASE_TIME_MS = 1_723_161_600_000


class RecordingProducer:
    """Keeps what it is handed; refuses records above ``max_bytes`` the way KafkaProducer does (a failed future)."""

    def __init__(self, max_bytes: int = 1_048_576) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list]] = []
        self.max_bytes = max_bytes

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: list | None = None) -> Future:
        future = Future()
        if len(value) > self.max_bytes:
            return future.failure(MessageSizeTooLargeError(f"{len(value)} bytes"))
        self.sent.append((topic, key, value, headers or []))
        return future

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def values(self, topic: str) -> list[bytes]:
        return [value for sent_topic, _key, value, _headers in self.sent if sent_topic == topic]

    def letters(self, topic: str) -> list[DeadLetter]:
        sent = [(value, headers) for sent_topic, _key, value, headers in self.sent if sent_topic == topic]
        return [read_dead_letter(value, headers) for value, headers in sent]


@dataclass(frozen=True)
class Frame:
    payload: str | bytes
    trade: tuple[str, int] | None = None  # (symbol, id) when the test built it as a valid trade
    repeat_of: tuple[str, int] | None = None  # invalid, but a repeat (same symbol, id, time) if that trade was produced


def _trade_data(
    symbol: str,
    trade_id: int,
    price: str = "61686.00000000",
    quantity: str = "0.00705000",
    buyer_is_maker: bool = False,
) -> dict[str, Any]:
    # a trade's time follows from its id, so the same (symbol, id) is the same trade
    time_ms = BASE_TIME_MS + (trade_id % 10**9) * 7
    return {
        "e": "trade",
        "E": time_ms + 1,
        "s": symbol,
        "t": trade_id,
        "p": price,
        "q": quantity,
        "T": time_ms,
        "m": buyer_is_maker,
        "M": True,
    }


def _combined(data: dict[str, Any], symbol: str) -> str:
    return json.dumps({"stream": f"{symbol.lower()}@trade", "data": data})


trade_ids = st.one_of(
    st.integers(0, 40),  # small ranges: repeats and out-of-order ids are common
    st.integers(1_000_000, 1_000_010),  # far above the small ones: a fall back from here is a reset
    st.integers(MAX_LONG - 3, MAX_LONG + 3),  # the edge of an Avro long: above it a trade cannot be encoded
)
decimals = st.decimals(
    min_value="0.00000001", max_value="9999999999", places=8, allow_nan=False, allow_infinity=False
).map(lambda d: f"{d:f}")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@st.composite
def trade_frames(draw) -> Frame:
    symbol, trade_id = draw(st.sampled_from(SYMBOLS)), draw(trade_ids)
    data = _trade_data(symbol, trade_id, draw(decimals), draw(decimals), draw(st.booleans()))
    if draw(st.booleans()):  # fields outside V2 (event time E, anything new) go to vendor_data, whatever they hold
        data["E"] = draw(
            st.one_of(st.integers(-(10**400), 10**400), st.sampled_from(["²", "١٢٣", "9" * 40]), json_values)
        )
        data[draw(st.text(max_size=8).filter(lambda k: k not in data))] = draw(json_values)
    text = _combined(data, symbol)
    payload = text.encode() if draw(st.booleans()) else text  # Binance sends text, but a binary UTF-8 frame is fine
    return Frame(payload, (symbol, trade_id) if trade_id <= MAX_LONG else None)


# Changes that make a trade invalid whatever else it holds, by field.
BREAKAGES: dict[str, st.SearchStrategy] = {
    "p": st.one_of(
        st.sampled_from(["0", "-1", "NaN", "Infinity", "1e400", "1e-30", "", "abc", "1" * 40]),
        st.integers(),
        st.floats(),
        st.none(),
        st.booleans(),
    ),
    "q": st.one_of(st.sampled_from(["0", "-0.5", "sNaN", "1e-9"]), st.integers(), st.lists(st.integers())),
    "t": st.one_of(
        st.integers(max_value=-1),
        st.floats(),
        st.text(max_size=5),
        st.booleans(),
        st.integers(min_value=MAX_LONG + 1, max_value=2**200),
        st.none(),
    ),
    "T": st.one_of(st.integers(min_value=10**18), st.integers(max_value=-1), st.text(max_size=3), st.floats()),
    "m": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    "e": st.one_of(st.sampled_from(["aggTrade", "depthUpdate", "TRADE", ""]), st.integers()),
    "s": st.one_of(st.sampled_from(["", "BTC-USDT", "ＢＴＣＵＳＤＴ", "BTCXYZ", "ßUSDT"]), st.integers()),
}


@st.composite
def broken_trade_frames(draw) -> Frame:
    """A trade with one field wrong (type, range, Unicode), possibly using the id of a valid trade."""
    symbol, trade_id = draw(st.sampled_from(SYMBOLS)), draw(st.integers(0, 40))
    data = _trade_data(symbol, trade_id)
    name = draw(st.sampled_from(sorted(BREAKAGES)))
    data[name] = draw(BREAKAGES[name])
    if name == "s":
        return Frame(json.dumps({"stream": f"{symbol.lower()}@trade", "data": data}))
    if draw(st.booleans()):
        del data[name]
    return Frame(_combined(data, symbol))


@st.composite
def unencodable_extras(draw) -> Frame:
    """A valid-looking trade whose extra field holds a lone surrogate: it cannot be encoded as UTF-8 Avro."""
    symbol, trade_id = draw(st.sampled_from(SYMBOLS)), draw(st.integers(0, 40))
    data = _trade_data(symbol, trade_id)
    data["x"] = "\ud800" + draw(st.text(max_size=5))
    return Frame(_combined(data, symbol), repeat_of=(symbol, trade_id))


any_frames = st.one_of(
    trade_frames(),
    trade_frames(),
    trade_frames(),
    broken_trade_frames(),
    unencodable_extras(),
    json_values.map(lambda v: Frame(json.dumps(v))),
    st.text().map(Frame),
    st.binary(max_size=64).map(Frame),
    st.integers(min_value=0, max_value=50).map(lambda n: Frame("[" * n * 1000)),  # nested too deep
)


def _pipeline(producer: RecordingProducer, **config: Any) -> FramePipeline:
    return FramePipeline(
        StreamerConfig(topic=TOPIC, dlq_topic=DLQ, metrics_port=None, **config), producer, StreamMetrics()
    )


def _expected_produced(frames: list[Frame]) -> list[tuple[str, int]]:
    """The first occurrence of each valid trade, in order."""
    seen: set[tuple[str, int]] = set()
    expected = []
    for frame in frames:
        if frame.trade is not None and frame.trade not in seen:
            seen.add(frame.trade)
            expected.append(frame.trade)
    return expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_frames, max_size=40))
@example(
    [Frame(_combined(_trade_data("BTCUSDT", MAX_LONG + 1), "BTCUSDT"))]
    + [Frame(_combined(_trade_data("BTCUSDT", i), "BTCUSDT"), ("BTCUSDT", i)) for i in range(5)]
)
def test_every_frame_ends_once_as_produced_duplicate_or_dead_letter(frames: list[Frame]) -> None:
    producer = RecordingProducer()
    pipeline = _pipeline(producer)
    outcomes = [pipeline.handle(frame.payload) for frame in frames]  # never raises

    stats = pipeline.stats
    assert stats.received == len(frames)
    assert stats.produced + stats.duplicates + stats.dead_lettered == len(frames)
    assert outcomes.count(FrameOutcome.PRODUCED) == stats.produced
    assert outcomes.count(FrameOutcome.DUPLICATE) == stats.duplicates
    assert outcomes.count(FrameOutcome.DEAD_LETTER) == stats.dead_lettered

    produced = [decode_trade(value) for value in producer.values(TOPIC)]
    assert [(t["symbol"], t["source_sequence"]) for t in produced] == _expected_produced(frames)
    produced_so_far: set[tuple[str, int]] = set()
    for frame, outcome in zip(frames, outcomes):
        if frame.trade is not None:
            produced_so_far.add(frame.trade)
        elif frame.repeat_of in produced_so_far:
            assert outcome == FrameOutcome.DUPLICATE, frame  # judged by its identity before it is encoded
        else:
            assert outcome == FrameOutcome.DEAD_LETTER, frame
    letters = producer.letters(DLQ)
    assert len(letters) == stats.dead_lettered
    assert all(letter.reason and letter.detail and letter.stage == STREAM for letter in letters)

    registry = pipeline.metrics.registry
    assert registry.get_sample_value("k2_binance_messages_received_total") == len(frames)
    assert (
        sum(registry.get_sample_value("k2_binance_trades_produced_total", {"symbol": s}) or 0 for s in SYMBOLS)
        == stats.produced
    )


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(SYMBOLS[:2]), st.integers(0, 30)), min_size=1, max_size=60),
    st.lists(st.integers(0, 59), max_size=10),
)
def test_a_bad_frame_never_makes_a_later_good_trade_a_duplicate(
    trades: list[tuple[str, int]], bad_at: list[int]
) -> None:
    """The reported bug: a frame that fails after the duplicate check (unencodable) with the id of
    trades still to come must not hide them."""
    frames: list[Frame] = []
    for index, (symbol, trade_id) in enumerate(trades):
        if index in bad_at:
            data = _trade_data(symbol, trade_id)
            data["x"] = "\udfff"  # same symbol, id and time as the good trade: passes normalising, fails encoding
            frames.append(Frame(_combined(data, symbol)))
        frames.append(Frame(_combined(_trade_data(symbol, trade_id), symbol), (symbol, trade_id)))
    producer = RecordingProducer()
    pipeline = _pipeline(producer)
    for frame in frames:
        pipeline.handle(frame.payload)
    produced = [(t["symbol"], t["source_sequence"]) for t in map(decode_trade, producer.values(TOPIC))]
    assert produced == _expected_produced(frames)
    # a bad frame is a dead letter unless its trade (symbol, id, time) was already produced: then it is a repeat
    bad_before_first = sum(1 for index in set(bad_at) if index < len(trades) and trades[index] not in trades[:index])
    assert pipeline.stats.dead_letters_by_reason.get("schema_mismatch", 0) == bad_before_first


def test_issue_13_one_unencodable_trade_then_300_valid_trades_all_produced():
    producer = RecordingProducer()
    pipeline = _pipeline(producer)
    pipeline.handle(_combined(_trade_data("BTCUSDT", 2**64), "BTCUSDT"))  # the id cannot be encoded
    for trade_id in range(1, 301):
        pipeline.handle(_combined(_trade_data("BTCUSDT", trade_id), "BTCUSDT"))
    assert pipeline.stats.produced == 300 and pipeline.stats.duplicates == 0
    assert pipeline.stats.dead_letters_by_reason == {"schema_mismatch": 1}


def test_a_reset_is_kept_counted_and_logged_with_both_ids(caplog):
    producer = RecordingProducer()
    pipeline = _pipeline(producer, reset_jump=100)
    for trade_id in (5_000, 5_001, 3, 4, 5_001):
        pipeline.handle(_combined(_trade_data("ETHUSDT", trade_id), "ETHUSDT"))
    assert pipeline.stats.produced == 4 and pipeline.stats.duplicates == 1 and pipeline.stats.resets == 1
    assert pipeline.metrics.registry.get_sample_value("k2_binance_trade_id_resets_total", {"symbol": "ETHUSDT"}) >= 1
    warning = [r for r in caplog.records if "trade id reset on ETHUSDT" in r.getMessage()]
    assert len(warning) == 1 and "3" in warning[0].getMessage() and "5001" in warning[0].getMessage()


def test_oversized_and_binary_frames_become_dead_letters_that_fit_in_kafka():
    producer = RecordingProducer(max_bytes=200_000)
    pipeline = _pipeline(producer)
    data = _trade_data("BTCUSDT", 7)
    data["x"] = "é" * 300_000  # a valid trade too large for the producer
    big = _combined(data, "BTCUSDT")
    assert pipeline.handle(big) == FrameOutcome.DEAD_LETTER
    assert pipeline.handle(b"\xff\xfe binary") == FrameOutcome.DEAD_LETTER
    assert (
        pipeline.handle(_combined(_trade_data("BTCUSDT", 7), "BTCUSDT")) == FrameOutcome.PRODUCED
    )  # not a "duplicate"
    too_large, binary = producer.letters(DLQ)
    assert too_large.reason == "produce_rejected" and too_large.truncated
    assert too_large.raw_length == len(big.encode()) and len(too_large.raw) == 64 * 1024
    assert too_large.raw == big.encode()[: 64 * 1024]
    assert binary.reason == "invalid_utf8" and binary.raw == b"\xff\xfe binary"
    assert all(len(value) < 200_000 for value in producer.values(DLQ))
    data["x"] = "é" * 600_000  # 1.2 MB encoded: more than any Kafka record may hold, whatever the producer
    assert pipeline.handle(_combined(data, "BTCUSDT").replace('"t": 7', '"t": 8')) == FrameOutcome.DEAD_LETTER
    assert producer.letters(DLQ)[-1].reason == "too_large"
    assert pipeline.stats.produced == 1 and pipeline.stats.dead_lettered == 3
