"""K2 on a replicated Kafka cluster: a broker killed with SIGKILL mid-stream loses nothing.

The bundled recording (tests/support/recorded.py) is played by the local recording server and
streamed by K2's streamer (idempotent acks=all producer) into a topic of the local 3-broker
cluster; the leader of partition 0 is killed with SIGKILL early, half-way or at the stream's end (92% of the trades
in Kafka: where the streamer's end-of-stream flush and close wait on the failover:
k2_resources/platform/failover.py), the cluster fences it and leads its partitions elsewhere, the
stream goes on (or ends) with two brokers (min.insync.replicas=2), nothing is left in the
streamer's spool, and the broker is started again. The real stream sensor
then sinks the topic until the lag is zero, in both sink modes (the deployed follower, and a run per
range, each into a lake of its own): every trade is there exactly once.
"""

from __future__ import annotations

import threading
import time

import pytest

from k2_assets.cli.cluster_demo import KillPoint
from k2_resources.binance.recording_server import RecordedTrade, RecordingServerThread, Tape
from k2_resources.binance.streamer import stream_to_kafka
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.platform.failover import CLOSE_TIMEOUT_S, FAILOVER_BOUND_MS
from k2_resources.sink.offsets import committed_offsets
from tests.support.kafka_cluster import partition_replicas, topic_settings
from tests.support.recorded import recorded_trades_in_time_order
from tests.support.stream import drain_in_each_mode
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PER_SYMBOL = 1_500  # BTCUSDT and ETHUSDT: 3,000 trades
PLAYBACK_S = 40.0  # how long the server takes to play them: the last tenth is ~4 s, time to kill in it
SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def recorded_tape() -> list[RecordedTrade]:
    """The recorded trades as the recording server's tape, in time order."""
    return [
        RecordedTrade(
            r["symbol"],
            r["source_sequence"],
            str(r["price"]),
            str(r["quantity"]),
            int(r["timestamp"].timestamp() * 1000),
            r["side"] == "SELL",
        )
        for r in recorded_trades_in_time_order(PER_SYMBOL)
    ]


