"""asx domain: the ASX trading-day assets (raw CSV lines -> V2 trades and quotes in Iceberg) and their checks."""

from dagster import Definitions

from k2_assets.asx.assets import ASX_ASSETS, asx_quotes, asx_raw_quotes, asx_raw_trades, asx_trades
from k2_assets.asx.partitions import asx_trading_days

# The checks are declared on the assets (check_specs) and evaluated right after each day's
# write, so asset_checks holds nothing extra.
defs = Definitions(assets=ASX_ASSETS, asset_checks=[])

__all__ = ["defs", "asx_trading_days", "asx_raw_trades", "asx_trades", "asx_raw_quotes", "asx_quotes"]
