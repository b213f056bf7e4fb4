"""`k2 demo --json`: the whole platform headless, end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.source_ids import binance_trade_ids, recorded_binance_trades, table_trade_ids

pytestmark = pytest.mark.integration


def test_demo_streams_every_recorded_trade_into_iceberg_exactly_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("K2_KAFKA_BOOTSTRAP", "DAGSTER_HOME")}
    env["K2_HOME"] = str(tmp_path / "unused")  # the demo makes its own fresh home under --home
    completed = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "demo", "--json", "--home", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])

    binance = summary["binance"]
    assert binance["source_trades"] == 37_563  # every trade of the bundled recording (data/binance/SOURCE.md)
    assert binance["source_trades"] == binance["iceberg_trades"] == binance["iceberg_distinct_trade_ids"]
    assert summary["asx"]["iceberg_trades"] == 200_545
    assert summary["lag"] == 0
    assert summary["checks"] and set(summary["checks"].values()) == {"PASSED"}
    assert {"binance_trades.consumer_lag", "binance_trades.offset_baseline"} <= set(summary["checks"])

    # Exactly once by ids, not by the demo's counts: the table's Binance trade ids are the recording's, once each.
    in_table = table_trade_ids(tmp_path / "demo")
    assert [key for key, n in in_table.items() if n > 1] == []  # no trade twice
    assert in_table == binance_trade_ids(recorded_binance_trades())
