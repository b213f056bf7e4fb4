"""Binance domain: the micro-batch asset fed by the stream sensor, its checks and job."""

from dagster import Definitions

from k2_assets.binance.assets import binance_trades
from k2_assets.binance.checks import (
    DEGRADATION_CHECKS,
    binance_consumer_lag,
    binance_offset_baseline,
    binance_retention_loss,
)
from k2_assets.binance.jobs import binance_trades_job
from k2_sensors.binance.stream_sensor import binance_stream_sensor

defs = Definitions(
    assets=[binance_trades],
    asset_checks=[binance_consumer_lag, binance_offset_baseline, binance_retention_loss, *DEGRADATION_CHECKS],
    jobs=[binance_trades_job],
    sensors=[binance_stream_sensor],
)
