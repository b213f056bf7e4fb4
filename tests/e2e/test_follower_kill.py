"""`k2 run` with the daemon: the follower's run worker SIGKILLed mid-commit is noticed, replaced, and
the table stays exact.

The follower (K2_STREAM_FOLLOW_SECONDS) is the one long-running run that commits the topic under
`k2 run`. Here its run worker dies by SIGKILL inside a range commit: after the data files and the new
metadata file are written, before the catalog points at it (tests/support/kill_hook: loaded by every
process of this `k2 run` through PYTHONPATH; it kills the first follower process at the
KILL_AT_COMMIT-th catalog commit of its range commits, once). Then the code server marks the run
failed, the stream sensor (its supervisor) sees the follower gone and requests a new one, which the
daemon launches, and the new follower commits from where the table is. The trades compared are the
source's: what the test put in Kafka, by trade id.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.paths import PROJECT_ROOT
from k2_resources.platform.kafka_broker import free_port
from k2_resources.sink.offsets import committed_offsets
from tests.support.platform import start_k2_run
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.stream import assert_contiguous, range_commits
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

KILL_AT_COMMIT = 4  # catalog commits: the first lot takes three (one per partition), the kill lands in a later one
KILL_HOOK = PROJECT_ROOT / "tests" / "support" / "kill_hook"
RECOVERY_DEADLINE_S = 300  # the kill -> a new follower running (a loaded 2-core machine launches slowly)


def _follower_runs(home: Path) -> list:
    instance = DagsterInstance.from_config(str(home / "dagster"))
    try:
        records = instance.get_run_records(
            filters=RunsFilter(job_name="binance_trades_microbatch", tags={"k2/mode": "follow"})
        )
        return sorted(records, key=lambda r: r.create_timestamp)
    finally:
        instance.dispose()


def _trade_ids(iceberg: IcebergResource) -> Counter:
    table = iceberg.trades()
    return Counter(table.scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist())


@pytest.mark.timeout(1500)
def test_follower_sigkilled_mid_commit_is_replaced_by_the_sensor_and_the_table_stays_exact(
    k2_home, tmp_path, monkeypatch
):
    mark = tmp_path / "follower-killed.json"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(KILL_HOOK), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("K2_TEST_KILL_FOLLOWER_MARK", str(mark))
    monkeypatch.setenv("K2_TEST_KILL_FOLLOWER_AT", str(KILL_AT_COMMIT))
    monkeypatch.setenv("K2_STREAM_FOLLOW_SECONDS", "900")  # no follower ends by its time in this test
    monkeypatch.setenv("K2_STREAM_FOLLOW_INTERVAL_SECONDS", "0.5")
    kafka_ports = (free_port(), free_port())
    run = start_k2_run(k2_home, tmp_path / "k2-run.log", kafka_ports=kafka_ports)
    kafka = KafkaResource(bootstrap_servers=f"127.0.0.1:{kafka_ports[0]}")
    iceberg = IcebergResource()
    records = recorded_trades(4000)
    lots = [records[:1500], records[1500:2500], records[2500:]]
    produced: list[dict] = []

    def alive() -> None:
        assert run.process.poll() is None, f"k2 run exited:\n{run.output()[-4000:]}"

    def committed_total() -> int:
        alive()
        return sum(committed_offsets(iceberg.trades(), BINANCE_TRADES_TOPIC).values())

    try:
        run.wait_until_up(timeout_s=600)
        kafka.ensure_topic(BINANCE_TRADES_TOPIC, partitions=3)
        produced += lots[0]
        produce(kafka, BINANCE_TRADES_TOPIC, lots[0])
        wait_for(
            lambda: mark.exists() or committed_total() == len(produced),
            timeout_s=600,
            what="the first follower to commit the first lot",
            interval_s=0.5,
        )
        if not mark.exists():
            produced += lots[1]
            produce(kafka, BINANCE_TRADES_TOPIC, lots[1])  # the next commits: one of them is killed

        def killed_mid_commit() -> bool:
            alive()
            return mark.exists()

        wait_for(killed_mid_commit, timeout_s=300, what="the follower killed mid-commit", interval_s=0.2)
        killed = json.loads(mark.read_text())
        killed_at = killed["killed_at"]

        def failed_follower():
            alive()
            return next((r for r in _follower_runs(k2_home) if r.dagster_run.status == DagsterRunStatus.FAILURE), None)

        failed = wait_for(
            failed_follower, timeout_s=120, what="the killed follower's run marked failed", interval_s=0.5
        )
        noticed_s = (failed.end_time or time.time()) - killed_at

        def new_follower():
            alive()
            return next(
                (
                    r
                    for r in _follower_runs(k2_home)
                    if r.start_time is not None
                    and r.start_time > killed_at
                    and r.dagster_run.run_id != failed.dagster_run.run_id
                ),
                None,
            )

        replacement = wait_for(
            new_follower, RECOVERY_DEADLINE_S, "a new follower started by the sensor", interval_s=0.5
        )
        replaced_s = replacement.start_time - killed_at
        wait_for(
            lambda: committed_total() == len(produced),
            timeout_s=300,
            what="the new follower to commit what the killed one had not",
            interval_s=0.5,
        )
        caught_up_s = time.time() - killed_at
        rest = records[len(produced) :]  # what was produced is a prefix of the records
        produced += rest
        produce(kafka, BINANCE_TRADES_TOPIC, rest)  # the new follower keeps following
        wait_for(
            lambda: committed_total() == len(produced), timeout_s=300, what="every trade committed", interval_s=0.5
        )
        runs = _follower_runs(k2_home)
        statuses = Counter(r.dagster_run.status.value for r in runs)
    finally:
        code = run.stop()

    # exactly once against the source: every trade put in Kafka, each once, nothing else
    in_table = _trade_ids(iceberg)
    twice = [trade_id for trade_id, count in in_table.items() if count > 1]
    assert not twice, f"{len(twice)} trade ids twice in market.trades, e.g. {twice[:5]}"
    assert set(in_table) == {r["trade_id"] for r in produced}
    assert len(produced) == len(records)
    assert_contiguous(range_commits(iceberg.trades(), BINANCE_TRADES_TOPIC))
    assert killed["pid"] != run.process.pid
    assert statuses[DagsterRunStatus.FAILURE.value] == 1, statuses  # the killed one, and no other
    assert code == 0, run.output()[-3000:]
    print(
        f"\nfollower SIGKILLed mid-commit (its catalog commit {KILL_AT_COMMIT}): run marked failed after "
        f"{noticed_s:.1f} s, new follower running after {replaced_s:.1f} s, the table exact again after "
        f"{caught_up_s:.1f} s; follower runs {dict(statuses)}"
    )
