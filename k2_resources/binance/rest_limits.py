"""Binance REST request weights, seen from the client: a limiter that keeps under the IP's budget.

Binance counts the *weight* of the requests each IP makes in fixed one-minute windows (6,000 per
minute on spot; ``/api/v3/historicalTrades`` and ``/api/v3/trades`` weigh 25 each) and reports the
window's total in the ``X-MBX-USED-WEIGHT-1M`` response header. A client over the limit gets HTTP
429 with ``Retry-After`` (seconds); one that keeps asking during that time gets 418 (an IP ban, also
with ``Retry-After``). :class:`WeightLimiter` keeps a share of the budget (other clients on the same
IP need the rest), takes the server's header as the truth when it counts more (the other clients),
and blocks every request until a ``Retry-After`` has passed. It is pure and clock-driven, so the
gap filler and the unit tests use the same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

HISTORICAL_TRADES = "/api/v3/historicalTrades"
RECENT_TRADES = "/api/v3/trades"
ENDPOINT_WEIGHTS = {HISTORICAL_TRADES: 25, RECENT_TRADES: 25}
BINANCE_WEIGHT_LIMIT = 6000  # request weight per IP per minute (spot REQUEST_WEIGHT)
WEIGHT_WINDOW_S = 60.0
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
MAX_PAGE = 1000  # trades per historicalTrades / trades request at most
DEFAULT_RETRY_AFTER_S = 60.0  # when a 429/418 carries no usable Retry-After


def parse_retry_after(value: str | None, default_s: float = DEFAULT_RETRY_AFTER_S) -> float:
    """Seconds from a ``Retry-After`` header (Binance sends whole seconds); the default if absent or unreadable."""
    if value is None:
        return default_s
    try:
        seconds = float(value.strip())
    except ValueError:
        return default_s
    return seconds if math.isfinite(seconds) and seconds >= 0 else default_s


class WeightLimiter:
    """How long to wait before a request of a given weight; one per REST host.

    ``delay(w)`` is 0 when the request may go now; ``spend(w)`` records it; ``observe_used(n)``
    takes the server's count for the window; ``block(s)`` honours a Retry-After.
    """

    def __init__(
        self,
        limit: int = BINANCE_WEIGHT_LIMIT,
        share: float = 0.5,
        window_s: float = WEIGHT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1 or not 0 < share <= 1 or window_s <= 0:
            raise ValueError(
                f"WeightLimiter needs limit >= 1, 0 < share <= 1, window_s > 0; not {limit}, {share}, {window_s}"
            )
        self.limit = limit
        self.budget = max(1, int(limit * share))
        self.window_s = window_s
        self.clock = clock
        self._window = -1
        self._used = 0
        self._blocked_until = 0.0

    @property
    def used(self) -> int:
        """Weight counted in the current window."""
        self._roll(self.clock())
        return self._used

    @property
    def blocked_until(self) -> float:
        return self._blocked_until

    def _roll(self, now: float) -> None:
        window = int(now // self.window_s)
        if window != self._window:
            self._window, self._used = window, 0

    def delay(self, weight: int) -> float:
        """Seconds to wait before a request of ``weight`` may be sent (0: now)."""
        now = self.clock()
        if now < self._blocked_until:
            return self._blocked_until - now
        self._roll(now)
        if self._used + weight <= self.budget or self._used == 0:
            return 0.0  # an empty window always lets one request through, whatever its weight
        return max(0.0, (self._window + 1) * self.window_s - now)

    def spend(self, weight: int) -> None:
        self._roll(self.clock())
        self._used += weight

    def observe_used(self, used: int) -> None:
        """The server's ``X-MBX-USED-WEIGHT-1M``: other clients on the IP count too, so the larger count wins."""
        self._roll(self.clock())
        self._used = max(self._used, used)

    def block(self, seconds: float) -> None:
        """No request before ``seconds`` from now (a 429 or 418 with Retry-After)."""
        self._blocked_until = max(self._blocked_until, self.clock() + seconds)
