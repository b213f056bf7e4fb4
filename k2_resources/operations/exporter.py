"""The K2 metrics exporter: one Prometheus endpoint for the whole flow.

Every ``interval_s`` it reads what the platform's parts already record and turns it into
metrics: Kafka end offsets against the table's committed offsets (lag, and committed
messages whose rate is the sink's throughput), pending deferred/spilled ranges and their rows
(the backlogs), the dead-letter topic's size, the latest degradation level the stream sensor
reported and its level changes (from the ``degradation_level`` check history in the Dagster
instance), each micro-batch's Iceberg commit time and the rows it deferred by load shedding (from
its materialisation), the streamer's gap ledger (filled, unfilled, filling and absent trade-id gaps
with their ids, by reason: what the ``sequence_gaps`` check reports), and table statistics. Runs
and sensor ticks happen in processes that serve no metrics, so counters of what they did are
derived here, from what they recorded. It holds no state the platform needs: restarting it loses
nothing (counters restart, which Prometheus handles).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from dagster import AssetCheckKey, AssetKey, DagsterInstance

from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import LossReason
from k2_resources.catalog.errors import catalog_unavailable
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import EXPORTER
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC, dead_letter_topic
from k2_resources.metrics import (
    COMMITTED_MESSAGES,
    CONSUMER_LAG,
    DEAD_LETTERS,
    DEFERRED_RANGES,
    DEFERRED_ROWS,
    DEGRADATION_LEVEL,
    DEGRADATION_TRANSITIONS,
    EXPORTER_ERRORS,
    GAP_LEDGER_GAPS,
    GAP_LEDGER_RESETS,
    GAP_LEDGER_TRADE_IDS,
    ICEBERG_COMMIT_SECONDS,
    MICROBATCH_MESSAGES,
    SHED_MESSAGES,
    SPILLED_BATCHES,
    SPILLED_ROWS,
    TOPIC_END_OFFSETS,
)
from k2_resources.operations.continuous_maintenance import update_health_metrics
from k2_resources.operations.table_metrics import update_table_metrics
from k2_resources.sink.offsets import SPILLED, committed_offsets, pending_ranges

log = logging.getLogger(__name__)

BINANCE_TRADES = AssetKey("binance_trades")


@dataclass
class MetricsPoller:
    """Reads the platform's state and sets the metrics; ``poll()`` once per scrape interval."""

    kafka: KafkaResource = field(default_factory=lambda: KafkaResource(role=EXPORTER))
    iceberg: IcebergResource = field(default_factory=IcebergResource)
    topic: str = BINANCE_TRADES_TOPIC
    instance: DagsterInstance | None = None
    _dead_letters_seen: int | None = None
    _materialization_cursor: str | None = None
    _level_check_id: int | None = None  # newest degradation_level evaluation counted
    _level_seen: int | None = None  # the level it reported
    check_history_window: int = 500  # evaluations read per poll (the sensor reports one per tick)

    def poll(self) -> None:
        steps = (
            ("kafka", self._stream),
            ("dagster", self._dagster),
            ("gap_ledger", self._gaps),
            ("iceberg", self._tables),
        )
        for source, step in steps:
            try:
                step()
                EXPORTER_ERRORS.labels(source=source).set(0)
            except Exception as exc:  # one unreachable part must not blank the others' metrics
                EXPORTER_ERRORS.labels(source=source).set(1)
                # A catalog or object store that is down: the service, its address and the fix, not the HTTP error.
                reason = catalog_unavailable(exc, self.iceberg.catalog_properties) or exc
                log.warning("metrics poll of %s failed: %s", source, reason)

    def _stream(self) -> None:
        table = self.iceberg.trades()
        committed = committed_offsets(table, self.topic)
        ends = self.kafka.end_offsets(self.topic)
        for partition, end in ends.items():
            CONSUMER_LAG.labels(topic=self.topic, partition=str(partition)).set(
                max(0, end - committed.get(partition, 0))
            )
        COMMITTED_MESSAGES.labels(topic=self.topic).set(sum(committed.values()))
        TOPIC_END_OFFSETS.labels(topic=self.topic).set(sum(ends.values()))
        pending = pending_ranges(table, self.topic)
        SPILLED_BATCHES.set(sum(1 for p in pending if p.kind == SPILLED))
        DEFERRED_RANGES.set(sum(1 for p in pending if p.kind != SPILLED))
        SPILLED_ROWS.set(sum(p.rows for p in pending if p.kind == SPILLED))
        DEFERRED_ROWS.set(sum(p.rows for p in pending if p.kind != SPILLED))
        dead = sum(self.kafka.end_offsets(dead_letter_topic(self.topic)).values())
        if self._dead_letters_seen is not None and dead > self._dead_letters_seen:
            DEAD_LETTERS.labels(topic=self.topic).inc(dead - self._dead_letters_seen)
        elif self._dead_letters_seen is None:
            DEAD_LETTERS.labels(topic=self.topic).inc(0)  # the series exists from the first scrape
        self._dead_letters_seen = dead

    def _dagster(self) -> None:
        if self.instance is None:
            return
        storage = self.instance.event_log_storage
        key = AssetCheckKey(BINANCE_TRADES, "degradation_level")
        latest = storage.get_latest_asset_check_execution_by_key([key]).get(key)
        evaluation = latest.evaluation if latest is not None else None
        if evaluation is not None and "level_value" in evaluation.metadata:
            DEGRADATION_LEVEL.set(_number(evaluation.metadata["level_value"]))
        self._count_transitions(storage, key)
        records = self.instance.fetch_materializations(
            BINANCE_TRADES, limit=500, cursor=self._materialization_cursor, ascending=True
        )
        for record in records.records:
            metadata = record.asset_materialization.metadata if record.asset_materialization else {}
            if "commit_seconds" in metadata and not metadata.get("already_committed", _Value(False)).value:
                ICEBERG_COMMIT_SECONDS.observe(_number(metadata["commit_seconds"]))
            if "window_commits" in metadata:  # a follower's report window: count and sum exact, buckets at the mean
                commits = int(_number(metadata["window_commits"]))
                for _ in range(commits):
                    ICEBERG_COMMIT_SECONDS.observe(_number(metadata["commit_seconds_sum"]) / commits)
            if "rows_written" in metadata:
                MICROBATCH_MESSAGES.inc(_number(metadata["rows_written"]))
            if "deferred_rows_by_symbol" in metadata:
                for symbol, rows in json.loads(str(metadata["deferred_rows_by_symbol"].value)).items():
                    SHED_MESSAGES.labels(symbol=symbol).inc(int(rows))
        self._materialization_cursor = records.cursor

    def _count_transitions(self, storage, key: AssetCheckKey) -> None:
        """k2_degradation_transitions_total from the sensor's degradation_level evaluations.

        The sensor reports the level every tick and moves at most one transition per tick, so a
        level that differs from the previous evaluation's is one transition. Only the sensor's
        evaluations count (no run id): a check run on demand starts from a fresh manager.
        """
        records = storage.get_asset_check_execution_history(key, limit=self.check_history_window)
        for record in sorted(records, key=lambda r: r.id):  # newest first from storage
            if self._level_check_id is not None and record.id <= self._level_check_id:
                continue
            self._level_check_id = record.id
            evaluation = record.event.asset_check_evaluation if record.event is not None else None
            if record.run_id or evaluation is None or "level_value" not in evaluation.metadata:
                continue
            level = int(evaluation.metadata["level_value"].value)
            if self._level_seen is not None and level != self._level_seen:
                DEGRADATION_TRANSITIONS.labels(
                    from_level=DegradationLevel(self._level_seen).name, to_level=DegradationLevel(level).name
                ).inc()
            self._level_seen = level

    def _gaps(self) -> None:
        """The gap ledger's state (K2_HOME/binance/gaps/<topic>.jsonl) as gauges: every state and known
        reason is set each poll, so a gap accepted or filled since brings its series back to 0."""
        summary = GapLedger.for_topic(self.topic).summary()
        by_reason = dict.fromkeys(_LOSS_REASONS, (0, 0))
        for entry in summary.unfilled:
            gaps, ids = by_reason.get(entry.get("reason", ""), (0, 0))
            lost = entry["ids"] - entry.get("filled", 0) - entry.get("absent", 0)
            by_reason[entry.get("reason", "")] = (gaps + 1, ids + lost)
        states = [
            ("filled", "", summary.filled_gaps, summary.filled_ids),
            ("filling", "", summary.open_gaps, summary.open_ids),
            ("absent_at_source", "", summary.absent_gaps, summary.absent_ids),
        ] + [("unfilled", reason, gaps, ids) for reason, (gaps, ids) in sorted(by_reason.items())]
        for state, reason, gaps, ids in states:
            GAP_LEDGER_GAPS.labels(topic=self.topic, state=state, reason=reason).set(gaps)
            GAP_LEDGER_TRADE_IDS.labels(topic=self.topic, state=state, reason=reason).set(ids)
        GAP_LEDGER_RESETS.labels(topic=self.topic).set(summary.resets)

    def _tables(self) -> None:
        update_table_metrics(self.iceberg)
        update_health_metrics(self.iceberg)  # k2_table_health: the table_health check's measures


_LOSS_REASONS = tuple(sorted({value for name, value in vars(LossReason).items() if name.isupper()} | {"dead_lettered"}))


def _number(entry: Any) -> float:
    """A numeric metadata entry's value (Dagster types metadata values as any packable value)."""
    return float(entry.value)


@dataclass
class _Value:
    value: object


def run_exporter(port: int, interval_s: float, stop: threading.Event, poller: MetricsPoller) -> None:
    """Serve /metrics on 127.0.0.1:port and poll every interval until ``stop`` is set."""
    from k2_resources.metrics import serve_metrics, stop_metrics

    serve_metrics(port)
    try:
        while not stop.is_set():
            poller.poll()
            stop.wait(interval_s)
    finally:
        stop_metrics(port)
