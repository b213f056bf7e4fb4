"""The gap-fill rate limiter, gap planner and ledger, without a network."""

from __future__ import annotations

import pytest

from k2_resources.binance.gap_fill import rest_message
from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import (
    Gap,
    GapFillResource,
    GapFillSettings,
    LossReason,
    in_gap,
    judge,
    next_page,
    plan,
    rest_base_url,
)
from k2_resources.binance.normalise import normalise_trade
from k2_resources.binance.rest_limits import HISTORICAL_TRADES, RECENT_TRADES, WeightLimiter, parse_retry_after
from k2_resources.errors import K2Error


class Clock:
    def __init__(self, now: float = 60 * 16_667 + 20.0) -> None:  # 20 s into a minute window
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_limiter_keeps_its_share_of_the_window_and_waits_for_the_next():
    clock = Clock()
    limiter = WeightLimiter(limit=6000, share=0.5, clock=clock)
    sent = 0
    while limiter.delay(25) == 0:
        limiter.spend(25)
        sent += 1
    assert sent == 120  # 3,000 of the 6,000 weight a minute, 25 each
    assert limiter.delay(25) == pytest.approx(40.0)  # the rest of the window
    clock.now += 40.0
    assert limiter.delay(25) == 0 and limiter.used == 0


def test_limiter_takes_the_servers_count_and_honours_retry_after():
    clock = Clock()
    limiter = WeightLimiter(limit=6000, share=0.5, clock=clock)
    limiter.spend(25)
    limiter.observe_used(2990)  # other clients on the same IP
    assert limiter.delay(25) > 0
    clock.now += 40.0
    limiter.block(7)
    assert limiter.delay(25) == pytest.approx(7.0)
    clock.now += 7.0
    assert limiter.delay(25) == 0
    limiter.block(2)
    limiter.block(1)  # a shorter Retry-After never shortens a longer one
    assert limiter.delay(25) == pytest.approx(2.0)


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None, 60.0) == 60.0
    assert parse_retry_after("soon", 60.0) == 60.0
    assert parse_retry_after("-1", 60.0) == 60.0


def test_planner_pages_a_gap_in_thousands_and_bounds_it():
    gap = Gap("BTCUSDT", 101, 2600)
    pages = plan(gap)
    assert [(p.params["fromId"], p.params["limit"]) for p in pages] == [(101, 1000), (1101, 1000), (2101, 500)]
    assert {p.endpoint for p in pages} == {HISTORICAL_TRADES}
    assert judge(gap, 2500) is None and judge(gap, 2499) == LossReason.TOO_LARGE


def test_planner_uses_the_newest_trades_when_the_gap_is_among_them():
    gap = Gap("BTCUSDT", 5000, 5100)
    assert next_page(gap, 5000, live_high=5300).endpoint == RECENT_TRADES
    assert next_page(gap, 5000, live_high=5950).endpoint == HISTORICAL_TRADES  # too close to 1,000 back
    assert next_page(gap, 5000, live_high=5300, recent_ok=False).params == {
        "symbol": "BTCUSDT",
        "fromId": 5000,
        "limit": 101,
    }


def test_in_gap_keeps_the_gaps_ids_and_counts_what_the_history_skipped():
    gap = Gap("BTCUSDT", 10, 20)
    trades = [{"id": i} for i in (8, 9, 12, 13, 15, 21)]
    wanted, skipped, next_from = in_gap(trades, gap, 10)
    assert [t["id"] for t in wanted] == [12, 13, 15] and skipped == 3 and next_from == 16  # 10, 11, 14


def test_rest_host_follows_the_stream():
    assert rest_base_url("wss://stream.binance.com:9443/stream?streams=x") == "https://api.binance.com"
    assert rest_base_url("ws://127.0.0.1:9443/stream?streams=x") == "http://127.0.0.1:9443"
    assert rest_base_url("ws://127.0.0.1:9443", "https://example.org/") == "https://example.org"


def test_settings_from_the_environment_and_the_resource():
    settings = GapFillSettings.from_env({"K2_GAP_FILL_MAX_IDS": "500", "K2_GAP_FILL": "0"})
    assert (settings.max_gap_ids, settings.enabled) == (500, False)
    with pytest.raises(K2Error, match="K2_GAP_FILL"):
        GapFillSettings.from_env({"K2_GAP_FILL_MAX_IDS": "many"})
    assert GapFillResource(max_gap_ids=7).settings().max_gap_ids == 7


def test_a_rest_trade_normalises_like_a_live_one_and_is_marked_backfilled():
    trade = {"id": 42, "price": "1.5", "qty": "2", "quoteQty": "3", "time": 1_700_000_000_000, "isBuyerMaker": True}
    record = normalise_trade(rest_message("BTCUSDT", {**trade, "isBestMatch": True}))
    assert (record["message_id"], record["side"], record["source_sequence"]) == ("BINANCE-BTCUSDT-42", "SELL", 42)
    assert record["vendor_data"]["backfilled"] == "true"


def test_ledger_tells_filled_unfilled_open_and_resets_apart(tmp_path):
    ledger = GapLedger(tmp_path / "gaps.jsonl")
    a, b, c = Gap("BTCUSDT", 1, 10), Gap("ETHUSDT", 5, 9), Gap("BTCUSDT", 50, 59)
    for gap in (a, b, c):
        ledger.opened(gap)
    ledger.filled(a, 10)
    ledger.unfilled(b, LossReason.TIMEOUT, filled=2)
    ledger.reset("ETHUSDT", 900_000, 3)
    summary = ledger.summary()
    assert (summary.filled_gaps, summary.filled_ids, summary.unfilled_gaps, summary.unfilled_ids) == (1, 12, 1, 3)
    assert (summary.open_gaps, summary.open_ids, summary.resets) == (1, 10, 1)
    assert ledger.open_gaps() == [c]
    assert summary.metadata()["gaps_unfilled"] == 1
    ledger.accept("ops", "reloaded by hand")
    after = ledger.summary()
    assert (after.unfilled_gaps, after.resets, after.filled_gaps, after.open_gaps) == (0, 0, 1, 1)


def test_a_backfilled_trade_far_below_the_mark_is_not_a_reset():
    from k2_resources.binance.dedupe import TradeIdTracker, TradeIdVerdict

    tracker = TradeIdTracker(reset_jump=100)
    tracker.accept("BTCUSDT", 10_000, 1)
    tracker.accept("BTCUSDT", 9_000, 2, backfilled=True)  # a fill of an old gap, 1,000 below
    assert tracker.high_water_mark("BTCUSDT") == 10_000
    assert tracker.classify("BTCUSDT", 9_000, 2).verdict == TradeIdVerdict.DUPLICATE
    tracker.accept("BTCUSDT", 10_500, 3, backfilled=True)  # a fill may raise the mark
    assert tracker.high_water_mark("BTCUSDT") == 10_500
    tracker.accept("BTCUSDT", 5, 4)  # a live trade that far below is a reset
    assert tracker.high_water_mark("BTCUSDT") == 5
