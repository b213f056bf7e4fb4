"""What a hybrid read returns (rows and the statistics of that read) and how its parts are merged.

Kept apart from :mod:`k2_resources.trades.hybrid` so the resource holds the read order (metadata,
then Iceberg and Kafka in parallel) and this module the pieces that need no resource: the
statistics, the merge (deduplicated by message_id, ordered by timestamp then sequences), the
rows of load-shed ranges and the words naming offsets a read could not reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa

from k2_resources.catalog.tables import TRADES
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import PendingRange
from k2_resources.trades.iceberg_read import RowFilter, ScanStats
from k2_resources.trades.kafka_tail import TailStats

_ORDER = [
    ("timestamp", "ascending"),
    ("platform_sequence", "ascending"),
    ("source_sequence", "ascending"),
    ("message_id", "ascending"),
]


@dataclass
class QueryStats:
    """What one query read: the snapshot, the committed offsets, the Kafka ranges, row counts."""

    snapshot_id: int | None = None
    committed: dict[str, dict[int, int]] = field(default_factory=dict)
    pending: dict[str, list[PendingRange]] = field(default_factory=dict)  # below committed, rows not in the table yet
    iceberg: ScanStats = field(default_factory=ScanStats)
    kafka: TailStats = field(default_factory=TailStats)
    iceberg_rows: int = 0
    kafka_rows: int = 0
    duplicates_dropped: int = 0
    kafka_skipped: dict[str, str] = field(default_factory=dict)  # topic -> why its tail was not read
    missing: dict[str, str] = field(default_factory=dict)  # topic -> offsets left out (allow_partial)

    @property
    def partial(self) -> bool:
        """True when Kafka was down and the result holds the Iceberg part only (allow_partial=True)."""
        return bool(self.missing)


@dataclass(frozen=True)
class HybridResult:
    """The rows of one hybrid read and that read's own statistics (safe to use from many threads)."""

    frame: pl.DataFrame
    stats: QueryStats


class KafkaTailMissingWarning(UserWarning):
    """A hybrid read returned the Iceberg part only: Kafka was unreachable and allow_partial=True."""


def as_frame(rows: pa.Table | pl.DataFrame) -> pl.DataFrame:
    """``rows`` as a polars DataFrame (``pl.from_arrow`` of a table is always a DataFrame)."""
    if isinstance(rows, pl.DataFrame):
        return rows
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    return frame


def utc(moment: datetime | None, name: str) -> datetime | None:
    """``moment`` in UTC; a naive datetime is an error naming the fix."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise K2Error(
            f"{name}={moment.isoformat()} has no time zone; pass an aware datetime, "
            "e.g. datetime(..., tzinfo=timezone.utc)"
        )
    return moment.astimezone(UTC)


def chosen_symbols(symbols: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """One symbol, several, or None (all), as a tuple; an empty list is an error."""
    if symbols is None:
        return None
    chosen = (symbols,) if isinstance(symbols, str) else tuple(symbols)
    if not chosen:
        raise K2Error("symbols is empty; pass one symbol, a list of symbols, or None for all")
    return chosen


def merge_trades(parts: Sequence[pa.Table | pl.DataFrame], stats: QueryStats | None = None) -> pl.DataFrame:
    """Concatenate trade parts, keep each message_id's first row, order by timestamp then sequences."""
    frames = [as_frame(part) for part in parts]
    frames = [frame for frame in frames if frame.height] or frames[:1]
    merged = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    if merged.height == 0:
        return merged
    unique = merged
    if merged["message_id"].n_unique() != merged.height:  # cheap test first; duplicates are rare
        unique = merged.filter(pl.col("message_id").is_first_distinct())
    if stats is not None:
        stats.duplicates_dropped = merged.height - unique.height
    return unique.sort([name for name, _ in _ORDER], nulls_last=True)


def to_trades_arrow(frame: pl.DataFrame) -> pa.Table:
    """A merged result in market.trades' exact Arrow schema."""
    return frame.to_arrow().cast(TRADES.arrow_schema())


def missing_offsets(topic: str, committed: dict[int, int], pending: list[PendingRange]) -> str:
    """The offsets of ``topic`` a hybrid read needs from Kafka, in words (the log end is unknown here)."""
    if committed:
        parts = [f"{topic}[{p}] offsets {offset}.. (to the log end)" for p, offset in sorted(committed.items())]
    else:
        parts = [f"{topic}: every offset (market.trades has committed none of it yet)"]
    parts += [f"{topic}[{r.partition}] offsets {r.start}..{r.end - 1} ({r.kind.lower()})" for r in pending]
    return ", ".join(parts)


def filter_rows(rows: pl.DataFrame, row_filter: RowFilter) -> pl.DataFrame:
    """The rows matching the filter's symbols, exchange and window."""
    conditions = []
    if row_filter.symbols is not None:
        conditions.append(pl.col("symbol").is_in(list(row_filter.symbols)))
    if row_filter.exchange is not None:
        conditions.append(pl.col("exchange") == row_filter.exchange)
    if row_filter.start is not None:
        conditions.append(pl.col("timestamp") >= row_filter.start)
    if row_filter.end is not None:
        conditions.append(pl.col("timestamp") < row_filter.end)
    return rows.filter(*conditions) if conditions else rows


def pending_rows(kafka: KafkaResource, pending: list[PendingRange], row_filter: RowFilter) -> pl.DataFrame:
    """Rows of load-shed ranges (below the committed offsets, not in the table yet) read from Kafka:
    every row of a spilled range, the deferred symbols' rows of a deferred range."""
    from k2_resources.catalog.resource import to_arrow
    from k2_resources.sink.range_read import read_range

    records: list[dict] = []
    for entry in pending:
        if (
            row_filter.symbols is not None
            and entry.kind == "deferred"
            and not set(entry.symbols) & set(row_filter.symbols)
        ):
            continue  # none of the wanted symbols is missing from this range
        records += [r for r in read_range(kafka, entry.range).records if entry.is_missing(r["symbol"])]
    return as_frame(to_arrow(records, TRADES))
