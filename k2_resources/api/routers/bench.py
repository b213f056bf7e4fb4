"""``/v1/_bench/bytes?size=N``: N pre-encoded bytes, the ceiling of the serving stack.

Only served when ``ApiSettings.bench_route`` is on (``K2_API_BENCH_ROUTE=1``, which the API
benchmark sets). It goes through the same middleware, key check and rate limit as the data
routes and does no work of its own, so a data route's throughput over this one's, for a body of
the same size, is the share of the stack the query itself costs.
"""

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from k2_resources.api.auth import require
from k2_resources.api.keys import READ_TRADES

MAX_BYTES = 64 * 1024 * 1024
_bodies: dict[int, bytes] = {}

router = APIRouter(tags=["benchmark"], dependencies=[Depends(require(READ_TRADES))], include_in_schema=False)


@router.get("/v1/_bench/bytes")
async def bench_bytes(size: Annotated[int, Query(ge=0, le=MAX_BYTES)] = 1024) -> Response:
    body = _bodies.get(size)
    if body is None:
        body = _bodies.setdefault(size, b"x" * size)
    return Response(content=body, media_type="application/octet-stream")
