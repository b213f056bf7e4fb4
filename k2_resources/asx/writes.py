"""Writing one ASX trading day to Iceberg: the day's rows and dead letters replace the old ones.

The write replaces exactly one trading day. A Sydney day spans two UTC days, so the write
deletes the rows of ``exchange = 'ASX'`` in ``[local midnight, next local midnight)``
expressed in UTC and appends the day's rows, in one transaction; a whole-partition overwrite
would wipe the neighbouring day's rows sharing the UTC partition.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import polars as pl
import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from k2_resources.asx.files import Kind, read_raw_day
from k2_resources.asx.normalise import DEAD_LETTER_SOURCE, EXCHANGE, NORMALISERS, NormalisedDay, check_against_model
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.iceberg import IcebergResource


def day_filter(day: date | str) -> BooleanExpression:
    """exchange = 'ASX' and timestamp in [local midnight, next local midnight) as UTC."""
    start, end = local_day_bounds_utc(day)
    return And(
        EqualTo("exchange", EXCHANGE),
        And(GreaterThanOrEqual("timestamp", start.isoformat()), LessThan("timestamp", end.isoformat())),
    )


def dead_letter_filter(source: str, partition_key: str) -> BooleanExpression:
    return And(EqualTo("source", source), EqualTo("partition_key", partition_key))


def replace_rows(
    load_table: Callable[[], Table], rows: pa.Table, row_filter: BooleanExpression, properties: dict[str, str], attempts: int = 5
) -> Table:
    """Delete the rows matching ``row_filter`` and append ``rows`` in one Iceberg transaction.

    ``load_table`` is called for every attempt, so a commit that lost a race with another
    writer (a neighbouring day in the same backfill) is redone against the new snapshot.
    """
    for attempt in range(attempts):
        table: Table = load_table()
        # The catalog assigns field ids when it creates a table; write with the table's own.
        rows = rows.cast(table.schema().as_arrow())
        try:
            with warnings.catch_warnings():
                # The first load of a day deletes nothing; pyiceberg warns about that, harmlessly.
                warnings.filterwarnings("ignore", message="Delete operation did not match any records")
                table.overwrite(rows, overwrite_filter=row_filter, snapshot_properties=properties)
            return table
        except (CommitFailedException, ValidationException):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class IngestResult:
    """What one day's ingest of one kind did."""

    kind: Kind
    partition_key: str
    raw_rows: int
    valid: int
    rejected: int
    rows_per_symbol: dict[str, int]
    snapshot_id: int | None


def write_day(iceberg: IcebergResource, kind: Kind, partition_key: str, day: NormalisedDay) -> int | None:
    """Replace one trading day in market.trades/quotes and its dead letters; the new snapshot id."""
    source = DEAD_LETTER_SOURCE[kind]
    properties = {"k2.source": source, "k2.partition": partition_key}
    replace_rows(
        iceberg.dead_letters,
        day.dead_letters,
        dead_letter_filter(source, partition_key),
        {**properties, "k2.rows": str(day.rejected)},
    )
    table = replace_rows(
        iceberg.trades if kind == "trades" else iceberg.quotes,
        day.rows,
        day_filter(partition_key),
        {**properties, "k2.rows": str(day.valid)},
    )
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None


def rows_per_symbol(rows: pa.Table) -> dict[str, int]:
    counts = pl.from_arrow(rows.select(["symbol"])).group_by("symbol").len().sort("symbol")  # type: ignore[union-attr]
    return dict(zip(counts["symbol"].to_list(), counts["len"].to_list()))


def ingest_day(data_dir: Path, iceberg: IcebergResource, kind: Kind, partition_key: str, raw: pa.Table | None = None) -> IngestResult:
    """CSV -> validated V2 rows -> Iceberg for one trading day (what the assets and the benchmark run)."""
    if raw is None:
        raw = read_raw_day(data_dir, kind, partition_key)
    day = NORMALISERS[kind](raw, partition_key)
    check_against_model(day.rows, kind)
    snapshot_id = write_day(iceberg, kind, partition_key, day)
    return IngestResult(kind, partition_key, raw.num_rows, day.valid, day.rejected, rows_per_symbol(day.rows), snapshot_id)
