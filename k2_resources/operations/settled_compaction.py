"""Compaction of settled data while a follower commits every second.

A file is *settled* once it was committed more than ``settle_window_s`` ago (its data sequence
number is at most that of the newest snapshot older than the window; files of expired snapshots
are settled). In each (day, exchange) partition the settled files smaller than
``small_file_bytes`` are bin-packed, in the table's sort order (symbol, then timestamp), into
files of about ``target_file_size_bytes``, once at least ``min_files`` of them are there. Today's
partition is included: only the last window's files stay small. The new small files are merged
with a larger settled file only once they add up to its size (or when more than ``min_files - 1``
would stay), so a pass does not rewrite the whole partition (:func:`merge_group`). A partition
thus holds a few target-size files, at most ``min_files`` smaller settled ones, and the last
window's files.

The rewrite is made to coexist with commits a second apart: the rows are read, sorted and
written as new Parquet files once, outside any commit; then each commit attempt (through the
commit layer, :func:`k2_resources.catalog.commit.with_commit_retries`) only reloads the table,
checks every input file is still live, and swaps the files in one overwrite snapshot. An attempt
that loses to a follower's commit costs a metadata commit, not the rewrite, so the follower is
not slowed by more than a commit and compaction is not starved. The overwrite changes no rows
and no table property: the committed offsets (``k2.kafka.committed.*``, a table property) stay
exactly as the follower left them, so a re-run of any committed range still writes nothing.
New files that never got committed (every attempt lost, or the process died) are deleted here or
by the orphan sweep after its safety window.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile, ManifestContent, ManifestEntryStatus
from pyiceberg.table import FileScanTask, Table, TableProperties

from k2_resources.catalog.commit import with_commit_retries
from k2_resources.catalog.errors import CommitConflictError, CommitRetry
from k2_resources.catalog.pyiceberg_adapter import dataframe_to_data_files, transaction_of
from k2_resources.errors import K2Error
from k2_resources.operations.commit_window import CommitWindow
from k2_resources.operations.snapshot_policy import ReferenceCache

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MAINTENANCE_KEY = "k2.maintenance"
COMMITTED_PREFIX = "k2.kafka.committed."


@dataclass(frozen=True)
class CompactionSettings:
    settle_window_s: float = 120.0
    target_file_size_bytes: int = 128 * MIB
    small_file_bytes: int = 96 * MIB
    min_files: int = 4
    max_rewrite_bytes: int = 512 * MIB
    max_attempts: int = 30


@dataclass(frozen=True)
class LiveFile:
    data_file: DataFile
    sequence_number: int
    spec_id: int
    partition: tuple

    @property
    def size(self) -> int:
        return self.data_file.file_size_in_bytes


@dataclass
class PartitionRewrite:
    """One partition's rewrite: what it read and what it wrote."""

    partition: str
    files_before: int
    files_after: int
    records: int
    bytes_before: int
    bytes_after: int


@dataclass
class CompactionOutcome:
    rewrites: list[PartitionRewrite] = field(default_factory=list)
    commits: int = 0
    conflicts: int = 0
    abandoned: int = 0  # rewrites given up (input gone, or every attempt lost); their files deleted
    seconds: float = 0.0

    @property
    def files_removed(self) -> int:
        return sum(r.files_before for r in self.rewrites)

    @property
    def files_added(self) -> int:
        return sum(r.files_after for r in self.rewrites)

    def as_metadata(self) -> dict[str, object]:
        return {
            "partitions_rewritten": len(self.rewrites),
            "files_removed": self.files_removed,
            "files_added": self.files_added,
            "records_rewritten": sum(r.records for r in self.rewrites),
            "bytes_before": sum(r.bytes_before for r in self.rewrites),
            "bytes_after": sum(r.bytes_after for r in self.rewrites),
            "commits": self.commits,
            "conflicts": self.conflicts,
            "abandoned": self.abandoned,
            "seconds": round(self.seconds, 3),
            "partitions": [r.partition for r in self.rewrites][:20],
        }


