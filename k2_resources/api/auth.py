"""API keys on the routes: a dependency checks the key, its scope and its token bucket."""

from collections.abc import Callable
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from k2_resources.api.errors import ApiError
from k2_resources.api.keys import ApiKey
from k2_resources.api.limits import Decision
from k2_resources.api.metrics import API_RATE_LIMITED
from k2_resources.api.services import services_of

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from `k2 api keys create`")
_bearer = HTTPBearer(auto_error=False, description="the same API key as a bearer token")


def rate_headers(decision: Decision) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": f"{decision.limit:g}",
        "X-RateLimit-Burst": f"{decision.burst:g}",
        "X-RateLimit-Remaining": str(decision.remaining),
    }


def require(scope: str) -> Callable[..., ApiKey]:
    """A dependency: the request's key must be valid (401), hold ``scope`` (403) and have a token (429)."""

    def dependency(
        request: Request,
        header_key: Annotated[str | None, Security(_api_key_header)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
    ) -> ApiKey:
        services = services_of(request)
        presented = header_key or (bearer.credentials if bearer else None)
        challenge = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}
        if not presented:
            raise ApiError(
                401,
                "no API key; send it as the X-API-Key header (or Authorization: Bearer <key>); "
                "create one with `k2 api keys create --name <who> --scope " + scope + "`",
                challenge,
            )
        key = services.keys.authenticate(presented)
        if key is None:
            raise ApiError(
                401,
                "the API key is unknown or revoked; check it, or create a new one with `k2 api keys create`",
                challenge,
            )
        if not key.allows(scope):
            raise ApiError(
                403,
                f"API key {key.id} ({key.name}) lacks the scope {scope} this route needs (it has "
                f"{', '.join(key.scopes)}); create a key with --scope {scope}",
            )
        decision = services.limiter.take(key.id, key.rate_per_second, key.burst)
        request.state.rate = decision
        if not decision.allowed:
            API_RATE_LIMITED.labels(key_id=key.id).inc()
            raise ApiError(
                429,
                f"rate limit of {decision.limit:g} requests/s (burst {decision.burst:g}) reached "
                f"for API key {key.id}; retry after {decision.retry_after_header} s",
                {"Retry-After": decision.retry_after_header, **rate_headers(decision)},
            )
        return key

    return dependency
