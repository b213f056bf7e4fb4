"""ASX lines -> V2 trade and quote rows, with explicit checks and dead letters.

Normalisation is vectorised (polars) with explicit checks per row, because the pydantic
models would take far too long on 200K rows; the models still validate a sample of every
batch at the edge (:func:`check_against_model`), so the two can never drift apart. A row
that fails a check is never dropped: it becomes a dead letter carrying the file, its 1-based
line number, the line as read and the reason.

Trades take two paths, so a 10M-row day costs seconds: a line of the canonical shape (one
regular expression over the whole line) is split once and checked for its values only
(a real date and time, an existing Sydney time, price and volume > 0); every other line, and
every canonical line that fails a value check, goes through the general path, which checks
field by field and writes the reason. Both paths give a row the same values (the property
test in tests/unit/test_asx_row_properties.py holds them to one oracle), and reasons are built
only for rejected rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import ValidationError

from k2_resources.asx.files import QUOTE_FIELDS, RAW_SCHEMA, TRADE_FIELDS, Kind
from k2_resources.asx.sydney_time import LOCAL_TIMEZONE, local_to_utc
from k2_resources.catalog.tables import DEAD_LETTERS, QUOTES, TRADES, TableDefinition
from k2_resources.errors import SchemaMismatchError
from k2_resources.schemas.models import QuoteV2, TradeV2

EXCHANGE = "ASX"
CURRENCY = "AUD"
ASSET_CLASS = "equities"
DEAD_LETTER_SOURCE: dict[Kind, str] = {"trades": "asx_trades", "quotes": "asx_quotes"}

# decimal(18, 8): up to 10 integer digits and 8 fractional digits, no sign, no exponent.
_DECIMAL = r"^[0-9]{1,10}(\.[0-9]{1,8})?$"
_WHOLE = r"^[0-9]{1,10}$"
_DATE = r"^[0-9]{2}/[0-9]{2}/[0-9]{4}$"
_TIME = r"^[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?$"


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
            frame.select(
                rows.alias("row"), pl.lit(rank).alias("rank"), pl.lit(key).alias("key"), pl.col(key).alias("value")
            )
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
    offsets = (
        pa.array([0] + per_row.cum_sum().to_list(), type=pa.int32()) if frame.height else pa.array([0], pa.int32())
    )
    target = definition.arrow_schema().field("vendor_data").type
    return pa.MapArray.from_arrays(
        offsets,
        entries["key"].to_arrow().cast(pa.large_string()),
        entries["value"].to_arrow().cast(pa.large_string()),
        type=target,
    )


def _finish(
    frame: pl.DataFrame, columns: list[pl.Expr], vendor_keys: tuple[str, ...], definition: TableDefinition
) -> pa.Table:
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
    frame = pl.from_arrow(raw.cast(RAW_SCHEMA)) if raw.num_rows else pl.from_arrow(RAW_SCHEMA.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return _with_local_time(_split_fields(frame, names))


# A trade line of the canonical shape: the field checks of the general path, as one pattern
# (date, time, price, volume, qualifier, then venue and the 7th field, which may hold anything
# but a comma). A line that matches has exactly 7 fields, each of the right form.
_TRADE_LINE = (
    r"^[0-9]{2}/[0-9]{2}/[0-9]{4},[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?,"
    r"[0-9]{1,10}(\.[0-9]{1,8})?,[0-9]{1,10},[0-9]{1,4},[^,]*,[^,]*$"
)
# What a valid trade row carries into the V2 columns, whichever path checked it.
_TRADE_COLUMNS = ("file", "line_number", "company_id", "symbol", *TRADE_FIELDS, "_local_date", "_utc")


def _trade_checks() -> list[tuple[pl.Expr, pl.Expr]]:
    return (
        _common_checks(TRADE_FIELDS)
        + _decimal_checks("price", "price", positive=True)
        + _decimal_checks("volume", "volume", positive=True, whole=True)
        + [
            (
                ~pl.col("qualifier").str.contains(r"^[0-9]{1,4}$"),
                pl.format("qualifier code '{}' is not a number", pl.col("qualifier")),
            )
        ]
    )


def _canonical_trades(frame: pl.DataFrame) -> pl.DataFrame:
    """Lines of the canonical shape split into their fields, with local date and UTC time; the
    value checks as ``_ok`` (a real date and time of day, an existing Sydney time, price and
    volume > 0, a known company). The shape guarantees the slicing below is exact."""
    fields = pl.col("raw").str.split_exact(",", len(TRADE_FIELDS) - 1).struct.rename_fields(list(TRADE_FIELDS))
    frame = frame.with_columns(fields.alias("_fields")).unnest("_fields")
    clock = pl.col("time")
    hour, minute, second = (clock.str.slice(i, 2).cast(pl.Int64) for i in (0, 3, 6))
    micros = clock.str.slice(9).str.pad_end(6, "0").cast(pl.Int64).fill_null(0)  # "" (no fraction) -> 0
    frame = frame.with_columns(
        pl.col("date").str.strptime(pl.Date, "%m/%d/%Y", strict=False).alias("_local_date"),
        ((hour <= 23) & (minute <= 59) & (second <= 59)).alias("_time_ok"),
        (((hour * 60 + minute) * 60 + second) * 1_000_000 + micros).alias("_micros"),
    )
    local = pl.col("_local_date").cast(pl.Datetime("us")) + pl.duration(microseconds=pl.col("_micros"))
    frame = frame.with_columns(pl.when(pl.col("_time_ok")).then(local).alias("_local"))
    frame = frame.with_columns(local_to_utc(frame["_local"]).alias("_utc"))
    ok = (
        pl.col("symbol").is_not_null()
        & pl.col("_utc").is_not_null()
        & pl.col("price").str.contains("[1-9]")
        & pl.col("volume").str.contains("[1-9]")
    )
    return frame.with_columns(ok.fill_null(False).alias("_ok"))


def _general_trades(frame: pl.DataFrame) -> pl.DataFrame:
    """Any lines, checked field by field (:func:`_trade_checks`); ``_reason`` null when valid."""
    frame = _with_local_time(_split_fields(frame, TRADE_FIELDS))
    return frame.with_columns(_reason(_trade_checks()).alias("_reason"))


def _vendor_map_fast(frame: pl.DataFrame, keys: tuple[str, ...], definition: TableDefinition) -> pa.Array:
    """vendor_data: the non-empty values of ``keys`` per row, in key order, as one Arrow map column.

    Built with array indexing (numpy ``nonzero`` of the row x key presence matrix gives the
    entries in row-then-key order), with no per-row work and no sort.
    """
    present = np.column_stack([(frame[key].fill_null("") != "").to_numpy() for key in keys])
    rows, key_index = np.nonzero(present)
    offsets = np.zeros(frame.height + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1, dtype=np.int32), out=offsets[1:])
    values = pl.concat([frame[key].fill_null("").alias("value") for key in keys]).rechunk()
    flat_values = values.gather(pl.Series(key_index * frame.height + rows, dtype=pl.Int64))
    flat_keys = pl.Series("key", list(keys), dtype=pl.String).gather(pl.Series(key_index, dtype=pl.Int64))
    target = definition.arrow_schema().field("vendor_data").type
    return pa.MapArray.from_arrays(
        pa.array(offsets, type=pa.int32()),
        flat_keys.to_arrow().cast(pa.large_string()),
        flat_values.to_arrow().cast(pa.large_string()),
        type=target,
    )


def _trade_rows(valid: pl.DataFrame, ingested_at: datetime) -> pa.Table:
    """Valid trade rows (:data:`_TRADE_COLUMNS`) -> V2 rows in market.trades' Arrow schema, same order."""
    # The valid date field is MM/DD/YYYY, so the compact day is three slices of it (no strftime per row).
    day_compact = pl.concat_str(
        [pl.col("date").str.slice(6, 4), pl.col("date").str.slice(0, 2), pl.col("date").str.slice(3, 2)]
    )
    columns = [
        pl.format("asx:trade:{}:{}:{}", pl.col("symbol"), day_compact, pl.col("line_number")).alias("message_id"),
        pl.format(f"{EXCHANGE}-{{}}-{{}}-{{}}", pl.col("symbol"), day_compact, pl.col("line_number")).alias("trade_id"),
        pl.col("symbol"),
        pl.lit(EXCHANGE).alias("exchange"),
        pl.lit(ASSET_CLASS).alias("asset_class"),
        pl.col("_utc").alias("timestamp"),
        pl.col("price").cast(pl.Decimal(18, 8)),
        pl.col("volume").cast(pl.Decimal(18, 8)).alias("quantity"),
        pl.lit(CURRENCY).alias("currency"),
        pl.lit("UNKNOWN").alias("side"),
        pl.concat_list([pl.col("qualifier")]).alias("trade_conditions"),
        pl.col("line_number").alias("source_sequence"),
        pl.lit(ingested_at).dt.convert_time_zone("UTC").alias("ingestion_timestamp"),
        pl.lit(None, dtype=pl.Int64).alias("platform_sequence"),
    ]
    schema = TRADES.arrow_schema()
    table = valid.select(columns).to_arrow()
    vendor = _vendor_map_fast(
        valid.rename({"qualifier": "qualifier_code"}), ("company_id", "qualifier_code", "venue", "field_7"), TRADES
    )
    return table.append_column("vendor_data", vendor).select(schema.names).cast(schema)


