"""Which version of a table the serving path reads (k2_resources.trades.serving_table): stream appends
and compactions are served from the version before while the next is prepared aside; any other
change is served at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table

from k2_resources.sink.offsets import committed_key, pending_key
from k2_resources.trades.serving_table import ServedTable, invisible_change
from tests.support.waiting import wait_for

TOPIC = "trades-topic"
ROWS = pa.table({"trade_id": pa.array([1, 2], pa.int64())})


def _catalog(tmp_path: Path) -> SqlCatalog:
    catalog = SqlCatalog("t", uri=f"sqlite:///{tmp_path / 'c.db'}", warehouse=f"file://{tmp_path}")
    catalog.create_namespace("ns")
    catalog.create_table("ns.trades", schema=ROWS.schema)
    return catalog


def _stream_append(catalog: SqlCatalog, start: int) -> Table:
    table = catalog.load_table("ns.trades")
    batch = {
        "k2.kafka.topic": TOPIC,
        "k2.kafka.partition": "0",
        "k2.kafka.start-offset": str(start),
        "k2.kafka.end-offset": str(start + 2),
        committed_key(TOPIC): f'{{"0": {start + 2}}}',
    }
    table.append(ROWS, snapshot_properties=batch)
    return catalog.load_table("ns.trades")


def _append(catalog: SqlCatalog, summary: dict[str, str]) -> Table:
    table = catalog.load_table("ns.trades")
    table.append(ROWS, snapshot_properties=summary)
    return catalog.load_table("ns.trades")


def test_only_stream_appends_of_the_served_topics_and_compactions_are_invisible(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    served = _stream_append(catalog, 0)
    _stream_append(catalog, 2)
    compacted = _append(catalog, {"k2.maintenance": "compaction", committed_key(TOPIC): '{"0": 4}'})
    assert invisible_change(served, compacted, [TOPIC])
    assert invisible_change(served, served, [TOPIC])
    assert not invisible_change(served, compacted, ["another-topic"])  # its offsets are not in that tail
    batch_load = _append(catalog, {})  # e.g. an ASX day: rows no Kafka tail holds
    assert not invisible_change(compacted, batch_load, [TOPIC])
    assert not invisible_change(served, batch_load, [TOPIC])
    deferred = _append(catalog, {"k2.kafka.topic": TOPIC, pending_key(TOPIC): "[]"})  # pending rows
    assert not invisible_change(batch_load, deferred, [TOPIC])


def test_the_version_before_is_served_while_the_next_is_prepared_and_a_visible_change_at_once(
    tmp_path: Path,
) -> None:
    catalog = _catalog(tmp_path)
    release, prepared = threading.Event(), []

    def prepare(table: Table) -> None:
        release.wait(30)
        prepared.append(table.metadata_location)

    served = ServedTable([TOPIC], prepare)
    first = _stream_append(catalog, 0)
    assert served.table(first) is first
    second = _stream_append(catalog, 2)
    assert served.table(second) is first  # prepared aside meanwhile
    third = _stream_append(catalog, 4)
    assert served.table(third) is first  # one preparation at a time
    release.set()
    wait_for(lambda: served.prepared_aside == 1, timeout_s=30, what="the next version to be prepared")
    assert prepared == [second.metadata_location]
    assert served.table(third) is second  # the next preparation starts from the version now served
    wait_for(lambda: served.prepared_aside == 2, timeout_s=30, what="the version after to be prepared")
    assert served.table(third) is third
    batch_load = _append(catalog, {})
    assert served.table(batch_load) is batch_load and served.served_at_once == 1
    served.close()
