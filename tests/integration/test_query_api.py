"""The HTTP query API against a live uvicorn: keys, limits, every endpoint's rows against the hybrid
resource and DuckDB, pages without gaps or repeats, bad parameters, CSV and Arrow.

Data (built once for the module, in its own K2_HOME on the session's real Kafka broker): 3000
recorded Binance trades in a topic, the first half of each partition committed to Iceberg by
real micro-batches (the rest is the Kafka tail); one real ASX day (12 March 2014) in Iceberg;
OHLCV bars of all of it in market.ohlcv.
"""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import polars as pl
import pyarrow.ipc as ipc
import pytest

from k2_resources.analytics.ohlcv import exchange_day_bounds, ohlcv_bars, ohlcv_table, to_ohlcv_arrow
from k2_resources.api.app import ApiSettings, create_app
from k2_resources.api.keys import KeyFile, KeyStore, parse_key
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.platform.kafka_broker import free_port
from k2_resources.query.duckdb_query import DuckDBQueryResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support import synthetic
from tests.support.api_server import serving
from tests.support.producing import PARTITIONS, produce
from tests.support.recorded import recorded_trades_in_time_order
from tests.support.tail_calls import record_tail_calls
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ASX_DAY = "2014-03-12"
BOOTSTRAP_KEY = "bootstrap-key-for-the-api-tests"


class Platform:
    """What the tests share: the data's facts, the API's URL, keys, and reference readers."""

    def __init__(
        self, base_url: str, keys: KeyFile, topic: str, source, boundary: dict[int, int], hybrid: HybridQueryResource
    ) -> None:
        self.base_url, self.keys, self.topic, self.source, self.boundary = base_url, keys, topic, source, boundary
        self.hybrid = hybrid
        self.reader_key, _ = keys.create("reader", ["read:trades", "read:ohlcv"])
        self.client = httpx.Client(base_url=base_url, timeout=120, headers={"X-API-Key": self.reader_key})

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)


