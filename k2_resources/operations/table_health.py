"""How healthy a streamed Iceberg table is, measured from its metadata, with documented bounds.

What makes a table committed to every second slow is countable: manifests in the current snapshot
(planning reads each one), snapshots and the size of the metadata file (every commit rewrites it),
data files per partition (every read opens them), the metadata folder (old metadata files, manifest
lists and manifests left behind). :func:`measure` counts them; :data:`BOUNDS` says when each is a
WARN and when an ERROR; :func:`evaluate` compares. The ``table_health`` asset checks, the
exporter's gauges and the soak benchmark all use these, so the numbers an operator sees are the
numbers the bounds were set on. docs/operations.md lists the bounds and what to do past them.

Files per partition count *settled* files only (committed before the settle window): the files
of the last window are small by design until compaction takes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.table import Table

from k2_resources.operations.settled_compaction import live_files, settled_sequence
from k2_resources.operations.snapshot_policy import ReferenceCache

OK, WARN, ERROR = "OK", "WARN", "ERROR"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Bound:
    """A measure's WARN and ERROR thresholds (a value above the threshold reaches that severity)."""

    measure: str
    warn: float
    error: float
    meaning: str


BOUNDS: tuple[Bound, ...] = (
    Bound("manifests", 32, 128, "manifests in the current snapshot: each scan plan reads every one"),
    Bound("max_settled_files_per_partition", 8, 32, "settled data files in the fullest partition"),
    Bound("metadata_file_bytes", 1 * MIB, 8 * MIB, "the current metadata file, rewritten by every commit"),
    Bound("snapshots", 1_500, 10_000, "snapshots kept (each an entry in the metadata file)"),
    Bound(
        "metadata_folder_ratio",
        0.05,
        0.5,
        "metadata folder bytes over data bytes, when the folder is above 64 MiB (below: always OK)",
    ),
)
METADATA_FOLDER_FLOOR = 64 * MIB


@dataclass
class TableHealth:
    """One measurement of a table (see the module docstring)."""

    table: str
    snapshots: int = 0
    manifests: int = 0
    data_files: int = 0
    data_bytes: int = 0
    partitions: int = 0
    max_settled_files_per_partition: int = 0
    max_files_per_partition: int = 0
    unsettled_files: int = 0
    metadata_file_bytes: int = 0
    metadata_folder_bytes: int = 0
    metadata_folder_files: int = 0
    oldest_snapshot_ms: int | None = None
    measure_seconds: float = 0.0
    files_per_partition: dict[str, int] = field(default_factory=dict)

    @property
    def metadata_folder_ratio(self) -> float:
        if self.metadata_folder_bytes <= METADATA_FOLDER_FLOOR:
            return 0.0
        return self.metadata_folder_bytes / max(self.data_bytes, 1)

    @property
    def oldest_time_travel_age_s(self) -> float | None:
        if self.oldest_snapshot_ms is None:
            return None
        return max(0.0, time.time() - self.oldest_snapshot_ms / 1000)

    def value(self, measure: str) -> float:
        return float(getattr(self, measure))

    def as_metadata(self) -> dict[str, float | int | None]:
        return {
            "snapshots": self.snapshots,
            "manifests": self.manifests,
            "data_files": self.data_files,
            "data_bytes": self.data_bytes,
            "partitions": self.partitions,
            "max_settled_files_per_partition": self.max_settled_files_per_partition,
            "max_files_per_partition": self.max_files_per_partition,
            "unsettled_files": self.unsettled_files,
            "metadata_file_bytes": self.metadata_file_bytes,
            "metadata_folder_bytes": self.metadata_folder_bytes,
            "metadata_folder_files": self.metadata_folder_files,
            "oldest_time_travel_age_s": (
                round(self.oldest_time_travel_age_s, 1) if self.oldest_time_travel_age_s is not None else None
            ),
        }


