"""ASX assets: the raw CSV lines of a trading day, and the validated V2 trades and quotes in Iceberg."""

from datetime import date

import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)
from pyiceberg.expressions import And, EqualTo

from k2_assets.asx.partitions import asx_trading_days
from k2_resources.asx.files import Kind
from k2_resources.asx.normalise import DEAD_LETTER_SOURCE
from k2_resources.asx.source import AsxSourceResource
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.asx.writes import IngestResult, ingest_day
from k2_resources.catalog.resource import IcebergResource
from k2_resources.query.duckdb_query import DuckDBQueryResource

GROUP = "asx"

# Per kind: the Iceberg table, its id column and the condition every stored price must meet.
_TABLES: dict[str, tuple[str, str, str]] = {
    "trades": ("market.trades", "trade_id", "price > 0 and quantity > 0"),
    "quotes": ("market.quotes", "quote_id", "coalesce(bid_price, 1) > 0 and coalesce(ask_price, 1) > 0"),
}


def _raw_checks(asset_name: str) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            "company_ids_mapped",
            asset=asset_name,
            description="every company file maps to a symbol in reference-data/company_info.csv",
        )
    ]


def _stored_checks(asset_name: str, id_column: str) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            "rows_match_valid_csv_rows",
            asset=asset_name,
            description="Iceberg rows for the trading day equal the CSV rows that passed validation",
        ),
        AssetCheckSpec(f"no_duplicate_{id_column}", asset=asset_name, description=f"{id_column} is unique in the day"),
        AssetCheckSpec("prices_positive", asset=asset_name, description="every stored price (and quantity) is > 0"),
        AssetCheckSpec(
            "no_dead_letters",
            asset=asset_name,
            description="no CSV row of the day was rejected (rejected rows are in market.dead_letters)",
        ),
    ]


def _read_raw(context: AssetExecutionContext, asx_source: AsxSourceResource, kind: Kind, asset_name: str):
    raw = asx_source.read_day(kind, context.partition_key)
    symbols = asx_source.symbols()
    company_ids = sorted(set(raw.column("company_id").to_pylist()))
    unmapped = [c for c in company_ids if c not in symbols]
    yield Output(
        raw,
        metadata={
            "dagster/row_count": raw.num_rows,
            "source_dir": str(asx_source.path()),
            "company_ids": ", ".join(company_ids),
        },
    )
    yield AssetCheckResult(
        check_name="company_ids_mapped",
        asset_key=asset_name,
        passed=not unmapped,
        severity=AssetCheckSeverity.WARN,
        metadata={"unmapped_company_ids": ", ".join(unmapped) or "none"},
    )


def _stored_day_stats(duckdb: DuckDBQueryResource, kind: Kind, partition_key: str) -> dict[str, int]:
    """rows, distinct ids and rows breaking the price rule for one trading day, read back by DuckDB."""
    table, id_column, price_rule = _TABLES[kind]
    start, end = local_day_bounds_utc(partition_key)
    # Table and column names are the constants above; the values are bound parameters.
    result = duckdb.query(
        f"select count(*) as rows, count(distinct {id_column}) as distinct_ids, "
        f"count(*) filter (where not ({price_rule})) as bad_prices "
        f'from {table} where exchange = ? and "timestamp" >= ? and "timestamp" < ?',
        ["ASX", start, end],
    )
    return {name: int(result.column(name)[0].as_py()) for name in result.column_names}


def _dead_letter_sample(iceberg: IcebergResource, kind: Kind, partition_key: str, limit: int = 5) -> str:
    rows = (
        iceberg.dead_letters()
        .scan(
            row_filter=And(
                EqualTo(term="source", value=DEAD_LETTER_SOURCE[kind]),
                EqualTo(term="partition_key", value=partition_key),
            ),
            selected_fields=("file", "line_number", "reason"),
            limit=limit,
        )
        .to_arrow()
        .to_pylist()
    )
    return "\n".join(f"{r['file']}:{r['line_number']}: {r['reason']}" for r in rows)


