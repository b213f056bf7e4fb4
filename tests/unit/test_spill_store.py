"""SpillStore: atomic Parquet files per offset range under K2_HOME/spill, listed, read and deleted."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from k2_resources.degradation.spill import SpillStore
from k2_resources.errors import K2Error
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC

TOPIC = BINANCE_TRADES_TOPIC


def records(start: int, end: int) -> list[dict]:
    return [
        {"offset": o, "symbol": "MWR", "price": 1.0 + o / 100, "raw": f"msg-{o}".encode()} for o in range(start, end)
    ]


def test_default_root_is_under_k2_home(k2_home: Path) -> None:
    store = SpillStore()
    batch = store.write(TOPIC, 0, 100, 110, records(100, 110))
    assert batch.path == k2_home / "spill" / TOPIC / "0" / "100-110.parquet"
    assert batch.path.is_file()
    assert (batch.rows, batch.size) == (10, 10)


def test_write_list_read_delete(k2_home: Path) -> None:
    store = SpillStore()
    b2 = store.write(TOPIC, 1, 0, 5, records(0, 5))
    b1 = store.write(TOPIC, 0, 1000, 1003, records(1000, 1003))
    b0 = store.write(TOPIC, 0, 20, 1000, pa.Table.from_pylist(records(20, 25)))  # fewer rows than offsets
    store.write("other.topic", 0, 0, 1, records(0, 1))
    listed = store.list(TOPIC)
    assert [(b.partition, b.start, b.end, b.rows) for b in listed] == [
        (0, 20, 1000, 5),
        (0, 1000, 1003, 3),
        (1, 0, 5, 5),
    ]
    assert listed == [b0, b1, b2]
    assert [b.topic for b in store.list()] == [TOPIC] * 3 + ["other.topic"]
    assert store.list(TOPIC, partition=1) == [b2]
    assert store.list("never.spilled") == []
    table = store.read(b1)
    assert table.column("offset").to_pylist() == [1000, 1001, 1002]
    assert table.column("raw").to_pylist() == [b"msg-1000", b"msg-1001", b"msg-1002"]
    assert table.schema.metadata is None  # the spill bookkeeping does not leak into the records
    assert store.backlog() == {"batches": 4, "rows": 14, "offsets": 980 + 3 + 5 + 1}
    assert store.delete(b1) is True
    assert store.delete(b1) is False
    assert store.list(TOPIC, 0) == [b0]
    with pytest.raises(K2Error, match="list\\(\\) again"):
        store.read(b1)


def test_same_range_again_replaces_the_file(k2_home: Path) -> None:
    store = SpillStore()
    store.write(TOPIC, 0, 0, 3, records(0, 3))
    again = store.write(TOPIC, 0, 0, 3, records(0, 3))
    assert store.list(TOPIC) == [again]
    assert store.read(again).num_rows == 3


@pytest.mark.parametrize(("start", "end"), [(5, 15), (0, 11), (9, 10), (0, 100)])
def test_overlapping_ranges_are_refused(k2_home: Path, start: int, end: int) -> None:
    store = SpillStore()
    store.write(TOPIC, 0, 0, 10, records(0, 10))
    with pytest.raises(K2Error, match="overlap the spilled batch 0..10"):
        store.write(TOPIC, 0, start, end, records(start, end))
    assert len(store.list(TOPIC)) == 1


def test_adjacent_ranges_and_other_partitions_are_fine(k2_home: Path) -> None:
    store = SpillStore()
    store.write(TOPIC, 0, 0, 10, records(0, 10))
    store.write(TOPIC, 0, 10, 20, records(10, 20))
    store.write(TOPIC, 1, 5, 15, records(5, 15))
    assert len(store.list(TOPIC)) == 3


def test_write_is_atomic_no_partial_file_on_failure(k2_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SpillStore()
    import k2_resources.degradation.spill as spill

    def broken_write(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(spill.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.write(TOPIC, 0, 0, 3, records(0, 3))
    folder = k2_home / "spill" / TOPIC / "0"
    assert list(folder.iterdir()) == []  # neither the final file nor the temporary remains
    assert store.list() == []


def test_temporaries_are_ignored_by_list_and_removable(k2_home: Path) -> None:
    store = SpillStore()
    batch = store.write(TOPIC, 0, 0, 3, records(0, 3))
    stale = batch.path.parent / ".3-6.parquet.123.abc.tmp"
    stale.write_bytes(b"half")
    assert store.list() == [batch]
    assert store.remove_stale_temporaries(older_than_seconds=3600) == 0
    assert store.remove_stale_temporaries(older_than_seconds=-1) == 1
    assert not stale.exists()


def test_empty_batch_with_schema(k2_home: Path) -> None:
    store = SpillStore()
    schema = pa.schema([("offset", pa.int64()), ("symbol", pa.string())])
    batch = store.write(TOPIC, 0, 0, 4, [], schema=schema)  # every record went to dead letters
    assert batch.rows == 0
    assert store.read(batch).schema.names == ["offset", "symbol"]


@pytest.mark.parametrize(
    ("topic", "partition", "start", "end", "message"),
    [
        ("../escape", 0, 0, 1, "letters, digits"),
        ("a topic", 0, 0, 1, "letters, digits"),
        (TOPIC, -1, 0, 1, "partitions are >= 0"),
        (TOPIC, 0, 5, 5, "0 <= start < end"),
        (TOPIC, 0, -1, 3, "0 <= start < end"),
    ],
)
def test_bad_ranges_and_names_are_refused(k2_home: Path, topic, partition, start, end, message) -> None:
    with pytest.raises(K2Error, match=message):
        SpillStore().write(topic, partition, start, end, records(0, 1))


def test_explicit_root(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "elsewhere")
    batch = store.write(TOPIC, 2, 7, 8, records(7, 8))
    assert batch.path.parent == tmp_path / "elsewhere" / TOPIC / "2"
