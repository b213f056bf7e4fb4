"""Sydney wall-clock time to UTC, and the UTC bounds of a Sydney calendar day.

ASX times are exchange-local (Australia/Sydney). A Sydney day spans two UTC days (05:43
local on 11 March is 18:43 UTC on 10 March); local times skipped or repeated by a
daylight-saving change have no single UTC instant and come back null.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl

LOCAL_TIMEZONE = "Australia/Sydney"
SYDNEY = ZoneInfo(LOCAL_TIMEZONE)


def _utc_offset(local_minute: datetime) -> timedelta | None:
    """The UTC offset of a Sydney wall-clock minute; None if it does not exist or is ambiguous."""
    early = local_minute.replace(tzinfo=SYDNEY, fold=0)
    late = local_minute.replace(tzinfo=SYDNEY, fold=1)
    if early.utcoffset() != late.utcoffset():
        # Skipped (spring forward) or repeated (fall back) local time: no single UTC instant.
        return None
    round_trip = early.astimezone(UTC).astimezone(SYDNEY).replace(tzinfo=None)
    return early.utcoffset() if round_trip == local_minute else None


def local_to_utc(local: pl.Series) -> pl.Series:
    """Naive Sydney wall-clock datetimes -> UTC (tz-aware), offsets taken from zoneinfo.

    Offsets are looked up once per distinct local minute (time zones change on minute
    boundaries), so 200K rows cost a few thousand zoneinfo calls. Local times that do not
    exist or are ambiguous (daylight-saving changes) come back null.
    """
    minutes = local.dt.truncate("1m")
    distinct = minutes.drop_nulls().unique()
    offsets = [_utc_offset(m) for m in distinct.to_list()]
    offset_us = pl.Series([None if o is None else o // timedelta(microseconds=1) for o in offsets], dtype=pl.Int64)
    lookup = pl.DataFrame({"minute": distinct, "offset_us": offset_us})
    joined = pl.DataFrame({"minute": minutes, "local": local}).join(
        lookup, on="minute", how="left", maintain_order="left"
    )
    utc = joined.select(
        (pl.col("local") - pl.duration(microseconds=pl.col("offset_us"))).dt.replace_time_zone("UTC").alias(local.name)
    )
    return utc.to_series()


def local_day_bounds_utc(day: date | str) -> tuple[datetime, datetime]:
    """[start, end) in UTC of one Sydney calendar day: local midnight to the next local midnight."""
    day = date.fromisoformat(day) if isinstance(day, str) else day
    start = datetime(day.year, day.month, day.day, tzinfo=SYDNEY)
    following = day + timedelta(days=1)
    end = datetime(following.year, following.month, following.day, tzinfo=SYDNEY)
    return start.astimezone(UTC), end.astimezone(UTC)
