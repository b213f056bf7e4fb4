"""Identical concurrent requests share one read: the answer of a computation that started after each
of them arrived.

Fifty dashboards polling one symbol's recent trades ask the same question many times a second.
Answering each on its own repeats the same Iceberg slice, Kafka fetch and encoding, and the
requests queue behind each other. Here the requests of one key that arrive while its previous
computation runs wait together and share the next one; that computation starts after every one
of them arrived, so it sees everything that was there when each was sent (no answer is older
than its request: nothing is served from a time-based cache). At most one computation per key
runs at a time, on a worker thread; the requests that wait for it cost the event loop nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from k2_resources.api.metrics import API_SHARED_READS

T = TypeVar("T")


class Coalescer:
    """Per key, one computation running and one batch of requests waiting for the next."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, asyncio.Future[Any]] = {}
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps weak ones)
        self.computations = 0
        self.requests = 0

    async def run(self, key: Hashable, compute: Callable[[], T], route: str = "") -> T:
        """``compute()``'s result, from a call that started after this request arrived, shared with
        the requests of ``key`` that arrived before that call started. Its exception likewise."""
        self.requests += 1
        batch = self._waiting.get(key)
        if batch is not None:
            API_SHARED_READS.labels(route=route).inc()
        else:
            batch = asyncio.get_running_loop().create_future()
            self._waiting[key] = batch
            task = asyncio.create_task(self._drive(key, batch, compute))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # shield: a client that hangs up must not cancel the batch the others wait for
        return await asyncio.shield(batch)

    async def _drive(self, key: Hashable, batch: asyncio.Future[Any], compute: Callable[[], Any]) -> None:
        previous = self._running.get(key)
        while previous is not None:
            await asyncio.wait([previous])
            previous = self._running.get(key)
        # From here on, arrivals form the next batch: every member of this one arrived before the call.
        del self._waiting[key]
        self._running[key] = batch
        self.computations += 1
        try:
            batch.set_result(await run_in_threadpool(compute))
        except asyncio.CancelledError:  # the server is stopping
            batch.cancel()
            raise
        except Exception as exc:  # every member gets the same answer, errors included
            batch.set_exception(exc)
            batch.exception()  # retrieved here too: members that hung up must not leave it unlogged
        finally:
            del self._running[key]
