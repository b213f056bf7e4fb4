"""The one Definitions object loads, validates and holds exactly the definitions listed here."""

from __future__ import annotations

from dagster import AssetKey, Definitions

from k2_assets.definitions import defs

ASSETS = {
    "asx_raw_trades",
    "asx_trades",
    "asx_raw_quotes",
    "asx_quotes",
    "binance_trades",
    "asx_ohlcv",
    "binance_ohlcv",
    "binance_live_bars",
    "trades_storage",
    "trades_file_layout",
    "trades_snapshot_history",
    "symbol_tiers",
    "market_trades_table",
    "market_quotes_table",
    "market_live_bars_table",
}
ASSET_CHECKS = {
    ("asx_raw_trades", "company_ids_mapped"),
    ("asx_trades", "no_dead_letters"),
    ("asx_trades", "no_duplicate_trade_id"),
    ("asx_trades", "prices_positive"),
    ("asx_trades", "rows_match_valid_csv_rows"),
    ("asx_raw_quotes", "company_ids_mapped"),
    ("asx_quotes", "no_dead_letters"),
    ("asx_quotes", "no_duplicate_quote_id"),
    ("asx_quotes", "prices_positive"),
    ("asx_quotes", "rows_match_valid_csv_rows"),
    ("binance_trades", "consumer_lag"),
    ("binance_trades", "dead_letter_count"),
    ("binance_trades", "deferred_backlog"),
    ("binance_trades", "degradation_level"),
    ("binance_trades", "offset_baseline"),
    ("binance_trades", "retention_loss"),
    ("binance_trades", "sequence_gaps"),
    ("binance_trades", "spilled_backlog"),
    ("asx_ohlcv", "high_at_least_open_and_close"),
    ("asx_ohlcv", "low_at_most_open_and_close"),
    ("asx_ohlcv", "volumes_add_up_to_trades"),
    ("binance_ohlcv", "high_at_least_open_and_close"),
    ("binance_ohlcv", "low_at_most_open_and_close"),
    ("binance_ohlcv", "volumes_add_up_to_trades"),
    ("binance_live_bars", "high_at_least_open_and_close"),
    ("binance_live_bars", "low_at_most_open_and_close"),
    ("binance_live_bars", "volumes_match_hybrid_trades"),
    ("trades_file_layout", "files_per_partition"),
    ("trades_file_layout", "small_files_per_partition"),
    ("market_trades_table", "table_health"),
    ("market_quotes_table", "table_health"),
    ("market_live_bars_table", "table_health"),
}
JOBS = {
    "__ASSET_JOB",
    "binance_trades_microbatch",
    "binance_live_bars_refresh",
    "symbol_tiers_refresh",
    "trades_replay",
    "trades_table_maintenance",
    "dagster_history_retention",
}
SCHEDULES = {
    "binance_live_bars_every_minute",
    "symbol_tiers_hourly",
    "trades_replay_nightly",
    "trades_table_maintenance_nightly",
    "dagster_history_retention_nightly",
}
# default_automation_condition_sensor is Dagster's, present because assets declare automation conditions.
SENSORS = {"binance_stream_sensor", "k2_check_alerts", "default_automation_condition_sensor"}
RESOURCES = {
    "alert_webhooks",
    "analytics",
    "asx_source",
    "degradation",
    "duckdb",
    "hybrid",
    "iceberg",
    "kafka",
    "maintenance",
    "sink",
}


def test_definitions_hold_exactly_the_expected_definitions() -> None:
    graph = defs.resolve_asset_graph()
    repository = defs.get_repository_def()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == ASSETS
    assert {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys} == ASSET_CHECKS
    assert {job.name for job in repository.get_all_jobs()} == JOBS
    assert {schedule.name for schedule in repository.schedule_defs} == SCHEDULES
    assert {sensor.name for sensor in repository.sensor_defs} == SENSORS
    assert set(repository.get_top_level_resources()) == RESOURCES


def test_definitions_load_and_hold_the_asx_assets() -> None:
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    asx = {AssetKey(name) for name in ("asx_raw_trades", "asx_trades", "asx_raw_quotes", "asx_quotes")}
    assert asx <= graph.get_all_asset_keys()
    for key in asx:
        node = graph.get(key)
        assert node.group_name == "asx"
        assert node.partitions_def is not None
        assert node.partitions_def.get_partition_keys() == [
            "2014-03-10",
            "2014-03-11",
            "2014-03-12",
            "2014-03-13",
            "2014-03-14",
        ]
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert ("asx_trades", "rows_match_valid_csv_rows") in checks
    assert ("asx_trades", "no_duplicate_trade_id") in checks
    assert ("asx_quotes", "prices_positive") in checks
    assert defs.resolve_implicit_global_asset_job_def().name == "__ASSET_JOB"
