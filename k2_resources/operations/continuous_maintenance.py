"""Continuous table maintenance: what keeps a table committed to every second as fast as a new one.

Runs inside the streaming job (a thread of the follower's process, as Iceberg's Flink
``TableMaintenance`` runs inside the Flink job), every ``interval_s``, for each table K2 commits
to often (``market.trades``, ``market.quotes``, ``market.live_bars``). One pass per table:

1. **table properties** (once): manifest merging on append (``commit.manifest-merge.enabled``,
   ``commit.manifest.min-count-to-merge``), so the current snapshot's manifests stay few on every
   commit; old metadata files deleted by the committing writer itself
   (``write.metadata.delete-after-commit.enabled``, ``write.metadata.previous-versions-max``;
   pyiceberg 0.12 honours both in ``Table._do_commit``); the snapshot policy, so readers can say
   what time travel keeps;
2. **compaction** of settled small files (:mod:`k2_resources.operations.settled_compaction`),
   for the tables partitioned by (day, exchange);
3. **snapshot expiry** by the tiered policy, deleting the manifest lists, manifests and data files
   only expired snapshots used (:mod:`k2_resources.operations.snapshot_policy`);
4. **orphan sweep** every ``orphan_interval_s``: files under the table's ``data/`` and
   ``metadata/`` that nothing references (a commit that lost its race, a rewrite killed before its
   commit, metadata files from before the table's properties were set) and older than
   ``orphan_grace_s``, so a commit in flight never loses its files.

Every step commits through the commit layer and changes no rows and no ``k2.kafka.*`` property:
exactly-once, pending ranges and retention losses are untouched. A pass that fails is logged and
reported; the next pass starts afresh. Settings come from the environment (:func:`from_env`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pyarrow.fs as pafs
from pyiceberg.table import Table, TableProperties

from k2_resources import metrics
from k2_resources.catalog.commit import with_commit_retries
from k2_resources.catalog.pyiceberg_adapter import transaction_of
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import LIVE_BARS, QUOTES, TRADES, TableDefinition
from k2_resources.operations.commit_window import CommitWindow
from k2_resources.operations.settled_compaction import CompactionOutcome, CompactionSettings, compact_settled
from k2_resources.operations.snapshot_policy import (
    POLICY_PROPERTY,
    ExpiryOutcome,
    ReferenceCache,
    SnapshotPolicy,
    expire_by_policy,
    referenced,
)
from k2_resources.operations.table_health import (
    ERROR,
    OK,
    WARN,
    TableHealth,
    evaluate,
    list_files,
    measure,
    table_filesystem,
)

log = logging.getLogger(__name__)

STREAMED_TABLES: tuple[TableDefinition, ...] = (TRADES, QUOTES, LIVE_BARS)
COMPACTED_TABLES = {TRADES.identifier, QUOTES.identifier}
ENABLED_ENV = "K2_MAINTENANCE"  # "off" turns continuous maintenance off


@dataclass(frozen=True)
class MaintenanceSettings:
    """Everything continuous maintenance does and how often (docs/operations.md lists each)."""

    interval_s: float = 15.0
    compaction: CompactionSettings = field(default_factory=CompactionSettings)
    snapshots: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    metadata_versions: int = 10
    manifest_merge_count: int = 8
    orphan_interval_s: float = 3600.0
    orphan_grace_s: float = 1800.0
    measure_health: bool = True
    health_interval_s: float = 60.0  # passes measure the table at most this often (the report's cadence)

    def table_properties(self) -> dict[str, str]:
        return {
            TableProperties.MANIFEST_MERGE_ENABLED: "true",
            TableProperties.MANIFEST_MIN_MERGE_COUNT: str(self.manifest_merge_count),
            TableProperties.METADATA_DELETE_AFTER_COMMIT_ENABLED: "true",
            TableProperties.METADATA_PREVIOUS_VERSIONS_MAX: str(self.metadata_versions),
            POLICY_PROPERTY: self.snapshots.to_property(),
        }


def _env_float(name: str, default: float, scale: float = 1.0) -> float:
    raw = os.environ.get(name)
    return float(raw) * scale if raw not in (None, "") else default


def maintenance_enabled() -> bool:
    return os.environ.get(ENABLED_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def from_env(base: MaintenanceSettings | None = None) -> MaintenanceSettings:
    """The settings, each overridable by its environment variable (minutes and hours as named)."""
    base = base or MaintenanceSettings()
    compaction = replace(
        base.compaction,
        settle_window_s=_env_float("K2_COMPACTION_SETTLE_MINUTES", base.compaction.settle_window_s, 60),
        target_file_size_bytes=int(
            _env_float("K2_COMPACTION_TARGET_MB", base.compaction.target_file_size_bytes, 1024 * 1024)
        ),
    )
    snapshots = SnapshotPolicy(
        exact_window_s=_env_float("K2_SNAPSHOT_EXACT_MINUTES", base.snapshots.exact_window_s, 60),
        max_exact_snapshots=int(_env_float("K2_SNAPSHOT_EXACT_MAX", base.snapshots.max_exact_snapshots)),
        hourly_for_s=_env_float("K2_SNAPSHOT_HOURLY_HOURS", base.snapshots.hourly_for_s, 3600),
        retention_s=_env_float("K2_SNAPSHOT_RETENTION_HOURS", base.snapshots.retention_s, 3600),
    )
    return replace(
        base,
        interval_s=_env_float("K2_MAINTENANCE_INTERVAL_SECONDS", base.interval_s),
        compaction=compaction,
        snapshots=snapshots,
        orphan_grace_s=_env_float("K2_ORPHAN_GRACE_MINUTES", base.orphan_grace_s, 60),
    )


def ensure_properties(load: Callable[[], Table], settings: MaintenanceSettings) -> list[str]:
    """Set the maintenance table properties that differ (a properties-only commit); the keys set."""
    wanted = settings.table_properties()
    changed: list[str] = []

    def attempt(_: int) -> None:
        table = load()
        missing = {k: v for k, v in wanted.items() if table.properties.get(k) != v}
        changed[:] = sorted(missing)
        if missing:
            with transaction_of(table) as transaction:
                transaction.set_properties(missing)

    with_commit_retries(attempt, "maintenance table properties", gave_up="the next pass tries again")
    return changed


# -- orphan sweep ------------------------------------------------------------------------------


@dataclass
class OrphanOutcome:
    listed: int = 0
    deleted: int = 0
    bytes_deleted: int = 0
    kept_in_grace: int = 0


def sweep_orphans(table: Table, grace_s: float, cache: ReferenceCache, now: float | None = None) -> OrphanOutcome:
    """Delete files under ``data/`` and ``metadata/`` that the table does not reference and that are
    older than ``grace_s``. The listing is taken before the references are read, so a file
    committed in between counts as referenced."""
    outcome = OrphanOutcome()
    filesystem, _ = table_filesystem(table, table.location())
    listed: list[pafs.FileInfo] = []
    for folder in ("data", "metadata"):
        listed.extend(list_files(table, f"{table.location().rstrip('/')}/{folder}"))
    outcome.listed = len(listed)
    table.refresh()
    metadata = table.metadata
    lists, manifests, data = referenced(table, table.snapshots(), cache)
    keep = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    keep.update(s.statistics_path for s in metadata.statistics)
    keep.update(s.statistics_path for s in metadata.partition_statistics)
    keep.update(lists | manifests | data)
    for manifest_path in manifests:  # deleted entries too: a live snapshot's manifest names them
        keep.update(cache.manifest_files.get(manifest_path, (frozenset(), frozenset()))[1])
    keep_paths = {table_filesystem(table, path)[1] for path in keep}
    cutoff = (now if now is not None else time.time()) - grace_s
    for info in listed:
        if info.path in keep_paths:
            continue
        modified = info.mtime.timestamp() if info.mtime is not None else time.time()
        if modified > cutoff:
            outcome.kept_in_grace += 1
            continue
        filesystem.delete_file(info.path)
        outcome.deleted += 1
        outcome.bytes_deleted += int(info.size or 0)
    return outcome


# -- one table's passes ----------------------------------------------------------------------------


@dataclass
class MaintenancePass:
    """What one pass did to one table (recorded as a materialization and logged)."""

    table: str
    started_at: str
    properties_set: list[str] = field(default_factory=list)
    compaction: CompactionOutcome | None = None
    expiry: ExpiryOutcome | None = None
    orphans: OrphanOutcome | None = None
    health: TableHealth | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def changed_anything(self) -> bool:
        return bool(
            self.properties_set
            or (self.compaction and self.compaction.commits)
            or (self.expiry and self.expiry.expired)
            or (self.orphans and self.orphans.deleted)
        )

    def as_metadata(self) -> dict[str, object]:
        data: dict[str, object] = {
            "table": self.table,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
        }
        if self.properties_set:
            data["properties_set"] = ", ".join(self.properties_set)
        if self.compaction is not None:
            data.update({f"compaction_{k}": v for k, v in self.compaction.as_metadata().items()})
        if self.expiry is not None:
            data.update({f"expiry_{k}": v for k, v in self.expiry.as_metadata().items()})
        if self.orphans is not None:
            data.update({f"orphans_{k}": v for k, v in vars(self.orphans).items()})
        if self.health is not None:
            data.update({f"health_{k}": v for k, v in self.health.as_metadata().items()})
        if self.error:
            data["error"] = self.error
        return data


class TableMaintainer:
    """The passes of one table; keeps the manifest cache and the orphan sweep's clock between passes."""

    def __init__(self, load: Callable[[], Table], identifier: str, settings: MaintenanceSettings) -> None:
        self.load = load
        self.identifier = identifier
        self.settings = settings
        self.cache = ReferenceCache()
        self.properties_ok = False
        self.last_sweep = time.monotonic()  # the first sweep waits a whole interval
        self.last_health = -float("inf")
        self.before_swap: Callable[[], None] | None = None  # tests: a point to kill a rewrite at
        self.window: CommitWindow | None = None  # shared with the follower of this process, if any
        # Set by ContinuousMaintenance: compaction runs on its own fixed-rate thread (compact()), and a
        # pass reports what it did since the previous pass instead of compacting itself.
        self.separate_compaction = False
        self.compaction_cache = ReferenceCache()  # compact() runs beside run_pass: its own cache
        self._compacted: list[CompactionOutcome] = []
        self._lock = threading.Lock()

    def compact(self) -> None:
        """One compaction of this table (the compaction thread); its outcome goes into the next pass."""
        if self.identifier not in COMPACTED_TABLES:
            return
        try:
            outcome = compact_settled(
                self.load,
                self.settings.compaction,
                self.compaction_cache,
                before_swap=self.before_swap,
                window=self.window,
            )
        except Exception as exc:  # the next pass tries again
            log.warning("compaction of %s failed: %s", self.identifier, exc, exc_info=True)
            return
        with self._lock:
            self._compacted.append(outcome)

    def _take_compactions(self) -> CompactionOutcome:
        with self._lock:
            done, self._compacted = self._compacted, []
        merged = CompactionOutcome()
        for outcome in done:
            merged.rewrites += outcome.rewrites
            merged.commits += outcome.commits
            merged.conflicts += outcome.conflicts
            merged.abandoned += outcome.abandoned
            merged.seconds += outcome.seconds
        return merged

    def run_pass(self, sweep: bool | None = None) -> MaintenancePass:
        started = time.perf_counter()
        result = MaintenancePass(self.identifier, datetime.now(UTC).isoformat(timespec="seconds"))
        try:
            if not self.properties_ok:
                result.properties_set = ensure_properties(self.load, self.settings)
                self.properties_ok = True
            if self.separate_compaction:
                result.compaction = self._take_compactions()
            elif self.identifier in COMPACTED_TABLES:
                result.compaction = compact_settled(
                    self.load, self.settings.compaction, self.cache, before_swap=self.before_swap, window=self.window
                )
            result.expiry = expire_by_policy(self.load, self.settings.snapshots, self.cache)
            due = time.monotonic() - self.last_sweep >= self.settings.orphan_interval_s
            if sweep or (sweep is None and due):
                result.orphans = sweep_orphans(self.load(), self.settings.orphan_grace_s, self.cache)
                self.last_sweep = time.monotonic()
            if self.settings.measure_health and time.monotonic() - self.last_health >= self.settings.health_interval_s:
                self.last_health = time.monotonic()
                # A file is taken by the first pass after it settles: the window as health counts it.
                settled_after = self.settings.compaction.settle_window_s + self.settings.interval_s
                result.health = measure(self.load(), settled_after, self.cache)
        except Exception as exc:  # one failed pass must not end the stream: report it, try again next time
            log.warning("maintenance of %s failed: %s", self.identifier, exc, exc_info=True)
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - started
        return result