@pytest.mark.parametrize("kill_at", [0.1, 0.5, 0.92], ids=["early", "mid_stream", "stream_end"])
def test_broker_killed_mid_stream_loses_nothing_and_duplicates_nothing(
    k2_home, kafka_cluster, topic_name, monkeypatch, tmp_path, kill_at
):
    for name, value in kafka_cluster.env().items():  # the bootstrap, and the security settings of a secured cluster
        monkeypatch.setenv(name, value)
    # On the secured cluster the sink's principal may read trade topics only (market.trades.*, its ACL).
    topic_name = f"market.trades.{topic_name}"
    kafka = KafkaResource()
    servers = kafka_cluster.bootstrap_servers
    tape = recorded_tape()

    # Topics take their replication from the cluster: 3 replicas, two of them needed for a write.
    kafka.ensure_topic(topic_name, partitions=3)
    # Any broker may answer the next client: wait until the one asked knows the new topic too.
    wait_for(
        lambda: len(partition_replicas(servers, topic_name)) == 3,
        timeout_s=30,
        what="every broker to describe the new topic's 3 partitions",
    )
    replicas = partition_replicas(servers, topic_name)
    assert [r["replicas"] for r in replicas.values()] == [[1, 2, 3]] * 3
    assert topic_settings(servers, topic_name)["min.insync.replicas"] == "2"

    def produced() -> int:
        return sum(kafka.end_offsets(topic_name).values())

    speed = Tape(tape).compressed_span_ms / 1000 / PLAYBACK_S  # the server's timeline, pauses capped at 1 s
    stats: dict = {}
    with RecordingServerThread(trades=tape, speed=speed) as server:

        def stream() -> None:
            stats["result"] = stream_to_kafka(
                server.stream_url(SYMBOLS),
                topic_name,
                kafka,
                symbols=SYMBOLS,
                dlq_topic=dead_letter_topic(topic_name),
                partitions=3,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
            )

        streamer = threading.Thread(target=stream, name="k2-streamer")
        streamer.start()
        due = KillPoint(kill_at).records(len(tape))
        wait_for(
            lambda: produced() >= due or not streamer.is_alive(),
            timeout_s=120,
            what=f"{due} trades in Kafka ({kill_at:.0%} of them)",
            interval_s=0.05,
        )
        assert streamer.is_alive(), "the stream ended before the kill; raise PLAYBACK_S"
        victim = replicas[0]["leader"]
        killed_at = produced()
        kafka_cluster.kill(victim)
        kill_time = time.monotonic()
        assert victim not in kafka_cluster.running()

        # Two brokers left: the controller fences the dead one and its partitions get new leaders.
        survivors = ",".join(b.bootstrap_servers for b in kafka_cluster.nodes() if b.node_id != victim)

        def failed_over() -> bool:
            try:
                leaders = [p["leader"] for p in partition_replicas(survivors, topic_name).values()]
            except Exception:
                return False  # a survivor busy with the failover: ask again
            return victim not in kafka_cluster.live_brokers() and all(leader not in (victim, -1) for leader in leaders)

        wait_for(failed_over, timeout_s=FAILOVER_BOUND_MS / 1000 * 3, what="the failover", interval_s=0.05)
        failover_s = time.monotonic() - kill_time
        # The stream goes on (or, killed at its end, ends) with broker {victim} dead.
        wait_for(
            lambda: produced() >= min(len(tape), killed_at + len(tape) // 8) or not streamer.is_alive(),
            timeout_s=120,
            what=f"the stream to go on with broker {victim} dead",
            interval_s=0.2,
        )
        assert victim not in kafka_cluster.running()
        restart_began = time.monotonic()
        kafka_cluster.restart(victim)
        restart_s = time.monotonic() - restart_began
        streamer.join(timeout=180)
        assert not streamer.is_alive(), "the streamer did not finish the recording"
        sent = server.stats()

    print(
        f"\nkilled broker {victim} at {killed_at} of {len(tape)} trades ({kill_at:.0%} of them in Kafka); "
        f"failed over in {failover_s:.1f}s; restarted in {restart_s:.1f}s"
    )
    assert failover_s < CLOSE_TIMEOUT_S  # before the streamer's close would give up (the bound assumes an idle machine)
    assert sent.finished and sent.unique_trades == len(tape)
    assert stats["result"].ended_by == "end_of_recording"
    assert stats["result"].undelivered == 0, "the streamer gave up on Kafka before the failover ended"
    assert produced() == len(tape)  # idempotent acks=all: no record written twice by retries
    wait_for(
        lambda: all(r["isr"] == [1, 2, 3] for r in partition_replicas(servers, topic_name).values()),
        timeout_s=120,
        what=f"broker {victim} back in every partition's in-sync replicas",
    )

    # The topic the kill left, sunk in both sink modes (the deployed follower, and a run per range).
    for sink_mode, iceberg, report in drain_in_each_mode(topic_name, tmp_path, monkeypatch):
        assert report.failed_runs == 0, sink_mode
        assert report.lag == 0 and report.last_checks["consumer_lag"]["passed"] is True, sink_mode
        rows = iceberg.trades().scan(selected_fields=("trade_id", "symbol", "source_sequence")).to_arrow().to_pylist()
        trade_ids = [row["trade_id"] for row in rows]
        assert len(trade_ids) == len(set(trade_ids)) == len(tape), sink_mode
        assert {(row["symbol"], row["source_sequence"]) for row in rows} == {(t.symbol, t.trade_id) for t in tape}
        written = {partition: end for partition, end in kafka.end_offsets(topic_name).items() if end}
        assert committed_offsets(iceberg.trades(), topic_name) == written, sink_mode
