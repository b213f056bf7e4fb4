"""ASX historical equities: reading the CSV files of one trading day and turning them into V2 rows.

The source (``data/asx``, see its SOURCE.md) holds one trades file and one quotes file per
company (``trades/<company_id>.csv``, ``quotes/<company_id>.csv``, no header row, CRLF line
ends, exchange-local Australia/Sydney times), plus ``reference-data/company_info.csv`` that
maps company ids to symbols. A trading day is the set of rows dated that day in every file.

Normalisation is vectorised (polars) with explicit checks per row, because the pydantic
models would take far too long on 200K rows; the models still validate a sample of every
batch at the edge (:func:`check_against_model`), so the two can never drift apart. A row
that fails a check is never dropped: it becomes a dead letter carrying the file, its 1-based
line number, the line as read and the reason.

The Iceberg write replaces exactly one trading day. A Sydney day spans two UTC days (05:43
local on 11 March is 18:43 UTC on 10 March), so the write deletes the rows of
``exchange = 'ASX'`` in ``[local midnight, next local midnight)`` expressed in UTC and
appends the day's rows, in one transaction; a whole-partition overwrite would wipe the
neighbouring day's rows sharing the UTC partition.
"""

from __future__ import annotations

import csv
import os
import random
import time
import warnings
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Literal
from zoneinfo import ZoneInfo

import polars as pl
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field, ValidationError
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from k2_resources.errors import K2Error, SchemaMismatchError
from k2_resources.iceberg import IcebergResource
from k2_resources.schemas.models import QuoteV2, TradeV2
from k2_resources.settings import DATA_DIR
from k2_resources.tables import DEAD_LETTERS, QUOTES, TRADES, TableDefinition

EXCHANGE = "ASX"
CURRENCY = "AUD"
ASSET_CLASS = "equities"
LOCAL_TIMEZONE = "Australia/Sydney"
SYDNEY = ZoneInfo(LOCAL_TIMEZONE)

Kind = Literal["trades", "quotes"]
KINDS: tuple[Kind, ...] = ("trades", "quotes")

# Column layouts as observed (SOURCE.md). The 7th trade field is documented as "buyer id" but
# carries a price-like value on 113 rows; it is kept verbatim in vendor_data.
TRADE_FIELDS = ("date", "time", "price", "volume", "qualifier", "venue", "field_7")
QUOTE_FIELDS = ("date", "time", "bid", "ask", "bid_volume", "ask_volume")
FIELDS: dict[Kind, tuple[str, ...]] = {"trades": TRADE_FIELDS, "quotes": QUOTE_FIELDS}
DEAD_LETTER_SOURCE: dict[Kind, str] = {"trades": "asx_trades", "quotes": "asx_quotes"}

# decimal(18, 8): up to 10 integer digits and 8 fractional digits, no sign, no exponent.
_DECIMAL = r"^[0-9]{1,10}(\.[0-9]{1,8})?$"
_WHOLE = r"^[0-9]{1,10}$"
_DATE = r"^[0-9]{2}/[0-9]{2}/[0-9]{4}$"
_TIME = r"^[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?$"

_RAW_SCHEMA = pa.schema(
    [
        ("file", pa.large_string()),
        ("line_number", pa.int64()),
        ("company_id", pa.large_string()),
        ("symbol", pa.large_string()),
        ("raw", pa.large_string()),
    ]
)


def default_data_dir() -> Path:
    """``$K2_ASX_DATA_DIR`` or the copy of the ASX data in the project (``data/asx``)."""
    return Path(os.environ.get("K2_ASX_DATA_DIR") or DATA_DIR / "asx").expanduser().resolve()


# --------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------


def _require_dir(data_dir: Path) -> Path:
    if not (data_dir / "trades").is_dir() and not (data_dir / "quotes").is_dir():
        raise K2Error(
            f"no ASX data in {data_dir} (expected trades/ and quotes/ folders); "
            "set K2_ASX_DATA_DIR or the asx_source resource's data_dir to the folder holding them"
        )
    return data_dir


def company_symbols(data_dir: Path) -> dict[str, str]:
    """company_id -> symbol from ``reference-data/company_info.csv``."""
    path = data_dir / "reference-data" / "company_info.csv"
    if not path.is_file():
        raise K2Error(f"{path} is missing; it maps ASX company ids to symbols. Restore it from data/asx.")
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["company_id"].strip(): row["symbol"].strip() for row in csv.DictReader(handle)}


def source_files(data_dir: Path, kind: Kind) -> list[Path]:
    """The CSV files of one kind, one per company, in company id order."""
    return sorted((data_dir / kind).glob("*.csv"))


