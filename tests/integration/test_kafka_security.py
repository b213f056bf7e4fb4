"""The local cluster's Kafka security, against the real 3-node cluster of this pytest run (secured by
default: SASL_SSL with SCRAM-SHA-512, mTLS between controllers, the StandardAuthorizer's ACLs).

A plaintext client and a wrong password are refused; a principal without the ACL cannot produce to
market.trades.binance, and the error names the listener, the principal and the variable; the roles'
principals can do what their role needs. No generated secret appears in any broker log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError

from k2_resources.errors import KafkaUnavailableError
from k2_resources.kafka.errors import KafkaSecurityError
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import HYBRID, SINK, STREAMER, is_security_failure
from k2_resources.kafka.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_TOPIC
from k2_resources.platform.kafka_cluster import KafkaCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture
def secured(kafka_cluster: KafkaCluster, monkeypatch: pytest.MonkeyPatch) -> KafkaCluster:
    """This test's process pointed at the shared cluster with the variables `k2 cluster start` writes."""
    assert kafka_cluster.security == "SASL_SSL"
    for name, value in kafka_cluster.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("K2_KAFKA_ROLE", raising=False)
    KafkaResource(role=STREAMER).ensure_topic(BINANCE_TRADES_TOPIC, partitions=6)
    return kafka_cluster


def _password(cluster: KafkaCluster, role: str) -> str:
    entries = json.loads(Path(cluster.env()["K2_KAFKA_CREDENTIALS_FILE"]).read_text())["roles"]
    return str(entries[role]["password"])


def test_a_plaintext_client_is_refused(secured: KafkaCluster) -> None:
    with pytest.raises((KafkaError, OSError)):
        admin = KafkaAdminClient(
            bootstrap_servers=secured.bootstrap_servers, request_timeout_ms=5000, bootstrap_timeout_ms=5000
        )
        try:
            admin.list_topics()
        finally:
            admin.close()


def test_a_plaintext_k2_client_gets_one_error_naming_the_listener_and_the_variable(
    secured: KafkaCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("K2_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    with pytest.raises(KafkaUnavailableError, match="spoke PLAINTEXT: .*K2_KAFKA_SECURITY_PROTOCOL=SASL_SSL"):
        KafkaResource(request_timeout_ms=5000).admin()


def test_a_wrong_password_is_refused_naming_the_principal(
    secured: KafkaCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "not-the-password"
    monkeypatch.setenv("K2_KAFKA_SASL_USERNAME", "k2-streamer")
    monkeypatch.setenv("K2_KAFKA_SASL_PASSWORD", wrong)
    with pytest.raises(KafkaSecurityError) as refused:
        KafkaResource(request_timeout_ms=5000).admin()
    message = str(refused.value)
    assert "SASL_SSL listener at" in message and "User:k2-streamer" in message
    assert "K2_KAFKA_SASL_PASSWORD" in message and wrong not in message
    assert _password(secured, STREAMER) not in message


def test_a_principal_without_the_acl_cannot_produce_trades(secured: KafkaCluster) -> None:
    """The hybrid reader's principal may read market.trades.binance but not write it: refused, with a
    clear error, and nothing lands in the topic."""
    before = KafkaResource().end_offsets(BINANCE_TRADES_TOPIC)
    reader = KafkaResource(role=HYBRID, request_timeout_ms=10_000)
    producer = reader.producer(enable_idempotence=False, retries=0, max_block_ms=10_000)
    try:
        with pytest.raises(KafkaError) as refused:
            producer.send(BINANCE_TRADES_TOPIC, key=b"forged", value=b"a forged trade").get(timeout=30)
    finally:
        producer.close(timeout=5)
    assert is_security_failure(refused.value), refused.value
    assert "TopicAuthorization" in type(refused.value).__name__
    message = str(reader.security().failure(reader.servers, refused.value))
    assert "SASL_SSL listener" in message and "User:k2-hybrid" in message and "lacks the ACL" in message
    assert KafkaResource().end_offsets(BINANCE_TRADES_TOPIC) == before
    assert KafkaResource(role=HYBRID).end_offsets(BINANCE_TRADES_TOPIC) == before  # reading is allowed


def test_each_role_does_what_it_needs(secured: KafkaCluster) -> None:
    streamer = KafkaResource(role=STREAMER).producer()
    try:
        streamer.send(BINANCE_TRADES_TOPIC, key=b"BTCUSDT", value=b"a trade").get(timeout=60)
    finally:
        streamer.close(timeout=10)
    sink = KafkaResource(role=SINK)
    sink.ensure_topic(BINANCE_TRADES_DLQ_TOPIC)  # the sink may create and write its dead letters
    dead_letters = sink.producer()
    try:
        dead_letters.send(BINANCE_TRADES_DLQ_TOPIC, value=b"undecodable").get(timeout=60)
        with pytest.raises(KafkaError):  # but not the trades
            KafkaProducer(
                bootstrap_servers=secured.bootstrap_servers,
                enable_idempotence=False,
                retries=0,
                max_block_ms=10_000,
                **sink.security().kafka_python(),
            ).send(BINANCE_TRADES_TOPIC, value=b"x").get(timeout=30)
    finally:
        dead_letters.close(timeout=10)
    assert sum(sink.end_offsets(BINANCE_TRADES_TOPIC).values()) >= 1


def test_no_generated_secret_is_in_a_broker_log(secured: KafkaCluster) -> None:
    secrets = [
        _password(secured, role)
        for role in json.loads(Path(secured.env()["K2_KAFKA_CREDENTIALS_FILE"]).read_text())["roles"]
    ]
    secrets += [path.read_text().strip() for path in (secured.home / "tls").glob("*.password")]
    logs = [path for path in secured.home.rglob("*.log")] + list(secured.home.rglob("logs/*"))
    assert logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [secret for secret in secrets if secret in text], f"a secret is in {log}"