def _loader(iceberg: IcebergResource, definition: TableDefinition) -> Callable[[], Table]:
    return lambda: iceberg.table(definition)


class ContinuousMaintenance:
    """A daemon thread running a pass over every streamed table each ``settings.interval_s``.

    ``on_pass`` gets each :class:`MaintenancePass` (the follower records it as a materialization);
    use as a context manager around the streaming loop, or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        iceberg: IcebergResource,
        settings: MaintenanceSettings | None = None,
        on_pass: Callable[[MaintenancePass], None] | None = None,
        tables: tuple[TableDefinition, ...] = STREAMED_TABLES,
    ) -> None:
        self.settings = settings or from_env()
        self.on_pass = on_pass
        self.maintainers = [
            TableMaintainer(_loader(iceberg, definition), definition.identifier, self.settings) for definition in tables
        ]
        self.window = CommitWindow()  # pass self.window.pause as the follower's pause
        for maintainer in self.maintainers:
            maintainer.window = self.window
        self.passes: list[MaintenancePass] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._compaction_thread: threading.Thread | None = None

    def run_once(self) -> list[MaintenancePass]:
        done = []
        for maintainer in self.maintainers:
            if self._stop.is_set():
                break
            result = maintainer.run_pass()
            done.append(result)
            self.passes.append(result)
            del self.passes[:-100]
            _record_metrics(result)
            if self.on_pass is not None:
                try:
                    self.on_pass(result)
                except Exception as exc:
                    log.warning("reporting a maintenance pass failed: %s", exc)
        return done

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            self.run_once()

    def _compaction_loop(self) -> None:
        """Compaction at a fixed rate, every half interval, whatever expiry, the orphan sweep and the
        health measure cost: files settle continuously, and the health bound (settle window plus one
        interval) holds only while two committed compactions are at most one interval apart."""
        tick = self.settings.interval_s / 2
        next_at = time.monotonic()
        while True:
            next_at = max(next_at + tick, time.monotonic() - tick)  # late: run now, no burst to catch up
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return
            for maintainer in self.maintainers:
                if self._stop.is_set():
                    return
                maintainer.compact()

    def start(self) -> ContinuousMaintenance:
        if self._thread is None:
            for maintainer in self.maintainers:
                maintainer.separate_compaction = True
            self._compaction_thread = threading.Thread(
                target=self._compaction_loop, name="k2-table-compaction", daemon=True
            )
            self._compaction_thread.start()
            self._thread = threading.Thread(target=self._loop, name="k2-table-maintenance", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._compaction_thread):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._compaction_thread = None

    def __enter__(self) -> ContinuousMaintenance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _record_metrics(result: MaintenancePass) -> None:
    """The exporter's view of a pass: health gauges, action and removal counters."""
    table = result.table
    metrics.MAINTENANCE_PASS_SECONDS.labels(table=table).observe(result.seconds)
    if result.error:
        metrics.MAINTENANCE_ERRORS.labels(table=table).inc()
    if result.properties_set:
        metrics.MAINTENANCE_ACTIONS.labels(table=table, action="properties").inc()
    removed = metrics.MAINTENANCE_FILES_REMOVED
    if result.compaction is not None:
        metrics.MAINTENANCE_ACTIONS.labels(table=table, action="compaction").inc(result.compaction.commits)
        metrics.MAINTENANCE_CONFLICTS.labels(table=table).inc(result.compaction.conflicts)
        removed.labels(table=table, kind="data_rewritten").inc(result.compaction.files_removed)
    if result.expiry is not None:
        metrics.MAINTENANCE_ACTIONS.labels(table=table, action="expiry").inc(1 if result.expiry.expired else 0)
        metrics.MAINTENANCE_CONFLICTS.labels(table=table).inc(result.expiry.conflicts)
        removed.labels(table=table, kind="data_deleted").inc(result.expiry.data_files_deleted)
        removed.labels(table=table, kind="manifests").inc(result.expiry.manifests_deleted)
        removed.labels(table=table, kind="manifest_lists").inc(result.expiry.manifest_lists_deleted)
    if result.orphans is not None:
        metrics.MAINTENANCE_ACTIONS.labels(table=table, action="orphans").inc(1 if result.orphans.deleted else 0)
        removed.labels(table=table, kind="orphans").inc(result.orphans.deleted)
    if result.health is not None:
        record_health(result.health)


