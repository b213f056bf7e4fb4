"""The query API's security (issue 24) against the real `k2 api` process: HTTPS with a configured
certificate, bearer JWTs checked against a JWKS file, key revocation in every worker, the audit
trail of allowed and refused requests, and no secret in its logs.

One process serves the module: `k2 api --workers 2` configured by its environment only
(K2_API_TLS_CERT/KEY: a self-signed certificate for 127.0.0.1 made here; K2_API_JWT_*: a JWKS file
holding the public half of an RSA key made here, an issuer, an audience, the ``roles`` claim mapped
to K2's scopes; K2_API_AUDIT_FILE). Data: a few hundred trades in market.trades of its K2_HOME, so
``/v1/symbols`` returns rows without Kafka.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from k2_resources.api.errors import TokenSettingsError
from k2_resources.api.keys import KeyFile
from k2_resources.api.tokens import TokenSettings
from k2_resources.catalog.resource import IcebergResource
from k2_resources.platform.kafka_broker import free_port
from tests.support import synthetic
from tests.support.api_server import wait_until_serving
from tests.support.k2_process import k2_env, start_k2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ISSUER, AUDIENCE = "https://idp.example.test/realms/k2", "k2-query-api"
SCOPE_MAP = "market-data-reader=read:trades read:ohlcv,k2-operators=admin"
BOOTSTRAP_KEY = "k2-api-security-bootstrap-secret"


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


class Api:
    def __init__(self, root: Path, base_url: str, ca: Path, signer: rsa.RSAPrivateKey, keys: KeyFile, process) -> None:
        self.root, self.base_url, self.ca, self.signer, self.keys, self.process = (
            root,
            base_url,
            ca,
            signer,
            keys,
            process,
        )
        self.audit_file = root / "audit" / "api-audit.log"
        self.log_file = root / "api.log"
        self.secrets: list[str] = [BOOTSTRAP_KEY]

    def get(self, path: str = "/v1/symbols", headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", headers=headers or {}, verify=str(self.ca), timeout=60)

    def token(self, signer: rsa.RSAPrivateKey | None = None, **overrides) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "jti": uuid.uuid4().hex,
            "iat": now,
            "nbf": now - 5,
            "exp": now + 600,
            "roles": ["market-data-reader"],
        }
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        token = jwt.encode(claims, _pem(signer or self.signer), algorithm="RS256", headers={"kid": "k2-test-1"})
        self.secrets.append(token)
        return token

    def bearer(self, token: str) -> httpx.Response:
        return self.get(headers={"Authorization": f"Bearer {token}"})

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("k2-api-security")
    home = root / "home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("K2_HOME", str(home))
        iceberg = IcebergResource()
        iceberg.trades().append(synthetic.asx_trades(1).slice(0, 500))

    tls_key, signer = _private_key(), _private_key()
    (root / "tls").mkdir()
    cert_file, key_file = root / "tls" / "api.crt", root / "tls" / "api.key"
    cert_file.write_bytes(_self_signed(tls_key))
    key_file.write_bytes(_pem(tls_key))
    key_file.chmod(0o600)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signer.public_key()))
    jwks_file = root / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**public, "kid": "k2-test-1", "use": "sig", "alg": "RS256"}]}))

    keys = KeyFile(root / "secrets" / "api-keys.json")
    port = free_port()
    environment = k2_env(
        home,
        K2_API_PORT=str(port),
        K2_API_WORKERS="2",
        K2_API_KEYS_FILE=str(keys.path),
        K2_API_KEY=BOOTSTRAP_KEY,
        K2_API_RATE_PER_SECOND="1000",
        K2_API_BURST="1000",
        K2_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",  # no broker: /v1/symbols reads Iceberg only
        K2_API_TLS_CERT=str(cert_file),
        K2_API_TLS_KEY=str(key_file),
        K2_API_JWT_JWKS=str(jwks_file),
        K2_API_JWT_ISSUER=ISSUER,
        K2_API_JWT_AUDIENCE=AUDIENCE,
        K2_API_JWT_SCOPE_CLAIM="roles",
        K2_API_JWT_SCOPE_MAP=SCOPE_MAP,
        K2_API_AUDIT_FILE=str(root / "audit" / "api-audit.log"),
    )
    process = start_k2("api", env=environment, log_path=root / "api.log")
    base_url = f"https://127.0.0.1:{port}"
    try:
        wait_until_serving(base_url, timeout_s=180, process=process, verify=str(cert_file))
        shared = Api(root, base_url, cert_file, signer, keys, process)
        shared.secrets.append(_pem(tls_key).decode().splitlines()[1])  # a line of the TLS private key
        yield shared
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_the_api_serves_https_with_the_configured_certificate_and_not_plain_http(api: Api) -> None:
    answer = api.get("/v1/health")
    assert answer.status_code in (200, 503) and answer.url.scheme == "https"
    with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
        httpx.get(f"{api.base_url}/v1/health", timeout=30)
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port gets no answer
        httpx.get(api.base_url.replace("https://", "http://") + "/v1/health", timeout=30)
    assert "K2 query API on https://" in api.log_file.read_text()


def test_a_valid_token_reads_and_expired_foreign_audience_forged_and_early_tokens_are_refused(api: Api) -> None:
    allowed = api.bearer(api.token())
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["data"], "market.trades holds rows: /v1/symbols lists their symbols"

    hour_ago = int(time.time()) - 3600
    refusals = {
        "expired": api.token(exp=hour_ago, iat=hour_ago - 60, nbf=hour_ago - 60),
        "wrong_audience": api.token(aud="another-api"),
        "bad_signature": api.token(signer=_private_key()),  # the same kid, another key
        "wrong_issuer": api.token(iss="https://idp.example.test/realms/other"),
        "not_yet_valid": api.token(nbf=int(time.time()) + 3600),
    }
    for reason, token in refusals.items():
        refused = api.bearer(token)
        assert refused.status_code == 401, (reason, refused.text)
        assert f'error_description="{reason}"' in refused.headers["WWW-Authenticate"], reason
    # A token without the mapped grant is known but may not read trades; an operator's grant is admin.
    assert api.bearer(api.token(roles=["someone-else"])).status_code == 403
    assert api.bearer(api.token(sub="ops", roles=["k2-operators"])).status_code == 200
    # A token without exp is refused: every token must expire.
    assert api.bearer(api.token(exp=None)).status_code == 401


def test_a_revoked_key_is_refused_on_the_next_request_by_every_worker(api: Api) -> None:
    key, entry = api.keys.create("revoke-me", ["read:trades"])
    api.secrets.append(key)
    # Fresh connections spread over both workers: each verifies the key and remembers it.
    assert [api.get(headers={"X-API-Key": key}).status_code for _ in range(16)] == [200] * 16
    api.keys.revoke(entry.id)
    after = [api.get(headers={"X-API-Key": key}).status_code for _ in range(16)]
    assert after == [401] * 16, after


def test_every_request_allowed_or_refused_has_an_audit_line_and_is_counted(api: Api) -> None:
    token = api.token(sub="auditor")
    assert api.bearer(token).status_code == 200
    assert api.get().status_code == 401  # no credential
    assert api.get(headers={"X-API-Key": "k2_0123456789ab_not-the-secret"}).status_code == 401
    claims = jwt.decode(token, options={"verify_signature": False})
    lines = api.audit_lines()
    assert all(
        set(line) >= {"time", "principal", "credential", "credential_id", "endpoint", "params_sha256", "status", "rows"}
        for line in lines
    )
    mine = [line for line in lines if line["principal"] == "jwt:auditor"]
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["credential_id"] == claims["jti"]
    assert mine[0]["endpoint"] == "/v1/symbols" and mine[0]["rows"] > 0
    reasons = {line["reason"] for line in lines if line["status"] == 401}
    assert {"no_credential", "unknown_or_revoked_key", "expired", "wrong_audience", "bad_signature"} <= reasons
    forged = [line for line in lines if line["credential_id"] == "0123456789ab"]
    assert forged and forged[-1]["status"] == 401 and forged[-1]["principal"] is None
    assert stat.S_IMODE(api.audit_file.stat().st_mode) == 0o600
    # Each worker counts its own lines; scrapes over fresh connections reach both.
    scraped = "".join(api.get("/metrics").text for _ in range(8))
    assert 'k2_api_audit_lines_total{credential="jwt",outcome="refused"}' in scraped
    assert 'k2_api_audit_lines_total{credential="api_key",outcome="allowed"}' in scraped


def test_no_secret_is_in_the_api_log_or_the_audit_trail(api: Api) -> None:
    assert api.bearer(api.token()).status_code == 200
    assert api.get(headers={"X-API-Key": BOOTSTRAP_KEY}).status_code == 200
    assert len(api.secrets) > 5
    for path in (api.log_file, api.audit_file):
        text = path.read_text()
        assert text, path
        leaked = [secret[:12] + "..." for secret in api.secrets if secret in text]
        assert not leaked, f"{path.name} holds secrets {leaked}"
    assert stat.S_IMODE(api.keys.path.stat().st_mode) == 0o600


def test_token_settings_that_would_accept_foreign_tokens_stop_the_api() -> None:
    with pytest.raises(TokenSettingsError, match="K2_API_JWT_AUDIENCE"):
        TokenSettings(jwks="/etc/k2/jwks.json", issuer=ISSUER).check()
    with pytest.raises(TokenSettingsError, match="asymmetric"):
        TokenSettings(jwks="/etc/k2/jwks.json", issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",)).check()
    TokenSettings().check()  # tokens off: API keys only