def table_filesystem(table: Table, location: str) -> tuple[pafs.FileSystem, str]:
    """The file system holding ``location`` as the table's FileIO is configured (an object store's
    endpoint and credentials included), and the path in it; a listing names files by that path."""
    io = table.io
    if isinstance(io, PyArrowFileIO):
        scheme, netloc, path = PyArrowFileIO.parse_location(location, io.properties)
        return io.fs_by_scheme(scheme, netloc), path
    return pafs.FileSystem.from_uri(location)


def list_files(table: Table, folder: str) -> list[pafs.FileInfo]:
    """Every file under ``folder`` (a location under the table's)."""
    filesystem, root = table_filesystem(table, folder)
    selector = pafs.FileSelector(root.rstrip("/"), recursive=True, allow_not_found=True)
    return [info for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File]


def measure(
    table: Table,
    settle_window_s: float = 120.0,
    cache: ReferenceCache | None = None,
    with_folder: bool = True,
    now_ms: int | None = None,
) -> TableHealth:
    """Count what makes the table slow (module docstring); ``with_folder`` lists the metadata folder."""
    started = time.perf_counter()
    cache = cache or ReferenceCache()
    health = TableHealth(table=".".join(table.name()[-2:]))
    snapshots = table.snapshots()
    health.snapshots = len(snapshots)
    health.oldest_snapshot_ms = min((s.timestamp_ms for s in snapshots), default=None)
    health.metadata_file_bytes = len(table.io.new_input(table.metadata_location))
    current = table.current_snapshot()
    if current is not None:
        health.manifests = len(cache.manifests(table, current))
        files = live_files(table, cache)
        settled = settled_sequence(table, settle_window_s, now_ms if now_ms is not None else int(time.time() * 1000))
        per_partition: dict[tuple, list[int]] = {}
        for live in files:
            counts = per_partition.setdefault((live.spec_id, live.partition), [0, 0])
            counts[0] += 1
            counts[1] += 1 if live.sequence_number <= settled else 0
        health.data_files = len(files)
        health.data_bytes = sum(live.size for live in files)
        health.partitions = len(per_partition)
        health.max_files_per_partition = max((c[0] for c in per_partition.values()), default=0)
        health.max_settled_files_per_partition = max((c[1] for c in per_partition.values()), default=0)
        health.unsettled_files = sum(c[0] - c[1] for c in per_partition.values())
        health.files_per_partition = {
            "/".join(str(v) for v in key[1]): counts[0] for key, counts in sorted(per_partition.items(), key=str)
        }
    if with_folder:
        listed = list_files(table, f"{table.location().rstrip('/')}/metadata")
        health.metadata_folder_bytes = sum(int(info.size or 0) for info in listed)
        health.metadata_folder_files = len(listed)
    health.measure_seconds = time.perf_counter() - started
    return health


@dataclass(frozen=True)
class Finding:
    measure: str
    value: float
    severity: str
    bound: Bound


def evaluate(health: TableHealth, bounds: tuple[Bound, ...] = BOUNDS) -> tuple[str, list[Finding]]:
    """The worst severity over ``bounds`` and one finding per measure."""
    findings = []
    for bound in bounds:
        value = health.value(bound.measure)
        severity = ERROR if value > bound.error else WARN if value > bound.warn else OK
        findings.append(Finding(bound.measure, value, severity, bound))
    worst = (
        ERROR
        if any(f.severity == ERROR for f in findings)
        else WARN
        if any(f.severity == WARN for f in findings)
        else OK
    )
    return worst, findings


def describe(findings: list[Finding]) -> str:
    """The findings past a bound, as one line an operator can act on."""
    past = [f for f in findings if f.severity != OK]
    if not past:
        return "within every bound"
    parts = []
    for f in past:
        limit = f.bound.warn if f.severity == WARN else f.bound.error
        parts.append(f"{f.measure} {f.value:g} above its {f.severity} bound {limit:g} ({f.bound.meaning})")
    return "; ".join(parts)
