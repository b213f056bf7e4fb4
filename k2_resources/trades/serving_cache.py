"""The Iceberg side of the serving path: plans per manifest, one sorted frame per snapshot and filter.

A table a follower commits to every second gains a manifest and a data file per commit, so a
query that plans every snapshot from scratch reads every manifest again, and one that keeps each
data file's rows apart slices hundreds of files. Both are kept incrementally instead:

- :class:`ManifestPlans`: a manifest never changes, so the data files it contributes to a filter
  are kept per (manifest, filter); a new snapshot reads only its new manifests;
- :class:`SnapshotRows`: per (symbols, exchange, hour-widened window) the rows of the snapshot's
  planned files as ONE frame sorted by (timestamp, message_id). The next snapshot of an
  append-only table reuses it and adds the new files' rows; any other change (compaction,
  expiry) rebuilds it from the per-file cache. A query slices it by binary search.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain

import numpy as np
import polars as pl
from pyiceberg.manifest import DataFileContent, ManifestContent
from pyiceberg.table import ManifestGroupPlanner, Table

from k2_resources.trades.iceberg_read import RowFilter

MAX_MANIFEST_PLANS = 50_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNPLANNED = ("<not planned yet>",)
_MICROSECOND = timedelta(microseconds=1)


class ManifestPlans:
    """Data files of a snapshot matching a filter, planned manifest by manifest (cached per manifest)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, tuple[str, ...] | None] = OrderedDict()
        self._lock = threading.Lock()

    def files(self, table: Table, snapshot_id: int, row_filter: RowFilter) -> tuple[str, ...] | None:
        """The snapshot's data files that may hold rows of the filter; None when delete files apply."""
        snapshot = table.snapshot_by_id(snapshot_id)
        if snapshot is None:
            return ()
        manifests = snapshot.manifests(table.io)
        if any(m.content != ManifestContent.DATA for m in manifests):
            return None
        found: list[tuple[str, ...]] = []
        todo = []
        with self._lock:
            for manifest in manifests:
                cached = self._plans.get((manifest.manifest_path, row_filter), _UNPLANNED)
                if cached is _UNPLANNED:
                    todo.append(manifest)
                elif cached is None:
                    return None
                else:
                    found.append(cached)
        if todo:
            planner = ManifestGroupPlanner(table.metadata, table.io, row_filter.iceberg())
            for manifest in todo:
                entries = list(chain.from_iterable(planner.plan_manifest_entries([manifest])))
                plan: tuple[str, ...] | None = tuple(e.data_file.file_path for e in entries)
                if any(e.data_file.content != DataFileContent.DATA for e in entries):
                    plan = None
                with self._lock:
                    self._plans[(manifest.manifest_path, row_filter)] = plan
                    while len(self._plans) > MAX_MANIFEST_PLANS:
                        self._plans.popitem(last=False)
                if plan is None:
                    return None
                found.append(plan)
        return tuple(sorted(set(chain.from_iterable(found))))


