"""The duplicate check: real repeats only, resets kept and reported, memory bounded, nothing remembered
before accept."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from k2_resources.binance.dedupe import TradeIdTracker, TradeIdVerdict, seed_from_spool, trade_time_ms
from k2_resources.binance.normalise import normalise_trade
from k2_resources.errors import K2Error
from k2_resources.kafka.spool_store import SpoolRecord, encode_record
from k2_resources.schemas import encode_trade


def _judge(tracker: TradeIdTracker, symbol: str, trade_id: int, time_ms: int | None = None):
    """Classify and, unless a duplicate, accept: what the streamer does for a trade it can encode."""
    time_ms = trade_id * 10 if time_ms is None else time_ms
    seen = tracker.classify(symbol, trade_id, time_ms)
    if seen.verdict != TradeIdVerdict.DUPLICATE:
        tracker.accept(symbol, trade_id, time_ms)
    return seen


def test_repeats_are_duplicates_and_ids_below_the_highest_are_not():
    tracker = TradeIdTracker(reset_jump=100)
    seen = [
        _judge(tracker, symbol, trade_id)
        for symbol, trade_id in [
            ("BTCUSDT", 10),
            ("BTCUSDT", 11),
            ("ETHUSDT", 5),
            ("BTCUSDT", 11),
            ("BTCUSDT", 9),
            ("BTCUSDT", 15),
            ("ETHUSDT", 6),
            ("ETHUSDT", 6),
            ("BTCUSDT", 9),
        ]
    ]
    assert [s.verdict for s in seen] == [
        TradeIdVerdict.NEW,
        TradeIdVerdict.NEW,
        TradeIdVerdict.NEW,
        TradeIdVerdict.DUPLICATE,
        TradeIdVerdict.LATE,  # 9 was never seen: out of order, kept
        TradeIdVerdict.NEW,
        TradeIdVerdict.NEW,
        TradeIdVerdict.DUPLICATE,
        TradeIdVerdict.DUPLICATE,
    ]
    assert seen[5].missing == 3 and seen[5].previous_high == 11  # 12, 13 and 14 never came
    assert tracker.high_water_mark("BTCUSDT") == 15 and tracker.high_water_mark("ETHUSDT") == 6


def test_classify_changes_nothing_so_a_trade_that_fails_later_is_not_remembered():
    tracker = TradeIdTracker()
    tracker.accept("BTCUSDT", 100, 1_000)
    for _ in range(3):  # e.g. a trade whose id cannot be encoded, sent three times
        assert tracker.classify("BTCUSDT", 2**70, 2_000).verdict == TradeIdVerdict.NEW
    assert tracker.high_water_mark("BTCUSDT") == 100 and len(tracker) == 1
    assert tracker.classify("BTCUSDT", 101, 1_001) == tracker.classify("BTCUSDT", 101, 1_001)
    assert tracker.classify("BTCUSDT", 101, 1_001).verdict == TradeIdVerdict.NEW


def test_the_same_id_at_another_time_is_a_new_trade_not_a_repeat():
    """After a reset the source reuses ids; a repeat is the same trade (id and trade time) again."""
    tracker = TradeIdTracker(reset_jump=10)
    _judge(tracker, "BTCUSDT", 5, 1_000)
    assert tracker.classify("BTCUSDT", 5, 1_000).verdict == TradeIdVerdict.DUPLICATE
    assert tracker.classify("BTCUSDT", 5, 9_999).verdict == TradeIdVerdict.LATE


def test_a_large_backward_jump_is_a_reset_and_the_new_ids_are_kept():
    tracker = TradeIdTracker(reset_jump=1_000)
    for trade_id in range(5_000, 5_100):
        _judge(tracker, "BTCUSDT", trade_id)
    reset = _judge(tracker, "BTCUSDT", 1, 9_000_000)
    assert reset.verdict == TradeIdVerdict.RESET and reset.previous_high == 5_099
    after = [_judge(tracker, "BTCUSDT", trade_id, 9_000_000 + trade_id).verdict for trade_id in range(2, 200)]
    assert after == [TradeIdVerdict.NEW] * 198  # counted from the new start, no gaps
    assert tracker.high_water_mark("BTCUSDT") == 199
    # the old trades are still recognised when resent
    assert tracker.classify("BTCUSDT", 5_099, 50_990).verdict == TradeIdVerdict.DUPLICATE


def test_memory_is_bounded_whatever_the_ids_do():
    tracker = TradeIdTracker(window=1_000, reset_jump=50, max_symbols=20)
    rng = random.Random(13)
    for _ in range(20_000):
        symbol = f"S{rng.randrange(100)}USDT"
        _judge(tracker, symbol, rng.choice([rng.randrange(2**63), rng.randrange(100), 0]), rng.randrange(2**40))
        assert len(tracker) <= 1_000 and tracker.symbols <= 20
    # the most recent trades are still recognised
    tracker.accept("BTCUSDT", 7, 70)
    assert tracker.classify("BTCUSDT", 7, 70).verdict == TradeIdVerdict.DUPLICATE


def test_the_window_forgets_the_oldest_first():
    tracker = TradeIdTracker(window=3)
    for trade_id in (1, 2, 3, 4):
        _judge(tracker, "BTCUSDT", trade_id)
    assert tracker.classify("BTCUSDT", 1, 10).verdict == TradeIdVerdict.LATE  # forgotten
    assert [tracker.classify("BTCUSDT", i, i * 10).verdict for i in (2, 3, 4)] == [TradeIdVerdict.DUPLICATE] * 3


def test_trade_time_ms_is_exact_and_bad_settings_are_named():
    assert trade_time_ms(datetime(2024, 8, 9, 0, 0, 0, 330_000, tzinfo=UTC)) == 1723161600330
    with pytest.raises(K2Error, match="window >= 1"):
        TradeIdTracker(window=0)


def test_a_restart_remembers_the_trades_its_spool_still_holds(tmp_path):
    """Trades handed over but still in the spool (Kafka was away) are replayed by the next run: a
    source resending them after a restart must find them already seen."""

    def frame(trade_id: int) -> str:
        return (
            f'{{"stream":"btcusdt@trade","data":{{"e":"trade","E":1,"s":"BTCUSDT","t":{trade_id},"p":"1.5","q":"2",'
            f'"T":{1_723_161_600_000 + trade_id},"m":true,"M":true}}}}'
        )

    records = [SpoolRecord(encode_trade(normalise_trade(frame(i))), b"BTCUSDT") for i in range(10)]
    (tmp_path / "00000000000000000000.seg").write_bytes(b"".join(encode_record(r) for r in records[:6]))
    (tmp_path / "00000000000000000006.seg").write_bytes(b"".join(encode_record(r) for r in records[6:]) + b"torn")
    tracker = TradeIdTracker()
    assert seed_from_spool(tmp_path, tracker) == 10
    assert tracker.classify("BTCUSDT", 9, 1_723_161_600_009).verdict == TradeIdVerdict.DUPLICATE
    assert tracker.classify("BTCUSDT", 10, 1_723_161_600_010).verdict == TradeIdVerdict.NEW
    assert seed_from_spool(tmp_path / "absent", TradeIdTracker()) == 0
    newest = TradeIdTracker()
    assert seed_from_spool(tmp_path, newest, limit=4) == 4  # the newest four
    assert newest.classify("BTCUSDT", 5, 1_723_161_600_005).verdict == TradeIdVerdict.LATE  # not remembered
    assert newest.classify("BTCUSDT", 6, 1_723_161_600_006).verdict == TradeIdVerdict.DUPLICATE
