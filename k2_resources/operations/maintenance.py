"""Table maintenance for K2's Iceberg tables: compaction, snapshot expiry, orphan-file clean-up.

Thousands of micro-batch commits leave thousands of small files and snapshots. pyiceberg 0.12
has no compaction API, so compaction here is a rewrite: for each partition (day, exchange)
with too many small files, the rows of those files are read, sorted by symbol then timestamp,
written as a few new files, and the old files are swapped for the new ones in ONE overwrite
snapshot. That commit asserts the snapshot it read from is still current (Iceberg's optimistic
concurrency), so a micro-batch committing meanwhile makes it retry instead of losing rows. It
changes no rows and no table properties, so ``k2.kafka.committed.*`` and every hybrid read stay
exactly as they were; the snapshot summary copies the committed offsets for time travel.

Expiry drops snapshots older than the retention but always keeps the newest N of the current
lineage. Neither step deletes files: the orphan clean-up does, removing only files under the
table location that no live snapshot references and that are older than a grace period (so a
writer that is committing right now keeps its fresh files).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
from dagster import ConfigurableResource
from pydantic import Field
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile
from pyiceberg.table import FileScanTask, Table, TableProperties
from pyiceberg.table.metadata import TableMetadata

from k2_resources.catalog.commit import with_commit_retries
from k2_resources.catalog.pyiceberg_adapter import dataframe_to_data_files, transaction_of
from k2_resources.errors import K2Error
from k2_resources.sink.offsets import PREFIX

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SORT_KEYS = [("symbol", "ascending"), ("timestamp", "ascending")]
MAINTENANCE_KEY = "k2.maintenance"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


class TableMaintenanceResource(ConfigurableResource):
    """Settings of table maintenance; the defaults suit the embedded default and a busy stream."""

    target_file_size_bytes: int = Field(
        default=128 * MIB, gt=0, description="on-disk size a compacted data file aims for"
    )
    small_file_bytes: int = Field(default=32 * MIB, gt=0, description="data files below this size count as small")
    min_small_files: int = Field(
        default=5, ge=2, description="compact a partition once it holds at least this many small files"
    )
    max_rewrite_bytes: int = Field(
        default=512 * MIB, gt=0, description="on-disk bytes rewritten per commit (bounds memory)"
    )
    max_files_per_partition: int = Field(
        default=16, ge=1, description="the file-count check warns above this many files in one partition"
    )
    snapshot_retention_hours: float = Field(default=24.0 * 7, ge=0, description="expire snapshots older than this")
    min_snapshots_to_keep: int = Field(
        default=20, ge=1, description="always keep this many newest snapshots of the current lineage"
    )
    orphan_grace_hours: float = Field(default=72.0, ge=0, description="only delete unreferenced files older than this")

    def compact(self, table: Table) -> CompactionReport:
        return compact_table(
            table,
            target_file_size_bytes=self.target_file_size_bytes,
            small_file_bytes=self.small_file_bytes,
            min_small_files=self.min_small_files,
            max_rewrite_bytes=self.max_rewrite_bytes,
        )

    def expire(self, table: Table) -> ExpiryReport:
        return expire_snapshots(
            table,
            older_than=datetime.now(UTC) - timedelta(hours=self.snapshot_retention_hours),
            retain_last=self.min_snapshots_to_keep,
        )

    def remove_orphans(self, table: Table) -> OrphanReport:
        return remove_orphan_files(table, grace=timedelta(hours=self.orphan_grace_hours))


# --------------------------------------------------------------------------------------------
# File layout per partition
# --------------------------------------------------------------------------------------------


@dataclass
class PartitionFiles:
    """The live data files of one partition in the current snapshot."""

    label: str  # e.g. "timestamp_day=2024-08-09/exchange=BINANCE"
    spec_id: int
    tasks: list[FileScanTask] = field(default_factory=list)

    @property
    def file_count(self) -> int:
        return len(self.tasks)

    @property
    def total_bytes(self) -> int:
        return sum(task.file.file_size_in_bytes for task in self.tasks)

    @property
    def record_count(self) -> int:
        return sum(task.file.record_count for task in self.tasks)

    def small_tasks(self, small_file_bytes: int) -> list[FileScanTask]:
        return [task for task in self.tasks if task.file.file_size_in_bytes < small_file_bytes]


@dataclass(frozen=True)
class PartitionStats:
    """File count and sizes of one partition (what the asset checks look at)."""

    partition: str
    files: int
    records: int
    total_bytes: int
    min_file_bytes: int
    max_file_bytes: int
    small_files: int

    @property
    def mean_file_bytes(self) -> float:
        return self.total_bytes / self.files if self.files else 0.0


def partition_files(table: Table) -> list[PartitionFiles]:
    """The current snapshot's data files grouped by partition, in partition order."""
    groups: dict[tuple, PartitionFiles] = {}
    if table.current_snapshot() is None:
        return []
    for task in table.scan().plan_files():
        data_file = task.file
        values = tuple(data_file.partition[i] for i in range(len(data_file.partition)))
        key = (data_file.spec_id, values)
        if key not in groups:
            spec = table.specs()[data_file.spec_id]
            label = spec.partition_to_path(data_file.partition, table.schema()) or "unpartitioned"
            groups[key] = PartitionFiles(label=label, spec_id=data_file.spec_id)
        groups[key].tasks.append(task)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], tuple(str(v) for v in k[1])))]