def _store_day(
    context: AssetExecutionContext,
    raw: pa.Table,
    kind: Kind,
    asset_name: str,
    asx_source: AsxSourceResource,
    iceberg: IcebergResource,
    duckdb: DuckDBQueryResource,
) -> MaterializeResult:
    key = context.partition_key
    result: IngestResult = ingest_day(asx_source.path(), iceberg, kind, key, raw=raw)
    stats = _stored_day_stats(duckdb, kind, key)
    _, id_column, price_rule = _TABLES[kind]
    start, end = local_day_bounds_utc(key)
    context.log.info(
        f"ASX {kind} {key}: {result.raw_rows} CSV rows, {result.valid} valid, {result.rejected} dead letters; "
        f"Iceberg holds {stats['rows']} rows for the day"
    )
    checks = [
        AssetCheckResult(
            check_name="rows_match_valid_csv_rows",
            asset_key=asset_name,
            passed=stats["rows"] == result.valid,
            metadata={"iceberg_rows": stats["rows"], "valid_csv_rows": result.valid, "csv_rows": result.raw_rows},
        ),
        AssetCheckResult(
            check_name=f"no_duplicate_{id_column}",
            asset_key=asset_name,
            passed=stats["distinct_ids"] == stats["rows"],
            metadata={"rows": stats["rows"], "distinct_ids": stats["distinct_ids"]},
        ),
        AssetCheckResult(
            check_name="prices_positive",
            asset_key=asset_name,
            passed=stats["bad_prices"] == 0,
            metadata={"rows_breaking_rule": stats["bad_prices"], "rule": price_rule},
        ),
        AssetCheckResult(
            check_name="no_dead_letters",
            asset_key=asset_name,
            passed=result.rejected == 0,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "dead_letters": result.rejected,
                "sample": MetadataValue.text(_dead_letter_sample(iceberg, kind, key) if result.rejected else ""),
            },
        ),
    ]
    return MaterializeResult(
        metadata={
            "dagster/row_count": result.valid,
            "csv_rows": result.raw_rows,
            "dead_letters": result.rejected,
            "rows_per_symbol": MetadataValue.json(result.rows_per_symbol),
            "utc_range": f"[{start.isoformat()}, {end.isoformat()})",
            "snapshot_id": str(result.snapshot_id),
            "seconds_reading_and_validating": result.seconds.get("read_and_validate", 0.0),
            "seconds_writing": result.seconds.get("write", 0.0),
            "trading_day": date.fromisoformat(key).isoformat(),
        },
        check_results=checks,
    )


@asset(
    partitions_def=asx_trading_days,
    group_name=GROUP,
    check_specs=_raw_checks("asx_raw_trades"),
    kinds={"csv"},
)
def asx_raw_trades(context: AssetExecutionContext, asx_source: AsxSourceResource):
    """The ASX trade lines of one trading day from every company's trades/<company_id>.csv, as read:
    file, 1-based line number, company id, symbol and the raw line (Sydney local times)."""
    yield from _read_raw(context, asx_source, "trades", "asx_raw_trades")


@asset(
    partitions_def=asx_trading_days,
    group_name=GROUP,
    check_specs=_stored_checks("asx_trades", "trade_id"),
    kinds={"iceberg", "polars"},
)
def asx_trades(
    context: AssetExecutionContext,
    asx_raw_trades: pa.Table,
    asx_source: AsxSourceResource,
    iceberg: IcebergResource,
    duckdb: DuckDBQueryResource,
) -> MaterializeResult:
    """ASX trades of one trading day as trade V2 rows in Iceberg market.trades (UTC times, AUD,
    side UNKNOWN); the day is replaced, never appended. Rejected rows go to market.dead_letters."""
    return _store_day(context, asx_raw_trades, "trades", "asx_trades", asx_source, iceberg, duckdb)


@asset(
    partitions_def=asx_trading_days,
    group_name=GROUP,
    check_specs=_raw_checks("asx_raw_quotes"),
    kinds={"csv"},
)
def asx_raw_quotes(context: AssetExecutionContext, asx_source: AsxSourceResource):
    """The ASX best bid/ask lines of one trading day from every company's quotes/<company_id>.csv, as read."""
    yield from _read_raw(context, asx_source, "quotes", "asx_raw_quotes")


@asset(
    partitions_def=asx_trading_days,
    group_name=GROUP,
    check_specs=_stored_checks("asx_quotes", "quote_id"),
    kinds={"iceberg", "polars"},
)
def asx_quotes(
    context: AssetExecutionContext,
    asx_raw_quotes: pa.Table,
    asx_source: AsxSourceResource,
    iceberg: IcebergResource,
    duckdb: DuckDBQueryResource,
) -> MaterializeResult:
    """ASX best bid/ask of one trading day as quote V2 rows in Iceberg market.quotes; an empty
    side of the book is a null price. The day is replaced, never appended."""
    return _store_day(context, asx_raw_quotes, "quotes", "asx_quotes", asx_source, iceberg, duckdb)


ASX_ASSETS = [asx_raw_trades, asx_trades, asx_raw_quotes, asx_quotes]