@dataclass(frozen=True)
class SortedRows:
    """Rows sorted by (timestamp, message_id) and their timestamps as int64 microseconds."""

    snapshot_id: int | None
    files: frozenset[str]
    rows: pl.DataFrame
    micros: np.ndarray

    @classmethod
    def of(cls, snapshot_id: int | None, files: frozenset[str], rows: pl.DataFrame) -> SortedRows:
        rows = rows.sort(["timestamp", "message_id"])
        micros = rows["timestamp"].dt.epoch("us").to_numpy() if rows.height else np.empty(0, dtype=np.int64)
        return cls(snapshot_id, files, rows, micros)

    def extended(self, snapshot_id: int | None, files: frozenset[str], added: list[pl.DataFrame]) -> SortedRows:
        """These rows and ``added`` (new files' rows) for a later snapshot. A stream appends newer
        trades, so the added rows usually sort after these: then they are sorted alone and appended."""
        added = [frame for frame in added if frame.height]
        if not added:
            return SortedRows(snapshot_id, files, self.rows, self.micros)
        new = pl.concat(added, how="vertical_relaxed").sort(["timestamp", "message_id"])
        if self.rows.height == 0:
            return SortedRows.of(snapshot_id, files, new)
        last, first = self.rows.row(self.rows.height - 1, named=True), new.row(0, named=True)
        if (first["timestamp"], first["message_id"]) < (last["timestamp"], last["message_id"]):
            return SortedRows.of(snapshot_id, files, pl.concat([self.rows, new], how="vertical_relaxed"))
        rows = pl.concat([self.rows, new], how="vertical_relaxed", rechunk=False)
        micros = np.concatenate([self.micros, new["timestamp"].dt.epoch("us").to_numpy()])
        return SortedRows(snapshot_id, files, rows, micros)

    def window(self, start_us: int | None, end_us: int | None, head: int | None = None) -> pl.DataFrame:
        """Rows with start <= timestamp < end (the first ``head`` of them when given)."""
        low = 0 if start_us is None else int(np.searchsorted(self.micros, start_us, side="left"))
        high = len(self.micros) if end_us is None else int(np.searchsorted(self.micros, end_us, side="left"))
        if head is not None:
            high = min(high, low + head)
        return self.rows.slice(low, max(0, high - low))


class SnapshotRows:
    """The :class:`SortedRows` of the last two snapshots per (table, symbols, exchange, widened window),
    moved from snapshot to snapshot. Two, because queries keep reading a snapshot while the next one is
    prepared beside them (:mod:`k2_resources.trades.serving_table`): neither evicts the other."""

    def __init__(self, max_keys: int = 256, versions: int = 2) -> None:
        self.max_keys = max_keys
        self.versions = versions
        self._rows: OrderedDict[tuple, tuple[SortedRows, ...]] = OrderedDict()  # oldest version first
        self._locks: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def _known(self, key: tuple, snapshot_id: int | None) -> tuple[SortedRows | None, tuple[SortedRows, ...]]:
        """(the rows of ``snapshot_id`` if kept, every kept version); the caller holds the lock."""
        kept = self._rows.get(key, ())
        return next((rows for rows in kept if rows.snapshot_id == snapshot_id), None), kept

    def rows(
        self,
        key: tuple,
        snapshot_id: int | None,
        files: tuple[str, ...],
        read: Callable[[str], pl.DataFrame],
        empty: pl.DataFrame,
    ) -> SortedRows:
        """The rows of ``files`` for ``key``; ``read(path)`` gives one file's rows of the key's filter."""
        with self._lock:
            found, _ = self._known(key, snapshot_id)
            if found is not None:
                self._rows.move_to_end(key)
                return found
            build_lock = self._locks.setdefault(key, threading.Lock())
        with build_lock:  # one thread builds the next snapshot's rows; the others then find them
            with self._lock:
                found, kept = self._known(key, snapshot_id)
            if found is not None:
                return found
            wanted = frozenset(files)
            # the newest kept version whose files are all still there grows by the new files' rows
            base = next((rows for rows in reversed(kept) if rows.files <= wanted), None)
            if base is not None:
                built = base.extended(snapshot_id, wanted, [read(path) for path in sorted(wanted - base.files)])
            else:
                parts = [frame for frame in (read(path) for path in files) if frame.height]
                frame = pl.concat(parts, how="vertical_relaxed") if parts else empty
                built = SortedRows.of(snapshot_id, wanted, frame)
            with self._lock:
                self._rows[key] = (*self._rows.get(key, ())[-(self.versions - 1) :], built)
                self._rows.move_to_end(key)
                while len(self._rows) > self.max_keys:
                    dropped, _ = self._rows.popitem(last=False)
                    self._locks.pop(dropped, None)
            return built


def micros_of(moment: datetime | None) -> int | None:
    """An aware datetime as microseconds since the epoch (None stays None)."""
    return None if moment is None else (moment - _EPOCH) // _MICROSECOND
