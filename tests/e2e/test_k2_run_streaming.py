"""`k2 run` with the streamer: recorded trades go through the WebSocket client, Kafka, the stream
sensor in the real Dagster daemon and runs started by its run launcher (run keys, queue, concurrency
limits), into Iceberg, each exactly once.

The other stream tests drive the sensor in process (``driver.drive`` executes each requested run with
``execute_in_process``); this one is the path a user meets. It streams one symbol of the bundled
recording (ETHUSDT, two days: about 14.5K trades) once and as fast as possible, to stay lean.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from k2_resources.api.keys import KeyFile
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.platform.kafka_broker import free_port
from tests.support.platform import start_k2_run
from tests.support.recorded import binance_records
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SYMBOL = "ETHUSDT"
INGEST_DEADLINE_S = 900


def _message_ids_from_the_api(base_url: str, key: str) -> Counter:
    """Every ETHUSDT trade `k2 run`'s API answers, page after page."""
    found: Counter = Counter()
    params: dict[str, str | int] = {"symbol": SYMBOL, "limit": 50_000}
    while True:
        response = httpx.get(f"{base_url}/v1/trades", params=params, headers={"X-API-Key": key}, timeout=120)
        assert response.status_code == 200, response.text[:2000]
        page = response.json()
        found.update(row["message_id"] for row in page["data"])
        if not page["next_cursor"]:
            return found
        params["cursor"] = page["next_cursor"]


def _message_ids_in_iceberg(iceberg: IcebergResource) -> Counter:
    table = iceberg.trades()
    rows = table.scan(selected_fields=("message_id",)).to_arrow()
    return Counter(rows.column("message_id").to_pylist())


@pytest.mark.timeout(1800)
def test_k2_run_streams_the_recording_through_the_daemon_into_iceberg_exactly_once(k2_home, tmp_path):
    recorded = Counter(record["message_id"] for record in binance_records(SYMBOL))
    assert len(recorded) > 10_000
    kafka_ports = (free_port(), free_port())
    run = start_k2_run(
        k2_home,
        tmp_path / "k2-run.log",
        kafka_ports=kafka_ports,
        stream={
            "K2_STREAM_SOURCE": "recording",
            "K2_STREAM_ONCE": "1",
            "K2_STREAM_SPEED": "0",
            "K2_STREAM_SYMBOLS": SYMBOL,
            "K2_STREAMER_METRICS_PORT": "0",
        },
    )
    iceberg = IcebergResource()
    started = time.monotonic()
    try:
        run.wait_until_up(timeout_s=600)  # a busy 2-core machine can take minutes to load the code location

        def all_recorded_trades_in_iceberg() -> bool:
            assert run.process.poll() is None, f"k2 run exited:\n{run.output()[-4000:]}"
            return set(_message_ids_in_iceberg(iceberg)) >= set(recorded)

        wait_for(
            all_recorded_trades_in_iceberg, INGEST_DEADLINE_S, "every recorded trade in market.trades", interval_s=5
        )
        seconds = time.monotonic() - started
        in_iceberg = _message_ids_in_iceberg(iceberg)
        # The API `k2 run` serves answers the same trades, each once (Iceberg plus the Kafka tail).
        key, _ = KeyFile(k2_home / "api" / "keys.json").create("e2e", ["read:trades"])
        from_the_api = _message_ids_from_the_api(run.api, key)
        kafka = KafkaResource(bootstrap_servers=f"127.0.0.1:{kafka_ports[0]}")
        in_kafka = sum(kafka.end_offsets(BINANCE_TRADES_TOPIC).values())
        instance = DagsterInstance.from_config(str(k2_home / "dagster"))
        try:
            runs = instance.get_runs(filters=RunsFilter(job_name="binance_trades_microbatch"))
            statuses = Counter(r.status for r in runs)
            launched_by_sensor = [r for r in runs if r.tags.get("dagster/sensor_name") == "binance_stream_sensor"]
        finally:
            instance.dispose()
    finally:
        code = run.stop()

    output = run.output()
    streamer_log = (k2_home / "logs" / "binance-streamer.log").read_text(errors="replace")
    assert "binance streamer finished (exit code 0)" in output, streamer_log[-2000:]
    assert code == 0, output[-3000:]
    # exactly once: every recorded trade, nothing else, no message twice
    duplicates = {m: n for m, n in in_iceberg.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} message ids twice in market.trades, e.g. {list(duplicates)[:5]}"
    assert set(in_iceberg) == set(recorded)
    assert from_the_api == Counter(set(recorded)), "the API under k2 run answers every recorded trade once"
    assert in_kafka == len(recorded), "the streamer produced each recorded trade once"
    # the runs were requested by the sensor and started by the daemon's run launcher, and none failed;
    # under `k2 run` the sensor starts a long-running follower, which may still be running now
    assert launched_by_sensor and len(launched_by_sensor) == len(runs)
    assert statuses[DagsterRunStatus.SUCCESS] + statuses[DagsterRunStatus.STARTED] >= 1, statuses
    assert not statuses[DagsterRunStatus.FAILURE], statuses
    assert any(r.tags.get("k2/mode") == "follow" for r in runs), [r.tags for r in runs]
    print(f"\n{len(recorded)} trades through k2 run in {seconds:.0f}s with {len(runs)} runs: {dict(statuses)}")
