"""SASL_SSL, SCRAM principals and ACLs of the local Kafka cluster (`k2 cluster start`).

* Clients reach each node on a SASL_SSL listener (SCRAM-SHA-512 over TLS); brokers talk to each
  other on it too, as the principal ``k2-broker``. Controllers listen on SSL with client
  certificates required: a node proves itself with its CA-signed certificate (principal
  ``CN=k2-kafka-<n>``). KRaft cannot take SCRAM on the controller listener, which is why mTLS.
* SCRAM credentials exist before the first start: KRaft keeps them in the metadata log, so they
  are written at format time (``kafka-storage format --add-scram``, KIP-900).
* The KRaft ``StandardAuthorizer`` allows nothing without an ACL (``allow.everyone.if.no.acl.found``
  stays false); :func:`role_acls` is one principal per role with the least it needs. The admin,
  the broker and the nodes' certificates are super users (the admin creates topics and ACLs).
* Passwords are generated once into ``K2_HOME/cluster/kafka-credentials.json`` (mode 0600), which
  clients name with ``K2_KAFKA_CREDENTIALS_FILE``; nothing prints them.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType
from kafka.errors import KafkaError

from k2_resources.platform.errors import ClusterServiceError
from k2_resources.platform.tls import ClusterTls, write_secret

PLAINTEXT, SASL_SSL = "PLAINTEXT", "SASL_SSL"
SECURITY_VARIABLE = "K2_CLUSTER_KAFKA_SECURITY"  # SASL_SSL (default) or PLAINTEXT, for a new cluster
MECHANISM = "SCRAM-SHA-512"
LISTENER = SASL_SSL
BROKER_ROLE = "broker"
CREDENTIALS_FILE = "kafka-credentials.json"
# The names below are K2's (k2_resources.kafka.topics, k2_resources.sink.kafka_outputs, and the roles
# and variables of k2_resources.kafka.security), repeated because the platform sits below those
# packages; tests/unit/test_kafka_security.py checks that they agree.
TRADE_TOPICS_PREFIX = "market.trades."  # market.trades.<exchange> and their .dlq
BINANCE_TRADES_DLQ_TOPIC = "market.trades.binance.dlq"
REPLAY_TOPICS_PREFIX = "replay.trades."
SINK_GROUP = "k2-iceberg-sink"
ADMIN, STREAMER, SINK, HYBRID, API, EXPORTER, REPLAY = (
    "admin",
    "streamer",
    "sink",
    "hybrid",
    "api",
    "exporter",
    "replay",
)
ROLES = (ADMIN, STREAMER, SINK, HYBRID, API, EXPORTER, REPLAY)
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"

_READ = (ACLOperation.READ, ACLOperation.DESCRIBE)
_WRITE = (ACLOperation.WRITE, ACLOperation.CREATE, ACLOperation.DESCRIBE)
_PREFIXED, _LITERAL = ACLResourcePatternType.PREFIXED, ACLResourcePatternType.LITERAL

# role -> (resource type, name, pattern, operations): what each role's principal may do, nothing more.
ROLE_GRANTS: dict[str, list[tuple[ResourceType, str, ACLResourcePatternType, tuple[ACLOperation, ...]]]] = {
    STREAMER: [(ResourceType.TOPIC, TRADE_TOPICS_PREFIX, _PREFIXED, _WRITE)],
    SINK: [
        (ResourceType.TOPIC, TRADE_TOPICS_PREFIX, _PREFIXED, _READ),
        (ResourceType.TOPIC, BINANCE_TRADES_DLQ_TOPIC, _LITERAL, _WRITE),
        (ResourceType.GROUP, SINK_GROUP, _LITERAL, (ACLOperation.READ, ACLOperation.DESCRIBE, ACLOperation.DELETE)),
    ],
    HYBRID: [(ResourceType.TOPIC, TRADE_TOPICS_PREFIX, _PREFIXED, _READ)],
    API: [(ResourceType.TOPIC, TRADE_TOPICS_PREFIX, _PREFIXED, _READ)],
    EXPORTER: [(ResourceType.TOPIC, TRADE_TOPICS_PREFIX, _PREFIXED, _READ)],
    # A replay reads its own topic's last message to resume where it stopped.
    REPLAY: [(ResourceType.TOPIC, REPLAY_TOPICS_PREFIX, _PREFIXED, (*_WRITE, ACLOperation.READ))],
    ADMIN: [],  # a super user
}


def principal_name(role: str) -> str:
    return f"k2-{role}"


def node_name(node_id: int) -> str:
    """A node's certificate CN; its principal on the controller listener is ``User:CN=<name>``."""
    return f"k2-kafka-{node_id}"


