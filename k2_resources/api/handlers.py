"""How the API answers errors: each exception class with its HTTP status and a ``detail`` naming the fix.

ApiError its own status (401, 403, 429), ParameterError and FastAPI's validation errors 422
(with ``errors``: parameter and message each), NotAcceptable 406, KafkaUnavailableError 503 with
Retry-After, any other K2Error 503. Starlette looks a handler up by the exception's class first,
so the K2Error subclasses above keep their own status.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2_resources.api.errors import ApiError, NotAcceptable, ParameterError
from k2_resources.api.params import EXAMPLES
from k2_resources.errors import K2Error, KafkaUnavailableError


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def _parameter_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ParameterError)
    return JSONResponse(
        {"detail": str(exc), "errors": [{"parameter": exc.parameter, "message": exc.message}]}, status_code=422
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part not in ("query", "header", "path")]
        parameter = ".".join(location) or "request"
        message = error.get("msg", "invalid")
        if error.get("type") == "missing":
            message = f"is required, e.g. {EXAMPLES.get(parameter, parameter + '=...')}"
        elif "input" in error:
            message += f" (got {error['input']!r})"
        errors.append({"parameter": parameter, "message": message})
    detail = "; ".join(f"{e['parameter']}: {e['message']}" for e in errors)
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


async def _not_acceptable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=406)


async def _kafka_down(request: Request, exc: Exception) -> JSONResponse:
    detail = (
        str(exc)
        if "allow_partial" in str(exc)
        else f"{exc}; or add allow_partial=true to get the Iceberg part alone, with the missing offsets named"
    )
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})


async def _k2_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ParameterError, _parameter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(NotAcceptable, _not_acceptable)
    app.add_exception_handler(KafkaUnavailableError, _kafka_down)
    app.add_exception_handler(K2Error, _k2_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