def record_health(health: TableHealth) -> str:
    """Set the ``k2_table_health`` gauges of one measurement; returns its severity."""
    for name, value in health.as_metadata().items():
        if isinstance(value, int | float):
            metrics.TABLE_HEALTH.labels(table=health.table, measure=name).set(float(value))
    severity, _ = evaluate(health)
    metrics.TABLE_HEALTH_SEVERITY.labels(table=health.table).set({OK: 0, WARN: 1, ERROR: 2}[severity])
    return severity


_HEALTH_CACHES: dict[str, ReferenceCache] = {}


def update_health_metrics(iceberg: IcebergResource, settings: MaintenanceSettings | None = None) -> dict[str, str]:
    """Measure every streamed table and set its ``k2_table_health`` gauges (the exporter, each poll);
    returns each table's severity. Manifests are read once per exporter (they never change)."""
    settings = settings or from_env()
    severities = {}
    for definition in STREAMED_TABLES:
        cache = _HEALTH_CACHES.setdefault(definition.identifier, ReferenceCache())
        if len(cache.manifest_entries) > 10_000:  # manifests of long-expired snapshots: start afresh
            cache = _HEALTH_CACHES[definition.identifier] = ReferenceCache()
        health = measure(iceberg.table(definition), settings.compaction.settle_window_s + settings.interval_s, cache)
        severities[definition.identifier] = record_health(health)
    return severities
