"""What a trade-id gap is, how it is fetched, and the gap-fill settings.

Binance trade ids are consecutive per symbol, so a jump from id ``h`` to id ``n > h + 1`` means the
ids ``h + 1 .. n - 1`` were never received: a :class:`Gap`. It is fetched from the REST history in
pages of at most 1,000 trades (:func:`next_page`): ``/api/v3/trades`` (the newest trades, no
``fromId``) when every missing id is among the newest 1,000 of the symbol, else
``/api/v3/historicalTrades?fromId=`` (also the fallback when the newest page does not reach back far
enough). A gap above ``max_gap_ids`` (:func:`judge`) is never fetched: one request of one trade
asks whether the source holds its ids at all (gap_fill), and if it does, the gap is a loss.

Settings come from :class:`GapFillResource` (a Dagster ConfigurableResource whose fields may be
``EnvVar``\\ s) or from the environment (:meth:`GapFillSettings.from_env`, what `k2 stream binance`
uses); see docs/operations.md "Gap fill".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from dagster import ConfigurableResource
from pydantic import Field

from k2_resources.binance.rest_limits import BINANCE_WEIGHT_LIMIT, HISTORICAL_TRADES, MAX_PAGE, RECENT_TRADES
from k2_resources.errors import K2Error

LIVE_REST_URL = "https://api.binance.com"
RECENT_MARGIN = 100  # ids the newest page must reach below a gap's first id (the live id moves on meanwhile)


class LossReason:
    """Why a gap (or what remains of it) was not filled."""

    TOO_LARGE = "too_large"  # above max_gap_ids and held by the source: never fetched
    REFUSED = "refused"  # 401/403/451 (or 400): no key, forbidden, geo-blocked, not accepted
    UNREACHABLE = "unreachable"  # max_attempts failures in a row (timeouts, 5xx, connection errors)
    TIMEOUT = "timeout"  # fill_timeout_s passed (e.g. a long 429/418 ban)
    NOT_AT_SOURCE = "not_at_source"  # the history answers nothing from these ids on (ids it skips are absent)
    DISABLED = "disabled"  # gap fill switched off


@dataclass(frozen=True, order=True, slots=True)
class Gap:
    """Trade ids ``first .. last`` (inclusive) of ``symbol`` that were not received."""

    symbol: str
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def key(self) -> str:
        return f"{self.symbol}:{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Page:
    """One REST request: the endpoint path and its query parameters."""

    endpoint: str
    params: dict[str, Any]


def judge(gap: Gap, max_gap_ids: int) -> str | None:
    """None when the gap may be fetched, else the loss reason (a LossReason)."""
    return LossReason.TOO_LARGE if gap.size > max_gap_ids else None


def next_page(gap: Gap, from_id: int, live_high: int | None, *, recent_ok: bool = True) -> Page:
    """The request for ids ``from_id .. gap.last``.

    ``/api/v3/trades`` when they are all among the newest MAX_PAGE trades of the symbol (``live_high``
    is the newest id the stream has delivered; the margin covers trades arriving meanwhile), else
    ``/api/v3/historicalTrades`` from ``from_id``. ``recent_ok=False`` forces the latter (the newest
    page did not reach ``from_id``).
    """
    if recent_ok and live_high is not None and live_high - from_id + 1 + RECENT_MARGIN <= MAX_PAGE:
        return Page(RECENT_TRADES, {"symbol": gap.symbol, "limit": MAX_PAGE})
    limit = min(MAX_PAGE, gap.last - from_id + 1)
    return Page(HISTORICAL_TRADES, {"symbol": gap.symbol, "fromId": from_id, "limit": limit})


def plan(gap: Gap) -> list[Page]:
    """Every historicalTrades page that covers the gap (what a fill costs at most: 25 weight each)."""
    return [
        Page(HISTORICAL_TRADES, {"symbol": gap.symbol, "fromId": start, "limit": min(MAX_PAGE, gap.last - start + 1)})
        for start in range(gap.first, gap.last + 1, MAX_PAGE)
    ]


def in_gap(trades: list[dict[str, Any]], gap: Gap, from_id: int) -> tuple[list[dict[str, Any]], int, int]:
    """The REST trades that belong to ``from_id .. gap.last`` (by ``id``), the ids the page skipped
    (asked for but absent: the page starts above ``from_id`` or jumps), and the next id to ask for."""
    wanted = sorted(
        (t for t in trades if isinstance(t.get("id"), int) and from_id <= t["id"] <= gap.last), key=lambda t: t["id"]
    )
    if not wanted:
        return [], 0, from_id
    skipped = wanted[0]["id"] - from_id + sum(b["id"] - a["id"] - 1 for a, b in zip(wanted, wanted[1:]))
    return wanted, skipped, wanted[-1]["id"] + 1


def rest_base_url(stream_url: str, configured: str | None = None) -> str:
    """The REST host for a stream URL: the configured one, api.binance.com for Binance's streams, else
    the stream's own host over HTTP(S) (K2's recording server answers both on one port)."""
    if configured:
        return configured.rstrip("/")
    parts = urlsplit(stream_url)
    host = parts.hostname or ""
    if host == "binance.com" or host.endswith(".binance.com"):
        return LIVE_REST_URL
    return f"{'https' if parts.scheme in ('wss', 'https') else 'http'}://{parts.netloc}"


@dataclass(frozen=True)
class GapFillSettings:
    """How the streamer fills trade-id gaps (see the module docstring and docs/operations.md)."""

    enabled: bool = True
    rest_url: str | None = None  # None: derived from the stream URL (rest_base_url)
    api_key: str | None = None  # sent as X-MBX-APIKEY when set; never logged
    max_gap_ids: int = 100_000  # a larger gap is a loss, never fetched
    weight_limit: int = BINANCE_WEIGHT_LIMIT  # the IP's request weight per window
    weight_share: float = 0.5  # the part of it the gap fill may use
    weight_window_s: float = 60.0
    fill_timeout_s: float = 600.0  # a gap not filled by then is a loss (reason timeout)
    max_attempts: int = 5  # failures in a row (timeouts, 5xx) before a gap is a loss
    retry_initial_s: float = 0.5  # backoff after a failure, doubling
    request_timeout_s: float = 10.0
    drain_timeout_s: float = 60.0  # at the end of a run, how long open fills may finish (the rest resume next run)

    def __post_init__(self) -> None:
        if self.max_gap_ids < 1 or self.max_attempts < 1 or self.fill_timeout_s <= 0:
            raise K2Error(
                f"gap fill needs max_gap_ids >= 1, max_attempts >= 1 and fill_timeout_s > 0, not "
                f"{self.max_gap_ids}, {self.max_attempts}, {self.fill_timeout_s}; check K2_GAP_FILL_* settings"
            )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> GapFillSettings:
        """``K2_GAP_FILL`` (0 turns it off), ``K2_GAP_FILL_MAX_IDS``, ``K2_GAP_FILL_WEIGHT_SHARE``,
        ``K2_GAP_FILL_TIMEOUT_S``, ``K2_BINANCE_REST_URL``, ``K2_BINANCE_API_KEY``."""
        env = os.environ if environ is None else environ
        try:
            return cls(
                enabled=env.get("K2_GAP_FILL", "1") not in ("0", "false", "no", "off"),
                rest_url=env.get("K2_BINANCE_REST_URL") or None,
                api_key=env.get("K2_BINANCE_API_KEY") or None,
                max_gap_ids=int(env.get("K2_GAP_FILL_MAX_IDS", cls.max_gap_ids)),
                weight_share=float(env.get("K2_GAP_FILL_WEIGHT_SHARE", cls.weight_share)),
                fill_timeout_s=float(env.get("K2_GAP_FILL_TIMEOUT_S", cls.fill_timeout_s)),
            )
        except ValueError as exc:
            raise K2Error(f"a K2_GAP_FILL_* setting is not a number ({exc}); fix the environment") from exc


class GapFillResource(ConfigurableResource):
    """The gap-fill settings as a Dagster resource (fields accept ``EnvVar("...")``)."""

    enabled: bool = Field(default=True, description="fill trade-id gaps from the REST history")
    rest_url: str | None = Field(default=None, description="REST host; default: derived from the stream URL")
    api_key: str | None = Field(default=None, description="Binance API key (X-MBX-APIKEY), optional")
    max_gap_ids: int = Field(default=100_000, description="a larger gap is reported as a loss, never fetched")
    weight_share: float = Field(default=0.5, description="share of the IP's request weight the fill may use")
    fill_timeout_s: float = Field(default=600.0, description="a gap not filled by then is reported as a loss")

    def settings(self) -> GapFillSettings:
        known = {f.name for f in fields(GapFillSettings)}
        return GapFillSettings(**{k: v for k, v in self.model_dump().items() if k in known})
