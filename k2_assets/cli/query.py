"""`k2 query sql "<SQL>"` (DuckDB over the Iceberg tables), `k2 query trades` (Iceberg plus the Kafka
tail, through HybridQueryResource) and `k2 query ohlcv` (bars from market.ohlcv)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import duckdb

from k2_resources.catalog.settings import use_reader_identity
from k2_resources.errors import K2Error
from k2_resources.query.sql_query import run_sql

if TYPE_CHECKING:  # type hints only: `k2 query sql` never imports pyarrow (a new process pays for every import)
    import pyarrow as pa


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("query", help="query the Iceberg tables")
    kinds = parser.add_subparsers(dest="kind", required=True)
    sql = kinds.add_parser("sql", help="run SQL over market.trades, market.quotes, market.dead_letters, market.ohlcv")
    sql.add_argument("sql", help='e.g. "select symbol, count(*) from market.trades group by 1"')
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.set_defaults(handler=_as_reader(_sql))

    trades = kinds.add_parser("trades", help="trades from Iceberg plus the Kafka tail (the hybrid query)")
    trades.add_argument("--symbol", action="append", required=True, help="repeat for several symbols")
    window = trades.add_mutually_exclusive_group()
    window.add_argument("--minutes", type=float, help="the last N minutes (up to --end, default now)")
    window.add_argument("--start", type=_moment, help="ISO time, UTC unless it has an offset")
    trades.add_argument("--end", type=_moment, help="ISO time (exclusive), UTC unless it has an offset")
    trades.add_argument("--exchange", help="e.g. BINANCE or ASX")
    trades.add_argument("--as-of", help="snapshot id or ISO time: Iceberg time travel, no Kafka tail")
    trades.add_argument("--topic", action="append", help="Kafka topic(s) of the tail (default market.trades.binance)")
    trades.add_argument(
        "--allow-partial",
        action="store_true",
        help="when Kafka is down, print the Iceberg part and warn (on stderr) which offsets are missing",
    )
    trades.add_argument(
        "--columns",
        default="timestamp,symbol,exchange,price,quantity,side,trade_id",
        help="comma-separated columns to print, or 'all'",
    )
    _output_arguments(trades)
    trades.set_defaults(handler=_as_reader(_trades))

    ohlcv = kinds.add_parser("ohlcv", help="OHLCV bars from market.ohlcv")
    ohlcv.add_argument("--symbol", action="append", required=True, help="repeat for several symbols")
    ohlcv.add_argument("--interval", choices=["1m", "5m", "1h", "1d"], default="1m")
    ohlcv.add_argument("--start", type=_moment, help="bars starting at or after this ISO time (UTC default)")
    ohlcv.add_argument("--end", type=_moment, help="bars starting before this ISO time")
    ohlcv.add_argument("--exchange", help="e.g. BINANCE or ASX")
    _output_arguments(ohlcv)
    ohlcv.set_defaults(handler=_as_reader(_ohlcv))


def _as_reader(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``handler`` run with the object store's reader identity when one is configured: `k2 query`
    only reads, so it holds no credential that could write or delete table files."""

    def run(args: argparse.Namespace) -> int:
        use_reader_identity()
        return handler(args)

    return run


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="print at most N rows (default: 100 for table, all for csv/json; 0: all)",
    )


