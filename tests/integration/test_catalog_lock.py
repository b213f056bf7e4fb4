"""The SQLite Iceberg catalog locked by another writer during a micro-batch commit: the commit
waits, retries and lands exactly once (issue 13, item 6)."""

from __future__ import annotations

import logging
import sqlite3
import threading

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from tests.support.producing import produce
from tests.support.recorded import first_binance_records

pytestmark = pytest.mark.integration

ROWS = 300
HOLD_S = 8.0  # longer than SQLite's default 5 s busy timeout, so the first commit attempt fails


class CatalogLocker:
    """Holds an exclusive lock on the catalog database from another connection for ``HOLD_S`` seconds."""

    def __init__(self, database) -> None:
        self.database = database
        self.held = threading.Event()
        self.thread: threading.Thread | None = None

    def lock_now(self) -> None:
        """Take the lock (once) and return only when it is held."""
        if self.thread is not None:
            return
        self.thread = threading.Thread(target=self._hold, name="catalog-locker", daemon=True)
        self.thread.start()
        assert self.held.wait(timeout=30), "could not lock the catalog database"

    def _hold(self) -> None:
        connection = sqlite3.connect(self.database, timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            self.held.set()
            threading.Event().wait(HOLD_S)  # the fault: another writer keeps the database locked this long
            connection.execute("ROLLBACK")
        finally:
            connection.close()


@pytest.mark.timeout(300)
def test_a_commit_that_meets_a_locked_catalog_retries_and_lands_once(kafka_broker, k2_home, topic_name, caplog):
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    kafka.ensure_topic(topic_name, partitions=1)
    records = first_binance_records("BTCUSDT", ROWS)
    produce(kafka, topic_name, records, partitions=1)
    iceberg = IcebergResource()
    before = iceberg.trades().scan().to_arrow().num_rows
    locker = CatalogLocker(k2_home / "iceberg" / "catalog.db")
    batch = OffsetRange(topic_name, 0, 0, ROWS)

    with caplog.at_level(logging.WARNING, logger="k2_resources.catalog.commit"):
        result = run_microbatch(kafka, iceberg, batch, before_commit=locker.lock_now)
    locker.thread.join(timeout=30)

    busy = [r for r in caplog.records if "catalog is locked" in r.getMessage()]
    assert busy, "the commit never met the lock, so the test proved nothing"
    assert (result.written, result.already_committed) == (ROWS, False)
    table = IcebergResource().trades()
    rows = table.scan().to_arrow()
    ours = [m for m in rows.column("message_id").to_pylist() if m in {r["message_id"] for r in records}]
    assert len(ours) == ROWS and len(set(ours)) == ROWS  # each row exactly once
    assert rows.num_rows == before + ROWS
    assert committed_offsets(table, topic_name) == {0: ROWS}
    # the range is committed: running it again writes nothing
    assert run_microbatch(kafka, iceberg, batch).already_committed
    assert IcebergResource().trades().scan().to_arrow().num_rows == before + ROWS
