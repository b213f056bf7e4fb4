"""Certificates for the local cluster: a CA and one PKCS12 keystore per Kafka node, made with openssl.

`k2 cluster start` creates a CA under ``K2_HOME/cluster/tls`` the first time, or uses the one an
operator supplies (``K2_CLUSTER_CA_CERT`` and ``K2_CLUSTER_CA_KEY``, PEM files), and signs one
certificate per node for ``127.0.0.1``, ``localhost`` and the node's own host names. Clients
trust ``ca.pem`` (``K2_KAFKA_SSL_CAFILE``); brokers read it as a PEM truststore, and their own
key and certificate from a PKCS12 keystore.

openssl, not the JDK's keytool: each keytool call starts a JVM (seconds on a loaded machine, a
dozen calls per cluster), each openssl call takes milliseconds. Private keys and keystore
passwords are files of mode 0600 in a 0700 folder; passwords reach openssl as ``file:`` arguments,
never on a command line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from k2_resources.platform.errors import ClusterServiceError

CA_CERT_VARIABLE = "K2_CLUSTER_CA_CERT"
CA_KEY_VARIABLE = "K2_CLUSTER_CA_KEY"
VALIDITY_DAYS = "825"  # the longest server certificate life most TLS stacks accept


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, created with mode 0600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    return path


def secret_file(path: Path, nbytes: int = 24) -> Path:
    """A 0600 file holding a generated secret (hex), created once and kept."""
    if not path.exists():
        write_secret(path, secrets.token_hex(nbytes))
    return path


def _openssl(*args: str) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        raise ClusterServiceError("`openssl` was not found on PATH; install it (Debian: `apt-get install openssl`)")
    old = os.umask(0o077)  # key files openssl writes are the owner's only
    try:
        result = subprocess.run([tool, *args], capture_output=True, text=True)
    finally:
        os.umask(old)
    if result.returncode != 0:
        raise ClusterServiceError(f"openssl {args[0]} failed: {(result.stdout + result.stderr).strip()[-500:]}")


@dataclass(frozen=True)
class NodeKeystore:
    """A node's PKCS12 keystore (its key and the CA-signed certificate) and the file of its password."""

    path: Path
    password_file: Path

    def password(self) -> str:
        return self.password_file.read_text().strip()


@dataclass(frozen=True)
class ClusterTls:
    """The CA and the nodes' keystores of the local cluster, under ``home`` (K2_HOME/cluster/tls)."""

    home: Path

    @property
    def ca_pem(self) -> Path:
        """The CA certificate (PEM): what clients and brokers trust (K2_KAFKA_SSL_CAFILE)."""
        supplied = os.environ.get(CA_CERT_VARIABLE)
        return Path(supplied) if supplied else self.home / "ca.pem"

    @property
    def ca_key(self) -> Path:
        supplied = os.environ.get(CA_KEY_VARIABLE)
        return Path(supplied) if supplied else self.home / "ca.key"

    def ensure_ca(self) -> Path:
        """Create the CA unless supplied or made before; its certificate's path."""
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        supplied = [name for name in (CA_CERT_VARIABLE, CA_KEY_VARIABLE) if os.environ.get(name)]
        if supplied:
            if len(supplied) == 1 or not (self.ca_pem.is_file() and self.ca_key.is_file()):
                raise ClusterServiceError(
                    f"a supplied CA needs both {CA_CERT_VARIABLE} and {CA_KEY_VARIABLE} set to existing PEM files"
                )
            return self.ca_pem
        if not (self.ca_pem.exists() and self.ca_key.exists()):
            _openssl(
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.ca_key),
                "-out",
                str(self.ca_pem),
                "-days",
                VALIDITY_DAYS,
                "-subj",
                "/CN=K2 local cluster CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            )
        return self.ca_pem

    def node_keystore(self, name: str, hosts: tuple[str, ...] = ()) -> NodeKeystore:
        """The PKCS12 keystore of node ``name`` (its certificate's CN), signed by the CA for
        127.0.0.1, localhost and ``hosts``; made once and kept."""
        self.ensure_ca()
        store = NodeKeystore(self.home / f"{name}.p12", self.home / f"{name}.password")
        if store.path.exists():
            return store
        secret_file(store.password_file)
        key, request, signed = (self.home / f"{name}.{suffix}" for suffix in ("key", "csr", "crt"))
        extensions = self.home / f"{name}.ext"
        sans = ",".join(["IP:127.0.0.1", "DNS:localhost", *(f"DNS:{host}" for host in hosts)])
        extensions.write_text(
            f"subjectAltName={sans}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        try:
            _openssl(
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(request),
                "-subj",
                f"/CN={name}",
            )
            _openssl(
                "x509",
                "-req",
                "-in",
                str(request),
                "-CA",
                str(self.ca_pem),
                "-CAkey",
                str(self.ca_key),
                "-set_serial",
                str(secrets.randbits(63)),
                "-days",
                VALIDITY_DAYS,
                "-extfile",
                str(extensions),
                "-out",
                str(signed),
            )
            _openssl(
                "pkcs12",
                "-export",
                "-in",
                str(signed),
                "-inkey",
                str(key),
                "-certfile",
                str(self.ca_pem),
                "-name",
                name,
                "-out",
                str(store.path),
                "-passout",
                f"file:{store.password_file}",
            )
        except BaseException:
            store.path.unlink(missing_ok=True)  # half made: made again next time
            raise
        finally:
            for leftover in (key, request, signed, extensions):
                leftover.unlink(missing_ok=True)
        return store