def partition_stats(table: Table, small_file_bytes: int = 32 * MIB) -> list[PartitionStats]:
    """File count, records and sizes for each partition of the current snapshot."""
    stats = []
    for partition in partition_files(table):
        sizes = [task.file.file_size_in_bytes for task in partition.tasks]
        stats.append(
            PartitionStats(
                partition=partition.label,
                files=len(sizes),
                records=partition.record_count,
                total_bytes=sum(sizes),
                min_file_bytes=min(sizes),
                max_file_bytes=max(sizes),
                small_files=sum(1 for size in sizes if size < small_file_bytes),
            )
        )
    return stats


# --------------------------------------------------------------------------------------------
# Compaction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionCompaction:
    """One partition's share of a rewrite: ``files_before`` small files became ``files_after``."""

    partition: str
    files_before: int
    files_after: int
    records: int
    bytes_before: int
    bytes_after: int
    snapshot_id: int | None


@dataclass
class CompactionReport:
    """Everything one compaction pass did."""

    rewrites: list[PartitionCompaction] = field(default_factory=list)
    partitions_checked: int = 0
    commits: int = 0
    conflicts: int = 0
    seconds: float = 0.0

    @property
    def files_removed(self) -> int:
        return sum(r.files_before for r in self.rewrites)

    @property
    def files_added(self) -> int:
        return sum(r.files_after for r in self.rewrites)

    @property
    def records_rewritten(self) -> int:
        return sum(r.records for r in self.rewrites)


def compact_table(
    table: Table,
    target_file_size_bytes: int = 128 * MIB,
    small_file_bytes: int = 32 * MIB,
    min_small_files: int = 5,
    max_rewrite_bytes: int = 512 * MIB,
    max_attempts: int = 8,
) -> CompactionReport:
    """Rewrite the small files of every partition that has at least ``min_small_files`` of them.

    Each commit rewrites up to ``max_rewrite_bytes`` of input (several partitions at once when
    they fit, which also drops whole old manifests instead of rewriting each one per partition).
    A commit that conflicts with a concurrent writer is re-planned from the new current snapshot
    and retried; the pass ends when no partition qualifies any more.
    """
    started = time.perf_counter()
    report = CompactionReport()

    def next_rewrite(_: int) -> list[PartitionCompaction] | None:
        """Plan from the current snapshot and commit one rewrite; None when nothing qualifies."""
        table.refresh()
        partitions = partition_files(table)
        report.partitions_checked = max(report.partitions_checked, len(partitions))
        plan = _plan_rewrite(table, partitions, small_file_bytes, min_small_files, max_rewrite_bytes)
        return _rewrite(table, plan, target_file_size_bytes) if plan else None

    def count_conflict(_: BaseException) -> None:
        report.conflicts += 1

    while True:
        # A conflict with a concurrent writer re-plans from the new current snapshot.
        rewrites = with_commit_retries(
            next_rewrite,
            f"compaction of {table.name()}",
            max_attempts=max_attempts,
            gave_up="run the maintenance job again when ingest is quieter",
            on_retry=count_conflict,
        )
        if rewrites is None:
            break
        report.commits += 1
        report.rewrites.extend(rewrites)
        if sum(r.files_after for r in rewrites) >= sum(r.files_before for r in rewrites):
            break  # nothing got fewer (files already near the target): stop rather than loop
    report.seconds = time.perf_counter() - started
    return report


