"""The Binance combined-stream WebSocket client.

The client yields raw frames (text as ``str``, binary as ``bytes``, exactly as received) and keeps
the stream alive:

- pings from the server are answered by websockets itself (Binance pings every 20 s and
  drops a connection that does not answer within a minute);
- a closed or failed connection is reopened with exponential backoff and jitter: the n-th
  retry in a row waits ``min(cap, initial * 2**n)`` scaled by a random factor in
  ``[1 - jitter, 1 + jitter]``; a connection that delivered frames resets the count;
- Binance closes every connection after 24 hours, so the client rotates proactively at
  ``max_connection_age_s`` (default 23.5 h): it opens the new connection first, keeps reading
  the old one until that has caught up with the new one's first trade, and only then closes
  it, so nothing falls in between (the overlap comes through twice and the streamer's duplicate check
  drops it, see k2_resources.binance.dedupe);
- a close with code 1000 and reason ``end of recording`` (sent only by K2's recording server at the
  end of a once-only playback) ends the stream; so do ``stop_event`` and ``idle_timeout_s``.

"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from k2_resources.binance.recording_server import END_OF_RECORDING_REASON

log = logging.getLogger(__name__)

LIVE_BASE_URL = "wss://stream.binance.com:9443"
DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
BINANCE_MAX_CONNECTION_AGE_S = 24 * 3600


def combined_stream_url(base_url: str, symbols: list[str] | tuple[str, ...]) -> str:
    """``<base>/stream?streams=<sym>@trade/...``; a URL that already names streams is returned as is."""
    if "streams=" in base_url:
        return base_url
    return base_url.rstrip("/") + "/stream?streams=" + "/".join(f"{s.lower()}@trade" for s in symbols)


DEFAULT_LIVE_URL = combined_stream_url(LIVE_BASE_URL, DEFAULT_SYMBOLS)


class StopSignal(Protocol):
    def is_set(self) -> bool: ...


def backoff_delay(
    attempt: int, initial_s: float, cap_s: float, jitter: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): doubling from initial to cap, jittered."""
    base = min(cap_s, initial_s * (2 ** min(attempt, 62)))
    factor = 1.0 + (rng or random).uniform(-jitter, jitter)
    return max(0.0, base * factor)


@dataclass
class ClientStats:
    connections: int = 0  # connections opened
    reconnects: int = 0  # connections opened after the first one
    rotations: int = 0  # proactive reconnects before Binance's 24-hour cut
    failed_attempts: int = 0  # connection attempts that failed
    frames: int = 0
    last_close: str | None = None
    ended_by: str | None = None  # end_of_recording | stop | idle | max_frames


