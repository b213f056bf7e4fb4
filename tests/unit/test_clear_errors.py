"""Guarantee 6: a missing Java or Maven, and a schema mismatch, each give one message naming the fix."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from k2_resources.errors import KafkaUnavailableError, SchemaMismatchError
from k2_resources.platform.kafka_broker import KafkaBroker
from k2_resources.schemas import TradeV2, decode_quote, decode_trade, encode_trade


def _broker(tmp_path: Path) -> KafkaBroker:
    return KafkaBroker(home=tmp_path / "kafka", port=1, controller_port=2)


def test_missing_java_names_the_package_to_install(tmp_path, monkeypatch):
    broker = _broker(tmp_path)
    monkeypatch.setattr(broker, "classpath", lambda: "unused.jar")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no java, no mvn
    with pytest.raises(KafkaUnavailableError, match=r"`java` was not found on PATH; install a Java 17\+ runtime"):
        broker.start()


def test_missing_maven_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaUnavailableError, match="`mvn` was not found on PATH; install Maven"):
        _broker(tmp_path).classpath()


def _trade() -> dict:
    now = datetime(2024, 8, 9, tzinfo=UTC)
    return TradeV2(
        message_id="m",
        trade_id="BINANCE-1",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=now,
        price=Decimal("1.5"),
        quantity=Decimal("2"),
        currency="USDT",
        ingestion_timestamp=now,
    ).to_record()


def test_a_record_that_does_not_fit_the_schema_names_the_model_to_use():
    record = _trade()
    record["side"] = "SIDEWAYS"
    with pytest.raises(SchemaMismatchError, match="build it with the pydantic model"):
        encode_trade(record)


def test_a_message_of_another_schema_is_refused_with_its_ids():
    payload = encode_trade(_trade())
    with pytest.raises(SchemaMismatchError, match="schema id 1, expected 0 and 2"):
        decode_quote(payload)
    with pytest.raises(SchemaMismatchError, match="too short"):
        decode_trade(b"\x00")