def _plan_rewrite(
    table: Table, partitions: list[PartitionFiles], small_file_bytes: int, min_small_files: int, max_rewrite_bytes: int
) -> list[tuple[str, list[FileScanTask]]]:
    """The (partition, small files) groups of the next commit, within the byte budget."""
    plan: list[tuple[str, list[FileScanTask]]] = []
    budget = max_rewrite_bytes
    for partition in partitions:
        small = partition.small_tasks(small_file_bytes)
        if partition.spec_id != table.spec().spec_id or len(small) < min_small_files:
            continue  # nothing to do, or written under an older partition spec: leave it
        if any(task.delete_files for task in small):
            log.warning("%s has delete files; compaction of merge-on-read partitions is not supported", partition.label)
            continue
        chunk: list[FileScanTask] = []
        total = 0
        for task in sorted(small, key=lambda t: t.file.file_path):
            if len(chunk) >= 2 and total + task.file.file_size_in_bytes > budget:
                break
            chunk.append(task)
            total += task.file.file_size_in_bytes
        if plan and total > budget:
            break  # the next commit takes it
        plan.append((partition.label, chunk))
        budget -= total
        if budget <= 0:
            break
    return plan


def _rewrite(
    table: Table, plan: list[tuple[str, list[FileScanTask]]], target_file_size_bytes: int
) -> list[PartitionCompaction]:
    """Replace each group's files by sorted files holding the same rows, all in ONE overwrite snapshot."""
    metadata = table.metadata
    scan = ArrowScan(metadata, table.io, table.schema(), AlwaysTrue())
    summary = {
        MAINTENANCE_KEY: "compaction",
        f"{MAINTENANCE_KEY}.partitions": str(len(plan)),
        f"{MAINTENANCE_KEY}.files-rewritten": str(sum(len(tasks) for _, tasks in plan)),
        # The rows are unchanged, so the committed offsets as of this snapshot are unchanged too.
        **{key: value for key, value in metadata.properties.items() if key.startswith(f"{PREFIX}.committed.")},
    }
    results: list[tuple[str, list[FileScanTask], int, list[DataFile]]] = []
    with transaction_of(table) as transaction:
        overwrite = transaction.update_snapshot(snapshot_properties=summary).overwrite()
        with overwrite:
            for label, tasks in plan:
                rows = scan.to_table(tasks)
                expected = sum(task.file.record_count for task in tasks)
                if rows.num_rows != expected:
                    raise K2Error(
                        f"compaction of {label} read {rows.num_rows} rows from files that list {expected}; "
                        "the files may be damaged: nothing was changed, inspect them before retrying"
                    )
                bytes_before = sum(task.file.file_size_in_bytes for task in tasks)
                new_files = _write_sorted(
                    transaction.table_metadata,
                    table,
                    rows.sort_by(SORT_KEYS),
                    bytes_before,
                    target_file_size_bytes,
                    overwrite.commit_uuid,
                )
                for task in tasks:
                    overwrite.delete_data_file(task.file)
                for data_file in new_files:
                    overwrite.append_data_file(data_file)
                results.append((label, tasks, rows.num_rows, new_files))
    table.refresh()
    snapshot = table.current_snapshot()
    return [
        PartitionCompaction(
            partition=label,
            files_before=len(tasks),
            files_after=len(new_files),
            records=records,
            bytes_before=sum(task.file.file_size_in_bytes for task in tasks),
            bytes_after=sum(f.file_size_in_bytes for f in new_files),
            snapshot_id=snapshot.snapshot_id if snapshot else None,
        )
        for label, tasks, records, new_files in results
    ]


def _write_sorted(
    metadata: TableMetadata,
    table: Table,
    rows: pa.Table,
    bytes_on_disk: int,
    target_file_size_bytes: int,
    write_uuid: uuid.UUID,
) -> list[DataFile]:
    """Sorted ``rows`` as consecutive, non-overlapping files of about the target on-disk size.

    pyiceberg bin-packs by in-memory Arrow size (and may interleave batches across files), so
    the rows are cut here into slices sized from the on-disk bytes per row of the input, and
    each slice is written as exactly one file.
    """
    if rows.num_rows == 0:
        return []
    bytes_per_row = max(bytes_on_disk / rows.num_rows, 1.0)
    rows_per_file = max(1, int(target_file_size_bytes / bytes_per_row))
    # One slice must never be split again by pyiceberg's own (in-memory) target size.
    unsplit = metadata.model_copy(
        update={"properties": {**metadata.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES: str(2**62)}}
    )
    files: list[DataFile] = []
    counter = itertools.count(0)
    for offset in range(0, rows.num_rows, rows_per_file):
        files.extend(dataframe_to_data_files(unsplit, rows.slice(offset, rows_per_file), table.io, write_uuid, counter))
    return files


