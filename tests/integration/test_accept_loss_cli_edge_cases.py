"""`k2 offsets accept-loss` (a new process, as an operator runs it) with nothing to accept, and
twice: neither writes a snapshot or touches the first acceptance; real broker and real table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import LOSS_ACKNOWLEDGED_KEY, OffsetRange, retention_losses
from tests.support.k2_process import k2_env, run_k2
from tests.support.sink_losses import delete_records_below, produce_trades

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _accept(topic: str, by: str) -> list[str]:
    return ["offsets", "accept-loss", "--topic", topic, "--by", by, "--note", "reloaded from the exchange"]


def test_accept_loss_with_nothing_to_accept_and_twice_changes_nothing(k2_home, kafka_broker, topic_name) -> None:
    kafka, iceberg = KafkaResource(), IcebergResource()
    lossy, clean = f"{topic_name}-lossy", f"{topic_name}-clean"
    for topic in (lossy, clean):
        kafka.ensure_topic(topic, partitions=1)
        produce_trades(kafka, topic, ["BTCUSDT"] * 30)
    delete_records_below(kafka, lossy, 0, 10)
    assert run_microbatch(kafka, iceberg, OffsetRange(lossy, 0, 0, 30)).lost == 10
    assert run_microbatch(kafka, iceberg, OffsetRange(clean, 0, 0, 30)).lost == 0
    before = len(iceberg.trades().snapshots())
    env = k2_env(k2_home, K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers)

    # At once: a topic with nothing recorded, and the first acceptance of the lossy one.
    command = [sys.executable, "-m", "k2_assets.cli"]
    nothing, first = (
        subprocess.Popen(
            [*command, *_accept(topic, by)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for topic, by in ((clean, "nobody"), (lossy, "ops-on-call"))
    )
    (nothing_out, nothing_err), (first_out, first_err) = (
        nothing.communicate(timeout=180),
        first.communicate(timeout=180),
    )
    assert (nothing.returncode, first.returncode) == (0, 0), (nothing_err, first_err)
    assert nothing_out.strip() == f"no unacknowledged retention loss is recorded for {clean}; nothing changed"
    assert first_out.strip() == (
        "accepted by ops-on-call: partition 0: offsets [0, 10) (10 messages) deleted by Kafka retention "
        "before market.trades committed them"
    )
    table = iceberg.trades()
    assert len(table.snapshots()) == before + 1  # the acceptance's own commit, and nothing for the clean topic
    current = table.current_snapshot()
    assert current is not None and current.summary is not None
    accepted = json.loads(current.summary.additional_properties[LOSS_ACKNOWLEDGED_KEY])
    [loss] = retention_losses(table, lossy)
    assert (loss.acknowledged_by, loss.acknowledged_at) == ("ops-on-call", accepted["at"])
    assert retention_losses(table, clean) == []

    # Twice: the second finds nothing open, writes nothing, and keeps the first acceptance as it was.
    second = run_k2(*_accept(lossy, "someone-else"), env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"no unacknowledged retention loss is recorded for {lossy}; nothing changed"
    table = iceberg.trades()
    assert len(table.snapshots()) == before + 1
    assert retention_losses(table, lossy) == [loss]
