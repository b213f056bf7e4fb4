"""Kafka client security settings (k2_resources/kafka/security.py) and the local cluster's principals,
ACLs and certificates (k2_resources/platform/kafka_acls.py, tls.py)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from kafka.admin import ACLOperation, ACLResourcePatternType, ResourceType

from k2_resources.errors import KafkaUnavailableError
from k2_resources.kafka import security
from k2_resources.kafka.columnar_fetch import BrokerConnection
from k2_resources.kafka.errors import FastFetchUnavailable, KafkaSecurityError
from k2_resources.kafka.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_TOPIC, REPLAY_TRADES_PREFIX
from k2_resources.platform import kafka_acls
from k2_resources.platform.kafka_acls import ClusterSecurity, role_acls
from k2_resources.platform.tls import ClusterTls
from k2_resources.sink.kafka_outputs import CONSUMER_GROUP

SECRET = "s3cr3t-never-shown"


def _secured(tmp_path: Path, **extra: str) -> dict[str, str]:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return {"K2_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "K2_KAFKA_SSL_CAFILE": str(ca), **extra}


def _credentials(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "creds.json"
    roles = {role: {"username": f"k2-{role}", "password": f"{SECRET}-{role}"} for role in security.ROLES}
    path.write_text(json.dumps({"roles": roles}))
    path.chmod(mode)
    return path


def test_no_variable_means_the_embedded_plaintext_default() -> None:
    settings = security.client_security(environ={})
    assert not settings.secured
    assert settings.kafka_python() == {} and settings.java_properties() == {}


def test_username_and_password_variables_give_one_principal_for_every_role(tmp_path: Path) -> None:
    env = _secured(tmp_path, K2_KAFKA_SASL_USERNAME="alice", K2_KAFKA_SASL_PASSWORD=SECRET)
    settings = security.client_security(security.STREAMER, environ=env)
    config = settings.kafka_python()
    assert config["security_protocol"] == "SASL_SSL" and config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("alice", SECRET)
    assert config["ssl_cafile"] == env["K2_KAFKA_SSL_CAFILE"] and config["ssl_check_hostname"] is True
    assert SECRET not in repr(settings)
    java = settings.java_properties()
    assert java["ssl.truststore.type"] == "PEM" and 'username="alice"' in java["sasl.jaas.config"]


def test_a_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o644)
    env = _secured(tmp_path, K2_KAFKA_SASL_USERNAME="alice", K2_KAFKA_SASL_PASSWORD_FILE=str(secret))
    with pytest.raises(KafkaSecurityError, match="K2_KAFKA_SASL_PASSWORD_FILE.*chmod 600"):
        security.client_security(environ=env)
    secret.chmod(0o600)
    assert security.client_security(environ=env).password == SECRET


def test_the_credentials_file_gives_each_role_its_principal(tmp_path: Path) -> None:
    env = _secured(tmp_path, K2_KAFKA_CREDENTIALS_FILE=str(_credentials(tmp_path)))
    assert security.client_security(security.SINK, environ=env).username == "k2-sink"
    assert security.client_security(None, environ=env).username == "k2-admin"  # operator commands
    assert security.client_security(security.SINK, environ={**env, "K2_KAFKA_ROLE": "api"}).username == "k2-api"
    with pytest.raises(KafkaSecurityError, match="no principal for the Kafka role 'spark'.*K2_KAFKA_ROLE"):
        security.client_security("spark", environ=env)


def test_a_readable_credentials_file_is_refused(tmp_path: Path) -> None:
    env = _secured(tmp_path, K2_KAFKA_CREDENTIALS_FILE=str(_credentials(tmp_path, 0o644)))
    with pytest.raises(KafkaSecurityError, match="readable by others"):
        security.client_security(security.SINK, environ=env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"K2_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "K2_KAFKA_SECURITY_PROTOCOL"),
        ({"K2_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "K2_KAFKA_SSL_CAFILE"),
        ({"K2_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "K2_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "does not exist"),
    ],
)
def test_incomplete_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(KafkaSecurityError, match=named):
        security.client_security(environ=env)


def test_a_principal_is_required(tmp_path: Path) -> None:
    with pytest.raises(KafkaSecurityError, match="K2_KAFKA_SASL_USERNAME.*K2_KAFKA_CREDENTIALS_FILE"):
        security.client_security(environ=_secured(tmp_path))


def test_a_refusal_names_listener_principal_and_variable_never_the_password(tmp_path: Path) -> None:
    env = _secured(tmp_path, K2_KAFKA_CREDENTIALS_FILE=str(_credentials(tmp_path)))
    settings = security.client_security(security.HYBRID, environ=env)
    message = str(settings.failure("127.0.0.1:9092", RuntimeError("TopicAuthorizationFailedError")))
    assert "SASL_SSL listener at 127.0.0.1:9092" in message and "User:k2-hybrid" in message
    assert "K2_KAFKA_CREDENTIALS_FILE" in message and SECRET not in message
    plain = str(security.ClientSecurity().failure("127.0.0.1:9092", ConnectionResetError("reset")))
    assert "PLAINTEXT listener" in plain and "K2_KAFKA_SECURITY_PROTOCOL=SASL_SSL" in plain
    assert issubclass(KafkaSecurityError, KafkaUnavailableError)  # callers treating Kafka as down still do


def test_security_failures_are_told_from_other_errors() -> None:
    class TopicAuthorizationFailedError(Exception):
        pass

    assert security.is_security_failure(TopicAuthorizationFailedError("market.trades.binance"))
    assert not security.is_security_failure(TimeoutError("no answer"))


def test_the_wire_protocol_clients_decline_a_secured_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(FastFetchUnavailable, match="kafka-python"):
        BrokerConnection("127.0.0.1:1", "k2-test", 1.0)


def test_the_platform_names_agree_with_the_clients() -> None:
    assert kafka_acls.ROLES == security.ROLES
    assert kafka_acls.BINANCE_TRADES_DLQ_TOPIC == BINANCE_TRADES_DLQ_TOPIC
    assert kafka_acls.REPLAY_TOPICS_PREFIX == REPLAY_TRADES_PREFIX
    assert kafka_acls.SINK_GROUP == CONSUMER_GROUP
    assert BINANCE_TRADES_TOPIC.startswith(kafka_acls.TRADE_TOPICS_PREFIX)
    assert BINANCE_TRADES_DLQ_TOPIC.startswith(kafka_acls.TRADE_TOPICS_PREFIX)


def _grants(role: str) -> set[tuple[str, str, str, str]]:
    return {
        (acl.resource_pattern.resource_type.name, acl.resource_pattern.resource_name,
         acl.resource_pattern.pattern_type.name, acl.operation.name)
        for acl in role_acls()
        if acl.principal == f"User:k2-{role}"
    }  # fmt: skip


def test_least_acls_per_role() -> None:
    trades = kafka_acls.TRADE_TOPICS_PREFIX
    assert ("TOPIC", trades, "PREFIXED", "WRITE") in _grants("streamer")
    assert not any(op == "READ" for *_, op in _grants("streamer"))
    for reader in ("hybrid", "api", "exporter"):
        assert _grants(reader) == {("TOPIC", trades, "PREFIXED", "READ"), ("TOPIC", trades, "PREFIXED", "DESCRIBE")}
    sink = _grants("sink")
    assert {(kind, name) for kind, name, _pattern, op in sink if op == "WRITE"} == {("TOPIC", BINANCE_TRADES_DLQ_TOPIC)}
    assert ("GROUP", CONSUMER_GROUP, "LITERAL", "READ") in sink
    assert {name for _kind, name, _pattern, op in _grants("replay") if op == "WRITE"} == {REPLAY_TRADES_PREFIX}
    assert _grants("admin") == set()  # a super user, not an ACL holder
    assert all(acl.operation != ACLOperation.ALL for acl in role_acls())
    assert all(
        acl.resource_pattern.resource_type in (ResourceType.TOPIC, ResourceType.GROUP)
        and acl.resource_pattern.pattern_type in (ACLResourcePatternType.LITERAL, ACLResourcePatternType.PREFIXED)
        for acl in role_acls()
    )


def test_generated_credentials_are_private_and_reach_the_clients(tmp_path: Path) -> None:
    cluster = ClusterSecurity(tmp_path)
    credentials = cluster.credentials()
    assert set(credentials) == {*security.ROLES, kafka_acls.BROKER_ROLE}
    assert stat.S_IMODE(cluster.credentials_file.stat().st_mode) == 0o600
    assert cluster.credentials() == credentials  # generated once, then kept
    env = cluster.client_env()
    assert all(password not in json.dumps(env) for _user, password in credentials.values())
    cluster.tls.home.mkdir(parents=True)
    cluster.tls.ca_pem.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = security.client_security(security.STREAMER, environ=env)
    assert (settings.username, settings.password) == credentials[security.STREAMER]
    arguments = cluster.format_arguments()
    assert arguments.count("--add-scram") == len(credentials)
    assert f"SCRAM-SHA-512=[name=k2-broker,password={credentials['broker'][1]}]" in arguments


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_node_certificates_are_signed_by_the_cluster_ca_and_kept_private(tmp_path: Path) -> None:
    tls = ClusterTls(tmp_path / "tls")
    store = tls.node_keystore("k2-kafka-1")
    assert store.path.exists() and tls.ca_pem.exists()
    for private in (store.path, store.password_file, tls.ca_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert stat.S_IMODE(tls.home.stat().st_mode) == 0o700
    assert not list(tls.home.glob("*.key"))[1:], "only the CA's key stays on disk"
    properties = ClusterSecurity(tmp_path).broker_properties(1, 9092, 9093, [1, 2, 3])
    assert "PLAINTEXT" not in properties["listeners"] + properties["listener.security.protocol.map"]
    assert properties["listener.name.controller.ssl.client.auth"] == "required"
    assert properties["authorizer.class.name"].endswith("StandardAuthorizer")
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert "User:CN=k2-kafka-3" in properties["super.users"] and "User:k2-sink" not in properties["super.users"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_compose_secrets_are_private_and_agree_with_docker_compose(tmp_path: Path) -> None:
    import yaml

    from k2_resources.paths import PROJECT_ROOT
    from k2_resources.platform.compose_kafka import NODES, write_compose_secrets

    written = write_compose_secrets(tmp_path)
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in written)
    assert write_compose_secrets(tmp_path) == written  # a second run keeps the same files
    credentials = ClusterSecurity(tmp_path).credentials()
    assert f'username="{credentials["broker"][0]}"' in (tmp_path / "kafka_server_jaas.conf").read_text()
    assert (tmp_path / "scram-arguments").read_text().count("--add-scram") == len(credentials)
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for n in NODES:
        environment = services[f"kafka-{n}"]["environment"]
        assert (tmp_path / environment["KAFKA_SSL_KEYSTORE_FILENAME"]) in written
        assert (tmp_path / f"format-{environment['KAFKA_SECRETS_NODE']}.properties") in written
        assert "PLAINTEXT" not in environment["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
        assert environment["KAFKA_AUTHORIZER_CLASS_NAME"] == kafka_acls.AUTHORIZER
        assert environment["KAFKA_SUPER_USERS"].split(";") == [
            "User:k2-admin",
            "User:k2-broker",
            *(f"User:CN=kafka-{m}" for m in NODES),
        ]
    k2_env = services["streamer"]["environment"]
    assert k2_env["K2_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert Path(k2_env["K2_KAFKA_CREDENTIALS_FILE"]).name == ClusterSecurity(tmp_path).credentials_file.name
    assert Path(k2_env["K2_KAFKA_SSL_CAFILE"]).name == "ca.pem"
