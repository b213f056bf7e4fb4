"""Every read of one stream-sensor tick: Kafka and table offsets, run statuses, memory, dead letters,
the latest batches' sequence gaps and the spill folder's backlog, gathered into an Observation.

The one place a tick does I/O; the rules (``stream_planning``, ``stream_checks``) decide and
report on the values read here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import RUN_KEY_TAG
from kafka import TopicPartition

from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import system_memory_percent
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.sink.offsets import committed_offsets, pending_ranges, retention_losses
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_cursor import RUN_ACTIVE, RUN_FAILED, RUN_SUCCEEDED, StreamCursor
from k2_sensors.binance.stream_observation import Observation, StreamOffsets
from k2_sensors.binance.stream_planning import follower_run_keys, recovery_run_keys

BINANCE_TRADES = AssetKey("binance_trades")
_FAILED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING}


def read_stream_offsets(kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> StreamOffsets:
    """The topic's log start and end offsets and, from market.trades, its committed offsets,
    pending ranges and recorded retention losses."""
    starts, ends = kafka.offset_bounds(topic)
    table = iceberg.trades()
    return StreamOffsets(
        topic,
        ends,
        committed_offsets(table, topic),
        tuple(pending_ranges(table, topic)),
        starts,
        tuple(retention_losses(table, topic)),
    )


def run_statuses(instance: DagsterInstance, run_keys: list[str]) -> dict[str, str]:
    """active / failed / succeeded for each run key that has a run."""
    statuses: dict[str, str] = {}
    for key in run_keys:
        runs = instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: key}), limit=1)
        if not runs:
            continue
        status = runs[0].status
        statuses[key] = (
            RUN_FAILED if status in _FAILED else RUN_SUCCEEDED if status == DagsterRunStatus.SUCCESS else RUN_ACTIVE
        )
    return statuses


def dead_letter_total(kafka: KafkaResource, topic: str) -> int:
    """Messages ever written to ``topic`` (sum of its end offsets); 0 when it does not exist yet."""
    consumer = kafka.consumer()
    try:
        if topic not in consumer.topics():
            return 0  # asking for its partitions could auto-create it
        partitions = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.end_offsets([TopicPartition(topic, p) for p in partitions]).values())
    finally:
        consumer.close()


def latest_batch_gaps(instance: DagsterInstance, topic: str, limit: int = 30) -> dict[int, dict[str, Any]]:
    """Sequence gaps of the newest micro-batch materialisation (or follower report window) per partition
    of ``topic``."""
    latest: dict[int, dict[str, Any]] = {}
    records = instance.fetch_materializations(BINANCE_TRADES, limit=limit).records
    for record in records:  # newest first
        materialization = record.asset_materialization
        if materialization is None:
            continue
        meta: dict[str, Any] = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        if meta.get("topic") == topic and "sequence_gaps_by_partition" in meta:  # a follower's report window
            for key, window in json.loads(meta["sequence_gaps_by_partition"]).items():
                latest.setdefault(int(key), window)
            continue
        if meta.get("topic") != topic or "sequence_gaps_by_symbol" not in meta:
            continue
        partition = int(meta["partition"])
        if partition not in latest:
            latest[partition] = {
                "range": f"{meta['start_offset']}-{meta['end_offset']}",
                "gaps": json.loads(meta["sequence_gaps_by_symbol"]),
            }
    return latest


def observe(
    instance: DagsterInstance,
    cursor: StreamCursor,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    sink: TradeSinkResource,
    degradation: DegradationResource,
    memory_percent: Callable[[], float] = system_memory_percent,
) -> Observation:
    """Every read of one tick: offsets and pending ranges, the in-flight runs' statuses, memory,
    dead letters, the latest batches' sequence gaps and the spill folder's backlog."""
    dlq = dead_letter_topic(sink.topic)
    return Observation(
        offsets=read_stream_offsets(kafka, iceberg, sink.topic),
        run_status=run_statuses(
            instance,
            [flight.run_key for flight in cursor.in_flight.values()]
            + recovery_run_keys(cursor)
            + follower_run_keys(cursor),
        ),
        memory_percent=memory_percent(),
        dead_letter_topic=dlq,
        dead_letters=dead_letter_total(kafka, dlq),
        batch_gaps=latest_batch_gaps(instance, sink.topic),
        gap_ledger=GapLedger.for_topic(sink.topic).summary().metadata(),
        spill_files=degradation.spill_store().backlog(),
    )
