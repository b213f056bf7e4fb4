"""Which snapshots of a streamed table K2 keeps, and removing the rest with the files only they used.

A table committed to every second gains a snapshot a second per partition. Every snapshot is an
entry in the metadata file that each commit rewrites, so keeping them all makes every commit
slower and the metadata folder grow with the square of the commits. K2 keeps a readable policy:

- **exact window**: every snapshot of the last ``exact_window_s`` (at most ``max_exact_snapshots``
  of them), so time travel over the last minutes is exact, commit by commit;
- **hourly points**: older than that and up to ``hourly_for_s`` back, the last snapshot of each
  hour (the state at the end of that hour);
- **daily points**: older than that and up to ``retention_s`` back, the last snapshot of each day;
- nothing older than ``retention_s``; the current snapshot and branch or tag heads are always kept.

``as_of`` a time between two kept points reads the point before it (Iceberg's own rule: the
snapshot current at that time, among those kept). ``as_of`` before the oldest kept point raises
:class:`TimeTravelExpiredError` naming the setting (:func:`snapshot_as_of`).

Expiry (pyiceberg's ``ExpireSnapshots``) only edits metadata; the manifest lists, manifests and
data files that only expired snapshots used are then deleted here (:func:`expire_by_policy`),
computed from what the live snapshots still reference, so no file a kept snapshot reads goes.
Committed Kafka offsets, pending ranges and retention losses live in table properties, which
expiry does not touch (k2_resources/sink/offsets.py): exactly-once does not depend on snapshots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pyiceberg.manifest import ManifestEntry, ManifestEntryStatus, ManifestFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from k2_resources.catalog.commit import with_commit_retries
from k2_resources.operations.errors import TimeTravelExpiredError

log = logging.getLogger(__name__)

POLICY_PROPERTY = "k2.maintenance.snapshot-policy"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class SnapshotPolicy:
    """What time travel keeps (module docstring); environment names in :data:`POLICY_ENV`."""

    exact_window_s: float = 300.0
    max_exact_snapshots: int = 900
    hourly_for_s: float = 24 * 3600.0
    retention_s: float = 7 * 24 * 3600.0

    def describe(self) -> str:
        return (
            f"every snapshot of the last {self.exact_window_s / 60:g} min (at most {self.max_exact_snapshots}), "
            f"hourly points for {self.hourly_for_s / 3600:g} h, daily points up to {self.retention_s / 86400:g} days"
        )

    def to_property(self) -> str:
        return json.dumps(
            {
                "exact_window_s": self.exact_window_s,
                "max_exact_snapshots": self.max_exact_snapshots,
                "hourly_for_s": self.hourly_for_s,
                "retention_s": self.retention_s,
            },
            sort_keys=True,
        )

    @classmethod
    def from_property(cls, raw: str | None) -> SnapshotPolicy | None:
        if not raw:
            return None
        data = json.loads(raw)
        return cls(
            float(data["exact_window_s"]),
            int(data["max_exact_snapshots"]),
            float(data["hourly_for_s"]),
            float(data["retention_s"]),
        )


# The environment variables that set the policy (k2_resources/operations/continuous_maintenance.py reads them).
POLICY_ENV = {
    "exact_window_s": "K2_SNAPSHOT_EXACT_MINUTES",
    "max_exact_snapshots": "K2_SNAPSHOT_EXACT_MAX",
    "hourly_for_s": "K2_SNAPSHOT_HOURLY_HOURS",
    "retention_s": "K2_SNAPSHOT_RETENTION_HOURS",
}


def kept_snapshot_ids(
    snapshots: Iterable[Snapshot], protected: set[int], policy: SnapshotPolicy, now_ms: int
) -> set[int]:
    """The ids the policy keeps among ``snapshots`` (``protected``: current, branch and tag heads)."""
    ordered = sorted(snapshots, key=lambda s: (s.timestamp_ms, s.sequence_number or 0))
    keep = {s.snapshot_id for s in ordered if s.snapshot_id in protected}
    exact_from = now_ms - int(policy.exact_window_s * 1000)
    hourly_from = now_ms - int(policy.hourly_for_s * 1000)
    oldest = now_ms - int(policy.retention_s * 1000)
    recent = [s for s in ordered if s.timestamp_ms >= exact_from]
    keep.update(s.snapshot_id for s in recent[-policy.max_exact_snapshots :])
    last_of_bucket: dict[tuple[str, int], int] = {}
    for snapshot in ordered:
        if snapshot.timestamp_ms >= exact_from or snapshot.timestamp_ms < oldest:
            continue
        if snapshot.timestamp_ms >= hourly_from:
            bucket = ("hour", snapshot.timestamp_ms // HOUR_MS)
        else:
            bucket = ("day", snapshot.timestamp_ms // DAY_MS)
        last_of_bucket[bucket] = snapshot.snapshot_id  # ordered by time: the last one wins
    keep.update(last_of_bucket.values())
    return keep


def protected_ids(table: Table) -> set[int]:
    current = table.current_snapshot()
    ids = {ref.snapshot_id for ref in table.metadata.refs.values()}
    if current is not None:
        ids.add(current.snapshot_id)
    return ids


# -- what live snapshots reference --------------------------------------------------------------


@dataclass
class ReferenceCache:
    """Manifest lists and manifests read once per process (both are immutable once written)."""

    manifest_lists: dict[str, list[ManifestFile]] = field(default_factory=dict)
    manifest_files: dict[str, tuple[frozenset[str], frozenset[str]]] = field(default_factory=dict)
    manifest_entries: dict[str, list[ManifestEntry]] = field(default_factory=dict)

    def manifests(self, table: Table, snapshot: Snapshot) -> list[ManifestFile]:
        if snapshot.manifest_list not in self.manifest_lists:
            self.manifest_lists[snapshot.manifest_list] = list(snapshot.manifests(table.io))
        return self.manifest_lists[snapshot.manifest_list]

    def entries(self, table: Table, manifest: ManifestFile) -> list[ManifestEntry]:
        """Every entry of one manifest, deleted ones included."""
        if manifest.manifest_path not in self.manifest_entries:
            self.manifest_entries[manifest.manifest_path] = list(
                manifest.fetch_manifest_entry(table.io, discard_deleted=False)
            )
        return self.manifest_entries[manifest.manifest_path]

    def data_files(self, table: Table, manifest: ManifestFile) -> tuple[frozenset[str], frozenset[str]]:
        """(live data and delete files, every file named) of one manifest."""
        path = manifest.manifest_path
        if path not in self.manifest_files:
            live, named = set(), set()
            for entry in self.entries(table, manifest):
                named.add(entry.data_file.file_path)
                if entry.status != ManifestEntryStatus.DELETED:
                    live.add(entry.data_file.file_path)
            self.manifest_files[path] = (frozenset(live), frozenset(named))
        return self.manifest_files[path]

    def forget(self, manifest_lists: Iterable[str], manifests: Iterable[str]) -> None:
        for path in manifest_lists:
            self.manifest_lists.pop(path, None)
        for path in manifests:
            self.manifest_files.pop(path, None)
            self.manifest_entries.pop(path, None)


def referenced(
    table: Table, snapshots: Iterable[Snapshot], cache: ReferenceCache
) -> tuple[set[str], set[str], set[str]]:
    """(manifest lists, manifests, live data files) that ``snapshots`` reference."""
    lists: set[str] = set()
    manifests: set[str] = set()
    data: set[str] = set()
    for snapshot in snapshots:
        lists.add(snapshot.manifest_list)
        for manifest in cache.manifests(table, snapshot):
            if manifest.manifest_path not in manifests:
                manifests.add(manifest.manifest_path)
                data.update(cache.data_files(table, manifest)[0])
    return lists, manifests, data


# -- expiry ------------------------------------------------------------------------------------


@dataclass
class ExpiryOutcome:
    """One expiry pass: snapshots before and after, and the files removed with the expired ones."""

    snapshots_before: int = 0
    snapshots_after: int = 0
    expired: int = 0
    manifest_lists_deleted: int = 0
    manifests_deleted: int = 0
    data_files_deleted: int = 0
    conflicts: int = 0
    oldest_kept_ms: int | None = None

    def as_metadata(self) -> dict[str, int | None]:
        return dict(vars(self))


def expire_by_policy(
    load: Callable[[], Table],
    policy: SnapshotPolicy,
    cache: ReferenceCache,
    now: datetime | None = None,
    delete: Callable[[Table, str], None] | None = None,
) -> ExpiryOutcome:
    """Expire the snapshots ``policy`` does not keep, in one commit (retried by the commit layer on
    a conflict, re-deciding from the fresh table), then delete the files only they referenced."""
    moment = now or datetime.now(UTC)
    now_ms = int(moment.timestamp() * 1000)
    outcome = ExpiryOutcome()
    chosen: list[Snapshot] = []

    def attempt(_: int) -> Table:
        table = load()
        snapshots = table.snapshots()
        keep = kept_snapshot_ids(snapshots, protected_ids(table), policy, now_ms)
        chosen[:] = [s for s in snapshots if s.snapshot_id not in keep]
        outcome.snapshots_before = len(snapshots)
        if chosen:
            table.maintenance.expire_snapshots().by_ids([s.snapshot_id for s in chosen]).commit()
        return table

    def count(_: BaseException) -> None:
        outcome.conflicts += 1

    table = with_commit_retries(attempt, "snapshot expiry", gave_up="the next pass tries again", on_retry=count)
    outcome.expired = len(chosen)
    live = table.snapshots()
    outcome.snapshots_after = len(live)
    outcome.oldest_kept_ms = min((s.timestamp_ms for s in live), default=None)
    if chosen:
        _delete_unreferenced(table, chosen, live, cache, outcome, delete or _delete_file)
    return outcome


def _delete_file(table: Table, path: str) -> None:
    try:
        table.io.delete(path)
    except FileNotFoundError:
        pass


def _delete_unreferenced(
    table: Table,
    expired: list[Snapshot],
    live: list[Snapshot],
    cache: ReferenceCache,
    outcome: ExpiryOutcome,
    delete: Callable[[Table, str], None],
) -> None:
    """Delete what ``expired`` referenced and no snapshot of ``live`` does.

    ``live`` is the table right after the expiry commit. A commit made since is based on the current
    snapshot (Iceberg rejects one based on anything older), so it references only files the current
    snapshot references, or new ones: neither is deleted here.
    """
    live_lists, live_manifests, live_data = referenced(table, live, cache)
    gone_lists = {s.manifest_list for s in expired} - live_lists
    gone_manifests: set[str] = set()
    gone_data: set[str] = set()
    for snapshot in expired:
        for manifest in cache.manifests(table, snapshot):
            if manifest.manifest_path in live_manifests or manifest.manifest_path in gone_manifests:
                continue
            gone_manifests.add(manifest.manifest_path)
            gone_data.update(cache.data_files(table, manifest)[1] - live_data)
    for path in sorted(gone_data):
        delete(table, path)
    for path in sorted(gone_manifests):
        delete(table, path)
    for path in sorted(gone_lists):
        delete(table, path)
    cache.forget(gone_lists, gone_manifests)
    outcome.manifest_lists_deleted = len(gone_lists)
    outcome.manifests_deleted = len(gone_manifests)
    outcome.data_files_deleted = len(gone_data)


# -- time travel -------------------------------------------------------------------------------


def snapshot_as_of(table: Table, moment: datetime) -> Snapshot:
    """The snapshot current at ``moment`` among those kept; :class:`TimeTravelExpiredError` naming
    the retention setting when ``moment`` is before the oldest kept one."""
    snapshot = table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
    if snapshot is not None:
        return snapshot
    raise time_travel_error(table, moment)


def time_travel_error(table: Table, moment: datetime | int) -> TimeTravelExpiredError:
    """The one error for time travel to a snapshot or time the table no longer keeps."""
    oldest = min((s.timestamp_ms for s in table.snapshots()), default=None)
    oldest_text = (
        datetime.fromtimestamp(oldest / 1000, UTC).isoformat(timespec="seconds") if oldest is not None else "none"
    )
    asked = moment.isoformat() if isinstance(moment, datetime) else f"snapshot {moment}"
    policy = SnapshotPolicy.from_property(table.properties.get(POLICY_PROPERTY))
    kept = policy.describe() if policy else "every snapshot (no expiry policy recorded on this table)"
    return TimeTravelExpiredError(
        f"{table.name()} keeps no snapshot for {asked}: the oldest kept is {oldest_text}. Time travel keeps "
        f"{kept}; to keep more history raise {POLICY_ENV['retention_s']} (and {POLICY_ENV['hourly_for_s']} / "
        f"{POLICY_ENV['exact_window_s']} for finer points) where K2 streams, or pick a later time"
    )