def _read_lines(path: Path) -> pl.Series:
    """The lines of a file without their line ends (LF or CRLF); a final line end starts no new line."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return pl.Series("raw", lines, dtype=pl.String).str.strip_suffix("\r")


def _dated_lines(path: Path) -> pl.DataFrame:
    """line_number, raw and the trading day each line belongs to.

    A line's day is its own date field when that parses; a line whose date does not parse
    belongs to the day of the line before it (files are in time order), or the line after
    it at the top of a file, so that it is dead-lettered with its neighbours, never lost.
    """
    frame = pl.DataFrame({"raw": _read_lines(path)}).with_row_index(
        "line_number", offset=1
    )
    day = pl.col("raw").str.extract(r"^([0-9]{2}/[0-9]{2}/[0-9]{4})(,|$)", 1).str.strptime(
        pl.Date, "%m/%d/%Y", strict=False
    )
    return frame.with_columns(day.forward_fill().backward_fill().alias("day"))


def trading_days(data_dir: Path | None = None) -> list[str]:
    """The trading days (ISO dates) present in the trades and quotes files, sorted."""
    data_dir = _require_dir(data_dir or default_data_dir())
    days: set[date] = set()
    for kind in KINDS:
        for path in source_files(data_dir, kind):
            days.update(d for d in _dated_lines(path)["day"].unique().to_list() if d is not None)
    return [d.isoformat() for d in sorted(days)]


def read_raw_day(data_dir: Path, kind: Kind, day: date | str) -> pa.Table:
    """Every line of one trading day from all companies' files of one kind, as read.

    Columns: file, line_number (1-based), company_id (the file name), symbol (null when the
    company id is not in company_info.csv), raw (the line without its line end).
    """
    data_dir = _require_dir(data_dir)
    day = date.fromisoformat(day) if isinstance(day, str) else day
    symbols = company_symbols(data_dir)
    dated = {path: _dated_lines(path) for path in source_files(data_dir, kind)}
    present = [d for lines in dated.values() for d in lines["day"].drop_nulls().unique().to_list()]
    # A file without a single valid date: its lines go to the first trading day, once.
    fallback = min(present) if present else date.fromisoformat(trading_days(data_dir)[0])
    frames = []
    for path, lines in dated.items():
        selected = lines.filter(pl.col("day").fill_null(fallback) == day)
        frames.append(
            selected.select(
                pl.lit(str(path)).alias("file"),
                pl.col("line_number").cast(pl.Int64),
                pl.lit(path.stem).alias("company_id"),
                pl.lit(symbols.get(path.stem), dtype=pl.String).alias("symbol"),
                pl.col("raw"),
            )
        )
    if not frames:
        return _RAW_SCHEMA.empty_table()
    return pl.concat(frames).to_arrow().cast(_RAW_SCHEMA)


# --------------------------------------------------------------------------------------------
# Time zone
# --------------------------------------------------------------------------------------------


def _utc_offset(local_minute: datetime) -> timedelta | None:
    """The UTC offset of a Sydney wall-clock minute; None if it does not exist or is ambiguous."""
    early = local_minute.replace(tzinfo=SYDNEY, fold=0)
    late = local_minute.replace(tzinfo=SYDNEY, fold=1)
    if early.utcoffset() != late.utcoffset():
        # Skipped (spring forward) or repeated (fall back) local time: no single UTC instant.
        return None
    round_trip = early.astimezone(timezone.utc).astimezone(SYDNEY).replace(tzinfo=None)
    return early.utcoffset() if round_trip == local_minute else None


def local_to_utc(local: pl.Series) -> pl.Series:
    """Naive Sydney wall-clock datetimes -> UTC (tz-aware), offsets taken from zoneinfo.

    Offsets are looked up once per distinct local minute (time zones change on minute
    boundaries), so 200K rows cost a few thousand zoneinfo calls. Local times that do not
    exist or are ambiguous (daylight-saving changes) come back null.
    """
    minutes = local.dt.truncate("1m")
    distinct = minutes.drop_nulls().unique()
    offsets = [_utc_offset(m) for m in distinct.to_list()]
    offset_us = pl.Series([None if o is None else o // timedelta(microseconds=1) for o in offsets], dtype=pl.Int64)
    lookup = pl.DataFrame({"minute": distinct, "offset_us": offset_us})
    joined = pl.DataFrame({"minute": minutes, "local": local}).join(lookup, on="minute", how="left", maintain_order="left")
    utc = joined.select(
        (pl.col("local") - pl.duration(microseconds=pl.col("offset_us")))
        .dt.replace_time_zone("UTC")
        .alias(local.name)
    )
    return utc.to_series()


def local_day_bounds_utc(day: date | str) -> tuple[datetime, datetime]:
    """[start, end) in UTC of one Sydney calendar day: local midnight to the next local midnight."""
    day = date.fromisoformat(day) if isinstance(day, str) else day
    start = datetime(day.year, day.month, day.day, tzinfo=SYDNEY)
    following = day + timedelta(days=1)
    end = datetime(following.year, following.month, following.day, tzinfo=SYDNEY)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalisedDay:
    """The V2 rows (in the Iceberg table's Arrow schema) and the dead letters of one day."""

    rows: pa.Table
    dead_letters: pa.Table

    @property
    def valid(self) -> int:
        return self.rows.num_rows

    @property
    def rejected(self) -> int:
        return self.dead_letters.num_rows


def _split_fields(frame: pl.DataFrame, names: tuple[str, ...]) -> pl.DataFrame:
    parts = pl.col("raw").str.split(",")
    frame = frame.with_columns(parts.alias("_fields"))
    return frame.with_columns(
        pl.col("_fields").list.len().alias("_field_count"),
        *[pl.col("_fields").list.get(i, null_on_oob=True).alias(name) for i, name in enumerate(names)],
    ).drop("_fields")


def _common_checks(names: tuple[str, ...]) -> list[tuple[pl.Expr, pl.Expr]]:
    """(failed?, reason) pairs every ASX row goes through, in order; the first failure is reported."""
    layout = ",".join(names)
    return [
        (
            pl.col("symbol").is_null(),
            pl.format(
                "company id {} is not in reference-data/company_info.csv; add it there to load this file",
                pl.col("company_id"),
            ),
        ),
        (
            pl.col("_field_count") != len(names),
            pl.format(f"expected {len(names)} comma-separated fields ({layout}), found {{}}", pl.col("_field_count")),
        ),
        (
            ~pl.col("date").str.contains(_DATE) | pl.col("_local_date").is_null(),
            pl.format("date '{}' is not a valid MM/DD/YYYY date", pl.col("date")),
        ),
        (
            ~pl.col("time").str.contains(_TIME) | pl.col("_local_time").is_null(),
            pl.format("time '{}' is not a valid HH:MM:SS.fff time", pl.col("time")),
        ),
        (
            pl.col("_utc").is_null(),
            pl.format(
                f"local time {{}} {{}} does not exist or is ambiguous in {LOCAL_TIMEZONE} (daylight-saving change)",
                pl.col("date"),
                pl.col("time"),
            ),
        ),
    ]


def _decimal_checks(column: str, label: str, *, positive: bool, whole: bool = False) -> list[tuple[pl.Expr, pl.Expr]]:
    pattern = _WHOLE if whole else _DECIMAL
    shape = "a whole number of up to 10 digits" if whole else "a decimal with up to 10 integer and 8 fractional digits"
    checks = [(~pl.col(column).str.contains(pattern), pl.format(f"{label} '{{}}' is not {shape}", pl.col(column)))]
    if positive:
        checks.append((~pl.col(column).str.contains("[1-9]"), pl.format(f"{label} '{{}}' must be > 0", pl.col(column))))
    return checks


def _with_local_time(frame: pl.DataFrame) -> pl.DataFrame:
    local_date = pl.col("date").str.strptime(pl.Date, "%m/%d/%Y", strict=False)
    local_time = pl.col("time").str.strptime(pl.Time, "%H:%M:%S%.f", strict=False)
    frame = frame.with_columns(local_date.alias("_local_date"), local_time.alias("_local_time"))
    frame = frame.with_columns(pl.col("_local_date").dt.combine(pl.col("_local_time")).alias("_local"))
    return frame.with_columns(local_to_utc(frame["_local"].cast(pl.Datetime("us"))).alias("_utc"))


def _reason(checks: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    """The first failing check's reason, null when the row passes; a null field fails its check."""
    expr: pl.Expr | None = None
    for failed, reason in reversed(checks):
        condition = failed.fill_null(True)
        # A reason built from a null field would be null and pass the row: never let it.
        text = pl.coalesce(reason, pl.lit("row failed validation (a field is missing)"))
        expr = pl.when(condition).then(text) if expr is None else pl.when(condition).then(text).otherwise(expr)
    assert expr is not None
    return expr


def _dead_letters(rejected: pl.DataFrame, source: str, partition_key: str, ingested_at: datetime) -> pa.Table:
    frame = rejected.select(
        pl.lit(source).alias("source"),
        pl.lit(partition_key).alias("partition_key"),
        pl.col("file"),
        pl.col("line_number"),
        pl.col("raw"),
        pl.col("_reason").alias("reason"),
        pl.lit(ingested_at).dt.convert_time_zone("UTC").alias("ingestion_timestamp"),
    )
    return frame.to_arrow().cast(DEAD_LETTERS.arrow_schema())


def _vendor_map(frame: pl.DataFrame, keys: tuple[str, ...], definition: TableDefinition) -> pa.Array:
    """A map<string,string> column of the given columns' non-empty values, keyed by column name."""
    rows = pl.int_range(frame.height, dtype=pl.Int64)
    entries = pl.concat(
        [
            frame.select(rows.alias("row"), pl.lit(rank).alias("rank"), pl.lit(key).alias("key"), pl.col(key).alias("value"))
            for rank, key in enumerate(keys)
        ]
    ).filter(pl.col("value").fill_null("") != "")
    entries = entries.sort(["row", "rank"])
    per_row = (
        pl.DataFrame({"row": pl.int_range(frame.height, dtype=pl.Int64, eager=True)})
        .join(entries.group_by("row").len(), on="row", how="left", maintain_order="left")["len"]
        .fill_null(0)
        .cast(pl.Int32)
    )
    offsets = pa.array([0] + per_row.cum_sum().to_list(), type=pa.int32()) if frame.height else pa.array([0], pa.int32())
    target = definition.arrow_schema().field("vendor_data").type
    return pa.MapArray.from_arrays(
        offsets,
        entries["key"].to_arrow().cast(pa.large_string()),
        entries["value"].to_arrow().cast(pa.large_string()),
        type=target,
    )


def _finish(frame: pl.DataFrame, columns: list[pl.Expr], vendor_keys: tuple[str, ...], definition: TableDefinition) -> pa.Table:
    """Select the V2 columns, add vendor_data, sort by symbol then time, cast to the table schema."""
    table = frame.select(columns).to_arrow()
    table = table.append_column("vendor_data", _vendor_map(frame, vendor_keys, definition))
    schema = definition.arrow_schema()
    table = table.select(schema.names)
    table = table.sort_by([("symbol", "ascending"), ("timestamp", "ascending"), ("source_sequence", "ascending")])
    return table.cast(schema)


def _envelope(kind_label: str, ingested_at: datetime) -> list[pl.Expr]:
    day_compact = pl.col("_local_date").dt.strftime("%Y%m%d")
    return [
        pl.format(f"asx:{kind_label}:{{}}:{{}}:{{}}", pl.col("symbol"), day_compact, pl.col("line_number")).alias(
            "message_id"
        ),
        pl.format(f"{EXCHANGE}-{{}}-{{}}-{{}}", pl.col("symbol"), day_compact, pl.col("line_number")).alias(
            f"{kind_label}_id"
        ),
        pl.col("symbol"),
        pl.lit(EXCHANGE).alias("exchange"),
        pl.lit(ASSET_CLASS).alias("asset_class"),
        pl.col("_utc").alias("timestamp"),
        pl.lit(CURRENCY).alias("currency"),
        pl.col("line_number").alias("source_sequence"),
        pl.lit(ingested_at).dt.convert_time_zone("UTC").alias("ingestion_timestamp"),
        pl.lit(None, dtype=pl.Int64).alias("platform_sequence"),
    ]


def _prepare(raw: pa.Table, names: tuple[str, ...]) -> pl.DataFrame:
    frame = pl.from_arrow(raw.cast(_RAW_SCHEMA)) if raw.num_rows else pl.from_arrow(_RAW_SCHEMA.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return _with_local_time(_split_fields(frame, names))


def normalise_trades(raw: pa.Table, partition_key: str, ingested_at: datetime | None = None) -> NormalisedDay:
    """ASX trade lines (as from :func:`read_raw_day`) -> trade V2 rows and dead letters.

    side is UNKNOWN (the data has no aggressor side); the qualifier code is the trade
    condition; company id, qualifier, venue and the 7th field go to vendor_data.
    """
    ingested_at = ingested_at or datetime.now(timezone.utc)
    frame = _prepare(raw, TRADE_FIELDS)
    checks = (
        _common_checks(TRADE_FIELDS)
        + _decimal_checks("price", "price", positive=True)
        + _decimal_checks("volume", "volume", positive=True, whole=True)
        + [(~pl.col("qualifier").str.contains(r"^[0-9]{1,4}$"), pl.format("qualifier code '{}' is not a number", pl.col("qualifier")))]
    )
    frame = frame.with_columns(_reason(checks).alias("_reason"))
    valid = frame.filter(pl.col("_reason").is_null()).rename({"qualifier": "qualifier_code"})
    columns = _envelope("trade", ingested_at) + [
        pl.col("price").cast(pl.Decimal(18, 8)),
        pl.col("volume").cast(pl.Decimal(18, 8)).alias("quantity"),
        pl.lit("UNKNOWN").alias("side"),
        pl.concat_list([pl.col("qualifier_code")]).alias("trade_conditions"),
    ]
    rows = _finish(valid, columns, ("company_id", "qualifier_code", "venue", "field_7"), TRADES)
    rejected = frame.filter(pl.col("_reason").is_not_null())
    return NormalisedDay(rows, _dead_letters(rejected, DEAD_LETTER_SOURCE["trades"], partition_key, ingested_at))


def normalise_quotes(raw: pa.Table, partition_key: str, ingested_at: datetime | None = None) -> NormalisedDay:
    """ASX best bid/ask lines -> quote V2 rows and dead letters.

    A price of 0.0 is an empty side of the book: its price and quantity become null (a valid
    row). An empty side with a non-zero volume contradicts itself and is dead-lettered.
    Crossed and locked books (bid >= ask) are real auction states and are kept.
    """
    ingested_at = ingested_at or datetime.now(timezone.utc)
    frame = _prepare(raw, QUOTE_FIELDS)
    checks = _common_checks(QUOTE_FIELDS)
    for side in ("bid", "ask"):
        checks += _decimal_checks(side, f"{side} price", positive=False)
        checks += _decimal_checks(f"{side}_volume", f"{side} volume", positive=False, whole=True)
        checks.append(
            (
                ~pl.col(side).str.contains("[1-9]") & pl.col(f"{side}_volume").str.contains("[1-9]"),
                pl.format(f"{side} price is 0 (empty side) but {side} volume is {{}}", pl.col(f"{side}_volume")),
            )
        )
    frame = frame.with_columns(_reason(checks).alias("_reason"))
    valid = frame.filter(pl.col("_reason").is_null())

    def side_columns(side: str) -> list[pl.Expr]:
        present = pl.col(side).str.contains("[1-9]")
        return [
            pl.when(present).then(pl.col(side).cast(pl.Decimal(18, 8))).alias(f"{side}_price"),
            pl.when(present).then(pl.col(f"{side}_volume").cast(pl.Decimal(18, 8))).alias(f"{side}_quantity"),
        ]

    columns = _envelope("quote", ingested_at) + side_columns("bid") + side_columns("ask")
    rows = _finish(valid, columns, ("company_id",), QUOTES)
    rejected = frame.filter(pl.col("_reason").is_not_null())
    return NormalisedDay(rows, _dead_letters(rejected, DEAD_LETTER_SOURCE["quotes"], partition_key, ingested_at))


NORMALISERS = {"trades": normalise_trades, "quotes": normalise_quotes}
MODELS = {"trades": TradeV2, "quotes": QuoteV2}


def check_against_model(rows: pa.Table, kind: Kind, sample: int = 3) -> None:
    """Validate the first and last rows with the pydantic V2 model: the vectorised checks and
    the record contract must agree. Raises SchemaMismatchError naming the field."""
    if rows.num_rows == 0:
        return
    indices = sorted({*range(min(sample, rows.num_rows)), *range(max(0, rows.num_rows - sample), rows.num_rows)})
    model = MODELS[kind]
    for record in rows.take(indices).to_pylist():
        if record.get("vendor_data") is not None:
            record["vendor_data"] = dict(record["vendor_data"])
        try:
            model(**record)
        except ValidationError as exc:
            raise SchemaMismatchError(
                f"a normalised ASX {kind} row does not match {model.__name__}: {exc.errors()[0]}; "
                "fix the normaliser in k2_resources/asx.py or the model in k2_resources/schemas/models.py"
            ) from exc


# --------------------------------------------------------------------------------------------
# Writing one day to Iceberg
# --------------------------------------------------------------------------------------------


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


class AsxSourceResource(ConfigurableResource):
    """Where the ASX CSV files are: ``data_dir`` or ``$K2_ASX_DATA_DIR`` or the project's data/asx."""

    data_dir: str | None = Field(default=None, description="folder with trades/, quotes/ and reference-data/")

    def path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve() if self.data_dir else default_data_dir()

    def read_day(self, kind: Kind, partition_key: str) -> pa.Table:
        return read_raw_day(self.path(), kind, partition_key)

    def symbols(self) -> dict[str, str]:
        return company_symbols(self.path())
