"""notebooks/k2-tour.ipynb tells its six parts end to end against a real broker and a real Iceberg catalog."""

from __future__ import annotations

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from k2_resources.asx.files import default_data_dir
from k2_resources.asx.writes import ingest_day
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.paths import PROJECT_ROOT
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from tests.support.producing import PARTITIONS, produce
from tests.support.recorded import recorded_trades_in_time_order

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NOTEBOOK = PROJECT_ROOT / "notebooks" / "k2-tour.ipynb"


def test_the_tour_notebook_tells_its_six_parts(k2_home, kafka_broker, topic_name, monkeypatch, tmp_path):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS, config={"retention.ms": "-1"})
    source = produce(kafka, topic_name, recorded_trades_in_time_order(), record_timestamps=True)
    ends = kafka.end_offsets(topic_name)
    for partition, end in ends.items():  # the first half in Iceberg, in two commits; the rest stays in Kafka
        run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, 0, end // 4))
        run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, end // 4, end // 2))
    asx_day = ingest_day(default_data_dir(), iceberg, "trades", "2014-03-14")  # one real ASX day, as the asset loads it
    monkeypatch.setenv("K2_TRADES_TOPIC", topic_name)
    assert os.environ["K2_KAFKA_BOOTSTRAP"] == kafka_broker.bootstrap_servers

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    summary = json.loads(text.split("TOUR-RESULT ", 1)[1].splitlines()[0])
    assert summary["recent_iceberg_rows"] > 0 and summary["recent_kafka_rows"] > 0
    assert summary["recent_rows"] == summary["recent_iceberg_rows"] + summary["recent_kafka_rows"]
    assert summary["all_rows"] == len(source.rows)
    # The first snapshot holds one partition's first quarter: time travel sees only that.
    assert 0 < summary["time_travel_rows"] < len(source.rows) // 4
    assert summary["bar_trade_count"] == summary["recent_rows"]
    charts = [
        o["data"]["image/png"] for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(charts) == 2 and all(len(chart) > 1000 for chart in charts)  # base64 PNGs: the burst, price and volume

    # 1. positioning: the hybrid read measured and set against each tier's budget, the verdicts following
    # the figures. Whether it is fast enough is the benchmark's call (bench_hybrid, judged), not this test's.
    positioning = summary["positioning"]
    assert 0 < positioning["p50_ms"] <= positioning["worst_ms"] and positioning["l3_budget_ms"] == 500
    verdicts = re.findall(
        r"(L[123]) budget +([\d.]+) ms: K2 hybrid read p50 [\d.]+ ms, worst ([\d.]+) ms -> (\w+)", text
    )
    assert [tier for tier, *_ in verdicts] == ["L1", "L2", "L3"], text
    for tier, budget, worst, verdict in verdicts:
        if abs(float(worst) - float(budget)) > 0.1:  # printed to 0.1 ms: a tie cannot be told
            assert verdict == ("within" if float(worst) < float(budget) else "outside"), (tier, budget, worst)
    # 2. ingestion: both exchanges counted; Kafka holds the half not yet committed.
    ingestion = summary["ingestion"]
    assert ingestion["asx_rows"] == asx_day.valid > 0
    assert ingestion["binance_rows"] + ingestion["kafka_only"] == len(source.rows) == ingestion["kafka_messages"]
    assert ingestion["kafka_only"] == sum(end - end // 2 for end in ends.values())
    # 3. storage: the micro-batch snapshots plus the ASX day, partitions by day and exchange.
    storage = summary["storage"]
    assert storage["snapshots"] == 2 * len(ends) + 1
    assert storage["partitions"] >= 2 and storage["files"] >= storage["partitions"] and storage["bytes_per_row"] > 0
    # 4. resilience: the burst went past GRACEFUL and came back to NORMAL, step by step.
    resilience = summary["resilience"]
    assert resilience["max_level"] >= 3 and resilience["final_level"] == 0
    assert resilience["transitions"] >= 2 * resilience["max_level"] - 1
    # 6. cost: the seeds' three scales, sink processes growing with them.
    cost = summary["cost"]
    assert cost["scales"] == [10_000, 1_000_000, 10_000_000]
    assert cost["sink_processes"] == sorted(cost["sink_processes"]) and cost["sink_processes"][0] >= 1
