"""`k2 query sql "<SQL>"`: SQL over the K2 Iceberg tables with DuckDB."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import date, datetime
from decimal import Decimal

import duckdb
import pyarrow as pa

from k2_resources.errors import K2Error
from k2_resources.query import DuckDBQueryResource


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("query", help="query the Iceberg tables")
    kinds = parser.add_subparsers(dest="kind", required=True)
    sql = kinds.add_parser("sql", help="run SQL over market.trades, market.quotes, market.dead_letters")
    sql.add_argument("sql", help='e.g. "select symbol, count(*) from market.trades group by 1"')
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.set_defaults(handler=_sql)


def _sql(args: argparse.Namespace) -> int:
    try:
        # The user's SQL is run as given: it is theirs, on their own data, read-only views.
        result = DuckDBQueryResource().query(args.sql)
    except duckdb.Error as exc:
        raise K2Error(f"the query failed: {exc}") from exc
    print_table(result, args.format)
    return 0


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def print_table(table: pa.Table, fmt: str, out=sys.stdout) -> None:
    """Print Arrow rows as an aligned table, CSV with a header row, or JSON lines."""
    rows = table.to_pylist()
    columns = table.column_names
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([[_plain(row[c]) for c in columns] for row in rows])
    elif fmt == "json":
        for row in rows:
            out.write(json.dumps({c: _plain(row[c]) for c in columns}, default=str) + "\n")
    else:
        cells = [[str(_plain(row[c])) for c in columns] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "\n")
        out.write(f"({len(rows)} rows)\n")