def live_files(table: Table, cache: ReferenceCache) -> list[LiveFile]:
    """The data files of the current snapshot with their data sequence numbers."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return []
    files = []
    for manifest in cache.manifests(table, snapshot):
        if manifest.content != ManifestContent.DATA:
            continue
        for entry in cache.entries(table, manifest):
            if entry.status == ManifestEntryStatus.DELETED:
                continue
            data_file = entry.data_file
            values = tuple(data_file.partition[i] for i in range(len(data_file.partition)))
            files.append(LiveFile(data_file, entry.sequence_number or 0, data_file.spec_id, values))
    return files


def settled_sequence(table: Table, settle_window_s: float, now_ms: int) -> int:
    """The highest data sequence number whose files are settled (committed before the window)."""
    cutoff = now_ms - int(settle_window_s * 1000)
    snapshots = table.snapshots()
    before = [s.sequence_number or 0 for s in snapshots if s.timestamp_ms <= cutoff]
    if before:
        return max(before)
    # Every kept snapshot is newer than the window: files of expired ones are older than them.
    return min((s.sequence_number or 0 for s in snapshots), default=0) - 1


def plan(table: Table, files: list[LiveFile], settings: CompactionSettings, now_ms: int) -> list[list[LiveFile]]:
    """Groups of settled small files to rewrite, one group per partition, within the byte budget."""
    settled = settled_sequence(table, settings.settle_window_s, now_ms)
    groups: dict[tuple, list[LiveFile]] = {}
    for live in files:
        settled_small = live.sequence_number <= settled and live.size < settings.small_file_bytes
        if live.spec_id == table.spec().spec_id and settled_small:
            groups.setdefault((live.spec_id, live.partition), []).append(live)
    chosen, budget = [], settings.max_rewrite_bytes
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k[1])):
        group = groups[key]
        if len(group) < settings.min_files:
            continue
        take = merge_group(group, settings.min_files - 1, budget)
        if len(take) < 2:
            continue
        chosen.append(take)
        budget -= sum(live.size for live in take)
        if budget <= 0:
            break
    return chosen


def merge_group(group: list[LiveFile], keep_at_most: int, budget: int) -> list[LiveFile]:
    """The files of one partition to merge: the smallest first, and a larger one only when it is no
    larger than what is merged so far, or when more than ``keep_at_most`` would stay unmerged.

    Merging every settled file each pass would rewrite the whole partition's data every few seconds,
    a cost that grows all day; this way the new small files are merged, a larger file joins them
    only once they have caught up with it or the count demands it (over four hours of 7.5 s
    passes, each byte is rewritten about 36 times instead of about 1,000;
    tests/unit/test_compaction_merge_policy.py), and a partition keeps at most ``keep_at_most``
    settled files besides the merge's output."""
    ordered = sorted(group, key=lambda live: (live.size, live.sequence_number))
    take: list[LiveFile] = []
    total = 0
    for index, live in enumerate(ordered):
        left = len(ordered) - index  # files that stay unmerged if the merge stops before this one
        if len(take) >= 2 and live.size > total and left <= keep_at_most:
            break
        if len(take) >= 2 and total + live.size > budget:
            break
        take.append(live)
        total += live.size
    return take


def _label(table: Table, live: LiveFile) -> str:
    return table.specs()[live.spec_id].partition_to_path(live.data_file.partition, table.schema()) or "unpartitioned"


def _sort_keys(table: Table) -> list[tuple[str, str]]:
    order = table.sort_order()
    keys = []
    for sort_field in order.fields:
        name = table.schema().find_column_name(sort_field.source_id)
        if name is None:
            continue
        keys.append((name, "ascending" if sort_field.direction.value == "asc" else "descending"))
    return keys or [("symbol", "ascending"), ("timestamp", "ascending")]


