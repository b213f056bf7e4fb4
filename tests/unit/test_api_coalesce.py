"""The API's request coalescing: shared answers are never older than the requests they answer."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from k2_resources.api.coalesce import Coalescer


class Clock:
    """A computation that records when each call started and can be held until released."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.release = threading.Event()
        self.release.set()

    def compute(self) -> float:
        started = time.monotonic()
        self.starts.append(started)
        assert self.release.wait(timeout=30), "the test never released the computation"
        return started


def test_every_answer_comes_from_a_call_that_started_after_its_request_arrived():
    async def scenario() -> None:
        coalescer, clock = Coalescer(), Clock()
        clock.release.clear()
        first = asyncio.create_task(coalescer.run("k", clock.compute))
        while not clock.starts:  # the first call is running and held
            await asyncio.sleep(0.001)
        arrivals = []
        waiting = []
        for _ in range(20):
            arrivals.append(time.monotonic())
            waiting.append(asyncio.create_task(coalescer.run("k", clock.compute)))
        await asyncio.sleep(0.01)
        clock.release.set()
        answers = await asyncio.gather(first, *waiting)
        for arrived, answer in zip(arrivals, answers[1:], strict=True):
            assert answer >= arrived  # the answer's call started after the request arrived
        # the 20 that arrived while the first call ran shared one call: two calls in all
        assert len(clock.starts) == 2, clock.starts
        assert coalescer.computations == 2 and coalescer.requests == 21

    asyncio.run(scenario())


def test_different_keys_do_not_share_and_errors_reach_every_member():
    async def scenario() -> None:
        coalescer = Coalescer()
        calls: list[str] = []

        def failing() -> str:
            calls.append("bad")
            time.sleep(0.05)
            raise ValueError("no such symbol")

        def fine() -> str:
            calls.append("good")
            return "rows"

        results = await asyncio.gather(
            coalescer.run("bad", failing),
            coalescer.run("bad", failing),
            coalescer.run("good", fine),
            return_exceptions=True,
        )
        assert [type(r) for r in results[:2]] == [ValueError, ValueError]
        assert results[2] == "rows"
        assert sorted(calls) == ["bad", "good"]  # the two "bad" requests shared one call

    asyncio.run(scenario())


def test_a_member_that_hangs_up_does_not_cancel_the_others():
    async def scenario() -> None:
        coalescer, clock = Coalescer(), Clock()
        clock.release.clear()
        leaving = asyncio.create_task(coalescer.run("k", clock.compute))
        staying = asyncio.create_task(coalescer.run("k", clock.compute))
        while not clock.starts:
            await asyncio.sleep(0.001)
        leaving.cancel()
        clock.release.set()
        assert await staying == clock.starts[0]
        with pytest.raises(asyncio.CancelledError):
            await leaving

    asyncio.run(scenario())
