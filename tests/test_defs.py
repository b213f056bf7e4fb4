"""Smoke test: the one Definitions object loads, validates and holds the ASX graph."""

from __future__ import annotations

from dagster import AssetKey, Definitions


def test_definitions_load_and_hold_the_asx_assets() -> None:
    from k2_assets.definitions import defs

    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    asx = {AssetKey(name) for name in ("asx_raw_trades", "asx_trades", "asx_raw_quotes", "asx_quotes")}
    assert asx <= graph.get_all_asset_keys()
    for key in asx:
        node = graph.get(key)
        assert node.group_name == "asx"
        assert node.partitions_def is not None
        assert node.partitions_def.get_partition_keys() == [
            "2014-03-10", "2014-03-11", "2014-03-12", "2014-03-13", "2014-03-14",
        ]
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert ("asx_trades", "rows_match_valid_csv_rows") in checks
    assert ("asx_trades", "no_duplicate_trade_id") in checks
    assert ("asx_quotes", "prices_positive") in checks
    assert defs.resolve_implicit_global_asset_job_def().name == "__ASSET_JOB"
