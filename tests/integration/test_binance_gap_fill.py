"""Gap fill against the recording server's REST history (issue 25), the streamer in process, Kafka real.

The feed resends nothing on a reconnect (``resume_overlap=0``, as live Binance) and a forced drop also
loses the trades that were on the wire (``lose_on_drop``): every one of them must end in the topic once,
fetched from the REST history, even through a 429 storm; a gap above the bound, a refusing endpoint and
an id reset are reported (ledger, metrics, ERROR log) and never filled. Ids the source itself does not
hold (the bundled recording's jump between its 2023 and 2024 windows) are absent at the source, not a
loss. Expected sets come from the server's record of what it sent, never from the streamer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest

from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import GapFillSettings
from k2_resources.binance.recording_server import RecordingServerThread, load_recorded_trades
from k2_resources.binance.stream_metrics import StreamMetrics
from k2_resources.binance.streamer import StreamerConfig, run_streamer
from k2_resources.kafka.resource import KafkaResource
from k2_sensors.binance.stream_checks import sequence_gap_evaluation
from tests.support.streamer_runs import tape_2024, topic_trades, twice

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRADES = 3_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")
DROPS, LOST_PER_DROP = 3, 40


def _stream(server: RecordingServerThread, topic: str, **gap_fill) -> tuple:
    import asyncio

    settings = replace(GapFillSettings(), drain_timeout_s=60, fill_timeout_s=60, **gap_fill)
    config = StreamerConfig(
        url=server.base_url,
        symbols=SYMBOLS,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        partitions=3,
        metrics_port=None,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        gap_fill=settings,
    )
    metrics = StreamMetrics()
    started = time.monotonic()
    stats = asyncio.run(run_streamer(config, KafkaResource(), metrics=metrics))
    return stats, metrics, time.monotonic() - started


def _sent(server: RecordingServerThread) -> set[tuple[str, int]]:
    return {(s, i) for s, ids in server.stats().trade_ids.items() for i in ids}


def _in_topic(topic: str) -> list[tuple[str, int]]:
    return [(t["symbol"], t["source_sequence"]) for t in topic_trades(KafkaResource(), topic)]


def _sample(metrics: StreamMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _dropping_server(symbol: str | None = None, **options) -> RecordingServerThread:
    """Drops DROPS times, losing LOST_PER_DROP trades each time (of one symbol only when ``symbol`` is given)."""
    trades = [t for t in tape_2024(TRADES * 2) if symbol in (None, t.symbol)][:TRADES]
    return RecordingServerThread(
        speed=None,
        trades=trades,
        resume_overlap=0,
        drop_after=700,
        max_drops=DROPS,
        lose_on_drop=LOST_PER_DROP,
        **options,
    )


def test_connections_dropped_mid_stream_lose_nothing_the_gaps_are_filled(k2_home, kafka_broker, topic_name):
    with _dropping_server() as server:
        stats, metrics, seconds = _stream(server, topic_name)
        sent, rest = _sent(server), server.rest.stats()
    keys = _in_topic(topic_name)
    assert len(sent) == TRADES and server.stats().drops == DROPS
    assert not twice(keys) and set(keys) == sent  # every trade the feed sent, once
    # a drop's lost trades make one gap per symbol among them
    assert stats.reconnects == DROPS and DROPS <= stats.gaps <= 2 * DROPS
    assert stats.missing_ids == DROPS * LOST_PER_DROP
    assert (stats.gaps_filled, stats.gaps_unfilled, stats.backfilled) == (stats.gaps, 0, DROPS * LOST_PER_DROP)
    summary = GapLedger.for_topic(topic_name).summary()
    assert (summary.filled_gaps, summary.filled_ids, summary.unfilled_gaps) == (stats.gaps, DROPS * LOST_PER_DROP, 0)
    backfilled = sum(_sample(metrics, "k2_binance_trades_backfilled_total", symbol=s) for s in SYMBOLS)
    assert backfilled >= DROPS * LOST_PER_DROP  # the counter is process-wide (k2_resources.metrics)
    assert rest.violations == 0 and rest.max_used_weight <= 6000
    print(f"drops: {TRADES} trades, {stats.gaps_filled} gaps / {stats.backfilled} ids filled, {seconds:.1f} s")


def test_a_429_storm_is_waited_out_with_retry_after_and_the_gaps_still_fill(k2_home, kafka_broker, topic_name):
    with _dropping_server() as server:
        server.rest.storm(5, retry_after_s=1)
        stats, _metrics, seconds = _stream(server, topic_name)
        sent, rest = _sent(server), server.rest.stats()
    keys = _in_topic(topic_name)
    assert not twice(keys) and set(keys) == sent
    assert rest.by_status[429] == 5 and rest.violations == 0 and rest.by_status.get(418, 0) == 0  # Retry-After honoured
    assert stats.gaps_filled == stats.gaps >= DROPS and stats.gaps_unfilled == 0
    assert stats.backfilled == DROPS * LOST_PER_DROP
    print(f"429 storm: {stats.gaps_filled} gaps filled after 5 429s, REST {dict(rest.by_status)}, {seconds:.1f} s")


def test_a_gap_past_the_bound_is_a_loss_loud_counted_and_never_fetched(k2_home, kafka_broker, topic_name, caplog):
    caplog.set_level(logging.ERROR, logger="k2_resources.binance.gap_fill")
    with _dropping_server("BTCUSDT") as server:
        stats, metrics, _ = _stream(server, topic_name, max_gap_ids=LOST_PER_DROP - 1)
        sent, rest = _sent(server), server.rest.stats()
    keys = set(_in_topic(topic_name))
    # never fetched: one request of one trade per gap asks whether the source holds its ids (it does)
    assert rest.requests == DROPS and sum(len(ids) for ids in rest.served_ids.values()) == DROPS
    assert (stats.gaps_filled, stats.gaps_unfilled, stats.ids_unfilled) == (0, DROPS, DROPS * LOST_PER_DROP)
    assert len(sent - keys) == DROPS * LOST_PER_DROP and keys <= sent  # exactly the lost ones missing
    summary = GapLedger.for_topic(topic_name).summary()
    assert (summary.unfilled_gaps, summary.unfilled_ids) == (DROPS, DROPS * LOST_PER_DROP)
    assert {e["reason"] for e in summary.unfilled} == {"too_large"}
    missing = {(e["symbol"], i) for e in summary.unfilled for i in range(e["first"], e["last"] + 1)}
    assert missing == sent - keys  # the ledger names exactly the ids that are missing
    lost = sum(_sample(metrics, "k2_binance_trade_ids_unfilled_total", symbol=s, reason="too_large") for s in SYMBOLS)
    assert lost >= DROPS * LOST_PER_DROP
    assert sum("NOT filled (too_large)" in r.getMessage() for r in caplog.records) == DROPS


def test_a_refusing_endpoint_is_a_loss_and_turns_the_fill_off(k2_home, kafka_broker, topic_name):
    with _dropping_server("BTCUSDT") as server:
        server.rest.refuse(451)
        stats, _, _ = _stream(server, topic_name)
        rest = server.rest.stats()
    assert rest.requests == 1 and rest.by_status[451] == 1  # asked once, never again
    assert (stats.gaps_filled, stats.gaps_unfilled, stats.ids_unfilled) == (0, DROPS, DROPS * LOST_PER_DROP)
    assert {e["reason"] for e in GapLedger.for_topic(topic_name).summary().unfilled} == {"refused"}


def test_an_id_reset_stays_a_reset_and_is_not_filled(k2_home, kafka_broker, topic_name):
    trades = tape_2024(1_000)
    relisted = [t for t in trades if t.symbol == "ETHUSDT"][300:]  # ETHUSDT relisted: its ids start again low
    first = relisted[0].trade_id
    renumbered = {id(t): replace(t, trade_id=t.trade_id - first + 1) for t in relisted}
    tape = [renumbered.get(id(t), t) for t in trades]
    with RecordingServerThread(speed=None, trades=tape, resume_overlap=0) as server:
        stats, _, _ = _stream(server, topic_name)
        sent, rest = _sent(server), server.rest.stats()
    keys = _in_topic(topic_name)
    assert not twice(keys) and set(keys) == sent
    assert stats.resets == 1 and stats.gaps == 0 and rest.requests == 0
    summary = GapLedger.for_topic(topic_name).summary()
    assert (
        summary.resets == 1 and summary.reset_list[0]["id"] == 1 and summary.filled_gaps == summary.unfilled_gaps == 0
    )


@pytest.mark.timeout(900)  # a whole lap of the recording (37,563 trades) on a shared 2-core machine
def test_the_bundled_recording_plays_a_lap_without_a_loss_and_real_gaps_on_it_are_filled(
    k2_home, kafka_broker, topic_name, caplog
):
    """The bundled recording jumps 664M BTCUSDT ids between its 2023 and 2024 windows: the REST history
    (the recording) answers a request from the first missing id with the 2024 window's first id, so the
    jump is absent at the source (WARNING, counted, an ``absent`` ledger entry), not a ``too_large`` loss;
    connections dropped on the same lap still lose trades on the wire, and those gaps are filled."""
    caplog.set_level(logging.WARNING, logger="k2_resources.binance.gap_fill")
    with RecordingServerThread(
        speed=None, resume_overlap=0, drop_after=5_000, max_drops=DROPS, lose_on_drop=LOST_PER_DROP
    ) as server:
        stats, metrics, seconds = _stream(server, topic_name)
        sent, served = _sent(server), server.stats()
    tape = load_recorded_trades()
    btc = sorted(t.trade_id for t in tape if t.symbol == "BTCUSDT")
    (window_end, window_start) = next((a, b) for a, b in zip(btc, btc[1:]) if b != a + 1)
    assert served.finished and len(sent) == len(tape) and served.drops == DROPS  # one whole lap
    keys = _in_topic(topic_name)
    assert not twice(keys) and set(keys) == sent  # every trade of the lap once, the lost ones filled
    assert (stats.gaps_unfilled, stats.ids_unfilled) == (0, 0)
    assert stats.backfilled == DROPS * LOST_PER_DROP and stats.ids_absent == window_start - window_end - 1
    summary = GapLedger.for_topic(topic_name).summary()
    assert (summary.unfilled_gaps, summary.open_gaps, summary.filled_ids) == (0, 0, DROPS * LOST_PER_DROP)
    assert (summary.absent_gaps, summary.absent_ids) == (1, window_start - window_end - 1)
    absent = [e for e in GapLedger.for_topic(topic_name).events() if e["event"] == "absent"]
    assert [(e["symbol"], e["first"], e["last"]) for e in absent] == [("BTCUSDT", window_end + 1, window_start - 1)]
    assert _sample(metrics, "k2_binance_trade_ids_absent_at_source_total", symbol="BTCUSDT") == summary.absent_ids
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    outcome = sequence_gap_evaluation(
        {0: {"range": "0-1", "gaps": {"BTCUSDT": summary.absent_ids}}}, summary.metadata()
    )
    assert outcome.passed  # the sequence_gaps check stays green on a healthy install
    print(f"one lap: {len(sent)} trades, {stats.gaps_filled} gaps filled, {summary.absent_ids} absent, {seconds:.1f} s")