def role_acls() -> list[ACL]:
    """Every ACL of :data:`ROLE_GRANTS`, as kafka-python ACL objects (ALLOW, any host)."""
    return [
        ACL(
            principal=f"User:{principal_name(role)}",
            host="*",
            operation=operation,
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(kind, name, pattern),
        )
        for role, grants in ROLE_GRANTS.items()
        for kind, name, pattern, operations in grants
        for operation in operations
    ]


@dataclass(frozen=True)
class ClusterSecurity:
    """The local cluster's TLS material and principals, under ``home`` (K2_HOME/cluster)."""

    home: Path

    @property
    def tls(self) -> ClusterTls:
        return ClusterTls(self.home / "tls")

    @property
    def credentials_file(self) -> Path:
        return self.home / CREDENTIALS_FILE

    def credentials(self) -> dict[str, tuple[str, str]]:
        """(username, password) per role and for the brokers: generated once, kept 0600."""
        roles = (*ROLES, BROKER_ROLE)
        if not self.credentials_file.exists():
            body = {
                "roles": {role: {"username": principal_name(role), "password": secrets.token_hex(24)} for role in roles}
            }
            write_secret(self.credentials_file, json.dumps(body, indent=2) + "\n")
        try:
            entries = json.loads(self.credentials_file.read_text())["roles"]
            return {role: (entries[role]["username"], entries[role]["password"]) for role in roles}
        except (ValueError, KeyError, TypeError) as exc:
            raise ClusterServiceError(
                f"{self.credentials_file} is not a K2 Kafka credentials file; stop the cluster and delete {self.home}"
            ) from exc

    def format_arguments(self) -> list[str]:
        """``--add-scram`` arguments of ``kafka-storage format``: every principal's SCRAM credential."""
        arguments: list[str] = []
        for username, password in self.credentials().values():
            arguments += ["--add-scram", f"{MECHANISM}=[name={username},password={password}]"]
        return arguments

    def broker_properties(self, node_id: int, port: int, controller_port: int, node_ids: list[int]) -> dict[str, str]:
        """The server.properties entries that secure node ``node_id`` (they replace its PLAINTEXT listeners)."""
        keystore = self.tls.node_keystore(node_name(node_id))
        ca = self.tls.ensure_ca()
        broker_user, broker_password = self.credentials()[BROKER_ROLE]
        login = "org.apache.kafka.common.security.scram.ScramLoginModule"
        super_users = [principal_name(ADMIN), broker_user, *(f"CN={node_name(n)}" for n in node_ids)]
        return {
            "listeners": f"{LISTENER}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"{LISTENER}://127.0.0.1:{port}",
            "listener.security.protocol.map": f"{LISTENER}:SASL_SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": LISTENER,
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.{LISTENER.lower()}.{MECHANISM.lower()}.sasl.jaas.config": (
                f'{login} required username="{broker_user}" password="{broker_password}";'
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(keystore.path),
            "ssl.keystore.password": keystore.password(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(ca),
            "listener.name.controller.ssl.client.auth": "required",
            "authorizer.class.name": AUTHORIZER,
            "allow.everyone.if.no.acl.found": "false",
            "super.users": ";".join(f"User:{user}" for user in super_users),
        }

    def client_env(self) -> dict[str, str]:
        """The variables a K2 process needs to use the secured cluster (no password among them)."""
        return {
            "K2_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "K2_KAFKA_SASL_MECHANISM": MECHANISM,
            "K2_KAFKA_SSL_CAFILE": str(self.tls.ca_pem),
            "K2_KAFKA_CREDENTIALS_FILE": str(self.credentials_file),
        }

    def admin_settings(self) -> dict[str, Any]:
        """kafka-python settings of the admin principal, for the cluster's own checks and its ACL set-up
        (the settings every other client takes come from k2_resources.kafka.security)."""
        username, password = self.credentials()[ADMIN]
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_plain_username": username,
            "sasl_plain_password": password,
            "ssl_cafile": str(self.tls.ensure_ca()),
            "ssl_check_hostname": True,
        }


def apply_acls(bootstrap_servers: str, admin_settings: dict[str, Any], timeout_s: float = 60.0) -> None:
    """Create every role's ACLs as the admin principal (creating an existing ACL changes nothing),
    retrying while the new cluster's controller is not ready to take them."""
    wanted = role_acls()
    deadline = time.monotonic() + timeout_s
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="k2-cluster-acls", **admin_settings)
    try:
        while True:
            try:
                result = admin.create_acls(wanted)
                failed = result.get("failed") or []
                if not failed:
                    return
                problem = "; ".join(str(error) for _acl, error in failed[:3])
            except KafkaError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ClusterServiceError(f"creating the Kafka ACLs failed for {timeout_s:.0f}s: {problem}")
            time.sleep(0.5)
    finally:
        admin.close()
