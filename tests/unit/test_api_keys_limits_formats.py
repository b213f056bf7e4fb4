"""The query API's building blocks without a server: hashed keys, token buckets, Accept, cursors."""

from __future__ import annotations

import json
import stat

import polars as pl
import pyarrow.ipc as ipc
import pytest

from k2_resources.api.errors import BadCursor, NotAcceptable
from k2_resources.api.formats import ARROW, CSV, JSON, Cursor, choose_media_type, render
from k2_resources.api.keys import KeyFile, KeyStore, parse_key
from k2_resources.api.limits import TokenBucketLimiter
from k2_resources.errors import K2Error


def test_keys_are_stored_hashed_verified_and_revoked(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    key, entry = keys.create("research", ["read:trades"])
    stored = keys.path.read_text()
    key_id, secret = parse_key(key)
    assert key_id == entry.id and secret not in stored and key not in stored
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    saved = json.loads(stored)["keys"][0]
    assert len(bytes.fromhex(saved["salt"])) == 16 and len(bytes.fromhex(saved["hash"])) == 32

    store = KeyStore(keys.path, reload_interval_s=0)
    assert store.authenticate(key).id == entry.id
    assert store.authenticate(key).id == entry.id  # the second time from the verified cache
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate("k2_" + entry.id + "_" + "x" * 43) is None
    assert store.authenticate("nonsense") is None
    assert store.authenticate(key).allows("read:trades") and not store.authenticate(key).allows("read:ohlcv")

    keys.revoke(entry.id)
    assert store.authenticate(key) is None  # the cache is dropped when the file changes
    assert [k.revoked_at is not None for k in keys.read()] == [True]


def test_bootstrap_key_admin_scope_and_bad_input(tmp_path):
    store = KeyStore(tmp_path / "none.json", bootstrap_key="from-the-environment", reload_interval_s=0)
    assert store.configured
    assert store.authenticate("from-the-environment").allows("read:ohlcv")
    assert store.authenticate("from-the-environment-not") is None
    assert not KeyStore(tmp_path / "none.json").configured
    with pytest.raises(K2Error, match="choose from"):
        KeyFile(tmp_path / "k.json").create("x", ["write:everything"])
    with pytest.raises(K2Error, match="k2 api keys list"):
        KeyFile(tmp_path / "k.json").revoke("000000000000")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(K2Error, match="cannot be read"):
        KeyStore(tmp_path / "broken.json")


def test_token_bucket_allows_the_burst_then_refuses_until_a_token_refills():
    now = [100.0]
    limiter = TokenBucketLimiter(rate_per_second=2, burst=3, clock=lambda: now[0])
    assert [limiter.take("a").allowed for _ in range(4)] == [True, True, True, False]
    refused = limiter.take("a")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.5)
    assert refused.retry_after_header == "1"  # whole seconds, never 0
    assert limiter.take("b").allowed  # buckets are per key
    now[0] += 0.5
    assert limiter.take("a").allowed and not limiter.take("a").allowed
    now[0] += 60
    assert limiter.take("a").remaining == 2  # refilled to the burst, not beyond
    slow = limiter.take("c", rate_per_second=0.1, burst=1)
    assert slow.allowed and limiter.take("c", rate_per_second=0.1, burst=1).retry_after_header == "10"


@pytest.mark.parametrize(
    "accept, chosen",
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/json", JSON),
        ("text/csv", CSV),
        ("application/vnd.apache.arrow.stream", ARROW),
        ("text/html, text/csv;q=0.5", CSV),
        ("application/json;q=0.2, application/vnd.apache.arrow.stream", ARROW),
    ],
)
def test_accept_header_picks_the_format(accept, chosen):
    assert choose_media_type(accept) == chosen


def test_unsupported_accept_is_refused_naming_the_formats():
    with pytest.raises(NotAcceptable, match="text/csv"):
        choose_media_type("text/html")


def test_render_json_csv_and_arrow():
    frame = pl.DataFrame(
        {"symbol": ["BHP", "CBA"], "price": ["1.50000000", "2.25000000"], "conditions": [["XT", "Q"], None]}
    ).with_columns(pl.col("price").cast(pl.Decimal(18, 8)))
    body = json.loads(render(frame, JSON, {"next_cursor": None}))
    assert body == {
        "data": [
            {"symbol": "BHP", "price": "1.50000000", "conditions": ["XT", "Q"]},
            {"symbol": "CBA", "price": "2.25000000", "conditions": None},
        ],
        "count": 2,
        "next_cursor": None,
    }
    assert render(frame, CSV).decode().splitlines() == [
        "symbol,price,conditions",
        "BHP,1.50000000,XT;Q",
        "CBA,2.25000000,",
    ]
    table = ipc.open_stream(render(frame, ARROW)).read_all()
    assert (
        table.column("symbol").to_pylist() == ["BHP", "CBA"]
        and str(table.schema.field("price").type) == "decimal128(18, 8)"
    )
    assert json.loads(render(frame.head(0), JSON)) == {"data": [], "count": 0}


def test_cursors_round_trip_and_refuse_other_queries_and_garbage():
    cursor = Cursor("q1", [1723161600000000, "BINANCE-BTCUSDT-1"], {"now": 5})
    decoded = Cursor.decode(cursor.encode(), "q1", 2)
    assert decoded == cursor
    with pytest.raises(BadCursor, match="different query"):
        Cursor.decode(cursor.encode(), "q2", 2)
    for garbage in ("", "!!!", "bm90IGpzb24", cursor.encode()[:-4]):
        with pytest.raises(BadCursor):
            Cursor.decode(garbage, "q1", 2)


def test_topic_exchanges_come_from_the_environment_and_a_bad_pair_names_the_fix(monkeypatch):
    from k2_resources.api.settings import ApiSettings
    from k2_resources.errors import K2Error

    monkeypatch.delenv("K2_API_TOPIC_EXCHANGES", raising=False)
    assert ApiSettings().topic_exchanges == {"market.trades.binance": ["BINANCE"]}
    monkeypatch.setenv("K2_API_TOPIC_EXCHANGES", "t1=binance, t1=BYBIT,t2=ASX")
    assert ApiSettings().topic_exchanges == {"t1": ["BINANCE", "BYBIT"], "t2": ["ASX"]}
    monkeypatch.setenv("K2_API_TOPIC_EXCHANGES", "t1")
    with pytest.raises(K2Error, match="topic=EXCHANGE"):
        ApiSettings()
