"""analytics domain: OHLCV bars of ASX (per trading day) and Binance (as micro-batches land), and live
1-minute Binance bars that include the Kafka tail (through the hybrid resource), with their schedule."""

from dagster import Definitions

from k2_assets.analytics.assets import asx_ohlcv, binance_ohlcv
from k2_assets.analytics.live_bars import (
    binance_live_bars,
    binance_live_bars_every_minute,
    binance_live_bars_refresh,
)

defs = Definitions(
    assets=[asx_ohlcv, binance_ohlcv, binance_live_bars],
    jobs=[binance_live_bars_refresh],
    schedules=[binance_live_bars_every_minute],
)