# --------------------------------------------------------------------------------------------
# Snapshot expiry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiryReport:
    """Snapshots before and after an expiry pass, and which were expired."""

    snapshots_before: int
    snapshots_after: int
    expired_ids: tuple[int, ...]


def expire_snapshots(table: Table, older_than: datetime, retain_last: int = 20) -> ExpiryReport:
    """Expire snapshots older than ``older_than``, keeping the newest ``retain_last`` of the current lineage.

    pyiceberg 0.12's ExpireSnapshots has ``older_than``/``by_ids`` but no retain-last, so the
    kept set is computed here; branch and tag heads are protected by pyiceberg itself.
    """
    if retain_last < 1:
        raise K2Error(f"retain_last must be at least 1 (got {retain_last}): the current snapshot is always kept")
    table.refresh()
    snapshots = table.snapshots()
    keep: set[int] = set()
    current = table.current_snapshot()
    while current is not None and len(keep) < retain_last:
        keep.add(current.snapshot_id)
        current = table.snapshot_by_id(current.parent_snapshot_id) if current.parent_snapshot_id else None
    protected = {ref.snapshot_id for ref in table.metadata.refs.values()}
    cutoff_ms = int(older_than.timestamp() * 1000)
    expired = sorted(
        s.snapshot_id
        for s in snapshots
        if s.timestamp_ms < cutoff_ms and s.snapshot_id not in keep and s.snapshot_id not in protected
    )
    if expired:
        table.maintenance.expire_snapshots().by_ids(expired).commit()
        table.refresh()
    return ExpiryReport(len(snapshots), len(table.snapshots()), tuple(expired))


# --------------------------------------------------------------------------------------------
# Orphan files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrphanReport:
    """Files found under the table location and what was done with them."""

    files_listed: int
    referenced: int
    deleted: tuple[str, ...]
    kept_in_grace: tuple[str, ...]
    bytes_deleted: int


def _normalise(location: str) -> str:
    """A file location as the file system listing spells it (no scheme; bucket/key for object stores)."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return parsed.path
    return f"{parsed.netloc}{parsed.path}"


def referenced_files(table: Table) -> set[str]:
    """Every file a live snapshot needs: metadata files, manifest lists, manifests, data and delete files."""
    metadata = table.metadata
    referenced = {_normalise(table.metadata_location)}
    referenced.update(_normalise(entry.metadata_file) for entry in metadata.metadata_log)
    referenced.update(_normalise(s.statistics_path) for s in metadata.statistics)
    referenced.update(_normalise(s.statistics_path) for s in metadata.partition_statistics)
    manifests = {}
    for snapshot in metadata.snapshots:
        referenced.add(_normalise(snapshot.manifest_list))
        for manifest in snapshot.manifests(table.io):
            manifests[manifest.manifest_path] = manifest
    referenced.update(_normalise(path) for path in manifests)
    for manifest in manifests.values():
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            referenced.add(_normalise(entry.data_file.file_path))
    return referenced


def remove_orphan_files(table: Table, grace: timedelta = timedelta(hours=72), dry_run: bool = False) -> OrphanReport:
    """Delete files under the table's data/ and metadata/ folders that no live snapshot references.

    Only files older than ``grace`` go: a commit in flight writes its files before it swaps the
    metadata pointer, and those files must survive. The listing comes first and the references
    are read afterwards, so a file committed between the two counts as referenced.
    """
    filesystem, root = pafs.FileSystem.from_uri(table.location())
    listed: list[pafs.FileInfo] = []
    for folder in ("data", "metadata"):
        selector = pafs.FileSelector(f"{root.rstrip('/')}/{folder}", recursive=True, allow_not_found=True)
        listed.extend(info for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File)
    table.refresh()
    referenced = referenced_files(table)
    cutoff = datetime.now(UTC) - grace
    deleted: list[str] = []
    kept: list[str] = []
    freed = 0
    for info in listed:
        if info.path in referenced:
            continue
        modified = info.mtime if info.mtime is not None else datetime.now(UTC)
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        if modified > cutoff:
            kept.append(info.path)
            continue
        if not dry_run:
            filesystem.delete_file(info.path)
        deleted.append(info.path)
        freed += info.size or 0
    in_listing = sum(1 for info in listed if info.path in referenced)
    return OrphanReport(len(listed), in_listing, tuple(sorted(deleted)), tuple(sorted(kept)), freed)
