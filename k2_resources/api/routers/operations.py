"""``/v1/health`` and ``/metrics``: open to probes and scrapers (no API key)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from k2_resources.api.metrics import API_REGISTRY
from k2_resources.api.services import services_of

router = APIRouter(tags=["operations"])


@router.get("/v1/health", summary="Catalog, Kafka and lag; 503 when the catalog is down")
def health(request: Request) -> JSONResponse:
    report = services_of(request).health.check()
    return JSONResponse(report, status_code=503 if report["status"] == "down" else 200)


@router.get("/metrics", summary="Prometheus metrics of the API", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(API_REGISTRY), media_type=CONTENT_TYPE_LATEST)