def _moment(text: str) -> datetime:
    """An ISO time; naive means UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time; use e.g. 2024-08-09T00:05:00Z") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _limited(table: pa.Table, args: argparse.Namespace) -> pa.Table:
    limit = args.limit if args.limit is not None else (100 if args.format == "table" else 0)
    if limit and table.num_rows > limit:
        print(f"(showing the first {limit} of {table.num_rows} rows; --limit 0 prints all)", file=sys.stderr)
        return table.slice(0, limit)
    return table


def _trades(args: argparse.Namespace) -> int:
    from k2_resources.trades.hybrid import HybridQueryResource, KafkaTailMissingWarning

    hybrid = HybridQueryResource(topics=args.topic) if args.topic else HybridQueryResource()
    # The missing offsets are printed once, below, instead of as a Python warning and a bare log line.
    logging.getLogger("k2_resources.trades.hybrid").addHandler(logging.NullHandler())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KafkaTailMissingWarning)
            if args.minutes is not None:
                end = args.end or datetime.now(UTC)
                frame = hybrid.trades(
                    args.symbol,
                    end - timedelta(minutes=args.minutes),
                    end,
                    exchange=args.exchange,
                    allow_partial=args.allow_partial,
                )
            else:
                as_of: int | datetime | None = None
                if args.as_of:
                    as_of = int(args.as_of) if args.as_of.isdigit() else _moment(args.as_of)
                frame = hybrid.trades(
                    args.symbol,
                    args.start,
                    args.end,
                    exchange=args.exchange,
                    as_of=as_of,
                    allow_partial=args.allow_partial,
                )
        stats = hybrid.last_stats
    finally:
        hybrid.close()
    if stats is not None and stats.partial:
        print(
            f"warning: Kafka is unreachable; printing the Iceberg part only, without the trades of "
            f"{'; '.join(stats.missing.values())}",
            file=sys.stderr,
        )
    table = frame.to_arrow()
    if args.columns != "all":
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in table.column_names]
        if unknown:
            raise K2Error(f"unknown column(s) {', '.join(unknown)}; choose from {', '.join(table.column_names)}")
        table = table.select(wanted)
    print_table(_limited(table, args), args.format, out=sys.stdout)
    return 0


def _ohlcv(args: argparse.Namespace) -> int:
    from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, In, LessThan

    from k2_resources.analytics.ohlcv import ohlcv_table
    from k2_resources.catalog.resource import IcebergResource

    condition = And(EqualTo(term="interval", value=args.interval), In(term="symbol", literals=tuple(args.symbol)))
    if args.exchange:
        condition = And(condition, EqualTo(term="exchange", value=args.exchange))
    if args.start:
        condition = And(condition, GreaterThanOrEqual(term="bucket_start", value=args.start.isoformat()))
    if args.end:
        condition = And(condition, LessThan(term="bucket_start", value=args.end.isoformat()))
    rows = ohlcv_table(IcebergResource().catalog()).scan(row_filter=condition).to_arrow()
    rows = rows.select(
        ["bucket_start", "symbol", "exchange", "open", "high", "low", "close", "volume", "vwap", "trade_count"]
    ).sort_by([("symbol", "ascending"), ("bucket_start", "ascending")])
    if rows.num_rows == 0:
        print(
            f"no {args.interval} bars for {', '.join(args.symbol)} in that window; materialise asx_ohlcv / "
            "binance_ohlcv in Dagster first",
            file=sys.stderr,
        )
    print_table(_limited(rows, args), args.format, out=sys.stdout)
    return 0


def _sql(args: argparse.Namespace) -> int:
    try:
        # The user's SQL is run as given: it is theirs, on their own data, read-only views.
        columns, rows = run_sql(args.sql)
    except duckdb.Error as exc:
        raise K2Error(f"the query failed: {exc}") from exc
    print_rows(columns, rows, args.format)
    return 0


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def print_table(table: pa.Table, fmt: str, out=None) -> None:
    """Print Arrow rows as an aligned table, CSV with a header row, or JSON lines."""
    columns = table.column_names
    print_rows(columns, [tuple(row[c] for c in columns) for row in table.to_pylist()], fmt, out)


def print_rows(columns: list[str], rows: Sequence[Sequence[Any]], fmt: str, out=None) -> None:
    """Print rows (tuples in column order) as an aligned table, CSV with a header row, or JSON lines."""
    out = out or sys.stdout  # looked up per call: tests and notebooks swap sys.stdout
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([[_plain(value) for value in row] for row in rows])
    elif fmt == "json":
        for row in rows:
            out.write(json.dumps({c: _plain(v) for c, v in zip(columns, row)}, default=str) + "\n")
    else:
        cells = [[str(_plain(value)) for value in row] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "\n")
        out.write(f"({len(rows)} rows)\n")
