"""Exactly once from the source to the table across crashes of the streamer.

The streamer (what `k2 stream binance` runs) is a process of its own against the local recording server, killed with
SIGKILL at seeded random points, then started again. With ``resume_overlap`` the server resends its last trades on
each reconnect and repeats frames now and then: the restarted streamer reads the tail of its topic back into its
duplicate check, so every (symbol, trade id) the server sent is in market.trades once. With ``resume_overlap=0`` the
server resends nothing and moves on while nobody listens, as live Binance: the trades published while the streamer
was down, and those the killed process had received but not handed to Kafka, are fetched from the server's REST
history by the gap fill (issue 25), so again every trade is there exactly once.
The topic the crashes leave is sunk in both sink modes, the deployed follower and a run per range.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.recording_server import RecordingServerThread
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import committed_offsets
from tests.support.stream import drain_in_each_mode
from tests.support.streamer_runs import kill_at, start_streamer, streamer_env, tape_2024

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TRADES = 4_000  # BTCUSDT and ETHUSDT in the first 4,000 recorded trades
KILLS = 3
SEED = 1313
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
RESEND = 1_500  # trades the server sends again on a reconnect: far more than can be in flight at a kill
MISSED = 20  # trades the feed that resends nothing publishes while the killed streamer restarts


def _table_rows(iceberg: IcebergResource) -> list[dict]:
    fields = ("message_id", "symbol", "source_sequence", "vendor_data")
    return iceberg.trades().scan(selected_fields=fields).to_arrow().to_pylist()


@pytest.mark.parametrize("resend", [RESEND, 0], ids=["feed-resends", "feed-resends-nothing"])
def test_sigkilled_streamer_restarts_and_every_trade_lands_in_iceberg_exactly_once(
    k2_home, kafka_broker, topic_name, tmp_path, resend, monkeypatch
):
    kafka = KafkaResource()
    kafka.ensure_topic(topic_name, partitions=3)
    env = streamer_env(k2_home, kafka_broker.bootstrap_servers, K2_GAP_FILL_TIMEOUT_S="120")
    kill_points = sorted(random.Random(SEED).sample(range(TRADES // 10, TRADES * 9 // 10), KILLS))
    log_path = tmp_path / "streamer.log"
    # the feed that resends nothing plays the 2024 recording (consecutive ids): every gap there is fillable
    # (its trades are denser: played at speed 5 it lasts about as long as the other at 40, so the kills find the
    # server still sending; a server that finished before the kill leaves the restart no live trade to reveal the gap)
    tape = {"speed": 40} if resend else {"trades": tape_2024(TRADES), "speed": 5, "lose_on_reconnect": MISSED}

    def produced() -> int:
        return sum(kafka.end_offsets(topic_name).values())

    started = time.monotonic()
    with RecordingServerThread(
        limit=TRADES, resume_overlap=resend, repeat_every=250 if resend else None, repeat_count=3, **tape
    ) as server:
        kills = []
        for point in kill_points:
            process = start_streamer(server.stream_url(SYMBOLS), topic_name, env, log_path)
            kills.append(kill_at(process, produced, point, log_path))
        last = start_streamer(server.stream_url(SYMBOLS), topic_name, env, log_path)
        assert last.wait(timeout=600) == 0, log_path.read_text()
        sent, rest = server.stats(), server.rest.stats()
    streamed_s = time.monotonic() - started

    assert sent.finished and sent.unique_trades == TRADES
    assert all(point <= at for point, at in zip(kill_points, kills)) and kills[-1] < TRADES  # killed mid-stream
    output = log_path.read_text()
    assert output.count("duplicate check seeded with the last") == KILLS, output
    final = json.loads(output.split("STATS ", 1)[1].splitlines()[0])
    assert final["ended_by"] == "end_of_recording"
    ledger = GapLedger.for_topic(topic_name).summary()
    if resend:
        assert sent.repeated_frames > 0 and final["duplicates"] > 0 and final["seeded"] == kills[-1]
    else:
        assert sent.repeated_frames == 0
        # each restart missed trades the feed will not send again: gaps, all filled from the REST history
        assert ledger.filled_gaps >= KILLS and ledger.filled_ids >= KILLS * MISSED, (ledger, output)
        assert (ledger.unfilled_gaps, ledger.open_gaps) == (0, 0), (ledger, output)
        assert rest.violations == 0 and rest.by_status[200] >= ledger.filled_gaps

    # The topic the crashes left, sunk in both sink modes (a follower, and a run per range).
    for sink_mode, iceberg, report in drain_in_each_mode(topic_name, tmp_path, monkeypatch):
        assert report.failed_runs == 0, sink_mode
        rows = _table_rows(iceberg)
        twice = [message_id for message_id, count in Counter(row["message_id"] for row in rows).items() if count > 1]
        assert not twice, f"{sink_mode}: {len(twice)} message_ids are in market.trades twice or more: {twice[:3]}"
        in_table = {(row["symbol"], row["source_sequence"]) for row in rows}
        sent_ids = {(symbol, trade_id) for symbol, ids in sent.trade_ids.items() for trade_id in ids}
        committed = committed_offsets(iceberg.trades(), topic_name)
        assert in_table == sent_ids, (
            f"{sink_mode}: {len(sent_ids - in_table)} sent trades missing, {len(in_table - sent_ids)} never sent; "
            f"{len(rows)} rows; committed offsets {committed}, topic end {kafka.end_offsets(topic_name)}"
        )
        assert len(rows) == TRADES, sink_mode
        backfilled = [r for r in rows if dict(r["vendor_data"] or {}).get("backfilled") == "true"]
        if not resend:  # filled ids also count trades a refill found already there (duplicates)
            assert 1 <= len(backfilled) <= ledger.filled_ids
    print(
        f"resend={resend}: {TRADES} trades, kills after {kills}, gaps filled {ledger.filled_gaps} "
        f"({ledger.filled_ids} ids, {len(backfilled)} backfilled rows), REST {dict(rest.by_status)}, "
        f"streamed in {streamed_s:.1f} s"
    )
