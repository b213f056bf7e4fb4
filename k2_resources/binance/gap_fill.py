"""Gap fill: trade ids the stream skipped, fetched from Binance's REST history beside the live stream.

Binance trade ids are consecutive per symbol. When the streamer accepts a trade whose id jumps past
the symbol's highest (after a reconnect, a restart, or mid-stream), the ids in between are a
:class:`~k2_resources.binance.gap_plan.Gap`. At start the duplicate check is seeded with the last
trades each symbol has in Kafka, so the first live trade after a crash or a stop opens the gap
from Kafka's last id up to it; gaps a killed run left open in the ledger are queued again.

:class:`GapFiller` runs as an asyncio task next to the WebSocket loop and never blocks it: each
REST request runs in a worker thread (``urllib``, so the streamer needs no HTTP client beyond the
standard library: a handful of requests a minute do not need a connection pool), and the trades
of a page go through ``FramePipeline.handle_backfilled`` in slices between which the loop serves
the live frames. Backfilled trades take the live trades' path (normalise, duplicate lookup, encode,
the spool when Kafka is away) with ``vendor_data["backfilled"] = "true"``.

Limits: the request weight stays under ``weight_share`` of the IP's budget (rest_limits.WeightLimiter,
fed by ``X-MBX-USED-WEIGHT-1M``); a 429 or 418 stops every request for its ``Retry-After``. A gap is
*lost* (ERROR log, ``k2_binance_gaps_unfilled_total{reason}`` and ``..._trade_ids_unfilled_total``,
an ``unfilled`` ledger entry) when it is larger than ``max_gap_ids``, when the endpoint refuses
(401/403/451 turn the fill off for the rest of the run; 400 loses that gap), after ``max_attempts``
failures in a row, after ``fill_timeout_s``, or when the history does not have the ids. An id reset
is written to the ledger as a reset and never filled. A gap is ``filled`` only once its last
missing id was handed to the producer.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from k2_resources.binance.errors import GapFillTimeout, RestRefused, RestUnavailable
from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import Gap, GapFillSettings, LossReason, Page, in_gap, judge, next_page
from k2_resources.binance.rest_limits import (
    ENDPOINT_WEIGHTS,
    RECENT_TRADES,
    USED_WEIGHT_HEADER,
    WeightLimiter,
    parse_retry_after,
)
from k2_resources.binance.stream_metrics import StreamMetrics, StreamStats

log = logging.getLogger(__name__)

SLICE = 200  # backfilled trades handled between two yields to the live stream
REFUSING_STATUSES = (401, 403, 451)  # no key / forbidden / unavailable for legal reasons: off for the run
Fetch = Callable[[str, dict[str, str], float], tuple[int, dict[str, str], bytes]]


def http_get(url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of a GET; RestUnavailable when there is no answer."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        names = {k.lower(): v for k, v in exc.headers.items()} if exc.headers else {}
        return exc.code, names, exc.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise RestUnavailable(f"GET {url.split('?', 1)[0]} failed: {exc}") from exc


def rest_message(symbol: str, trade: dict[str, Any]) -> dict[str, Any]:
    """A REST trade (``id, price, qty, time, isBuyerMaker, isBestMatch``) as a trade message, marked backfilled."""
    message = {
        "e": "trade",
        "s": symbol,
        "t": trade.get("id"),
        "p": trade.get("price"),
        "q": trade.get("qty"),
        "T": trade.get("time"),
        "m": trade.get("isBuyerMaker"),
        "M": trade.get("isBestMatch"),
    }
    return {**{k: v for k, v in message.items() if v is not None}, "backfilled": "true"}


class GapFiller:
    """Queues gaps as the pipeline finds them and fills them one at a time in a task of its own."""

    def __init__(
        self,
        settings: GapFillSettings,
        rest_url: str,
        handle: Callable[[dict[str, Any]], str],
        live_high: Callable[[str], int | None],
        ledger: GapLedger,
        metrics: StreamMetrics,
        stats: StreamStats,
        fetch: Fetch = http_get,
    ) -> None:
        self.settings = settings
        self.rest_url = rest_url.rstrip("/")
        self.handle, self.live_high = handle, live_high
        self.ledger, self.metrics, self.stats = ledger, metrics, stats
        self.fetch = fetch
        self.limiter = WeightLimiter(settings.weight_limit, settings.weight_share, settings.weight_window_s)
        self.refused: str | None = None  # set by a 401/403/451: every later gap is a loss at once
        self._queue: asyncio.Queue[Gap] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    # ---- called by the pipeline (synchronously, on the loop) ----------------------------------------
    def gap(self, symbol: str, first: int, last: int) -> None:
        gap = Gap(symbol, first, last)
        reason = LossReason.DISABLED if not self.settings.enabled else judge(gap, self.settings.max_gap_ids)
        if reason is not None:
            detail = (
                f"{gap.size} ids, above the bound of {self.settings.max_gap_ids}"
                if reason == LossReason.TOO_LARGE
                else ""
            )
            self._lose(gap, reason, 0, detail)
            return
        self.ledger.opened(gap)
        self._enqueue(gap)

    def reset(self, symbol: str, high: int, trade_id: int) -> None:
        self.ledger.reset(symbol, high, trade_id)  # reported (metrics and WARNING by the pipeline), never filled

    def resume(self) -> int:
        """Queue the gaps a previous run left open (killed or stopped mid-fill); returns how many."""
        self.ledger.compact()
        gaps = self.ledger.open_gaps()
        for gap in gaps:
            self._enqueue(gap)
        self.stats.gaps_resumed = len(gaps)
        if gaps:
            log.info(
                "gap fill: %d gaps left open by the previous run queued again: %s",
                len(gaps),
                [g.key for g in gaps[:10]],
            )
        return len(gaps)

    def _enqueue(self, gap: Gap) -> None:
        self._queue.put_nowait(gap)
        self.metrics.gaps_filling.inc()

    # ---- the task ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="binance-gap-fill")

    async def close(self, drain_timeout_s: float) -> bool:
        """Wait up to ``drain_timeout_s`` for the queued fills, then stop; True when none is left
        (the others stay open in the ledger and resume next run)."""
        drained = True
        if self._task is not None and not self._task.done():
            try:
                async with asyncio.timeout(drain_timeout_s):
                    await self._queue.join()
            except TimeoutError:
                drained = False
                log.warning(
                    "gap fill: %d gaps still open after %.0f s; they stay in the ledger and resume at the next start",
                    self._queue.qsize(),
                    drain_timeout_s,
                )
            self._task.cancel()
            with_error = await asyncio.gather(self._task, return_exceptions=True)
            del with_error
        return drained

    async def _run(self) -> None:
        while True:
            gap = await self._queue.get()
            try:
                await self._fill(gap)
            except Exception as exc:  # a bug must not end the fill task unseen; the gap stays open
                log.exception("gap fill of %s failed unexpectedly: %s", gap.key, exc)
            finally:
                self.metrics.gaps_filling.dec()
                self._queue.task_done()

    async def _fill(self, gap: Gap) -> None:
        settings = self.settings
        deadline = time.monotonic() + settings.fill_timeout_s
        from_id, filled, skipped, dead, failures, recent_ok = gap.first, 0, 0, 0, 0, True
        started = time.monotonic()
        while from_id <= gap.last:
            if self.refused is not None:
                return self._lose(gap, LossReason.REFUSED, filled, self.refused)
            page = next_page(gap, from_id, self.live_high(gap.symbol), recent_ok=recent_ok)
            try:
                trades = await self._request(page, deadline)
            except RestRefused as exc:
                if exc.status in REFUSING_STATUSES:
                    self.refused = str(exc)
                    log.error("gap fill turned off for this run: %s", exc)
                return self._lose(gap, LossReason.REFUSED, filled, str(exc))
            except GapFillTimeout as exc:
                return self._lose(gap, LossReason.TIMEOUT, filled, str(exc))
            except RestUnavailable as exc:
                failures += 1
                if failures >= settings.max_attempts:
                    return self._lose(gap, LossReason.UNREACHABLE, filled, f"{failures} failures in a row; last: {exc}")
                pause = settings.retry_initial_s * 2 ** (failures - 1)
                if time.monotonic() + pause > deadline:
                    return self._lose(gap, LossReason.TIMEOUT, filled, str(exc))
                log.warning("gap fill of %s: %s; retry %d in %.1f s", gap.key, exc, failures, pause)
                await asyncio.sleep(pause)
                continue
            failures = 0
            wanted, absent, next_from = in_gap(trades, gap, from_id)
            if page.endpoint == RECENT_TRADES and (not wanted or wanted[0]["id"] != from_id):
                recent_ok = False  # the newest trades do not reach back to from_id: ask the history
                continue
            if not wanted:
                skipped += gap.last - from_id + 1
                break
            for index, trade in enumerate(wanted, 1):
                outcome = self.handle(rest_message(gap.symbol, trade))
                filled += outcome != "dead_letter"
                dead += outcome == "dead_letter"
                if index % SLICE == 0:
                    await asyncio.sleep(0)  # let the live frames through
            skipped += absent
            from_id = next_from
        if skipped or dead:
            reason = LossReason.NOT_AT_SOURCE if skipped else "dead_lettered"
            return self._lose(gap, reason, filled, f"{skipped} ids not in the history, {dead} dead-lettered")
        self.ledger.filled(gap, filled)
        self.stats.gaps_filled += 1
        self.metrics.gaps_filled.labels(gap.symbol).inc()
        log.info(
            "gap filled: %s, %d trade ids from the REST history in %.2f s", gap.key, filled, time.monotonic() - started
        )
        return None

    async def _request(self, page: Page, deadline: float) -> list[dict[str, Any]]:
        """The trades of one page, after the limiter allows it; waits out 429/418 (Retry-After)."""
        weight = ENDPOINT_WEIGHTS[page.endpoint]
        url = f"{self.rest_url}{page.endpoint}?{urlencode(page.params)}"
        headers = {"X-MBX-APIKEY": self.settings.api_key} if self.settings.api_key else {}
        while True:
            wait = self.limiter.delay(weight)
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    raise GapFillTimeout(f"the next request may go only in {wait:.0f} s, past the gap's fill_timeout_s")
                await asyncio.sleep(wait)
                continue
            self.limiter.spend(weight)
            status, answer, body = await asyncio.to_thread(self.fetch, url, headers, self.settings.request_timeout_s)
            self.metrics.rest_requests.labels(page.endpoint, str(status)).inc()
            used = answer.get(USED_WEIGHT_HEADER.lower(), "")
            if used.isdigit():
                self.limiter.observe_used(int(used))
                self.metrics.rest_used_weight.set(int(used))
            if status in (429, 418):
                retry_after = parse_retry_after(answer.get("retry-after"))
                self.limiter.block(retry_after)
                log.warning("Binance REST answered %d: no request for %.0f s (Retry-After)", status, retry_after)
                continue
            text = body[:300].decode("utf-8", "replace")
            if status in REFUSING_STATUSES or status == 400:
                raise RestRefused(status, text)
            if status != 200:
                raise RestUnavailable(f"HTTP {status}: {text}")
            try:
                trades = json.loads(body)
            except ValueError as exc:
                raise RestUnavailable(f"the answer is not JSON ({exc})") from exc
            if not isinstance(trades, list):
                raise RestUnavailable(f"the answer is not a list of trades: {text}")
            return [t for t in trades if isinstance(t, dict)]

    def _lose(self, gap: Gap, reason: str, filled: int, detail: str = "") -> None:
        missing = gap.size - filled
        log.error(
            "trade-id gap NOT filled (%s): %s ids %d-%d, %d of %d ids never reached Kafka%s",
            reason,
            gap.symbol,
            gap.first,
            gap.last,
            missing,
            gap.size,
            f" ({detail})" if detail else "",
        )
        self.ledger.unfilled(gap, reason, filled, detail)
        self.stats.gaps_unfilled += 1
        self.stats.ids_unfilled += missing
        self.metrics.gaps_unfilled.labels(gap.symbol, reason).inc()
        self.metrics.ids_unfilled.labels(gap.symbol, reason).inc(missing)
