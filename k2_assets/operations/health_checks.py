"""Health of the tables K2 streams into, where an operator looks: an asset per streamed table, its
``table_health`` check, and each continuous-maintenance action as a materialization of it.

The asset of a table (``market_trades_table``, ``market_quotes_table``, ``market_live_bars_table``)
is materialized by the maintenance that runs inside the follower (`k2 run`,
k2_resources/operations/continuous_maintenance.py): each pass that changed something records what
it rewrote and removed. Its ``table_health`` check compares the table's measures (manifests,
settled files per partition, snapshots, metadata file and folder bytes, oldest time-travel point)
with the bounds of k2_resources/operations/table_health.py: WARN past a warn bound, ERROR past an
error bound. The follower logs the check after each pass; it can also be run from the UI.
"""

from __future__ import annotations

import queue
import time
from types import TracebackType

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSpec,
    MetadataValue,
    OpExecutionContext,
    asset_check,
)
from dagster import AssetChecksDefinition as ChecksDefinition

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TableDefinition
from k2_resources.operations.continuous_maintenance import (
    STREAMED_TABLES,
    ContinuousMaintenance,
    MaintenancePass,
    from_env,
    maintenance_enabled,
    record_health,
)
from k2_resources.operations.table_health import BOUNDS, ERROR, OK, TableHealth, describe, evaluate, measure

CHECK_NAME = "table_health"
GROUP = "operations"


def table_asset_key(definition: TableDefinition | str) -> AssetKey:
    identifier = definition if isinstance(definition, str) else definition.identifier
    return AssetKey(f"{identifier.replace('.', '_')}_table")


TABLE_ASSETS = [
    AssetSpec(
        key=table_asset_key(definition),
        group_name=GROUP,
        description=f"Iceberg {definition.identifier}: materialized by each continuous-maintenance pass that "
        "changed it (what it compacted, expired and deleted); its table_health check says whether it stays fast",
    )
    for definition in STREAMED_TABLES
]


def _bounds_metadata() -> MetadataValue:
    return MetadataValue.json({b.measure: {"warn": b.warn, "error": b.error, "meaning": b.meaning} for b in BOUNDS})


def health_evaluation(health: TableHealth) -> AssetCheckEvaluation:
    """The ``table_health`` check's evaluation of one measurement."""
    severity, findings = evaluate(health)
    return AssetCheckEvaluation(
        asset_key=table_asset_key(health.table),
        check_name=CHECK_NAME,
        passed=severity == OK,
        severity=AssetCheckSeverity.ERROR if severity == ERROR else AssetCheckSeverity.WARN,
        description=f"{health.table}: {describe(findings)}",
        metadata={
            **{k: v for k, v in health.as_metadata().items() if v is not None},
            "level": severity,
            "bounds": _bounds_metadata(),
            "files_per_partition": MetadataValue.json(dict(list(health.files_per_partition.items())[:20])),
        },
    )


def maintenance_materialization(result: MaintenancePass) -> AssetMaterialization:
    """A maintenance pass as a materialization of its table's asset: what it rewrote and removed."""
    metadata = {k: v for k, v in result.as_metadata().items() if v is not None and not k.startswith("health_")}
    partitions = metadata.get("compaction_partitions")
    if isinstance(partitions, list):
        metadata["compaction_partitions"] = MetadataValue.json(partitions)
    return AssetMaterialization(asset_key=table_asset_key(result.table), metadata=metadata)  # type: ignore[arg-type]


def _check_for(definition: TableDefinition) -> ChecksDefinition:
    @asset_check(
        asset=table_asset_key(definition),
        name=CHECK_NAME,
        description=f"{definition.identifier} stays within the table-health bounds (docs/operations.md)",
    )
    def _table_health(iceberg: IcebergResource) -> AssetCheckResult:
        settings = from_env()
        health = measure(
            iceberg.table(definition), settings.compaction.settle_window_s + settings.interval_s, with_folder=True
        )
        record_health(health)
        evaluation = health_evaluation(health)
        return AssetCheckResult(
            passed=evaluation.passed,
            severity=evaluation.severity,
            description=evaluation.description,
            metadata=evaluation.metadata,
        )

    return _table_health


TABLE_HEALTH_CHECKS = [_check_for(definition) for definition in STREAMED_TABLES]


REPORT_EVERY_S = 60.0
HEALTH_EVERY_S = 600.0  # an unchanged table_health level is logged this often; a change at once
# Counts summed over the passes a report covers; every other entry is the latest pass's.
SUMMED = ("_commits", "_conflicts", "_abandoned", "_removed", "_added", "_rewritten", "_deleted", "_expired", "seconds")