@pytest.fixture(scope="module")
def platform(kafka_broker, tmp_path_factory):
    home = tmp_path_factory.mktemp("api-k2home")
    topic = f"test-query-api-{os.getpid()}-{free_port()}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("K2_HOME", str(home))
        env.delenv("DAGSTER_HOME", raising=False)
        env.delenv("K2_API_KEYS_FILE", raising=False)
        kafka, iceberg = KafkaResource(), IcebergResource()
        kafka.ensure_topic(topic, partitions=PARTITIONS, config={"retention.ms": "-1"})
        source = produce(kafka, topic, recorded_trades_in_time_order(), record_timestamps=True)
        ends = kafka.end_offsets(topic)
        boundary = {p: end // 2 for p, end in ends.items()}
        for partition, offset in boundary.items():
            run_microbatch(kafka, iceberg, OffsetRange(topic, partition, 0, offset))
        assert committed_offsets(iceberg.trades(), topic) == boundary

        day_start, day_end = exchange_day_bounds("ASX", ASX_DAY)
        asx = pl.from_arrow(synthetic.asx_trades(1)).filter(
            (pl.col("timestamp") >= day_start) & (pl.col("timestamp") < day_end)
        )
        assert asx.height > 1000
        iceberg.trades().append(asx.to_arrow().cast(iceberg.trades().schema().as_arrow()))

        reference = HybridQueryResource(topics=[topic], producer_clock_slack_seconds=1)
        everything = reference.trades(None)
        ohlcv_table(iceberg.catalog()).append(to_ohlcv_arrow(ohlcv_bars(everything)))

        keys = KeyFile(home / "api" / "keys.json")
        settings = ApiSettings(
            keys_file=str(keys.path), bootstrap_key=BOOTSTRAP_KEY, rate_per_second=1000, burst=1000, topics=[topic]
        )
        app = create_app(
            settings,
            hybrid=HybridQueryResource(topics=[topic], producer_clock_slack_seconds=1),
            keys=KeyStore(keys.path, BOOTSTRAP_KEY, reload_interval_s=0.2),
        )
        with serving(app) as base_url:
            shared = Platform(base_url, keys, topic, source, boundary, reference)
            yield shared
            shared.client.close()
        reference.close()


def _get(url: str, **kwargs) -> httpx.Response:
    """One request without the shared client's key (a slow shared machine: a generous timeout)."""
    return httpx.get(url, timeout=120, **kwargs)


def _ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [row["message_id"] for row in response.json()["data"]]


def _api_order(frame: pl.DataFrame) -> list[str]:
    """The API's order: (timestamp, message_id)."""
    return frame.sort(["timestamp", "message_id"])["message_id"].to_list()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _boundary_times(platform: Platform) -> tuple[datetime, datetime]:
    rows = platform.source.rows
    committed = [r["timestamp"] for r in rows if r["offset"] < platform.boundary[r["partition"]]]
    tail = [r["timestamp"] for r in rows if r["offset"] >= platform.boundary[r["partition"]]]
    return max(committed), min(tail)


# ---------------------------------------------------------------------------------------------
# Keys and limits
# ---------------------------------------------------------------------------------------------


def test_keys_401_without_or_with_a_bad_key_403_without_the_scope_and_revocation(platform):
    url = "/v1/trades/recent"
    params = {"symbol": "BTCUSDT", "minutes": 1}
    anonymous = _get(platform.base_url + url, params=params)
    assert anonymous.status_code == 401
    assert "X-API-Key" in anonymous.json()["detail"] and anonymous.headers["WWW-Authenticate"].startswith("ApiKey")
    wrong = _get(platform.base_url + url, params=params, headers={"X-API-Key": platform.reader_key[:-2] + "xx"})
    assert wrong.status_code == 401
    assert _get(platform.base_url + url, params=params, headers={"X-API-Key": "not-a-k2-key"}).status_code == 401

    bars_only, entry = platform.keys.create("bars-only", ["read:ohlcv"])
    stored = platform.keys.path.read_text()
    assert parse_key(bars_only)[1] not in stored and entry.hash in stored  # only the hash is kept
    denied = _get(platform.base_url + url, params=params, headers={"X-API-Key": bars_only})
    assert denied.status_code == 403 and "read:trades" in denied.json()["detail"]
    assert (
        _get(platform.base_url + "/v1/ohlcv", params={"symbol": "BHP"}, headers={"X-API-Key": bars_only}).status_code
        == 200
    )
    # The same key as a bearer token; the bootstrap key from K2_API_KEY has every scope.
    assert (
        _get(
            platform.base_url + "/v1/ohlcv", params={"symbol": "BHP"}, headers={"Authorization": f"Bearer {bars_only}"}
        ).status_code
        == 200
    )
    assert _get(platform.base_url + url, params=params, headers={"X-API-Key": BOOTSTRAP_KEY}).status_code == 200

    platform.keys.revoke(entry.id)
    wait_for(
        lambda: (
            _get(
                platform.base_url + "/v1/ohlcv", params={"symbol": "BHP"}, headers={"X-API-Key": bars_only}
            ).status_code
            == 401
        ),
        timeout_s=10,
        what="the revoked key to be refused",
    )
    # Open routes: health for probes, metrics for Prometheus, the OpenAPI pages.
    assert _get(platform.base_url + "/v1/health").status_code == 200
    assert "k2_api_requests_total" in _get(platform.base_url + "/metrics").text
    assert "swagger" in _get(platform.base_url + "/docs").text.lower()
    spec = _get(platform.base_url + "/openapi.json").json()
    assert {"/v1/trades", "/v1/trades/recent", "/v1/ohlcv", "/v1/symbols", "/v1/health"} <= set(spec["paths"])


def test_rate_limit_answers_429_with_retry_after_and_recovers(platform):
    limited, entry = platform.keys.create("limited", ["read:trades"], rate_per_second=0.5, burst=3)
    headers = {"X-API-Key": limited}
    params = {"symbol": "BTCUSDT", "minutes": 1}
    # The store re-reads the file within its reload interval.
    wait_for(
        lambda: _get(platform.base_url + "/v1/trades/recent", params=params, headers=headers).status_code == 200,
        timeout_s=10,
        what="the new key to be accepted",
    )
    statuses = [_get(platform.base_url + "/v1/trades/recent", params=params, headers=headers) for _ in range(4)]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    assert all(r.status_code in (200, 429) for r in statuses)
    retry_after = int(refused[0].headers["Retry-After"])
    assert 1 <= retry_after <= 2  # one token at 0.5/s takes at most 2 s
    assert entry.id in refused[0].json()["detail"]
    # Other keys are not affected; the limited key passes again once a token has refilled.
    assert platform.get("/v1/trades/recent", params=params).status_code == 200
    wait_for(
        lambda: _get(platform.base_url + "/v1/trades/recent", params=params, headers=headers).status_code == 200,
        timeout_s=retry_after + 5,
        what="a token to refill",
        interval_s=0.5,
    )
    assert 'k2_api_rate_limited_total{key_id="' + entry.id + '"}' in _get(platform.base_url + "/metrics").text


# ---------------------------------------------------------------------------------------------
# Endpoints against the hybrid resource and DuckDB
# ---------------------------------------------------------------------------------------------


def test_trades_equal_the_hybrid_resource_in_iceberg_in_kafka_and_across(platform):
    last_committed, first_tail = _boundary_times(platform)
    first, last = platform.source.rows[0]["timestamp"], platform.source.rows[-1]["timestamp"]
    windows = {
        "iceberg": (first, last_committed - timedelta(seconds=5)),
        "kafka": (first_tail + timedelta(seconds=5), last + timedelta(seconds=1)),
        "across": (last_committed - timedelta(seconds=20), first_tail + timedelta(seconds=20)),
    }
    for name, (start, end) in windows.items():
        for symbols in (["BTCUSDT"], ["BTCUSDT", "ETHUSDT"]):
            expected = platform.hybrid.trades(symbols, start, end)
            assert expected.height, f"window {name} selects nothing: the test data is wrong"
            response = platform.get(
                "/v1/trades",
                params={"symbol": ",".join(symbols), "start": _iso(start), "end": _iso(end), "limit": 50_000},
            )
            assert _ids(response) == _api_order(expected), f"window {name}, symbols {symbols}"
            assert response.json()["next_cursor"] is None
    # Values are exact: prices and quantities as decimal strings, times in UTC.
    start, end = windows["across"]
    expected = platform.hybrid.trades(["ETHUSDT"], start, end).sort(["timestamp", "message_id"])
    rows = platform.get("/v1/trades", params={"symbol": "ETHUSDT", "start": _iso(start), "end": _iso(end)}).json()[
        "data"
    ]
    assert [Decimal(r["price"]) for r in rows] == expected["price"].to_list()
    assert [Decimal(r["quantity"]) for r in rows] == expected["quantity"].to_list()
    assert [datetime.fromisoformat(r["timestamp"]) for r in rows] == expected["timestamp"].to_list()

    # ASX (Iceberg only), filtered by exchange; an exchange that has none of the symbol's trades.
    day_start, day_end = exchange_day_bounds("ASX", ASX_DAY)
    expected = platform.hybrid.trades(["BHP"], day_start, day_end, exchange="ASX")
    response = platform.get(
        "/v1/trades",
        params={"symbol": "BHP", "start": _iso(day_start), "end": _iso(day_end), "exchange": "ASX", "limit": 50_000},
    )
    assert _ids(response) == _api_order(expected) and expected.height > 100
    assert _ids(platform.get("/v1/trades", params={"symbol": "BHP", "exchange": "BINANCE"})) == []

    # as_of: a snapshot id and a time read that snapshot only (time travel, no Kafka tail).
    table = IcebergResource().trades()
    first_snapshot = table.snapshots()[0]
    expected = platform.hybrid.trades(["BTCUSDT"], as_of=first_snapshot.snapshot_id)
    assert 0 < expected.height < platform.hybrid.trades(["BTCUSDT"]).height
    by_id = platform.get(
        "/v1/trades", params={"symbol": "BTCUSDT", "as_of": str(first_snapshot.snapshot_id), "limit": 50_000}
    )
    assert _ids(by_id) == _api_order(expected)
    moment = datetime.fromtimestamp(first_snapshot.timestamp_ms / 1000, tz=UTC)
    by_time = platform.get("/v1/trades", params={"symbol": "BTCUSDT", "as_of": _iso(moment), "limit": 50_000})
    assert _ids(by_time) == _api_order(platform.hybrid.trades(["BTCUSDT"], as_of=moment))


def test_recent_trades_equal_the_hybrid_recent_trades_including_the_kafka_tail(platform):
    _, first_tail = _boundary_times(platform)
    now = platform.source.rows[-1]["timestamp"]
    minutes = (now - first_tail).total_seconds() / 60 + 1  # reaches back across the boundary
    expected = platform.hybrid.recent_trades("BTCUSDT", minutes, now=now)
    stats = platform.hybrid.last_stats
    assert stats.kafka_rows > 0 and stats.iceberg_rows > 0
    response = platform.get(
        "/v1/trades/recent", params={"symbol": "BTCUSDT", "minutes": minutes, "now": _iso(now), "limit": 50_000}
    )
    assert _ids(response) == _api_order(expected)
    assert response.json()["window"]["end"] == now.isoformat()
    # Without `now` the window ends at the server's clock: the 2024 recording is far older.
    assert _ids(platform.get("/v1/trades/recent", params={"symbol": "BTCUSDT", "minutes": 5})) == []


def test_ohlcv_equals_duckdb_over_market_ohlcv(platform):
    duckdb = DuckDBQueryResource()
    day_start, day_end = exchange_day_bounds("ASX", ASX_DAY)
    for interval in ("1m", "5m", "1h", "1d"):
        expected = duckdb.query(
            "SELECT symbol, bucket_start, open, high, low, close, volume, vwap, trade_count FROM market.ohlcv "
            "WHERE interval = ? AND symbol IN (?, ?) AND bucket_start >= ? AND bucket_start < ? "
            "ORDER BY bucket_start, symbol, exchange",
            [interval, "BHP", "BTCUSDT", day_start - timedelta(days=1), day_end],
        ).to_pylist()
        assert expected
        response = platform.get(
            "/v1/ohlcv",
            params={
                "symbol": ["BHP", "BTCUSDT"],
                "interval": interval,
                "start": _iso(day_start - timedelta(days=1)),
                "end": _iso(day_end),
                "limit": 50_000,
            },
        )
        assert response.status_code == 200, response.text
        rows = response.json()["data"]
        assert [
            (
                r["symbol"],
                datetime.fromisoformat(r["bucket_start"]),
                Decimal(r["open"]),
                Decimal(r["high"]),
                Decimal(r["low"]),
                Decimal(r["close"]),
                Decimal(r["volume"]),
                Decimal(r["vwap"]),
                r["trade_count"],
            )
            for r in rows
        ] == [tuple(e.values()) for e in expected], interval
    # window: the last 2 hours before `end`, the same as start = end - 2h.
    end = day_start + timedelta(hours=12)  # noon in Sydney: the two hours before it are trading hours
    by_window = platform.get("/v1/ohlcv", params={"symbol": "BHP", "interval": "5m", "window": "2h", "end": _iso(end)})
    by_start = platform.get(
        "/v1/ohlcv",
        params={"symbol": "BHP", "interval": "5m", "start": _iso(end - timedelta(hours=2)), "end": _iso(end)},
    )
    assert by_window.json()["data"] == by_start.json()["data"] and by_window.json()["count"] > 0


def test_symbols_equal_duckdb_and_health_reports_the_lag(platform):
    expected = (
        DuckDBQueryResource()
        .query(
            'SELECT symbol, exchange, min("timestamp") AS first_trade, max("timestamp") AS last_trade, '
            "count(*) AS trade_count FROM market.trades GROUP BY 1, 2 ORDER BY exchange, symbol"
        )
        .to_pylist()
    )
    response = platform.get("/v1/symbols")
    assert response.status_code == 200, response.text
    rows = response.json()["data"]
    assert [
        (
            r["symbol"],
            r["exchange"],
            datetime.fromisoformat(r["first_trade"]),
            datetime.fromisoformat(r["last_trade"]),
            r["trade_count"],
        )
        for r in rows
    ] == [tuple(e.values()) for e in expected]
    assert {r["symbol"] for r in rows} >= {"BHP", "BTCUSDT", "ETHUSDT"}
    assert [r["symbol"] for r in platform.get("/v1/symbols", params={"exchange": "BINANCE"}).json()["data"]] == [
        "BTCUSDT",
        "ETHUSDT",
    ]

    health = _get(platform.base_url + "/v1/health").json()
    assert health["status"] == "ok" and health["catalog"]["ok"] and health["kafka"]["ok"]
    ends = KafkaResource().end_offsets(platform.topic)
    lag = health["lag"][platform.topic]
    assert lag["total"] == sum(ends[p] - platform.boundary[p] for p in ends) > 0
    assert {int(p): v["committed_offset"] for p, v in lag["partitions"].items()} == platform.boundary


def test_with_kafka_down_iceberg_windows_answer_the_tail_is_a_503_or_a_named_partial_answer(platform, monkeypatch):
    """An API whose Kafka does not answer: what Iceberg holds is served, the tail fails fast or is named."""
    unreachable = KafkaResource(bootstrap_servers=f"127.0.0.1:{free_port()}")
    hybrid = HybridQueryResource(
        kafka=unreachable,
        topics=[platform.topic],
        producer_clock_slack_seconds=1,
        topic_exchanges={platform.topic: ["BINANCE"]},
    )
    asked = record_tail_calls(monkeypatch, unreachable)  # what the API's reads asked the unreachable Kafka
    settings = ApiSettings(keys_file=str(platform.keys.path), topics=[platform.topic])
    with serving(create_app(settings, hybrid=hybrid, keys=KeyStore(platform.keys.path))) as base_url:
        client = httpx.Client(base_url=base_url, timeout=120, headers={"X-API-Key": platform.reader_key})
        day_start, day_end = exchange_day_bounds("ASX", ASX_DAY)
        asx = client.get(
            "/v1/trades",
            params={
                "symbol": "BHP",
                "start": _iso(day_start),
                "end": _iso(day_end),
                "exchange": "ASX",
                "limit": 50_000,
            },
        )
        assert _ids(asx) == _api_order(platform.hybrid.trades(["BHP"], day_start, day_end, exchange="ASX"))

        assert asked == [], f"the ASX window asked Kafka {asked}"
        down = client.get("/v1/trades", params={"symbol": "BTCUSDT"})
        assert down.status_code == 503 and "allow_partial" in down.json()["detail"]
        assert asked == ["partitions"]  # fast: the first bounded look-up failed; the read was never tried
        partial = client.get("/v1/trades", params={"symbol": "BTCUSDT", "allow_partial": "true", "limit": 50_000})
        assert _ids(partial) == _api_order(
            platform.hybrid.trades(["BTCUSDT"]).filter(
                pl.col("message_id").is_in(
                    [r["message_id"] for r in platform.source.rows if r["offset"] < platform.boundary[r["partition"]]]
                )
            )
        )
        assert partial.json()["partial"] is True and platform.topic in partial.headers["X-K2-Partial"]
        health = client.get("/v1/health").json()
        assert health["status"] == "degraded" and not health["kafka"]["ok"] and health["catalog"]["ok"]
        client.close()


# ---------------------------------------------------------------------------------------------
# Pages, formats, bad parameters
# ---------------------------------------------------------------------------------------------


def _all_pages(platform: Platform, path: str, params: dict, key=lambda row: row["message_id"]) -> list:
    seen, cursor, pages = [], None, 0
    while True:
        response = platform.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["count"] <= params["limit"]
        seen += [key(row) for row in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        assert response.headers["X-Next-Cursor"] == cursor and 'rel="next"' in response.headers["Link"]
        assert pages < 1000


def test_pages_have_no_gaps_and_no_repeats(platform):
    everything = platform.hybrid.trades(["BTCUSDT", "ETHUSDT"])
    paged = _all_pages(platform, "/v1/trades", {"symbol": "BTCUSDT,ETHUSDT", "limit": 97})
    assert len(paged) == len(set(paged)) == everything.height
    assert paged == _api_order(everything)

    # Trades sharing one timestamp straddle page borders: the (timestamp, message_id) key keeps them exact.
    assert everything.group_by("timestamp").len()["len"].max() > 1
    _, first_tail = _boundary_times(platform)
    now = platform.source.rows[-1]["timestamp"]
    minutes = (now - first_tail).total_seconds() / 60 + 1
    recent = _all_pages(
        platform, "/v1/trades/recent", {"symbol": "ETHUSDT", "minutes": minutes, "now": _iso(now), "limit": 50}
    )
    assert recent == _api_order(platform.hybrid.recent_trades("ETHUSDT", minutes, now=now))

    bars = _all_pages(
        platform,
        "/v1/ohlcv",
        {"symbol": "BHP,BTCUSDT,ETHUSDT", "interval": "1m", "limit": 37},
        key=lambda row: (row["bucket_start"], row["symbol"], row["exchange"]),
    )
    expected = DuckDBQueryResource().query(
        "SELECT count(*) AS n FROM market.ohlcv WHERE interval = '1m' AND symbol IN ('BHP', 'BTCUSDT', 'ETHUSDT')"
    )
    assert len(bars) == len(set(bars)) == expected["n"][0].as_py() and bars == sorted(bars)

    # A cursor only continues the query it came from.
    first = platform.get("/v1/trades", params={"symbol": "BTCUSDT", "limit": 10}).json()
    other = platform.get("/v1/trades", params={"symbol": "ETHUSDT", "limit": 10, "cursor": first["next_cursor"]})
    assert other.status_code == 422 and other.json()["errors"][0]["parameter"] == "cursor"


def test_csv_and_arrow_carry_the_same_rows_as_json(platform):
    params = {"symbol": "BTCUSDT,ETHUSDT", "limit": 500}
    as_json = platform.get("/v1/trades", params=params)
    as_csv = platform.get("/v1/trades", params=params, headers={"Accept": "text/csv"})
    as_arrow = platform.get("/v1/trades", params=params, headers={"Accept": "application/vnd.apache.arrow.stream"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
    rows = as_json.json()["data"]
    csv_rows = pl.read_csv(io.BytesIO(as_csv.content), infer_schema=False)
    arrow_rows = ipc.open_stream(as_arrow.content).read_all()
    assert csv_rows["message_id"].to_list() == arrow_rows["message_id"].to_pylist() == [r["message_id"] for r in rows]
    assert (
        [Decimal(p) for p in csv_rows["price"].to_list()]
        == arrow_rows["price"].to_pylist()
        == [Decimal(r["price"]) for r in rows]
    )
    assert str(arrow_rows.schema.field("price").type) == "decimal128(18, 8)"
    assert as_csv.headers["X-Next-Cursor"] == as_arrow.headers["X-Next-Cursor"] == as_json.json()["next_cursor"]
    # Bars and symbols render in every format too; an Accept the API cannot meet is a 406.
    bars = platform.get(
        "/v1/ohlcv",
        params={"symbol": "BHP", "interval": "1h"},
        headers={"Accept": "application/vnd.apache.arrow.stream"},
    )
    assert (
        ipc.open_stream(bars.content).read_all().num_rows
        == platform.get("/v1/ohlcv", params={"symbol": "BHP", "interval": "1h"}).json()["count"]
        > 0
    )
    assert platform.get("/v1/symbols", headers={"Accept": "text/csv"}).text.startswith("symbol,exchange,first_trade")
    refused = platform.get("/v1/trades", params=params, headers={"Accept": "text/html"})
    assert refused.status_code == 406 and "text/csv" in refused.json()["detail"]


@pytest.mark.parametrize(
    "path, params, parameter",
    [
        ("/v1/trades", {}, "symbol"),
        ("/v1/trades", {"symbol": "BTC USDT"}, "symbol"),
        ("/v1/trades", {"symbol": "BTCUSDT", "start": "yesterday"}, "start"),
        ("/v1/trades", {"symbol": "BTCUSDT", "start": "2024-08-09T01:00:00Z", "end": "2024-08-09T00:00:00Z"}, "end"),
        ("/v1/trades", {"symbol": "BTCUSDT", "exchange": "BIN'ANCE"}, "exchange"),
        ("/v1/trades", {"symbol": "BTCUSDT", "as_of": "99"}, "as_of"),
        ("/v1/trades", {"symbol": "BTCUSDT", "as_of": "2001-01-01T00:00:00Z"}, "as_of"),
        ("/v1/trades", {"symbol": "BTCUSDT", "limit": "0"}, "limit"),
        ("/v1/trades", {"symbol": "BTCUSDT", "limit": "lots"}, "limit"),
        ("/v1/trades", {"symbol": "BTCUSDT", "cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ("/v1/trades/recent", {"symbol": "BTCUSDT", "minutes": "-5"}, "minutes"),
        ("/v1/trades/recent", {"symbol": "BTCUSDT", "minutes": "100000"}, "minutes"),
        ("/v1/trades/recent", {"symbol": "BTCUSDT,ETHUSDT"}, "symbol"),
        ("/v1/ohlcv", {"symbol": "BHP", "interval": "7m"}, "interval"),
        ("/v1/ohlcv", {"symbol": "BHP", "window": "2 weeks"}, "window"),
        ("/v1/ohlcv", {"symbol": "BHP", "window": "2h", "start": "2014-03-12T00:00:00Z"}, "window"),
    ],
)
def test_bad_parameters_get_a_422_naming_the_parameter_and_the_fix(platform, path, params, parameter):
    response = platform.get(path, params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert [e["parameter"] for e in body["errors"]] == [parameter]
    assert body["detail"].startswith(parameter) and len(body["detail"]) > len(parameter) + 10
