"""Which version of market.trades the serving path reads: the next one is prepared off the request path.

A follower commits every second and maintenance compacts every few seconds, so a long-lived reader
meets a new snapshot about once a second, and the first query of each one planned its new manifests
and read its new files (or, after a compaction, re-sorted the whole filter's rows) while every query
behind it waited: that wait was the API's p99. Two kinds of change are invisible to a query, though:

- a stream append adds exactly the Kafka offsets of its range, all above the committed offsets of
  any earlier snapshot, and the hybrid read takes those offsets from the Kafka tail anyway;
- a compaction rewrites files and changes no row.

So when the catalog names a new metadata file and every snapshot since the one being served is of
those two kinds, queries keep reading the served version (with the Kafka tail from ITS committed
offsets: the same rows) while one background thread prepares the new one (the plans and sorted rows
of the filters queried lately); then the new version is served. Any other change (a batch load, a
delete, pending or lost ranges, a schema change, a chain that cannot be followed back) is served at
once, prepared on the request path as before, so no query misses a commit that was not streamed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot

from k2_resources.sink.offsets import PREFIX, committed_key

log = logging.getLogger(__name__)

COMPACTION_KEY = "k2.maintenance"  # the summary key settled compaction sets to "compaction"
COMMITTED_PREFIX = f"{PREFIX}.committed."
MAX_CHAIN = 64  # snapshots followed back; a longer gap is served at once
_BATCH_KEYS = frozenset(f"{PREFIX}.{name}" for name in ("topic", "partition", "start-offset", "end-offset"))


def _k2_keys(snapshot: Snapshot) -> set[str]:
    summary = snapshot.summary
    return {key for key in (summary.additional_properties if summary else {}) if key.startswith("k2.")}


def stream_append(snapshot: Snapshot, topics: Sequence[str]) -> bool:
    """A micro-batch of one of ``topics`` that recorded nothing but its range (no pending or lost offsets)."""
    summary = snapshot.summary
    if summary is None or summary.operation != Operation.APPEND:
        return False
    topic = summary.additional_properties.get(f"{PREFIX}.topic")
    return topic is not None and topic in topics and _k2_keys(snapshot) <= _BATCH_KEYS | {committed_key(topic)}


def compaction(snapshot: Snapshot) -> bool:
    """A settled-file compaction: files rewritten, rows unchanged."""
    summary = snapshot.summary
    if summary is None or summary.additional_properties.get(COMPACTION_KEY) != "compaction":
        return False
    return all(key.startswith((COMPACTION_KEY, COMMITTED_PREFIX)) for key in _k2_keys(snapshot))


def invisible_change(served: Table, latest: Table, topics: Sequence[str]) -> bool:
    """True when ``latest`` differs from ``served`` only by stream appends of ``topics`` and compactions
    (module docstring): ``served`` plus the Kafka tail above its committed offsets holds the same rows."""
    metadata, before = latest.metadata, served.metadata
    if (metadata.table_uuid, metadata.current_schema_id, metadata.default_spec_id) != (
        before.table_uuid,
        before.current_schema_id,
        before.default_spec_id,
    ):
        return False
    old, snapshot = served.current_snapshot(), latest.current_snapshot()
    if old is None or snapshot is None:
        return old is None and snapshot is None
    for _ in range(MAX_CHAIN):
        if snapshot.snapshot_id == old.snapshot_id:
            return True
        if not (stream_append(snapshot, topics) or compaction(snapshot)) or snapshot.parent_snapshot_id is None:
            return False
        parent = latest.snapshot_by_id(snapshot.parent_snapshot_id)
        if parent is None:
            return False
        snapshot = parent
    return False


class ServedTable:
    """The version of the table queries read now, and the one thread that prepares the next."""

    def __init__(self, topics: Sequence[str], prepare: Callable[[Table], None]) -> None:
        self.topics = tuple(topics)
        self._prepare = prepare
        self._served: Table | None = None
        self._preparing: Table | None = None
        self._verdict: tuple[str, str, bool] | None = None  # (served location, latest location, invisible)
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.prepared_aside = 0  # versions prepared in the background
        self.served_at_once = 0  # versions served without it (a change queries can see)

    def table(self, latest: Table) -> Table:
        """What a query arriving now reads, given ``latest``, the catalog's newest version."""
        with self._lock:
            served = self._served
            if served is None or served.metadata_location == latest.metadata_location:
                self._served = latest
                return latest
            if not self._invisible(served, latest):
                self._served = latest
                self.served_at_once += 1
                return latest
            if self._preparing is None:
                self._preparing = latest
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-serving-prepare")
                self._worker.submit(self._prepare_then_serve, served, latest)
            return served

    def _invisible(self, served: Table, latest: Table) -> bool:
        verdict = self._verdict
        if verdict is None or verdict[:2] != (served.metadata_location, latest.metadata_location):
            invisible = invisible_change(served, latest, self.topics)
            verdict = self._verdict = (served.metadata_location, latest.metadata_location, invisible)
        return verdict[2]

    def _prepare_then_serve(self, served: Table, latest: Table) -> None:
        try:
            self._prepare(latest)
        except Exception:  # then the queries of the new version prepare it themselves, as without this
            log.warning("preparing %s for serving failed", latest.metadata_location, exc_info=True)
        with self._lock:
            self._preparing = None
            if self._served is served:  # not overtaken by a version served at once meanwhile
                self._served = latest
                self.prepared_aside += 1

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
