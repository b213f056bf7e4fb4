"""The ASX trading-day partitions, derived from the dates present in the CSV files.

A StaticPartitionsDefinition rather than daily time windows: the data has trading days
only (no weekends or holidays), so every key is a day with rows, and a backfill launched
from the UI over "all partitions" loads exactly the days there are. A new day in the files
is a new key the next time the code location loads.
"""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from k2_resources.asx.files import trading_days

asx_trading_days = StaticPartitionsDefinition(trading_days())

# Backfill policy: none set, which means each trading day is its own run. A day is one Iceberg
# transaction with its own replace filter, a failed day is retried alone from the UI, and the
# asset code stays one-key simple (BackfillPolicy.single_run would need every asset to loop over
# context.partition_keys; setting multi_run(1) explicitly gives the same runs plus a beta warning
# on every load). Concurrent days commit to the same tables; a commit that loses the race is
# redone on the new snapshot (k2_resources.asx.writes.replace_rows).