class PassDigest:
    """The passes over one table since its last report, as one materialization and one evaluation."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.passes = 0
        self.changed = 0
        self.totals: dict[str, object] = {}
        self.health: TableHealth | None = None
        self.logged_at = time.monotonic()
        self.health_logged_at = -float("inf")
        self.logged_level: str | None = None
        self.errors: list[str] = []

    @property
    def level_changed(self) -> bool:
        return self.health is not None and evaluate(self.health)[0] != self.logged_level

    def add(self, result: MaintenancePass) -> None:
        self.passes += 1
        self.changed += 1 if result.changed_anything else 0
        if result.error:
            self.errors.append(result.error)
        if result.health is not None:
            self.health = result.health
        for key, value in maintenance_materialization(result).metadata.items():
            raw = getattr(value, "value", value)
            if isinstance(raw, int | float) and not isinstance(raw, bool) and key.endswith(SUMMED):
                previous = self.totals.get(key, 0)
                self.totals[key] = previous + raw if isinstance(previous, int | float) else raw
            elif key not in ("table", "started_at"):
                self.totals[key] = raw

    def take(self, now: float, final: bool = False) -> tuple[AssetMaterialization | None, TableHealth | None]:
        """The report of the passes so far (a materialization only if one changed the table or failed)."""
        materialization = None
        if self.changed or self.errors:
            metadata: dict[str, object] = {"passes": self.passes, "passes_that_changed": self.changed, **self.totals}
            if self.errors:
                metadata["failed_passes"] = len(self.errors)
                metadata["error"] = self.errors[-1]
            partitions = metadata.get("compaction_partitions")
            if isinstance(partitions, list):
                metadata["compaction_partitions"] = MetadataValue.json(partitions)
            materialization = AssetMaterialization(asset_key=table_asset_key(self.table), metadata=metadata)  # type: ignore[arg-type]
        health = self.health
        due = final or self.level_changed or now - self.health_logged_at >= HEALTH_EVERY_S
        if health is not None and due:
            self.logged_level = evaluate(health)[0]
            self.health_logged_at = now
        else:
            health = None
        self.passes = self.changed = 0
        self.totals, self.health, self.errors = {}, None, []
        self.logged_at = now
        return materialization, health


class FollowerMaintenance:
    """Continuous maintenance for the length of a follower run, reported into that run.

    Passes run on a thread of their own; their reports wait in a queue until the follower's thread
    logs them (:meth:`log_pending`, called after each commit and at the end), because a run's events
    are logged from its own thread. ``pause`` is the follower's pause: it lets a waiting
    compaction commit go between two cycles (k2_resources/operations/commit_window.py).
    """

    def __init__(
        self,
        context: AssetExecutionContext | OpExecutionContext,
        iceberg: IcebergResource,
        report_every_s: float = REPORT_EVERY_S,
    ) -> None:
        self.context = context
        self.enabled = maintenance_enabled()
        self.reports: queue.Queue[MaintenancePass] = queue.Queue()
        self.maintenance = ContinuousMaintenance(iceberg, on_pass=self.reports.put) if self.enabled else None
        self.report_every_s = report_every_s
        self.digests: dict[str, PassDigest] = {}

    def pause(self, seconds: float) -> None:
        self.log_pending()
        if self.maintenance is None:
            time.sleep(seconds)
        else:
            self.maintenance.window.pause(seconds)

    def log_pending(self, flush: bool = False) -> None:
        """Log what the passes did, at most once per ``report_every_s`` per table (and at the end),
        so a week of streaming leaves thousands of events in the instance, not hundreds of thousands;
        a table_health level change is logged at once."""
        while True:
            try:
                result = self.reports.get_nowait()
            except queue.Empty:
                break
            self.digests.setdefault(result.table, PassDigest(result.table)).add(result)
        now = time.monotonic()
        for digest in self.digests.values():
            if digest.passes and (flush or digest.level_changed or now - digest.logged_at >= self.report_every_s):
                materialization, health = digest.take(now, final=flush)
                if materialization is not None:
                    self.context.log_event(materialization)
                if health is not None:
                    # log_event takes check evaluations too (its annotation lists only the older event kinds)
                    self.context.log_event(health_evaluation(health))  # type: ignore[arg-type]

    def __enter__(self) -> FollowerMaintenance:
        if self.maintenance is not None:
            self.maintenance.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.maintenance is not None:
            self.maintenance.stop()
        self.log_pending(flush=True)
