"""The ids a run must have landed, read from the source files themselves, and the ids a K2 home's
``market.trades`` holds (read with pyiceberg, not by the code that counts them): for exactly-once
judged by sets of ids rather than by the counts the code under test reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from k2_resources.paths import DATA_DIR

# Settings of the shell that would point a reader at another platform than the home's.
FOREIGN_SETTINGS = ("K2_KAFKA_BOOTSTRAP", "DAGSTER_HOME", "K2_ICEBERG_", "K2_S3_", "DAGSTER_POSTGRES_")


def recorded_binance_trades() -> list[tuple[int, str, int]]:
    """Every trade of the bundled Binance recording (data/binance/*-trades-*.csv) as
    (time in ms, symbol, exchange trade id), in time, then symbol, then id order."""
    trades: list[tuple[int, str, int]] = []
    for path in sorted((DATA_DIR / "binance").glob("*-trades-*.csv")):
        symbol = path.name.split("-", 1)[0].upper()
        with path.open(newline="") as handle:
            trades.extend((int(row["time_ms"]), symbol, int(row["trade_id"])) for row in csv.DictReader(handle))
    return sorted(trades)


def binance_trade_ids(trades: list[tuple[int, str, int]]) -> Counter:
    """(symbol, trade_id as market.trades spells it: ``BINANCE-<id>``) of each trade, counted."""
    return Counter((symbol, f"BINANCE-{trade_id}") for _, symbol, trade_id in trades)


# Read in a process of its own, so the home's settings (and a cluster's catalog) apply to it alone.
_READ_IDS = """
import json, sys
from pyiceberg.expressions import EqualTo
from k2_resources.catalog.resource import IcebergResource
rows = IcebergResource().trades().scan(row_filter=EqualTo("exchange", sys.argv[1]))
table = rows.select("symbol", "trade_id").to_arrow()
print(json.dumps(list(zip(table.column("symbol").to_pylist(), table.column("trade_id").to_pylist()))))
"""


def table_trade_ids(
    home: Path, exchange: str = "BINANCE", settings: dict[str, str] | None = None, timeout_s: float = 300
) -> Counter:
    """(symbol, trade_id) of every ``exchange`` row of market.trades in ``home``, counted (a duplicate
    counts twice), read with pyiceberg in a process of its own on that home; ``settings``: the
    variables of a cluster's catalog and store (K2_ICEBERG_*, K2_S3_*), if the home uses one."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_SETTINGS)}
    environment.update(K2_HOME=str(home), **(settings or {}))
    done = subprocess.run(
        [sys.executable, "-c", _READ_IDS, exchange],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Counter(tuple(pair) for pair in json.loads(done.stdout.strip().splitlines()[-1]))