def _in_time_order(valid: pl.DataFrame) -> bool:
    """True when rows are ordered by (_utc, line_number) already (files are in time order)."""
    if valid.height < 2:
        return True
    utc, line = pl.col("_utc"), pl.col("line_number")
    later = (utc > utc.shift(1)) | ((utc == utc.shift(1)) & (line > line.shift(1)))
    return bool(valid.select(later.slice(1).all()).item())


def _trade_block(block: pl.DataFrame, ingested_at: datetime) -> tuple[pa.Table, pl.DataFrame]:
    """The lines of one file (one company, so one symbol): V2 rows in time order, and the rejected
    lines with ``_reason``."""
    block = block.with_columns(pl.col("raw").str.contains(_TRADE_LINE).fill_null(False).alias("_canonical"))
    canonical = _canonical_trades(block.filter(pl.col("_canonical")))
    # Everything the canonical path did not accept is checked field by field, with reasons.
    raw_columns = list(RAW_SCHEMA.names)
    general = _general_trades(
        pl.concat(
            [
                block.filter(~pl.col("_canonical")).select(raw_columns),
                canonical.filter(~pl.col("_ok")).select(raw_columns),
            ]
        )
    )
    del block
    valid = canonical.filter(pl.col("_ok")).select(_TRADE_COLUMNS)
    del canonical
    accepted = general.filter(pl.col("_reason").is_null())
    if accepted.height:
        valid = pl.concat([valid, accepted.select(_TRADE_COLUMNS)])
    if not _in_time_order(valid):
        valid = valid.sort(["_utc", "line_number"])
    return _trade_rows(valid, ingested_at), general.filter(pl.col("_reason").is_not_null())


