"""Exactly once from the source to the table across crashes of the streamer.

The streamer (what `k2 stream binance` runs) is a process of its own against the local recording server and is killed with
SIGKILL at seeded random points, then started again; the server resends its last trades on each
reconnect (``resume_overlap``) and repeats frames now and then. The restarted streamer reads the
tail of its topic back into its duplicate check, so after micro-batches have drained the topic,
every (symbol, trade id) the server sent is in market.trades once and no message_id is there twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter

import pytest
from dagster import DagsterInstance

from k2_resources.binance.recording_server import RecordingServerThread
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.paths import PROJECT_ROOT
from k2_sensors.binance.driver import drive
from tests.support.stream import stream_defs
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TRADES = 4_000  # BTCUSDT and ETHUSDT in the first 4,000 recorded trades
KILLS = 3
SEED = 1313
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
RESEND = 1_500  # trades the server sends again on a reconnect: far more than can be in flight at a kill


# What `k2 stream binance --url <server>` runs, without its reachability probe and its fallback to the
# bundled recording (a probe that times out on a loaded machine would switch sources mid-test).
STREAMER = """
import json, logging, sys
from k2_resources.binance.streamer import stream_to_kafka
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
logging.getLogger("kafka").setLevel(logging.WARNING)
url, topic, dlq = sys.argv[1:4]
stats = stream_to_kafka(url, topic, dlq_topic=dlq, backoff_initial_s=0.05, backoff_max_s=0.5)
print("STATS " + json.dumps(stats.as_dict()), flush=True)
"""


def _streamer(server_url: str, topic: str, env: dict[str, str], log_path) -> subprocess.Popen:
    command = [sys.executable, "-c", STREAMER, server_url, topic, dead_letter_topic(topic)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)


def test_sigkilled_streamer_restarts_and_every_trade_lands_in_iceberg_exactly_once(
    k2_home, kafka_broker, topic_name, tmp_path
):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    env = {key: value for key, value in os.environ.items() if not key.startswith("K2_STREAM_")}
    env.update(K2_HOME=str(k2_home), K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers)
    kill_points = sorted(random.Random(SEED).sample(range(TRADES // 10, TRADES * 9 // 10), KILLS))
    log_path = tmp_path / "streamer.log"

    def produced() -> int:
        return sum(kafka.end_offsets(topic_name).values())

    with RecordingServerThread(
        speed=40, limit=TRADES, resume_overlap=RESEND, repeat_every=250, repeat_count=3
    ) as server:
        kills = []
        for point in kill_points:
            process = _streamer(server.stream_url(SYMBOLS), topic_name, env, log_path)
            wait_for(
                lambda: produced() >= point or process.poll() is not None,
                timeout_s=300,
                what=f"the streamer to put {point} trades in Kafka",
                interval_s=0.05,
            )
            assert process.poll() is None, f"the streamer ended before the kill:\n{log_path.read_text()}"
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
            kills.append(produced())
        last = _streamer(server.stream_url(SYMBOLS), topic_name, env, log_path)
        assert last.wait(timeout=600) == 0, log_path.read_text()
        sent = server.stats()

    assert sent.finished and sent.repeated_frames > 0
    assert sent.unique_trades == TRADES
    assert all(point <= at for point, at in zip(kill_points, kills)) and kills[-1] < TRADES  # killed mid-stream
    # each restart read the topic back and dropped what the server resent
    output = log_path.read_text()
    assert output.count("duplicate check seeded with the last") == KILLS, output
    final = json.loads(output.split("STATS ", 1)[1].splitlines()[0])
    assert final["seeded"] == kills[-1] and final["duplicates"] > 0 and final["ended_by"] == "end_of_recording"

    with DagsterInstance.ephemeral() as instance:
        report = drive(instance, stream_defs(topic_name, max_batch=1_000), until=lambda r: r.lag == 0, timeout_s=600)
        assert report.failed_runs == 0

    rows = iceberg.trades().scan(selected_fields=("message_id", "symbol", "source_sequence")).to_arrow().to_pylist()
    twice = [message_id for message_id, count in Counter(row["message_id"] for row in rows).items() if count > 1]
    assert not twice, f"{len(twice)} message_ids are in market.trades more than once, e.g. {twice[:3]}"
    in_table = {(row["symbol"], row["source_sequence"]) for row in rows}
    assert in_table == {(symbol, trade_id) for symbol, ids in sent.trade_ids.items() for trade_id in ids}
    assert len(rows) == TRADES
