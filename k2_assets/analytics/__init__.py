"""analytics domain: OHLCV bars of ASX (per trading day) and Binance (as micro-batches land)."""

from dagster import Definitions

from k2_assets.analytics.assets import asx_ohlcv, binance_ohlcv

defs = Definitions(assets=[asx_ohlcv, binance_ohlcv])