@dataclass
class BinanceStreamClient:
    """Reads a Binance combined stream forever (or until stopped), reconnecting as needed."""

    url: str = DEFAULT_LIVE_URL
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_jitter: float = 0.25
    max_connection_age_s: float = BINANCE_MAX_CONNECTION_AGE_S - 1800
    handover_s: float = 1.0  # wait this long for the new connection's first frame on a rotation
    handover_max_s: float = 30.0  # read the old connection at most this long after that
    open_timeout_s: float = 10.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 60.0
    idle_timeout_s: float | None = None
    stop_event: StopSignal | None = None
    poll_interval_s: float = 0.25
    on_event: Callable[[str], None] | None = None  # called with "reconnect", "rotation", "failed_attempt"
    stats: ClientStats = field(default_factory=ClientStats)
    _next: ClientConnection | None = field(default=None, init=False, repr=False)
    _carry: str | bytes | None = field(default=None, init=False, repr=False)

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name)

    async def _open(self) -> ClientConnection:
        connection = await connect(
            self.url,
            open_timeout=self.open_timeout_s,
            ping_interval=self.ping_interval_s,
            ping_timeout=self.ping_timeout_s,
            close_timeout=2,
            max_size=2**20,
            max_queue=1024,
        )
        self.stats.connections += 1
        if self.stats.connections > 1:
            self.stats.reconnects += 1
            self._event("reconnect")
        return connection

    def _stopping(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    async def frames(self) -> AsyncGenerator[str | bytes]:
        """Every frame of the stream as received (text or binary), across reconnects, until the stream ends."""
        attempt = 0
        last_frame_at = time.monotonic()
        while not self._stopping():
            try:
                connection = await self._open()
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.stats.failed_attempts += 1
                self._event("failed_attempt")
                delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s, self.backoff_jitter)
                log.warning("cannot connect to %s (%s); retrying in %.2f s", self.url, exc, delay)
                attempt += 1
                if not await self._wait(delay):
                    break
                continue
            opened_at = time.monotonic()
            got_frames = False
            try:
                while True:
                    if self._stopping():
                        self.stats.ended_by = "stop"
                        return
                    if time.monotonic() - opened_at >= self.max_connection_age_s:
                        async for frame in self._handover(connection):
                            yield frame
                        assert self._next is not None  # _handover always sets it (the old connection on failure)
                        connection, opened_at = self._next, time.monotonic()
                        if self._carry is not None:
                            self.stats.frames += 1
                            yield self._carry
                        continue
                    wait = self.poll_interval_s
                    try:
                        async with asyncio.timeout(wait):
                            message = await connection.recv()
                    except TimeoutError:
                        if self.idle_timeout_s is not None and time.monotonic() - last_frame_at > self.idle_timeout_s:
                            self.stats.ended_by = "idle"
                            return
                        continue
                    last_frame_at = time.monotonic()
                    got_frames = True
                    self.stats.frames += 1
                    yield message
            except ConnectionClosed as closed:
                received = closed.rcvd
                self.stats.last_close = f"{received.code} {received.reason}" if received else "no close frame"
                if received is not None and received.code == 1000 and received.reason == END_OF_RECORDING_REASON:
                    self.stats.ended_by = "end_of_recording"
                    return
                log.warning("connection to %s closed (%s); reconnecting", self.url, self.stats.last_close)
            finally:
                await connection.close()
            if got_frames:
                attempt = 0
            delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s, self.backoff_jitter)
            attempt += 1
            if not await self._wait(delay):
                break
        self.stats.ended_by = self.stats.ended_by or "stop"

    async def _handover(self, old: ClientConnection) -> AsyncIterator[str | bytes]:
        """Open the next connection, then read the old one until it has caught up with the first
        trade of the new one (or goes quiet), then close it: nothing falls between the two.

        The frames the old connection still holds were sent before the new one started, so they
        must be read; the overlap that follows comes through twice and the tracker drops it.
        """
        self._carry = None
        try:
            new = await self._open()
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            # keep the old connection; Binance will close it and the normal retry takes over
            self.stats.failed_attempts += 1
            self._event("failed_attempt")
            log.warning("proactive reconnect to %s failed (%s); keeping the current connection", self.url, exc)
            self._next = old
            return
        self.stats.rotations += 1
        self._event("rotation")
        settle_s = min(self.handover_s, self.max_connection_age_s / 4)  # tests shorten both
        marker = None
        try:
            async with asyncio.timeout(settle_s):
                first = await new.recv()
            self._carry = first
            marker = _position(self._carry)
        except TimeoutError:
            pass  # a quiet market: drain the old connection until it is quiet too
        except ConnectionClosed:
            self._next = old  # the new connection failed at once: keep the old one
            return
        self._next = new
        deadline = time.monotonic() + self.handover_max_s
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(remaining if marker else min(remaining, settle_s)):
                        message = await old.recv()
                except TimeoutError:
                    break
                self.stats.frames += 1
                yield message
                if marker is not None and _caught_up(_position(message), marker):
                    break
        except ConnectionClosed:
            pass
        finally:
            await old.close()

    async def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False if a stop was requested meanwhile."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping():
                return False
            await asyncio.sleep(min(remaining, self.poll_interval_s))
        return not self._stopping()


def _position(frame: str | bytes) -> tuple[str, int] | None:
    """(stream, trade id) of a trade frame, None for anything else."""
    try:
        message = json.loads(frame)
        return str(message["stream"]), int(message["data"]["t"])
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None


def _caught_up(position: tuple[str, int] | None, marker: tuple[str, int]) -> bool:
    return position is not None and position[0] == marker[0] and position[1] >= marker[1]


async def probe(url: str, timeout_s: float = 5.0) -> str | None:
    """None if a WebSocket connection to ``url`` opens within the timeout, else the reason it did not."""
    try:
        async with asyncio.timeout(timeout_s):
            connection = await connect(url, open_timeout=timeout_s)
            await connection.close()
        return None
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
