"""Stage 6 of the column-wise trade reader: one part's share of a day as V2 rows and rejected lines.

The lines the vectorised checks accept become dictionary-encoded V2 rows; every other line of the
day goes through the general path of :mod:`k2_resources.asx.normalise`, field by field, with its
reason, so the result is exactly the general path's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from k2_resources.asx.columnar.columns import ENCODED_SCHEMA, dictionary_array, prefixed, repeated, vendor_data
from k2_resources.asx.columnar.fields import micros_of_day, minute_offsets_us, positive_decimals
from k2_resources.asx.columnar.parts import EPOCH, NO_DAY, day_numbers
from k2_resources.asx.columnar.scan import Scan, dictionary_parts
from k2_resources.asx.files import TRADE_FIELDS
from k2_resources.asx.normalise import (
    _DECIMAL,
    _TRADE_COLUMNS,
    _WHOLE,
    ASSET_CLASS,
    CURRENCY,
    EXCHANGE,
    _general_trades,
    _trade_rows,
)
from k2_resources.catalog.tables import TRADES

# (distinct values, index of each row's value) per field of the selected well-formed lines.
_Fields = dict[str, tuple[pl.Series, np.ndarray]]


@dataclass
class _Checked:
    """The selected well-formed lines of a part, with what the vectorised checks made of them."""

    fields: _Fields
    line_index: np.ndarray  # 0-based index in the part of each line
    micros: np.ndarray  # its microseconds since Sydney midnight
    minute: np.ndarray  # its Sydney minute of the day (0 where its clock is not valid)
    ok: np.ndarray  # whether every field passed
    prices: pa.Array  # decimal per distinct price text
    volumes: pa.Array  # decimal per distinct volume text


def _checked(scan: Scan, selected: np.ndarray, day: date) -> tuple[_Checked, np.ndarray | None]:
    """The checks of the general path, once per distinct value (the clock per row, from its bytes);
    and the rows of ``scan.fields`` selected (None: all of them)."""
    rows_selected = selected[scan.well]
    take = None if rows_selected.all() else np.flatnonzero(rows_selected)
    fields: _Fields = {}
    for name in ("date", "price", "volume", "qualifier", "venue", "field_7"):
        values, index = dictionary_parts(scan.fields.column(name))
        fields[name] = (values, index if take is None else index[take])
    micros, time_ok = micros_of_day(scan.fields.column("time"))
    if take is not None:
        micros, time_ok = micros[take], time_ok[take]
    _, offset_ok = minute_offsets_us(day)
    minute = np.where(time_ok, micros // 60_000_000, 0)
    price_ok, prices = positive_decimals(fields["price"][0], _DECIMAL)
    volume_ok, volumes = positive_decimals(fields["volume"][0], _WHOLE)
    qualifier_ok = fields["qualifier"][0].str.contains(r"^[0-9]{1,4}$").fill_null(False).to_numpy()
    date_ok = day_numbers(fields["date"][0]) != NO_DAY
    ok = (
        time_ok
        & offset_ok[minute]
        & date_ok[fields["date"][1]]
        & price_ok[fields["price"][1]]
        & volume_ok[fields["volume"][1]]
        & qualifier_ok[fields["qualifier"][1]]
    )
    line_index = scan.well if take is None else scan.well[take]
    return _Checked(fields, line_index, micros, minute, ok, prices, volumes), take


def _general_lines(
    scan: Scan, selected: np.ndarray, checked: _Checked, take: np.ndarray | None, company_id: str, symbol: str
) -> pl.DataFrame:
    """The general path's verdict (``_reason`` null: accepted) on the day's lines the vectorised
    checks did not accept and its lines of another width."""
    # A 7-field line without quotes is its fields joined by commas, so its text is rebuilt from them.
    failed = np.flatnonzero(~checked.ok)
    failed_rows = failed if take is None else take[failed]
    clock = scan.fields.column("time")
    texts = {"time": pl.Series(clock.take(pa.array(failed_rows)).cast(pa.large_string()), dtype=pl.String)} | {
        name: values.gather(index[failed]) for name, (values, index) in checked.fields.items()
    }
    rebuilt = pl.select(pl.concat_str([pl.lit(texts[name]) for name in TRADE_FIELDS], separator=",")).to_series()
    in_day = selected[scan.bad]
    others = pl.DataFrame(
        {
            "line_number": np.concatenate([scan.bad[in_day], checked.line_index[failed]]) + scan.first_line + 1,
            "raw": pl.concat(
                [
                    pl.Series([text for text, keep in zip(scan.bad_text, in_day) if keep], dtype=pl.String),
                    rebuilt.cast(pl.String),
                ]
            ),
        }
    ).sort("line_number")
    return _general_trades(
        others.select(
            pl.lit(str(scan.path)).alias("file"),
            pl.col("line_number").cast(pl.Int64),
            pl.lit(company_id).alias("company_id"),
            pl.lit(symbol, dtype=pl.String).alias("symbol"),
            pl.col("raw"),
        )
    )


def _encoded_rows(
    checked: _Checked, first_line: int, day: date, company_id: str, symbol: str, ingested_at: datetime
) -> pa.Table:
    """The accepted lines as dictionary-encoded V2 rows (ENCODED_SCHEMA), in time order."""
    fields, line_index, micros, minute = checked.fields, checked.line_index, checked.micros, checked.minute
    if not checked.ok.all():
        keep = np.flatnonzero(checked.ok)
        fields = {name: (values, index[keep]) for name, (values, index) in fields.items()}
        line_index, micros, minute = line_index[keep], micros[keep], minute[keep]
    offsets, _ = minute_offsets_us(day)
    utc = (day - EPOCH).days * 86_400_000_000 + micros - offsets[minute]
    line_number = line_index.astype(np.int64) + first_line + 1
    if len(utc) > 1 and not bool(np.all(np.diff(utc) >= 0)):
        order = np.lexsort((line_number, utc))
        fields = {name: (values, index[order]) for name, (values, index) in fields.items()}
        utc, line_number = utc[order], line_number[order]
    count = len(utc)
    compact = day.strftime("%Y%m%d")
    numbers = pc.cast(pa.array(line_number), pa.large_string())
    schema = ENCODED_SCHEMA
    qualifiers = dictionary_array(fields["qualifier"][1], fields["qualifier"][0].to_arrow())
    when = pa.scalar(ingested_at.astimezone(UTC), type=pa.timestamp("us", tz="UTC"))
    zeros = pa.array(np.zeros(count, dtype=np.int32))
    columns = {
        "message_id": prefixed(f"asx:trade:{symbol}:{compact}:", numbers),
        "trade_id": prefixed(f"{EXCHANGE}-{symbol}-{compact}-", numbers),
        "symbol": repeated(symbol, zeros),
        "exchange": repeated(EXCHANGE, zeros),
        "asset_class": repeated(ASSET_CLASS, zeros),
        "timestamp": pa.array(utc, type=pa.timestamp("us", tz="UTC")),
        "price": pa.DictionaryArray.from_arrays(
            pa.array(fields["price"][1].astype(np.int32, copy=False)), checked.prices
        ),
        "quantity": pa.DictionaryArray.from_arrays(
            pa.array(fields["volume"][1].astype(np.int32, copy=False)), checked.volumes
        ),
        "currency": repeated(CURRENCY, zeros),
        "side": repeated("UNKNOWN", zeros),
        "trade_conditions": pa.LargeListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int64)), qualifiers, type=schema.field("trade_conditions").type
        ),
        "source_sequence": pa.array(line_number),
        "ingestion_timestamp": pa.repeat(when, count),
        "platform_sequence": pa.nulls(count, pa.int64()),
        "vendor_data": vendor_data(company_id, fields),
    }
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def file_day_rows(
    scan: Scan, selected: np.ndarray, day: date, company_id: str, symbol: str, ingested_at: datetime
) -> tuple[pa.Table, pl.DataFrame]:
    """The V2 rows (in time order) and the rejected lines (with ``_reason``) of one file's day."""
    checked, take = _checked(scan, selected, day)
    general = _general_lines(scan, selected, checked, take, company_id, symbol)
    table = _encoded_rows(checked, scan.first_line, day, company_id, symbol, ingested_at)
    accepted = general.filter(pl.col("_reason").is_null())
    if accepted.height:  # lines only the general path accepts: rare, so these rows are decoded
        table = pa.concat_tables(
            [table.cast(TRADES.arrow_schema()), _trade_rows(accepted.select(_TRADE_COLUMNS), ingested_at)]
        )
        table = table.sort_by([("timestamp", "ascending"), ("source_sequence", "ascending")])
    return table, general.filter(pl.col("_reason").is_not_null())
