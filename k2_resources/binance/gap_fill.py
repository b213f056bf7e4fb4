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
failures in a row, after ``fill_timeout_s``, or when the history answers nothing from an id on. An
id reset is written to the ledger as a reset and never filled. A gap is ``filled`` only once its last
missing id was handed to the producer.

Ids the source does not hold are not a loss: when the history answers a request from id ``a`` with a
later id ``b`` (``historicalTrades`` serves the trades from ``fromId`` on), the ids ``a .. b - 1`` were
never traded there (two windows of a recording a year apart, or ids an exchange skipped). They are
counted as *absent at the source* (WARNING, ``k2_binance_trade_ids_absent_at_source_total``, an
``absent`` ledger entry or the ``absent`` count of a ``filled`` one), never as filled. A gap above
``max_gap_ids`` is never fetched, but one request of one trade asks where the source's history goes on
from the gap's first id: if it holds that id, the gap is a ``too_large`` loss; if it goes on past the
gap, nothing is missing; if it goes on inside the gap, the rest is a gap of its own, judged the same way.
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
from k2_resources.binance.gap_plan import Gap, GapFillSettings, LossReason, Page, in_gap, next_page
from k2_resources.binance.rest_limits import (
    ENDPOINT_WEIGHTS,
    HISTORICAL_TRADES,
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
        if not self.settings.enabled:
            self._lose(gap, LossReason.DISABLED, 0)
            return
        self.ledger.opened(gap)  # one above the bound too: the task asks the source whether it holds its ids
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
        if gap.size > settings.max_gap_ids:
            rest = await self._beyond_bound(gap, deadline)
            if rest is None:
                return None
            gap = rest
        from_id, filled, skipped, absent, dead, failures, recent_ok = gap.first, 0, 0, 0, 0, 0, True
        started = time.monotonic()
        while from_id <= gap.last:
            if self.refused is not None:
                return self._lose(gap, LossReason.REFUSED, filled, self.refused, absent)
            page = next_page(gap, from_id, self.live_high(gap.symbol), recent_ok=recent_ok)
            try:
                trades = await self._request(page, deadline)
            except RestRefused as exc:
                if exc.status in REFUSING_STATUSES:
                    self.refused = str(exc)
                    log.error("gap fill turned off for this run: %s", exc)
                return self._lose(gap, LossReason.REFUSED, filled, str(exc), absent)
            except GapFillTimeout as exc:
                return self._lose(gap, LossReason.TIMEOUT, filled, str(exc), absent)
            except RestUnavailable as exc:
                failures += 1
                if failures >= settings.max_attempts:
                    last = f"{failures} failures in a row; last: {exc}"
                    return self._lose(gap, LossReason.UNREACHABLE, filled, last, absent)
                pause = settings.retry_initial_s * 2 ** (failures - 1)
                if time.monotonic() + pause > deadline:
                    return self._lose(gap, LossReason.TIMEOUT, filled, str(exc), absent)
                log.warning("gap fill of %s: %s; retry %d in %.1f s", gap.key, exc, failures, pause)
                await asyncio.sleep(pause)
                continue
            failures = 0
            wanted, passed_over, next_from = in_gap(trades, gap, from_id)
            if page.endpoint == RECENT_TRADES and (not wanted or wanted[0]["id"] != from_id):
                recent_ok = False  # the newest trades do not reach back to from_id: ask the history
                continue
            if not wanted:
                # the history goes on past the gap: the rest is not at the source; it answers nothing: a loss
                beyond = any(isinstance(t.get("id"), int) and t["id"] > gap.last for t in trades)
                absent += gap.last - from_id + 1 if beyond else 0
                skipped += 0 if beyond else gap.last - from_id + 1
                break
            for index, trade in enumerate(wanted, 1):
                outcome = self.handle(rest_message(gap.symbol, trade))
                filled += outcome != "dead_letter"
                dead += outcome == "dead_letter"
                if index % SLICE == 0:
                    await asyncio.sleep(0)  # let the live frames through
            absent += passed_over  # the history answered with later ids: these were never traded there
            from_id = next_from
        if skipped or dead:
            reason = LossReason.NOT_AT_SOURCE if skipped else "dead_lettered"
            detail = f"{skipped} ids the history does not answer, {dead} dead-lettered, {absent} absent at the source"
            return self._lose(gap, reason, filled, detail, absent)
        if absent:
            self._count_absent(gap, absent)
        if not filled:
            self.ledger.absent(gap, absent)
            return None
        self.ledger.filled(gap, filled, absent)
        self.stats.gaps_filled += 1
        self.metrics.gaps_filled.labels(gap.symbol).inc()
        log.info(
            "gap filled: %s, %d trade ids from the REST history in %.2f s", gap.key, filled, time.monotonic() - started
        )
        return None

    async def _beyond_bound(self, gap: Gap, deadline: float) -> Gap | None:
        """A gap above ``max_gap_ids``: what remains to fill after asking the source where its history
        goes on from ``gap.first`` (one request of one trade); None when nothing does (lost or absent)."""
        bound = f"{gap.size} ids, above the bound of {self.settings.max_gap_ids}"
        if self.refused is not None:
            self._lose(gap, LossReason.TOO_LARGE, 0, f"{bound}; the history refuses: {self.refused}")
            return None
        page = Page(HISTORICAL_TRADES, {"symbol": gap.symbol, "fromId": gap.first, "limit": 1})
        try:
            trades = await self._request_retrying(page, deadline, gap)
        except RestRefused as exc:
            if exc.status in REFUSING_STATUSES:
                self.refused = str(exc)
                log.error("gap fill turned off for this run: %s", exc)
            self._lose(gap, LossReason.TOO_LARGE, 0, f"{bound}; the history could not be asked: {exc}")
            return None
        except (GapFillTimeout, RestUnavailable) as exc:
            self._lose(gap, LossReason.TOO_LARGE, 0, f"{bound}; the history could not be asked: {exc}")
            return None
        held = min((t["id"] for t in trades if isinstance(t.get("id"), int) and t["id"] >= gap.first), default=None)
        if held is None or held == gap.first:  # the source holds the ids (or answers nothing): a loss
            self._lose(gap, LossReason.TOO_LARGE, 0, bound)
            return None
        absent = min(held, gap.last + 1) - gap.first
        self._count_absent(gap, absent)
        self.ledger.absent(gap, absent)
        if held > gap.last:
            return None
        rest = Gap(gap.symbol, held, gap.last)
        self.ledger.opened(rest)
        if rest.size > self.settings.max_gap_ids:  # the source holds its first id: no second question
            rest_bound = f"{rest.size} ids, above the bound of {self.settings.max_gap_ids}"
            self._lose(rest, LossReason.TOO_LARGE, 0, rest_bound)
            return None
        return rest

    async def _request_retrying(self, page: Page, deadline: float, gap: Gap) -> list[dict[str, Any]]:
        """``_request``, tried again after a timeout or a 5xx (``max_attempts`` in a row, with the
        fill's backoff) while the deadline allows: one slow answer on a busy machine is not a loss."""
        failures = 0
        while True:
            try:
                return await self._request(page, deadline)
            except RestUnavailable as exc:
                failures += 1
                pause = self.settings.retry_initial_s * 2 ** (failures - 1)
                if failures >= self.settings.max_attempts or time.monotonic() + pause > deadline:
                    raise
                log.warning("gap fill of %s: %s; retry %d in %.1f s", gap.key, exc, failures, pause)
                await asyncio.sleep(pause)

    def _count_absent(self, gap: Gap, absent: int) -> None:
        log.warning(
            "trade-id gap not at the source: %s, %d of its %d ids are not in the exchange's history (it answers "
            "with later ids); nothing to fill, not a loss",
            gap.key,
            absent,
            gap.size,
        )
        self.stats.ids_absent += absent
        self.metrics.ids_absent.labels(gap.symbol).inc(absent)

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

    def _lose(self, gap: Gap, reason: str, filled: int, detail: str = "", absent: int = 0) -> None:
        missing = gap.size - filled - absent
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
        self.ledger.unfilled(gap, reason, filled, detail, absent)
        self.stats.gaps_unfilled += 1
        self.stats.ids_unfilled += missing
        self.metrics.gaps_unfilled.labels(gap.symbol, reason).inc()
        self.metrics.ids_unfilled.labels(gap.symbol, reason).inc(missing)
