"""Credentials on the routes: a dependency checks an API key or a bearer JWT, its scope and its token bucket.

An API key comes as ``X-API-Key`` (or ``Authorization: Bearer k2_...``); a JWT from the identity
provider as ``Authorization: Bearer <token>`` (told apart by its shape, see ``tokens``). Either
way the dependency leaves who asked in ``request.state`` (``k2_principal``, ``k2_credential``,
``k2_credential_id`` and, when refused, ``k2_reason``) before it decides, so the audit line of a
refused request names what was presented (a key's public id, a token's ``jti`` or digest; never
the secret).
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from k2_resources.api.errors import ApiError
from k2_resources.api.keys import parse_key
from k2_resources.api.limits import Decision
from k2_resources.api.metrics import API_RATE_LIMITED
from k2_resources.api.services import Services, services_of
from k2_resources.api.tokens import looks_like_jwt, token_id

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from `k2 api keys create`")
_bearer = HTTPBearer(
    auto_error=False, description="a JWT from the identity provider (K2_API_JWT_*), or an API key as a bearer token"
)
_KEY_CHALLENGE = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}


@dataclass(frozen=True)
class Principal:
    """Who a request is: ``key:<id>`` or ``jwt:<sub>``, with its scopes and bucket limits."""

    name: str
    credential: str  # api_key or jwt
    credential_id: str
    scopes: list[str]
    rate_per_second: float | None = None
    burst: float | None = None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def rate_headers(decision: Decision) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": f"{decision.limit:g}",
        "X-RateLimit-Burst": f"{decision.burst:g}",
        "X-RateLimit-Remaining": str(decision.remaining),
    }


def _refuse(request: Request, reason: str, error: ApiError) -> ApiError:
    request.state.k2_reason = error.reason or reason
    return error


def _from_token(request: Request, services: Services, credential: str) -> Principal:
    request.state.k2_credential = "jwt"
    request.state.k2_credential_id = token_id(credential)  # the digest until the claims are verified
    try:
        token = services.tokens.verify(credential)
    except ApiError as error:
        raise _refuse(request, "invalid_token", error) from None
    request.state.k2_credential_id = token.id
    return Principal(f"jwt:{token.subject}", "jwt", token.id, token.scopes)


def _from_key(request: Request, services: Services, presented: str, scope: str) -> Principal:
    parsed = parse_key(presented)
    request.state.k2_credential = "api_key"
    request.state.k2_credential_id = parsed[0] if parsed else None
    key = services.keys.authenticate(presented)
    if key is None:
        raise _refuse(
            request,
            "unknown_or_revoked_key",
            ApiError(
                401,
                "the API key is unknown or revoked; check it, or create a new one with `k2 api keys create`",
                _KEY_CHALLENGE,
            ),
        )
    request.state.k2_credential_id = key.id
    return Principal(f"key:{key.id}", "api_key", key.id, list(key.scopes), key.rate_per_second, key.burst)


def authenticate(request: Request, header_key: str | None, bearer: str | None, scope: str) -> Principal:
    """The request's principal (401 without a valid credential), noted in ``request.state``."""
    services = services_of(request)
    if not header_key and bearer and looks_like_jwt(bearer) and services.tokens.enabled:
        principal = _from_token(request, services, bearer)
    elif header_key or bearer:
        principal = _from_key(request, services, header_key or bearer or "", scope)
    else:
        tokens = " or a bearer JWT from the identity provider" if services.tokens.enabled else ""
        raise _refuse(
            request,
            "no_credential",
            ApiError(
                401,
                "no API key; send it as the X-API-Key header (or Authorization: Bearer <key>)"
                + tokens
                + "; create one with `k2 api keys create --name <who> --scope "
                + scope
                + "`",
                _KEY_CHALLENGE,
            ),
        )
    request.state.k2_principal = principal.name
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: a valid key or token (401), holding ``scope`` (403), with a token in its bucket (429).

    It runs on the event loop for API keys (a dict look-up, a file stat, a locked bucket: no thread
    hop per request); a JWT may need the identity provider's keys fetched, so it goes to a thread."""

    async def dependency(
        request: Request,
        header_key: Annotated[str | None, Security(_api_key_header)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
    ) -> Principal:
        credential = bearer.credentials if bearer else None
        if not header_key and credential and looks_like_jwt(credential) and services_of(request).tokens.enabled:
            return await run_in_threadpool(_admit, request, header_key, credential, scope)
        return _admit(request, header_key, credential, scope)

    return dependency


def _admit(request: Request, header_key: str | None, credential: str | None, scope: str) -> Principal:
    principal = authenticate(request, header_key, credential, scope)
    if not principal.allows(scope):
        raise _refuse(
            request,
            "missing_scope",
            ApiError(
                403,
                f"{principal.name} lacks the scope {scope} this route needs (it has "
                f"{', '.join(principal.scopes) or 'none'}); "
                + (
                    f"create a key with --scope {scope}"
                    if principal.credential == "api_key"
                    else "ask for a token with a grant mapped to it (K2_API_JWT_SCOPE_MAP)"
                ),
            ),
        )
    services = services_of(request)
    decision = services.limiter.take(principal.name, principal.rate_per_second, principal.burst)
    request.state.rate = decision
    if not decision.allowed:
        # Keys by id; tokens by subject (a jti is new with every token: unbounded series).
        label = principal.credential_id if principal.credential == "api_key" else principal.name
        API_RATE_LIMITED.labels(key_id=label).inc()
        raise _refuse(
            request,
            "rate_limited",
            ApiError(
                429,
                f"rate limit of {decision.limit:g} requests/s (burst {decision.burst:g}) reached "
                f"for {principal.name}; retry after {decision.retry_after_header} s",
                {"Retry-After": decision.retry_after_header, **rate_headers(decision)},
            ),
        )
    return principal
