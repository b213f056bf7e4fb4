"""A local Binance-compatible WebSocket server that plays back the recorded trades in data/binance.

It speaks the combined-stream protocol of ``wss://stream.binance.com:9443``: a client opens
``/stream?streams=btcusdt@trade/ethusdt@trade/...`` and receives
``{"stream": "btcusdt@trade", "data": {"e": "trade", "E": .., "s": .., "t": .., "p": .., "q": ..,
"T": .., "m": .., "M": true}}`` frames, symbols merged in trade-time order. Streams without
recorded data (BNBUSDT, depth streams) are accepted and send nothing, like a quiet market.

The recording kept ``T`` but not ``E`` (see data/binance/SOURCE.md), so the server sets ``E = T``.

The tape
    All recorded trades merged by trade time. Pauses longer than ``max_pause_ms`` (the year
    between the 2023 and the 2024 recording) are shortened to that for pacing. ``speed=None``
    sends as fast as the socket takes; ``speed=2.0`` plays twice as fast as recorded.
    ``loop=True`` plays the tape forever; every pass shifts ``T``/``E`` forward by the length of
    the tape and each symbol's trade ids by its id range, so ids stay unique and increasing.
    ``time_base="now"`` rebases times onto a continuous virtual tape anchored at the first
    recorded trade and starts at the position that matches the wall clock: what a live feed
    would look like, with trade ids that never repeat across restarts.

Reconnects
    The server remembers, per set of requested streams, where the newest connection got to, and
    a new connection resumes there, minus ``resume_overlap`` trades that it sends again (as a
    live reconnect can). That is what makes a forced drop lose nothing and bring duplicates.
    ``lose_on_reconnect`` plays live Binance instead: the feed moved on while nobody listened, so
    a reconnect resumes that many trades later (they count as sent; the REST history has them).
    While two connections overlap (a client rotating its connection), the older one keeps
    playing but no longer moves the resume point.

Faults on request (constructor options, or :meth:`RecordingServer.set_faults` while running)
    ``drop_after`` closes each connection (code 1001) after that many frames, at most
    ``max_drops`` times; ``repeat_every``/``repeat_count`` resends the last trades;
    ``malformed_every`` sends a malformed frame (cycling: truncated JSON, missing price,
    bad price); :meth:`drop_connections` and :meth:`inject_frame` act at once.

End of a once-only playback: the server closes with code 1000 and reason ``end of recording``;
the K2 client treats exactly that as the end of the stream.

:meth:`RecordingServer.stats` says how many frames of each kind went out and which trade ids,
per symbol, the server sent (for exactly-once checks).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from k2_resources.binance.rest_history import REST_PREFIX, RestHistory
from k2_resources.binance.rest_limits import BINANCE_WEIGHT_LIMIT, WEIGHT_WINDOW_S
from k2_resources.binance.tape import RECORDING_DIR, RecordedTrade, Tape, load_recorded_trades
from k2_resources.errors import K2Error

log = logging.getLogger(__name__)

END_OF_RECORDING_REASON = "end of recording"
FORCED_DROP_REASON = "forced drop (recording server fault injection)"
DEFAULT_PORT = 9443
MALFORMED_KINDS = ("truncated_json", "missing_price", "bad_price")
__all__ = ["RECORDING_DIR", "RecordedTrade", "RecordingServer", "ServerFaults", "Tape", "load_recorded_trades"]


@dataclass
class ServerFaults:
    """Faults the server injects, per connection; all off by default."""

    drop_after: int | None = None  # close each connection after this many frames ...
    max_drops: int | None = None  # ... at most this many times in total (None: always)
    repeat_every: int | None = None  # after every N-th trade frame ...
    repeat_count: int = 3  # ... send the last K trade frames again
    malformed_every: int | None = None  # after every N-th trade frame, one malformed frame
    lose_on_drop: int = 0  # a drop_after drop also loses the next N trades (sent, never received), as a network cut
    # a reconnect resumes N trades later: a live feed publishes while nobody listens (sent, never received)
    lose_on_reconnect: int = 0


@dataclass
class ServerStats:
    """What the server sent so far (a snapshot)."""

    connections: int = 0
    drops: int = 0
    trade_frames: int = 0  # every trade frame, repeats and resumed overlaps included
    repeated_frames: int = 0
    malformed_frames: int = 0
    injected_frames: int = 0
    finished: bool = False  # a once-only playback reached the end of the tape
    trade_ids: dict[str, set[int]] = field(default_factory=dict)
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (kind, frame)

    @property
    def unique_trades(self) -> int:
        """Distinct (symbol, trade id) pairs sent: the trades a consumer must end up with."""
        return sum(len(ids) for ids in self.trade_ids.values())


def _frame(trade: RecordedTrade, time_ms: int, trade_id: int) -> str:
    return (
        f'{{"stream":"{trade.symbol.lower()}@trade","data":{{"e":"trade","E":{time_ms},"s":"{trade.symbol}",'
        f'"t":{trade_id},"p":"{trade.price}","q":"{trade.quantity}","T":{time_ms},'
        f'"m":{"true" if trade.buyer_is_maker else "false"},"M":true}}}}'
    )


def _malformed(kind: str, trade: RecordedTrade, time_ms: int, trade_id: int) -> str:
    good = _frame(trade, time_ms, trade_id)
    if kind == "truncated_json":
        return good[: len(good) // 2]
    if kind == "missing_price":
        return good.replace(f'"p":"{trade.price}",', "")
    return good.replace(f'"p":"{trade.price}"', '"p":"not-a-number"')


def requested_symbols(path: str) -> set[str] | None:
    """The symbols of the ``@trade`` streams in a ``/stream?streams=...`` path; None if not that path."""
    parts = urlsplit(path)
    if parts.path.rstrip("/") != "/stream":
        return None
    streams = "/".join(parse_qs(parts.query).get("streams", []))
    return {name.split("@", 1)[0].upper() for name in streams.split("/") if name.lower().endswith("@trade")}


class RecordingServer:
    """The recording server on an asyncio loop: ``await start()``, ``await stop()``, or ``async with``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        speed: float | None = None,
        loop: bool = False,
        time_base: Literal["recorded", "now"] = "recorded",
        resume_overlap: int = 3,
        limit: int | None = None,
        trades: list[RecordedTrade] | None = None,
        max_pause_ms: int = 1000,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 60.0,
        close_timeout: float | None = 2.0,  # then the server drops the TCP connection (data unread by the client too)
        faults: ServerFaults | None = None,
        rest_weight_limit: int = BINANCE_WEIGHT_LIMIT,
        rest_window_s: float = WEIGHT_WINDOW_S,
        **fault_options: Any,
    ) -> None:
        """``fault_options`` are ServerFaults fields (drop_after=, repeat_every=, ...) given directly."""
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise K2Error(f"the recording server binds to the loopback only, not {host!r}; use 127.0.0.1")
        if speed is not None and speed <= 0:
            raise K2Error(f"speed must be above 0 (or None for as fast as possible), not {speed}")
        recorded = trades if trades is not None else load_recorded_trades()
        self.tape = Tape(recorded[:limit] if limit else recorded, max_pause_ms=max_pause_ms)
        self.host, self.port = host, port
        self.speed, self.loop, self.time_base = speed, loop, time_base
        self.resume_overlap = resume_overlap
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.close_timeout = close_timeout
        self._faults = replace(faults or ServerFaults(), **fault_options)
        self.rest = RestHistory(
            self.tape, time_base=time_base, loop=loop, weight_limit=rest_weight_limit, window_s=rest_window_s
        )
        self._lock = threading.Lock()
        self._stats = ServerStats()
        self._cursors: dict[tuple[str, ...], int] = {}
        self._owners: dict[tuple[str, ...], ServerConnection] = {}
        self._views: dict[tuple[str, ...], list[int]] = {}
        self._connections: set[ServerConnection] = set()
        self._pending: deque[str] = deque()
        self._server: Server | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> RecordingServer:
        self._event_loop = asyncio.get_running_loop()
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._check_path,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            close_timeout=self.close_timeout,
            max_queue=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Binance recording server on %s", self.url)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> RecordingServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    @property
    def base_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The combined-stream URL for every recorded symbol."""
        return self.stream_url(self.tape.symbols)

    def stream_url(self, symbols: list[str]) -> str:
        return f"{self.base_url}/stream?streams=" + "/".join(f"{s.lower()}@trade" for s in symbols)

    # ---- control API (thread-safe) --------------------------------------------------------------
    def stats(self) -> ServerStats:
        """A copy of the counters and of the sent trade ids."""
        with self._lock:
            return replace(
                self._stats,
                trade_ids={s: set(ids) for s, ids in self._stats.trade_ids.items()},
                malformed=list(self._stats.malformed),
            )

    def set_faults(self, **changes: Any) -> None:
        """Change fault settings (fields of ServerFaults) for frames sent from now on."""
        with self._lock:
            self._faults = replace(self._faults, **changes)

    def inject_frame(self, frame: str) -> None:
        """Send this raw frame on the next trade of each connection playing (once)."""
        with self._lock:
            self._pending.append(frame)

    def drop_connections(self) -> None:
        """Close every open connection now with code 1001, as a network drop or server restart would."""
        loop = self._event_loop
        if loop is None:
            return

        def close_all() -> None:
            for connection in list(self._connections):
                with self._lock:
                    self._stats.drops += 1
                loop.create_task(connection.close(1001, FORCED_DROP_REASON))

        loop.call_soon_threadsafe(close_all)

    def reset(self) -> None:
        """Forget where clients stopped, so the next connection starts the tape again."""
        with self._lock:
            self._cursors.clear()

    # ---- protocol ------------------------------------------------------------------------------
    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith(REST_PREFIX):  # the REST history, plain HTTP on the same port
            status, headers, body = self.rest.answer(request.path)
            response = connection.respond(status, body)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            for name, value in headers.items():
                response.headers[name] = value
            return response
        if requested_symbols(request.path) is None:
            return connection.respond(
                HTTPStatus.NOT_FOUND, "use the combined-stream path /stream?streams=<symbol>@trade/...\n"
            )
        return None

    def _view(self, key: tuple[str, ...]) -> list[int]:
        if key not in self._views:
            self._views[key] = self.tape.view(set(key))
        return self._views[key]

    def _values(self, view: list[int], position: int) -> tuple[RecordedTrade, int, int, int]:
        """(trade, time_ms, trade_id, compressed offset ms) of an endless-tape position."""
        lap, index = divmod(position, len(view))
        tape = self.tape
        global_index = view[index]
        trade = tape.trades[global_index]
        offset = lap * tape.compressed_span_ms + tape.offsets_ms[global_index]
        time_ms = tape.time_ms(global_index, lap, self.time_base)
        return trade, time_ms, trade.trade_id + lap * tape.id_span[trade.symbol], offset

    def _start_position(self, key: tuple[str, ...], view: list[int]) -> int:
        with self._lock:
            if key in self._cursors:
                return max(0, self._cursors[key] - self.resume_overlap)
        if self.time_base != "now":
            return 0
        elapsed = max(0, int(time.time() * 1000) - self.tape.anchor_ms)
        lap, remainder = divmod(elapsed, self.tape.compressed_span_ms)
        offsets = [self.tape.offsets_ms[i] for i in view]
        return lap * len(view) + min(bisect.bisect_left(offsets, remainder), len(view) - 1)

    async def _handle(self, connection: ServerConnection) -> None:
        symbols = requested_symbols(connection.request.path if connection.request else "") or set()
        key = tuple(sorted(symbols))
        view = self._view(key)
        with self._lock:
            self._stats.connections += 1
        self._connections.add(connection)
        try:
            if not view:  # a quiet stream: keep the connection (pings) and send nothing
                await connection.wait_closed()
                return
            await self._play(connection, key, view)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(connection)

    async def _play(self, connection: ServerConnection, key: tuple[str, ...], view: list[int]) -> None:
        with self._lock:
            reconnect = key in self._cursors
        position = self._start_position(key, view)
        with self._lock:  # the newest connection of a stream set owns its resume cursor
            self._owners[key] = connection
            missed = self._faults.lose_on_reconnect if reconnect else 0
        if missed:
            self._lose(key, view, position, missed, connection)
            position = position + missed if self.loop else min(position + missed, len(view))
        first_offset = self._values(view, position)[3]
        started = time.monotonic()
        sent_here = 0
        recent: deque[str] = deque(maxlen=64)
        limit = len(view)
        while True:
            if not self.loop and position >= limit:
                with self._lock:
                    self._stats.finished = True
                await connection.close(1000, END_OF_RECORDING_REASON)
                return
            trade, time_ms, trade_id, offset = self._values(view, position)
            if self.speed:
                delay = started + (offset - first_offset) / 1000 / self.speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif sent_here % 256 == 0:
                await asyncio.sleep(0)  # let control calls and other connections run
            frame = _frame(trade, time_ms, trade_id)
            await connection.send(frame)
            position += 1
            sent_here += 1
            recent.append(frame)
            with self._lock:
                if self._owners.get(key) is connection:
                    self._cursors[key] = position
                self._stats.trade_frames += 1
                self._stats.trade_ids.setdefault(trade.symbol, set()).add(trade_id)
                self.rest.sent(trade.symbol, trade_id)
                faults = self._faults
                extra = list(self._pending)
                self._pending.clear()
            if faults.repeat_every and faults.repeat_count > 0 and sent_here % faults.repeat_every == 0:
                for again in list(recent)[-faults.repeat_count :]:
                    await connection.send(again)
                    with self._lock:
                        self._stats.repeated_frames += 1
                        self._stats.trade_frames += 1
            if faults.malformed_every and sent_here % faults.malformed_every == 0:
                with self._lock:
                    kind = MALFORMED_KINDS[self._stats.malformed_frames % len(MALFORMED_KINDS)]
                bad = _malformed(kind, trade, time_ms, trade_id)
                await connection.send(bad)
                with self._lock:
                    self._stats.malformed_frames += 1
                    self._stats.malformed.append((kind, bad))
            for frame_text in extra:
                await connection.send(frame_text)
                with self._lock:
                    self._stats.injected_frames += 1
            if faults.drop_after and sent_here >= faults.drop_after:
                with self._lock:
                    allowed = faults.max_drops is None or self._stats.drops < faults.max_drops
                    if allowed:
                        self._stats.drops += 1
                if allowed:
                    self._lose(key, view, position, faults.lose_on_drop, connection)
                    await connection.close(1001, FORCED_DROP_REASON)
                    return

    def _lose(self, key: tuple[str, ...], view: list[int], position: int, count: int, owner: ServerConnection) -> None:
        """The next ``count`` trades count as sent but never reach the client (lost in a network cut)."""
        with self._lock:
            for lost in range(position, position + count if self.loop else min(position + count, len(view))):
                trade, _time_ms, trade_id, _offset = self._values(view, lost)
                self._stats.trade_ids.setdefault(trade.symbol, set()).add(trade_id)
                self.rest.sent(trade.symbol, trade_id)
                if self._owners.get(key) is owner:
                    self._cursors[key] = lost + 1


class RecordingServerThread:
    """The recording server on an event loop of its own thread, for synchronous code and tests.

    ``with RecordingServerThread(speed=None) as server: stream_to_kafka(server.url, ...)``; the
    control methods (stats, set_faults, inject_frame, drop_connections, reset) are thread-safe.
    """

    def __init__(self, **options: Any) -> None:
        self.server = RecordingServer(**options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> RecordingServerThread:
        self._thread = threading.Thread(target=self._run, name="binance-recording-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise K2Error("the Binance recording server did not start within 30 s")
        if self._error is not None:
            raise K2Error(f"the Binance recording server could not start: {self._error}") from self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:  # reported to start()
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.stop()

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> RecordingServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def stream_url(self, symbols: list[str]) -> str:
        return self.server.stream_url(symbols)

    @property
    def rest(self) -> RestHistory:
        """The REST history (control: storm, refuse; stats)."""
        return self.server.rest

    def stats(self) -> ServerStats:
        return self.server.stats()

    def set_faults(self, **changes: Any) -> None:
        self.server.set_faults(**changes)

    def inject_frame(self, frame: str) -> None:
        self.server.inject_frame(frame)

    def drop_connections(self) -> None:
        self.server.drop_connections()

    def reset(self) -> None:
        self.server.reset()
