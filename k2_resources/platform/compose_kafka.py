"""The Kafka secrets of docker-compose.yml: `python -m k2_resources.platform.compose_kafka /kafka-secrets`.

The compose stack's one-shot ``kafka-secrets`` service runs this before any broker starts. Into the
``kafka-secrets`` volume it writes, once (a second run keeps what exists):

* ``ca.pem``, ``ca.key`` and one PKCS12 keystore per node (``kafka-<n>.p12``, its password in
  ``kafka-<n>.password``) for the node's compose host name: the same CA and certificates as
  `k2 cluster start` makes (k2_resources/platform/tls.py);
* ``kafka-credentials.json``: one SCRAM principal per role (k2_resources/platform/kafka_acls.py),
  which K2's services name with ``K2_KAFKA_CREDENTIALS_FILE``;
* ``kafka_server_jaas.conf``: the brokers' own principal for the SASL_SSL listener they replicate on;
* ``admin-client.properties``: the admin principal for Kafka's own tools (the nodes' health check);
* ``scram-arguments`` and ``format-kafka-<n>.properties``: what each node's command hands to
  ``kafka-storage format`` (``--add-scram``: KRaft keeps SCRAM credentials in the metadata log, so
  they must be there before the first start).

Every file is mode 0600 and owned by uid 1000, the user of both the apache/kafka image and K2's image.
With ``--acls`` it instead creates every role's ACLs on the running brokers, as the admin principal
(the stack's one-shot ``kafka-acls`` service, once the brokers are healthy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from k2_resources.platform.kafka_acls import ADMIN, BROKER_ROLE, MECHANISM, ClusterSecurity, apply_acls
from k2_resources.platform.tls import ClusterTls, write_secret

NODES = (1, 2, 3)
CONTROLLER_PORT = 9093
INTERNAL_BOOTSTRAP = ",".join(f"kafka-{n}:19092" for n in NODES)
NODE_SECRETS = "/etc/kafka/secrets"  # where the apache/kafka image reads them (docker-compose.yml)
LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule"
IMAGE_UID = 1000


def format_properties(node_id: int) -> str:
    """What ``kafka-storage format`` reads of node ``node_id`` (docker-compose.yml's x-kafka-env)."""
    voters = ",".join(f"{n}@kafka-{n}:{CONTROLLER_PORT}" for n in NODES)
    return (
        "process.roles=broker,controller\n"
        f"node.id={node_id}\n"
        f"controller.quorum.voters={voters}\n"
        "controller.listener.names=CONTROLLER\n"
        f"listeners=INTERNAL://:19092,HOST://:9092,CONTROLLER://:{CONTROLLER_PORT}\n"
        "listener.security.protocol.map=INTERNAL:SASL_SSL,HOST:SASL_SSL,CONTROLLER:SSL\n"
        "inter.broker.listener.name=INTERNAL\n"
        "log.dirs=/var/lib/kafka/data\n"
    )


def write_compose_secrets(directory: Path) -> list[Path]:
    """Write (or keep) every file of the module's docstring in ``directory``; their paths."""
    secured = ClusterSecurity(directory)
    tls = ClusterTls(directory)  # the volume's root, not a tls/ folder in it
    stores = [tls.node_keystore(f"kafka-{n}", hosts=(f"kafka-{n}",)) for n in NODES]
    credentials = secured.credentials()
    broker_user, broker_password = credentials[BROKER_ROLE]
    admin_user, admin_password = credentials[ADMIN]
    jaas = write_secret(
        directory / "kafka_server_jaas.conf",
        f'KafkaServer {{\n  {LOGIN} required\n  username="{broker_user}"\n  password="{broker_password}";\n}};\n',
    )
    admin_client = write_secret(
        directory / "admin-client.properties",
        "security.protocol=SASL_SSL\n"
        f"sasl.mechanism={MECHANISM}\n"
        f'sasl.jaas.config={LOGIN} required username="{admin_user}" password="{admin_password}";\n'
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={NODE_SECRETS}/ca.pem\n",
    )
    arguments = write_secret(
        directory / "scram-arguments",
        "".join(
            f"--add-scram {MECHANISM}=[name={user},password={password}]\n" for user, password in credentials.values()
        ),
    )
    formats = [write_secret(directory / f"format-kafka-{n}.properties", format_properties(n)) for n in NODES]
    written = [
        tls.ca_pem,
        tls.ca_key,
        *(store.path for store in stores),
        *(store.password_file for store in stores),
        secured.credentials_file,
        jaas,
        admin_client,
        arguments,
        *formats,
    ]
    for path in [directory, *written]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
        if os.geteuid() == 0:  # the service runs as root to own the new volume; hand it to the images' user
            os.chown(path, IMAGE_UID, IMAGE_UID)
    return written


def create_acls(directory: Path, bootstrap_servers: str = INTERNAL_BOOTSTRAP) -> None:
    """Every role's ACLs on the compose brokers, as the admin principal of ``directory``'s credentials."""
    settings = ClusterSecurity(directory).admin_settings()
    settings["ssl_cafile"] = str(ClusterTls(directory).ca_pem)
    apply_acls(bootstrap_servers, settings)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--acls"] and len(arguments) == 2:
        create_acls(Path(arguments[1]))
        print(f"Kafka ACLs created on {INTERNAL_BOOTSTRAP}")
        return 0
    if len(arguments) != 1:
        print("usage: python -m k2_resources.platform.compose_kafka [--acls] <secrets folder>", file=sys.stderr)
        return 2
    written = write_compose_secrets(Path(arguments[0]))
    print(f"Kafka secrets ready in {arguments[0]} ({len(written)} files, 0600; none printed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
