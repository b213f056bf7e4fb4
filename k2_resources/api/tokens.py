"""Bearer JWTs from a company's identity provider: the query API's second kind of credential.

A token is accepted only when its signature verifies against a key of the configured JWKS (a file,
re-read when it changes, or an ``https://`` URL, fetched again when a token names a key id it does
not hold: the provider rotated its keys), with one of the allowed algorithms (asymmetric only, so
a JWKS can never be used as an HMAC secret), and ``iss``, ``aud``, ``exp`` (required) and ``nbf``
(when present) hold, with ``leeway_s`` of clock skew. The claim ``scope_claim`` (a space-separated
string, as OAuth2's ``scope``, or a list, as ``roles`` or ``groups``) names the token's grants;
``scope_map`` maps a grant to K2's scopes (``read:trades``, ``read:ohlcv``, ``admin``), and with no
map, grants that are K2 scopes count as themselves.

Settings (:class:`TokenSettings`, from the environment): ``K2_API_JWT_JWKS`` (path or URL; unset:
tokens are off), ``K2_API_JWT_ISSUER`` and ``K2_API_JWT_AUDIENCE`` (both required when tokens are
on), ``K2_API_JWT_SCOPE_CLAIM`` (default ``scope``), ``K2_API_JWT_SCOPE_MAP``
(``grant=scope[ scope],grant=...``), ``K2_API_JWT_ALGORITHMS`` (default ``RS256,ES256``),
``K2_API_JWT_LEEWAY_S`` (default 30).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from k2_resources.api.errors import ApiError, TokenSettingsError
from k2_resources.api.keys import SCOPES

ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}


def looks_like_jwt(credential: str) -> bool:
    """Three base64url parts with dots between: a JWS compact serialization (API keys have no dot)."""
    return credential.count(".") == 2 and credential.startswith("ey")


def token_id(credential: str, claims: dict[str, Any] | None = None) -> str:
    """``jti`` when the token has one, else the first 16 hex digits of its SHA-256 (never the token)."""
    jti = (claims or {}).get("jti")
    return str(jti) if jti else "sha256:" + hashlib.sha256(credential.encode()).hexdigest()[:16]


def _parse_scope_map(raw: str) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        grant, _, scopes = entry.partition("=")
        chosen = scopes.split()
        unknown = [s for s in chosen if s not in SCOPES]
        if not grant or not chosen or unknown:
            raise TokenSettingsError(
                f"K2_API_JWT_SCOPE_MAP entry {entry!r}: write grant=scope (scopes among {', '.join(SCOPES)}, "
                "several separated by spaces), entries separated by commas"
            )
        mapping[grant.strip()] = chosen
    return mapping


@dataclass(frozen=True)
class TokenSettings:
    """What a token must satisfy; ``jwks`` None: the API takes API keys only."""

    jwks: str | None = None
    issuer: str | None = None
    audience: str | None = None
    scope_claim: str = "scope"
    scope_map: dict[str, list[str]] = field(default_factory=dict)
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: float = 30.0

    @classmethod
    def from_environment(cls) -> TokenSettings:
        env = os.environ.get
        try:
            leeway = float(env("K2_API_JWT_LEEWAY_S") or 30.0)
        except ValueError as exc:
            raise TokenSettingsError(f"K2_API_JWT_LEEWAY_S={env('K2_API_JWT_LEEWAY_S')!r} is not a number") from exc
        algorithms = tuple(a.strip() for a in (env("K2_API_JWT_ALGORITHMS") or "RS256,ES256").split(",") if a.strip())
        return cls(
            jwks=env("K2_API_JWT_JWKS") or None,
            issuer=env("K2_API_JWT_ISSUER") or None,
            audience=env("K2_API_JWT_AUDIENCE") or None,
            scope_claim=env("K2_API_JWT_SCOPE_CLAIM") or "scope",
            scope_map=_parse_scope_map(env("K2_API_JWT_SCOPE_MAP") or ""),
            algorithms=algorithms,
            leeway_s=leeway,
        )

    def check(self) -> None:
        """Refuse settings that would accept tokens meant for someone else."""
        if self.jwks is None:
            return
        missing = [name for name, value in (("ISSUER", self.issuer), ("AUDIENCE", self.audience)) if not value]
        if missing:
            raise TokenSettingsError(
                f"K2_API_JWT_JWKS is set but {' and '.join('K2_API_JWT_' + m for m in missing)} is not: "
                "a token is accepted only for this API's issuer and audience"
            )
        weak = [a for a in self.algorithms if a not in ASYMMETRIC]
        if weak or not self.algorithms:
            raise TokenSettingsError(
                f"K2_API_JWT_ALGORITHMS {','.join(self.algorithms)}: only asymmetric algorithms "
                f"({', '.join(sorted(ASYMMETRIC))}) are checked against a JWKS"
            )


@dataclass(frozen=True)
class TokenPrincipal:
    """A verified token: who (``sub``), its id (``jti`` or a digest) and K2 scopes."""

    subject: str
    id: str
    scopes: list[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class _FileKeys:
    """A JWKS file, re-read when its stat changes (a rotation replaces it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._lock = threading.Lock()

    def key(self, kid: str | None) -> jwt.PyJWK:
        try:
            info = self.path.stat()
        except OSError as exc:
            raise TokenSettingsError(f"the JWKS file {self.path} cannot be read ({exc}); see K2_API_JWT_JWKS") from exc
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    keys = jwt.PyJWKSet.from_dict(json.loads(self.path.read_text())).keys
                except (OSError, ValueError, jwt.PyJWKSetError) as exc:
                    raise TokenSettingsError(f"the JWKS file {self.path} is not a JWK set ({exc})") from exc
                self._keys = {k.key_id: k for k in keys}
                if len(keys) == 1:
                    self._keys.setdefault(None, keys[0])
                self._stamp = stamp
            found = self._keys.get(kid)
        if found is None:
            raise jwt.InvalidTokenError(f"no key {kid!r} in the JWKS")
        return found


class TokenVerifier:
    """Verifies bearer tokens against :class:`TokenSettings`; thread-safe."""

    def __init__(self, settings: TokenSettings) -> None:
        settings.check()
        self.settings = settings
        self._file: _FileKeys | None = None
        self._url: jwt.PyJWKClient | None = None
        if settings.jwks is None:
            return
        if settings.jwks.startswith(("https://", "http://")):
            self._url = jwt.PyJWKClient(settings.jwks, cache_keys=True, lifespan=300, timeout=10)
        else:
            self._file = _FileKeys(Path(settings.jwks).expanduser())

    @property
    def enabled(self) -> bool:
        return self.settings.jwks is not None

    def _signing_key(self, credential: str) -> jwt.PyJWK:
        if self._url is not None:
            try:
                return self._url.get_signing_key_from_jwt(credential)
            except jwt.PyJWKClientConnectionError as exc:
                raise ApiError(503, f"the JWKS at {self.settings.jwks} cannot be fetched ({exc})") from exc
        assert self._file is not None
        return self._file.key(jwt.get_unverified_header(credential).get("kid"))

    def verify(self, credential: str) -> TokenPrincipal:
        """The token's principal, or ApiError 401 naming what failed (expired, audience, signature...)."""
        if not self.enabled:
            raise ApiError(401, "bearer tokens are not accepted here (K2_API_JWT_JWKS is unset); send an API key")
        settings = self.settings
        try:
            key = self._signing_key(credential)
            claims = jwt.decode(
                credential,
                key,
                algorithms=list(settings.algorithms),
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _refused("expired", "the token has expired; get a new one from the identity provider") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _refused("not_yet_valid", "the token is not valid yet (nbf/iat in the future)") from exc
        except jwt.InvalidAudienceError as exc:
            raise _refused(
                "wrong_audience", f"the token is not for this API (audience must be {settings.audience})"
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise _refused("wrong_issuer", f"the token's issuer is not {settings.issuer}") from exc
        except jwt.InvalidSignatureError as exc:
            raise _refused("bad_signature", "the token's signature does not verify against the JWKS") from exc
        except jwt.InvalidTokenError as exc:
            raise _refused("invalid", f"the token is not valid ({exc})") from exc
        return TokenPrincipal(str(claims["sub"]), token_id(credential, claims), self.scopes_of(claims))

    def scopes_of(self, claims: dict[str, Any]) -> list[str]:
        raw = claims.get(self.settings.scope_claim, [])
        grants = raw.split() if isinstance(raw, str) else [str(g) for g in raw] if isinstance(raw, list) else []
        if self.settings.scope_map:
            return sorted({scope for grant in grants for scope in self.settings.scope_map.get(grant, [])})
        return sorted({grant for grant in grants if grant in SCOPES})


def _refused(reason: str, detail: str) -> ApiError:
    challenge = {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'}
    return ApiError(401, detail, challenge, reason)
