"""The serving path's parts in isolation: admission control, shared log-end look-ups, plan widening,
the sorted data-file rows (exact windows by binary search)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from k2_resources.api.admission import AdmissionMiddleware
from k2_resources.api.pages import PageCache, Rendered
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.trades.iceberg_read import RowFilter
from k2_resources.trades.live_tail import FileRows, SharedEndOffsets, planning_filter
from k2_resources.trades.serving_cache import SnapshotRows, micros_of


def _scope(path: str, query: bytes = b"") -> dict:
    return {"type": "http", "path": path, "query_string": query, "method": "GET", "headers": []}


async def _call(middleware: AdmissionMiddleware, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request"}

    await middleware(scope, receive, send)
    return sent


def test_admission_refuses_beyond_the_limit_at_once_with_retry_after_and_sheds_expensive_first() -> None:
    release = asyncio.Event()
    level = {"now": DegradationLevel.NORMAL}

    async def app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware = AdmissionMiddleware(app, max_in_flight=2, level=lambda: level["now"])

    async def scenario() -> None:
        held = [asyncio.create_task(_call(middleware, _scope("/v1/trades/recent"))) for _ in range(2)]
        await asyncio.sleep(0)
        assert middleware.in_flight == 2
        started = time.perf_counter()
        refused = await _call(middleware, _scope("/v1/trades/recent"))
        assert time.perf_counter() - started < 0.1
        assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
        health = asyncio.create_task(_call(middleware, _scope("/v1/health")))  # open paths are never refused
        await asyncio.sleep(0)
        assert not health.done()
        release.set()
        assert [(await task)[0]["status"] for task in held] == [200, 200]
        await health
        assert middleware.in_flight == 0

        release.clear()
        level["now"] = DegradationLevel.CIRCUIT_BREAK
        one = asyncio.create_task(_call(middleware, _scope("/v1/symbols")))
        await asyncio.sleep(0)
        assert (await _call(middleware, _scope("/v1/symbols")))[0]["status"] == 503  # expensive: one at a time
        cheap = asyncio.create_task(_call(middleware, _scope("/v1/trades", b"symbol=BHP&start=a&end=b")))
        await asyncio.sleep(0)
        assert not cheap.done()  # a bounded point query keeps the whole limit
        release.set()
        assert (await one)[0]["status"] == 200 and (await cheap)[0]["status"] == 200

    asyncio.run(scenario())


class _SlowTail:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def end_offsets(self, topic: str, partitions: list[int]) -> dict[int, int]:
        with self.lock:
            self.calls += 1
            call = self.calls
        time.sleep(0.05)
        return {p: call for p in partitions}


def test_shared_end_offsets_one_look_up_at_a_time_each_started_after_the_query_arrived() -> None:
    tail = _SlowTail()
    shared = SharedEndOffsets(tail)  # type: ignore[arg-type]
    first = shared.ends("t", [0])
    assert first == {0: 1}
    answers: list[int] = []

    def query() -> None:
        answers.append(shared.ends("t", [0])[0])

    threads = [threading.Thread(target=query) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(answers) == 20
    assert all(answer >= 2 for answer in answers)  # none took the look-up that started before it arrived
    assert tail.calls <= 4  # 20 concurrent queries, a couple of shared look-ups


def test_planning_filter_widens_the_window_to_whole_hours() -> None:
    start = datetime(2026, 1, 2, 10, 17, 5, tzinfo=UTC)
    widened = planning_filter(RowFilter(("BTCUSDT",), start, start + timedelta(minutes=5), "BINANCE"))
    assert widened == RowFilter(
        ("BTCUSDT",), datetime(2026, 1, 2, 10, tzinfo=UTC), datetime(2026, 1, 2, 11, tzinfo=UTC), "BINANCE"
    )
    on_the_hour = datetime(2026, 1, 2, 11, tzinfo=UTC)
    assert planning_filter(RowFilter(None, None, on_the_hour)).end == on_the_hour


def test_file_rows_window_equals_the_filter_and_is_cached(tmp_path: Path) -> None:
    base = datetime(2026, 1, 2, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "symbol": ["A", "B"] * 50,
            "exchange": ["X"] * 100,
            "timestamp": [base + timedelta(seconds=(i * 37) % 100) for i in range(100)],
            "message_id": [f"m{i}" for i in range(100)],
        }
    )
    path = tmp_path / "part.parquet"
    frame.write_parquet(path)
    rows = FileRows(memory_budget_bytes=1 << 20)
    window = RowFilter(("A",), base + timedelta(seconds=10), base + timedelta(seconds=60), "X")
    got = rows.window(None, str(path), window)  # type: ignore[arg-type]  # local file: no table options needed
    predicate = window.polars()
    assert predicate is not None
    expected = frame.filter(predicate)
    assert sorted(got["message_id"].to_list()) == sorted(expected["message_id"].to_list())
    assert got["timestamp"].is_sorted()
    path.unlink()  # a second window of the same key comes from memory
    again = rows.window(None, str(path), RowFilter(("A",), None, base + timedelta(seconds=10), "X"))  # type: ignore[arg-type]
    assert again.height == frame.filter((pl.col("symbol") == "A") & (pl.col("timestamp") < window.start)).height


def test_snapshot_rows_add_new_files_to_the_previous_snapshot_and_rebuild_otherwise() -> None:
    base = datetime(2026, 1, 2, tzinfo=UTC)

    def rows(ids: range) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "timestamp": [base + timedelta(seconds=i // 2) for i in ids],
                "message_id": [f"m{i:03d}" for i in ids],
            }
        )

    files = {"a": rows(range(0, 10)), "b": rows(range(10, 20)), "c": rows(range(20, 30))}
    reads: list[str] = []

    def read(path: str) -> pl.DataFrame:
        reads.append(path)
        return files[path]

    snapshots = SnapshotRows()
    empty = rows(range(0))
    first = snapshots.rows(("k",), 1, ("a", "b"), read, empty)
    second = snapshots.rows(("k",), 2, ("a", "b", "c"), read, empty)
    assert reads == ["a", "b", "c"]  # the second snapshot read only its new file
    assert second.rows["message_id"].to_list() == [f"m{i:03d}" for i in range(30)]
    assert snapshots.rows(("k",), 2, ("a", "b", "c"), read, empty) is second
    # the snapshot before stays kept (queries read it while the next is prepared): nothing read again
    assert snapshots.rows(("k",), 1, ("a", "b"), read, empty) is first and reads == ["a", "b", "c"]
    compacted = snapshots.rows(("k",), 3, ("c",), read, empty)  # files went away: rebuilt
    assert compacted.rows.height == 10 and reads[-1] == "c"
    window = second.window(micros_of(base + timedelta(seconds=3)), micros_of(base + timedelta(seconds=7)))
    assert window["message_id"].to_list() == [f"m{i:03d}" for i in range(6, 14)]
    assert second.window(micros_of(base + timedelta(seconds=3)), None, head=3).height == 3
    assert first.rows.height == 20


def test_page_cache_keeps_the_newest_within_its_bytes() -> None:
    pages = PageCache(max_bytes=40)
    for number in range(5):
        pages.put(("q", number), Rendered(b"x" * 10, "application/json", None, 1))
    assert pages.get(("q", 0)) is None and pages.get(("q", 4)) is not None
    assert pages.get(None) is None