def normalise_trades(raw: pa.Table, partition_key: str, ingested_at: datetime | None = None) -> NormalisedDay:
    """ASX trade lines (as from :func:`read_raw_day`) -> trade V2 rows and dead letters.

    side is UNKNOWN (the data has no aggressor side); the qualifier code is the trade
    condition; company id, qualifier, venue and the 7th field go to vendor_data. Rows are
    ordered by symbol, then time, then line number. Each file is normalised on its own (its
    rows share one symbol), which bounds the memory a 10M-row day needs.
    """
    ingested_at = ingested_at or datetime.now(UTC)
    frame = pl.from_arrow(raw.cast(RAW_SCHEMA)) if raw.num_rows else pl.from_arrow(RAW_SCHEMA.empty_table())
    assert isinstance(frame, pl.DataFrame)
    blocks = frame.partition_by("file", maintain_order=True) if frame.height else [frame]
    del frame
    by_symbol: dict[str, list[pa.Table]] = {}
    rejected: list[pl.DataFrame] = []
    while blocks:
        rows, bad = _trade_block(blocks.pop(0), ingested_at)
        rejected.append(bad)
        if rows.num_rows:
            by_symbol.setdefault(rows.column("symbol")[0].as_py(), []).append(rows)
    ordered: list[pa.Table] = []
    for symbol in sorted(by_symbol):
        tables = by_symbol[symbol]
        if len(tables) == 1:
            ordered.append(tables[0])
        else:  # two files of one symbol: merge them in time order
            ordered.append(
                pa.concat_tables(tables).sort_by([("timestamp", "ascending"), ("source_sequence", "ascending")])
            )
    schema = TRADES.arrow_schema()
    table = pa.concat_tables(ordered) if ordered else schema.empty_table()
    dead = pl.concat(rejected).sort(["file", "line_number"])
    return NormalisedDay(table, _dead_letters(dead, DEAD_LETTER_SOURCE["trades"], partition_key, ingested_at))


def normalise_quotes(raw: pa.Table, partition_key: str, ingested_at: datetime | None = None) -> NormalisedDay:
    """ASX best bid/ask lines -> quote V2 rows and dead letters.

    A price of 0.0 is an empty side of the book: its price and quantity become null (a valid
    row). An empty side with a non-zero volume contradicts itself and is dead-lettered.
    Crossed and locked books (bid >= ask) are real auction states and are kept.
    """
    ingested_at = ingested_at or datetime.now(UTC)
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
MODELS: dict[str, type[TradeV2] | type[QuoteV2]] = {"trades": TradeV2, "quotes": QuoteV2}


def check_against_model(rows: pa.Table, kind: Kind, sample: int = 3) -> None:
    """Validate the first and last rows with the pydantic V2 model: the vectorised checks and
    the record contract must agree. Raises SchemaMismatchError naming the field."""
    if rows.num_rows == 0:
        return
    # Slices, not take(): a take on a 10M-row table with a map column costs seconds.
    head = min(sample, rows.num_rows)
    records = rows.slice(0, head).to_pylist() + rows.slice(max(head, rows.num_rows - sample)).to_pylist()
    model = MODELS[kind]
    for record in records:
        if record.get("vendor_data") is not None:
            record["vendor_data"] = dict(record["vendor_data"])
        try:
            model(**record)
        except ValidationError as exc:
            raise SchemaMismatchError(
                f"a normalised ASX {kind} row does not match {model.__name__}: {exc.errors()[0]}; "
                "fix the normaliser in k2_resources/asx/normalise.py or the model in k2_resources/schemas/models.py"
            ) from exc
