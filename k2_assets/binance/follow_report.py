"""What a follower records in Dagster: one materialisation of ``binance_trades`` per report window.

A follower commits every partition about once a second. Logging each commit as a materialisation
made the asset page unusable: its timeline loads every event of the last seven days, 100 per
request, one request after the other (20,000 events: 56 s instead of 2 s, bench_soak.py). So the
follower sums its commits over ``interval_s`` (``TradeSinkResource.follow_report_seconds``) and
logs one materialisation per window for the whole topic, carrying each partition's offset range,
the rows, gaps and snapshot ids the window covers; the run's own result closes the last window, so
a follower that ends (for any reason) leaves nothing committed unrecorded.

Nothing depends on these events for exactness: the committed offsets are the table's property and
each commit's range is in its snapshot summary (k2_resources/sink/offsets.py). Per-commit detail is
read there (``range_commits`` in tests, ``k2 offsets show``); Dagster holds the summary.

The windows of one run are contiguous per partition: a window's range for partition p starts where
the previous window's ended, so the union of a run's windows is exactly what it committed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dagster import MetadataValue

from k2_resources.sink.microbatch import BatchResult

FOLLOW = "follow"


@dataclass
class _PartitionWindow:
    start: int
    end: int
    commits: int = 0
    rows: int = 0
    gaps: Counter[str] = field(default_factory=Counter)


@dataclass
class _Window:
    """The commits since the last report, per partition."""

    partitions: dict[int, _PartitionWindow] = field(default_factory=dict)
    deferred_by_symbol: Counter[str] = field(default_factory=Counter)
    spilled: int = 0
    dead_lettered: int = 0
    lost: int = 0
    commit_seconds: list[float] = field(default_factory=list)
    first_snapshot: int | None = None
    last_snapshot: int | None = None

    def add(self, result: BatchResult) -> None:
        batch = result.batch
        window = self.partitions.setdefault(batch.partition, _PartitionWindow(batch.start, batch.end))
        window.end = batch.end
        window.commits += 1
        window.rows += result.written
        window.gaps.update(result.sequence_gaps)
        self.deferred_by_symbol.update(result.deferred_by_symbol)
        self.spilled += result.spilled
        self.dead_lettered += result.dead_lettered
        self.lost += result.lost
        self.commit_seconds.append(result.commit_seconds)
        if result.snapshot_id is not None:
            if self.first_snapshot is None:
                self.first_snapshot = result.snapshot_id
            self.last_snapshot = result.snapshot_id

    @property
    def commits(self) -> int:
        return len(self.commit_seconds)


def window_metadata(topic: str, level: str, window: _Window, seconds: float) -> dict[str, Any]:
    """The metadata of one report window (keys shared with a per-range run's where they mean the same:
    ``rows_written`` and ``deferred_rows_by_symbol`` are summed by `k2 metrics`)."""
    ordered = sorted(window.commit_seconds)
    ranges = {str(p): [w.start, w.end] for p, w in sorted(window.partitions.items())}
    gaps = {
        str(p): {"range": f"{w.start}-{w.end}", "gaps": dict(sorted(w.gaps.items()))}
        for p, w in sorted(window.partitions.items())
    }
    return {
        "mode": FOLLOW,
        "degradation_level": level,
        "topic": topic,
        "window_seconds": round(seconds, 1),
        "window_commits": window.commits,
        "offset_ranges": MetadataValue.json(ranges),
        "rows_written": sum(w.rows for w in window.partitions.values()),
        "sequence_gaps": sum(sum(w.gaps.values()) for w in window.partitions.values()),
        "sequence_gaps_by_partition": MetadataValue.text(json.dumps(gaps, sort_keys=True)),
        "deferred_rows_by_symbol": json.dumps(dict(window.deferred_by_symbol), sort_keys=True),
        "spilled_rows": window.spilled,
        "dead_lettered": window.dead_lettered,
        "retention_lost_offsets": window.lost,
        "snapshot_ids": MetadataValue.text(f"{window.first_snapshot}..{window.last_snapshot}"),
        "commit_seconds_sum": round(sum(ordered), 3),
        "commit_seconds_p50": round(ordered[len(ordered) // 2], 3) if ordered else 0.0,
        "commit_seconds_max": round(ordered[-1], 3) if ordered else 0.0,
    }


class FollowReport:
    """Sums a follower's commits and calls ``emit`` with one window's metadata every ``interval_s``.

    ``add`` takes each micro-batch result (an already-committed one adds nothing); ``close`` returns
    the metadata of the window still open (empty when nothing was committed since the last report),
    which the run's own result carries. A run of ``run_for_s`` thus logs ``ceil(run_for_s /
    interval_s)`` events at most, its result included.
    """

    def __init__(
        self,
        topic: str,
        level: str,
        interval_s: float,
        emit: Callable[[dict[str, Any]], None],
        run_for_s: float = float("inf"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topic, self.level, self.interval_s = topic, level, interval_s
        self._emit, self._clock = emit, clock
        self._window = _Window()
        self._opened = clock()
        # Made before the follower starts its own clock: past this the run is in its last cycle and
        # its result closes the window (one event, not a window and then the result).
        self._run_ends_by = self._opened + run_for_s
        self.windows_emitted = 0

    def add(self, result: BatchResult) -> None:
        if not result.already_committed:
            self._window.add(result)
        self.due()

    def due(self) -> None:
        """Emits the open window once ``interval_s`` has passed. The follower calls it every cycle, so
        when the stream goes quiet its last commits are recorded within a window, not at the run's end."""
        now = self._clock()
        if self._window.commits and now - self._opened >= self.interval_s and now < self._run_ends_by:
            self._emit(self._take())
            self.windows_emitted += 1

    def close(self) -> dict[str, Any]:
        """The open window's metadata (``{}`` when it holds no commit)."""
        return self._take() if self._window.commits else {}

    def _take(self) -> dict[str, Any]:
        now = self._clock()
        metadata = window_metadata(self.topic, self.level, self._window, now - self._opened)
        self._window, self._opened = _Window(), now
        return metadata
