"""Kafka client security from the environment, in one place for every K2 client.

Every K2 Kafka client (producer, sink, hybrid tail, exporter, `k2 offsets`, the demo, Java clients
such as Spark or the Kafka Connect peer) takes its security settings from :func:`client_security`.
With no variable set it is PLAINTEXT: the embedded one-broker default on 127.0.0.1.

Variables (docs/security.md, "Kafka"):

* ``K2_KAFKA_SECURITY_PROTOCOL``: ``PLAINTEXT`` (default) or ``SASL_SSL``.
* ``K2_KAFKA_SASL_MECHANISM``: ``SCRAM-SHA-512`` (default) or ``SCRAM-SHA-256``.
* ``K2_KAFKA_SASL_USERNAME`` with ``K2_KAFKA_SASL_PASSWORD`` or ``K2_KAFKA_SASL_PASSWORD_FILE``:
  the one principal of this process, whatever the client's role.
* ``K2_KAFKA_CREDENTIALS_FILE``: otherwise, a JSON file (mode 0600) with one principal per role,
  ``{"roles": {"streamer": {"username": ..., "password": ...}, ...}}``, written by
  `k2 cluster start`; a client's role picks its entry (``K2_KAFKA_ROLE`` overrides the role the
  code asks for, as a deployment running one role per process does).
* ``K2_KAFKA_SSL_CAFILE``: the PEM file of the CA that signed the brokers' certificates.

A password is never part of a message, a ``repr`` or a log line.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2_resources.kafka.errors import KafkaSecurityError

# The roles K2's clients play: each is one principal with its own ACLs on a secured cluster.
from k2_resources.platform.kafka_acls import ADMIN, API, EXPORTER, HYBRID, REPLAY, ROLES, SINK, STREAMER

__all__ = [
    "ADMIN",
    "API",
    "EXPORTER",
    "HYBRID",
    "REPLAY",
    "ROLES",
    "SINK",
    "STREAMER",
    "ClientSecurity",
    "KafkaSecurityError",
    "client_security",
]

PROTOCOL_VARIABLE = "K2_KAFKA_SECURITY_PROTOCOL"
MECHANISM_VARIABLE = "K2_KAFKA_SASL_MECHANISM"
USERNAME_VARIABLE = "K2_KAFKA_SASL_USERNAME"
PASSWORD_VARIABLE = "K2_KAFKA_SASL_PASSWORD"
PASSWORD_FILE_VARIABLE = "K2_KAFKA_SASL_PASSWORD_FILE"
CREDENTIALS_FILE_VARIABLE = "K2_KAFKA_CREDENTIALS_FILE"
ROLE_VARIABLE = "K2_KAFKA_ROLE"
CAFILE_VARIABLE = "K2_KAFKA_SSL_CAFILE"

PLAINTEXT = "PLAINTEXT"
SASL_SSL = "SASL_SSL"
PROTOCOLS = (PLAINTEXT, SASL_SSL)
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
DEFAULT_MECHANISM = "SCRAM-SHA-512"

DEFAULT_ROLE = ADMIN  # operator commands (`k2 offsets`, `k2 kafka`) when the code names no role


@dataclass(frozen=True)
class ClientSecurity:
    """How one client authenticates: the protocol, and for SASL_SSL the principal and the CA.

    ``source`` names the variable (or file) the principal came from, for error messages.
    """

    protocol: str = PLAINTEXT
    mechanism: str = DEFAULT_MECHANISM
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: str | None = None
    role: str | None = None
    source: str = PROTOCOL_VARIABLE

    @property
    def secured(self) -> bool:
        return self.protocol != PLAINTEXT

    @property
    def principal(self) -> str:
        return f"User:{self.username}" if self.username else "User:ANONYMOUS"

    def kafka_python(self) -> dict[str, Any]:
        """kafka-python keyword arguments (producer, consumer, admin client)."""
        if not self.secured:
            return {}
        return {
            "security_protocol": self.protocol,
            "sasl_mechanism": self.mechanism,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
            "ssl_cafile": self.cafile,
            "ssl_check_hostname": True,
        }

    def java_properties(self, truststore: str | None = None, truststore_password: str | None = None) -> dict[str, str]:
        """Java client properties (Kafka Connect, Spark's Kafka source): the same principal and CA.

        Java reads a PEM CA file as a truststore of type PEM, so ``K2_KAFKA_SSL_CAFILE`` serves both.
        """
        if not self.secured:
            return {}
        login = "org.apache.kafka.common.security.scram.ScramLoginModule"
        props = {
            "security.protocol": self.protocol,
            "sasl.mechanism": self.mechanism,
            "sasl.jaas.config": f'{login} required username="{self.username}" password="{self.password}";',
        }
        if truststore:
            props.update({"ssl.truststore.location": truststore, "ssl.truststore.type": "PKCS12"})
            if truststore_password:
                props["ssl.truststore.password"] = truststore_password
        elif self.cafile:
            props.update({"ssl.truststore.location": self.cafile, "ssl.truststore.type": "PEM"})
        return props

    def describe(self, servers: str) -> str:
        """Listener and principal, for messages: ``SASL_SSL listener at host:port as User:name``."""
        who = f" as {self.principal} (from {self.source})" if self.secured else ""
        return f"{self.protocol} listener at {servers}{who}"

    def failure(self, servers: str, exc: BaseException) -> KafkaSecurityError:
        """One clear error for a refused connection: the listener, the principal, the variable to fix."""
        reason = f"{type(exc).__name__}: {exc}"
        if not self.secured:
            fix = (
                f"the cluster may require SASL_SSL: set {PROTOCOL_VARIABLE}=SASL_SSL, {CAFILE_VARIABLE} and "
                f"{CREDENTIALS_FILE_VARIABLE} (or {USERNAME_VARIABLE}/{PASSWORD_VARIABLE}); `k2 cluster start` "
                "writes them to K2_HOME/cluster/env.sh"
            )
        else:
            fix = (
                f"check the password of {self.username} in {self.source} and the CA in {CAFILE_VARIABLE} "
                f"({self.cafile}); an authorization error means {self.principal} lacks the ACL for this request"
            )
        return KafkaSecurityError(f"Kafka refused the {self.describe(servers)} ({reason}); {fix}")


def _env(name: str, environ: dict[str, str]) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _read_secret_file(path: Path, variable: str) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise KafkaSecurityError(f"cannot read {path} named by {variable}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KafkaSecurityError(
            f"{path} (named by {variable}) is readable by others (mode {stat.S_IMODE(mode):o}); `chmod 600 {path}`"
        )
    return text


def role_credentials(path: Path, role: str) -> tuple[str, str]:
    """(username, password) of ``role`` in a credentials file (see the module's docstring)."""
    text = _read_secret_file(path, CREDENTIALS_FILE_VARIABLE)
    try:
        entry = json.loads(text)["roles"][role]
        return str(entry["username"]), str(entry["password"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KafkaSecurityError(
            f"{path} (named by {CREDENTIALS_FILE_VARIABLE}) has no principal for the Kafka role {role!r}; "
            f"roles are {', '.join(ROLES)} (set {ROLE_VARIABLE} to pick one, or {USERNAME_VARIABLE})"
        ) from exc


def write_credentials_file(path: Path, credentials: dict[str, tuple[str, str]]) -> Path:
    """Write ``{role: (username, password)}`` as a credentials file, created 0600 (never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"roles": {role: {"username": user, "password": password} for role, (user, password) in credentials.items()}}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(body, handle, indent=2)
        handle.write("\n")
    return path


def client_security(role: str | None = None, environ: dict[str, str] | None = None) -> ClientSecurity:
    """The security settings of a client playing ``role`` (None: ``K2_KAFKA_ROLE``, else admin).

    Raises KafkaSecurityError naming the variable when the settings are incomplete or wrong.
    """
    env = dict(os.environ) if environ is None else environ
    protocol = (_env(PROTOCOL_VARIABLE, env) or PLAINTEXT).upper()
    if protocol not in PROTOCOLS:
        raise KafkaSecurityError(f"{PROTOCOL_VARIABLE}={protocol} is not supported; use one of {', '.join(PROTOCOLS)}")
    if protocol == PLAINTEXT:
        return ClientSecurity()
    mechanism = (_env(MECHANISM_VARIABLE, env) or DEFAULT_MECHANISM).upper()
    if mechanism not in MECHANISMS:
        raise KafkaSecurityError(
            f"{MECHANISM_VARIABLE}={mechanism} is not supported; use one of {', '.join(MECHANISMS)}"
        )
    cafile = _env(CAFILE_VARIABLE, env)
    if cafile is None or not Path(cafile).is_file():
        raise KafkaSecurityError(
            f"{PROTOCOL_VARIABLE}=SASL_SSL needs {CAFILE_VARIABLE}, the PEM file of the CA that signed the brokers' "
            f"certificates ({'not set' if cafile is None else cafile + ' does not exist'})"
        )
    chosen_role = _env(ROLE_VARIABLE, env) or role or DEFAULT_ROLE
    username = _env(USERNAME_VARIABLE, env)
    if username is not None:
        password = _env(PASSWORD_VARIABLE, env)
        source = PASSWORD_VARIABLE
        if password is None and _env(PASSWORD_FILE_VARIABLE, env):
            source = PASSWORD_FILE_VARIABLE
            password = _read_secret_file(Path(env[PASSWORD_FILE_VARIABLE].strip()), source).strip()
        if not password:
            raise KafkaSecurityError(
                f"{USERNAME_VARIABLE}={username} needs {PASSWORD_VARIABLE} or {PASSWORD_FILE_VARIABLE}"
            )
        return ClientSecurity(
            protocol, mechanism, username, password, cafile, chosen_role, f"{USERNAME_VARIABLE}/{source}"
        )
    credentials = _env(CREDENTIALS_FILE_VARIABLE, env)
    if credentials is None:
        raise KafkaSecurityError(
            f"{PROTOCOL_VARIABLE}=SASL_SSL needs a principal: set {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}, "
            f"or {CREDENTIALS_FILE_VARIABLE} (one principal per role)"
        )
    username, password = role_credentials(Path(credentials), chosen_role)
    return ClientSecurity(
        protocol, mechanism, username, password, cafile, chosen_role, f"{CREDENTIALS_FILE_VARIABLE} ({chosen_role})"
    )


def is_security_failure(exc: BaseException) -> bool:
    """Whether a kafka-python error is an authentication, authorization or TLS refusal."""
    names = {type(exc).__name__} | {type(cause).__name__ for cause in (exc.__cause__, exc.__context__) if cause}
    text = str(exc)
    return any(
        word in name or word in text
        for name in names
        for word in ("Authentication", "Authorization", "SSL", "SaslAuthentication", "Certificate")
    )
