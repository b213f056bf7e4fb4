"""A live uvicorn serving the K2 query API on 127.0.0.1 and a free port, for tests and benchmarks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from k2_resources.platform.kafka_broker import free_port
from tests.support.waiting import wait_for


@contextmanager
def serving(app, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread until the block ends; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="k2-api-test-server", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout_s=timeout_s, what="uvicorn to start")
        assert thread.is_alive(), "uvicorn exited while starting (port taken?)"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until_serving(base_url: str, timeout_s: float = 90.0, process=None, verify: bool | str = True) -> None:
    """Wait for an API started elsewhere (a subprocess) to answer /v1/health (``verify``: httpx's, e.g.
    the CA file of an HTTPS API's certificate)."""

    def answers() -> bool:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the API process exited with code {process.returncode}")
        try:
            return httpx.get(f"{base_url}/v1/health", timeout=5, verify=verify).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout_s=timeout_s, what=f"the query API at {base_url}", interval_s=0.3)