def write_packed(table: Table, group: list[LiveFile], target_file_size_bytes: int) -> tuple[pa.Table, list[DataFile]]:
    """The rows of ``group`` sorted as the table is, written as consecutive files of about the target
    on-disk size (cut here by the input's bytes per row; pyiceberg's own split is turned off)."""
    metadata = table.metadata
    rows = ArrowScan(metadata, table.io, table.schema(), AlwaysTrue()).to_table(
        [FileScanTask(live.data_file) for live in group]
    )
    expected = sum(live.data_file.record_count for live in group)
    if rows.num_rows != expected:
        raise K2Error(
            f"compaction of {table.name()} read {rows.num_rows} rows from files that list {expected}; "
            "nothing was changed: inspect the files before compacting again"
        )
    rows = rows.sort_by(_sort_keys(table))
    bytes_per_row = max(sum(live.size for live in group) / max(rows.num_rows, 1), 1.0)
    rows_per_file = max(1, int(target_file_size_bytes / bytes_per_row))
    unsplit = metadata.model_copy(
        update={"properties": {**metadata.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES: str(2**62)}}
    )
    write_uuid, counter = uuid.uuid4(), itertools.count(0)
    files: list[DataFile] = []
    for offset in range(0, rows.num_rows, rows_per_file):
        files.extend(dataframe_to_data_files(unsplit, rows.slice(offset, rows_per_file), table.io, write_uuid, counter))
    return rows, files


def _swap(
    load: Callable[[], Table],
    group: list[LiveFile],
    new_files: list[DataFile],
    cache: ReferenceCache,
    settings: CompactionSettings,
    on_conflict: Callable[[BaseException], None],
    window: CommitWindow | None,
) -> bool:
    """Commit the swap of ``group`` for ``new_files``; False when an input file is no longer live."""
    wanted = {live.data_file.file_path for live in group}

    def attempt(_: int) -> bool:
        table = load()
        current = {live.data_file.file_path: live for live in live_files(table, cache)}
        if not wanted <= current.keys():
            return False  # another compaction (or a partition replace) took some of them: nothing to do
        summary = {
            MAINTENANCE_KEY: "compaction",
            f"{MAINTENANCE_KEY}.files-rewritten": str(len(group)),
            f"{MAINTENANCE_KEY}.files-written": str(len(new_files)),
            **{k: v for k, v in table.properties.items() if k.startswith(COMMITTED_PREFIX)},
        }
        with transaction_of(table) as transaction:
            with transaction.update_snapshot(snapshot_properties=summary).overwrite() as overwrite:
                for path in sorted(wanted):
                    overwrite.delete_data_file(current[path].data_file)
                for data_file in new_files:
                    overwrite.append_data_file(data_file)
        return True

    def commit() -> bool:
        return with_commit_retries(
            attempt,
            f"compaction of {group[0].data_file.file_path.rsplit('/', 2)[0]}",
            max_attempts=settings.max_attempts,
            gave_up="the next maintenance pass tries again",
            on_retry=on_conflict,
        )

    if window is None:
        return commit()
    with window.exclusive():
        return commit()


def compact_settled(
    load: Callable[[], Table],
    settings: CompactionSettings,
    cache: ReferenceCache,
    now_ms: int | None = None,
    before_swap: Callable[[], None] | None = None,
    window: CommitWindow | None = None,
) -> CompactionOutcome:
    """One compaction pass over the table ``load`` returns (module docstring)."""
    started = time.perf_counter()
    outcome = CompactionOutcome()
    table = load()
    moment = now_ms if now_ms is not None else int(time.time() * 1000)

    def count(exc: BaseException) -> None:
        if not isinstance(exc, CommitRetry):
            outcome.conflicts += 1

    for group in plan(table, live_files(table, cache), settings, moment):
        rows, new_files = write_packed(table, group, settings.target_file_size_bytes)
        if before_swap is not None:
            before_swap()
        try:
            swapped = _swap(load, group, new_files, cache, settings, count, window)
        except CommitConflictError:
            swapped = False
        if not swapped:
            outcome.abandoned += 1
            for data_file in new_files:
                _quiet_delete(table, data_file.file_path)
            continue
        outcome.commits += 1
        outcome.rewrites.append(
            PartitionRewrite(
                _label(table, group[0]),
                len(group),
                len(new_files),
                rows.num_rows,
                sum(live.size for live in group),
                sum(f.file_size_in_bytes for f in new_files),
            )
        )
    outcome.seconds = time.perf_counter() - started
    return outcome


def _quiet_delete(table: Table, path: str) -> None:
    try:
        table.io.delete(path)
    except OSError as exc:
        log.warning("could not delete the unused compaction output %s: %s (the orphan sweep will)", path, exc)
