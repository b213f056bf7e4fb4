"""The micro-batch job the stream sensor launches."""

from dagster import AssetSelection, define_asset_job, in_process_executor

from k2_assets.binance.assets import binance_trades

binance_trades_job = define_asset_job(
    "binance_trades_microbatch",
    selection=AssetSelection.assets(binance_trades).without_checks(),
    description="Append one Kafka offset range of Binance trades to market.trades (config from the stream sensor).",
    tags={"k2/kind": "ingest"},
    # One step: a child process per step would only add start-up time to every micro-batch.
    executor_def=in_process_executor,
)
