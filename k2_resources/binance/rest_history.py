"""The recording server's REST history: Binance's trade-history endpoints answered from the tape.

``GET /api/v3/historicalTrades?symbol=&fromId=&limit=`` (the trades from ``fromId``, default the
newest) and ``GET /api/v3/trades?symbol=&limit=`` (the newest), ``limit`` at most 1,000 (default
500), answered as Binance does: ``[{"id", "price", "qty", "quoteQty", "time", "isBuyerMaker",
"isBestMatch"}]`` with the trade ids and times the WebSocket stream sends for the same trades
(loop laps included). Only trades that have *happened* are served: ids up to the highest the
stream has sent for the symbol, and with the "now" time base also every trade whose time has passed.

Request weights as on Binance (rest_limits.ENDPOINT_WEIGHTS, ``weight_limit`` per fixed window of
``window_s``), reported in ``X-MBX-USED-WEIGHT-1M``. Over the limit: 429 with ``Retry-After``; a
request while a Retry-After is in force is a *violation*, and ``ban_after`` violations answer 418
with a longer Retry-After (an IP ban). Faults for tests: :meth:`storm` answers the next requests
429, :meth:`refuse` answers every request with a status (401, 403, 451).
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from k2_resources.binance.rest_limits import (
    BINANCE_WEIGHT_LIMIT,
    ENDPOINT_WEIGHTS,
    HISTORICAL_TRADES,
    MAX_PAGE,
    RECENT_TRADES,
    USED_WEIGHT_HEADER,
    WEIGHT_WINDOW_S,
)
from k2_resources.binance.tape import Tape

REST_PREFIX = "/api/v3/"
REFUSALS = {
    401: (-2015, "Invalid API-key, IP, or permissions for action."),
    403: (-1, "Forbidden (WAF)."),
    451: (0, "Service unavailable from a restricted location according to 'b. Eligibility' in Terms of Use."),
}


@dataclass
class RestStats:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    violations: int = 0  # requests made while a Retry-After was in force
    served_ids: dict[str, set[int]] = field(default_factory=dict)
    max_used_weight: int = 0


class RestHistory:
    """Answers the REST endpoints for one tape; thread-safe (the server's loop and test threads)."""

    def __init__(
        self,
        tape: Tape,
        *,
        time_base: str,
        loop: bool,
        weight_limit: int = BINANCE_WEIGHT_LIMIT,
        window_s: float = WEIGHT_WINDOW_S,
        ban_after: int = 3,
        ban_s: float = 120.0,
    ) -> None:
        self.tape, self.time_base, self.loop = tape, time_base, loop
        self.weight_limit, self.window_s, self.ban_after, self.ban_s = weight_limit, window_s, ban_after, ban_s
        self._lock = threading.Lock()
        self._stats = RestStats()
        self._sent_high: dict[str, int] = {}
        self._window, self._used = -1, 0
        self._blocked_until = 0.0
        self._storm, self._storm_retry_s = 0, 1
        self._refuse: int | None = None
        self._index: dict[str, tuple[list[int], list[int], int]] = {}  # symbol -> (global indices, lap-0 ids, id span)
        for index, trade in enumerate(tape.trades):
            entry = self._index.setdefault(trade.symbol, ([], [], tape.id_span[trade.symbol]))
            entry[0].append(index)
            entry[1].append(trade.trade_id)

    # ---- control and the stream's progress -----------------------------------------------------------
    def sent(self, symbol: str, trade_id: int) -> None:
        """The stream sent this trade (it has happened)."""
        if trade_id > self._sent_high.get(symbol, -1):
            self._sent_high[symbol] = trade_id

    def storm(self, count: int, retry_after_s: int = 1) -> None:
        """Answer the next ``count`` requests 429 with ``Retry-After: retry_after_s``."""
        with self._lock:
            self._storm, self._storm_retry_s = count, retry_after_s

    def refuse(self, status: int | None) -> None:
        """Answer every request with ``status`` (401, 403 or 451); None to stop."""
        with self._lock:
            self._refuse = status

    def stats(self) -> RestStats:
        with self._lock:
            return RestStats(
                self._stats.requests,
                Counter(self._stats.by_status),
                self._stats.violations,
                {s: set(ids) for s, ids in self._stats.served_ids.items()},
                self._stats.max_used_weight,
            )

    # ---- answering -------------------------------------------------------------------------------------
    def answer(self, path: str) -> tuple[int, dict[str, str], str]:
        """(status, headers, JSON body) for a request path under /api/v3/."""
        parts = urlsplit(path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = parts.path.rstrip("/")
        now = time.time()
        with self._lock:
            self._stats.requests += 1
            status, headers, body = self._admit(endpoint, now)
            if status == 200:
                status, body = self._trades(endpoint, query, now)
            self._stats.by_status[status] += 1
        return status, headers, json.dumps(body, separators=(",", ":"))

    def _admit(self, endpoint: str, now: float) -> tuple[int, dict[str, str], Any]:
        """Weights, bans and faults: (200, headers, None) when the request may be answered."""
        window = int(now // self.window_s)
        if window != self._window:
            self._window, self._used = window, 0
        if now < self._blocked_until:
            self._stats.violations += 1
            if self._stats.violations % self.ban_after == 0:
                self._blocked_until = now + self.ban_s
                return self._limited(418, self.ban_s, "Way too many requests; IP banned until later.")
            return self._limited(429, self._blocked_until - now, "Too many requests; current limit is exceeded.")
        if self._refuse is not None:
            code, message = REFUSALS.get(self._refuse, (-1, "Refused."))
            return self._refuse, {}, {"code": code, "msg": message}
        if endpoint not in ENDPOINT_WEIGHTS:
            return 404, {}, {"code": -1, "msg": f"K2's recording server serves {sorted(ENDPOINT_WEIGHTS)} only"}
        if self._storm > 0:
            self._storm -= 1
            self._blocked_until = now + self._storm_retry_s
            return self._limited(429, self._storm_retry_s, "Too many requests (fault injection).")
        weight = ENDPOINT_WEIGHTS[endpoint]
        if self._used + weight > self.weight_limit:
            retry = (window + 1) * self.window_s - now
            self._blocked_until = now + retry
            return self._limited(429, retry, "Too many requests; current limit of request weight is exceeded.")
        self._used += weight
        self._stats.max_used_weight = max(self._stats.max_used_weight, self._used)
        return 200, {USED_WEIGHT_HEADER: str(self._used)}, None

    def _limited(self, status: int, retry_s: float, message: str) -> tuple[int, dict[str, str], Any]:
        headers = {"Retry-After": str(max(1, math.ceil(retry_s))), USED_WEIGHT_HEADER: str(self._used)}
        return status, headers, {"code": -1003, "msg": message}

    def _trades(self, endpoint: str, query: dict[str, str], now: float) -> tuple[int, Any]:
        symbol = query.get("symbol", "").upper()
        if not symbol:
            return 400, {
                "code": -1102,
                "msg": "Mandatory parameter 'symbol' was not sent.",
            }
        if symbol not in self._index:
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        try:
            limit = int(query.get("limit", "500"))
            from_id = int(query["fromId"]) if endpoint == HISTORICAL_TRADES and "fromId" in query else None
        except ValueError:
            return 400, {"code": -1100, "msg": "Illegal characters found in a parameter."}
        if not 1 <= limit <= MAX_PAGE:
            return 400, {"code": -1100, "msg": f"Illegal value for parameter 'limit' (1 to {MAX_PAGE})."}
        indices, ids, span = self._index[symbol]
        now_ms = int(now * 1000)
        newest = self._sent_high.get(symbol)
        if from_id is None or endpoint == RECENT_TRADES:
            if newest is None:
                return 200, []
            from_id = newest - limit + 1
        lap, remainder = divmod(from_id - ids[0], span) if from_id >= ids[0] else (0, 0)
        position = bisect.bisect_left(ids, ids[0] + remainder)
        trades: list[dict[str, Any]] = []
        while len(trades) < limit:
            if position == len(ids):
                lap, position = lap + 1, 0
            if lap > 0 and not self.loop:
                break
            global_index, trade_id = indices[position], ids[position] + lap * span
            time_ms = self.tape.time_ms(global_index, lap, self.time_base)
            happened = (newest is not None and trade_id <= newest) or (self.time_base == "now" and time_ms <= now_ms)
            if not happened:
                break
            trade = self.tape.trades[global_index]
            trades.append(
                {
                    "id": trade_id,
                    "price": trade.price,
                    "qty": trade.quantity,
                    "quoteQty": f"{float(trade.price) * float(trade.quantity):.8f}",
                    "time": time_ms,
                    "isBuyerMaker": trade.buyer_is_maker,
                    "isBestMatch": True,
                }
            )
            position += 1
        self._stats.served_ids.setdefault(symbol, set()).update(t["id"] for t in trades)
        return 200, trades
