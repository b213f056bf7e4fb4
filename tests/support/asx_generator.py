"""A synthetic ASX trading day of any size, in the source's exact file format, for benchmarks.

``write_asx_trades_day(folder, rows=10_000_000)`` writes ``trades/<company_id>.csv`` (no header,
CRLF line ends, ``MM/DD/YYYY,HH:MM:SS.mmm,price,volume,qualifier,venue,field_7``) and
``reference-data/company_info.csv`` for the four companies of ``data/asx``, shaped like the real
March 2014 rows (see data/asx/SOURCE.md):

- rows split between companies in the real skew (BHP and RIO over 99.8 %);
- times in order across the day: a sparse pre-open from 07:00, continuous trading 10:00 to
  16:00, closing and late prints to 17:15 (Sydney local);
- prices a random walk around each company's real level, on its tick (0.01, or 0.005 below
  $2), with about the real day's volatility; sizes log-normal around the real median;
- qualifier codes in the real frequencies, venue ``X`` and a price-like 7th field on as few
  rows as in the real files.

A fixed seed gives the same bytes every time. ``malformed`` rows (one of each kind the loader
must dead-letter: a bad price, a zero price, a negative volume, a short row, an impossible time,
a non-numeric qualifier, an empty line, ...) replace ordinary rows at fixed positions, so a
benchmark can check the dead-letter count exactly. Everything is vectorised (numpy and polars),
so 10M rows take seconds, not minutes. The files are written to a folder the caller chooses
(a temp dir); they are never committed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

from k2_resources.paths import DATA_DIR

# company_id -> (symbol, share of the day's rows, price level, tick): levels as traded 10-14 March 2014.
COMPANIES: dict[str, tuple[str, float, float, float]] = {
    "7078": ("BHP", 0.4568, 36.70, 0.01),
    "7458": ("RIO", 0.5418, 61.90, 0.01),
    "7181": ("DVN", 0.0012, 0.685, 0.005),
    "3153": ("MWR", 0.0002, 1.20, 0.005),
}
# Qualifier codes and their frequency in the real trades (BHP and RIO together).
QUALIFIERS = {
    "0": 0.8756,
    "25": 0.0690,
    "2": 0.0371,
    "27": 0.0111,
    "5": 0.0055,
    "8": 0.0008,
    "3": 0.0007,
    "26": 0.0006,
    "9": 0.0003,
    "1": 0.0002,
    "10": 0.0001,
}
VENUE_X_SHARE = 224 / 200_310
FIELD_7_SHARE = 113 / 200_310

# One of each kind of bad line the loader must dead-letter (with the day's date where the line has one).
MALFORMED_LINES = (
    "{date},10:15:00.000,abc,100,0,,",  # price not a number
    "{date},10:15:00.000,0.0,100,0,,",  # price zero
    "{date},10:15:00.000,36.5,-100,0,,",  # negative volume
    "{date},10:15:00.000,36.5",  # too few fields
    "{date},25:61:00.000,36.5,100,0,,",  # impossible time
    "{date},10:15:00.000,36.5,100,Q,,",  # qualifier not a number
    "",  # an empty line
    "{date},10:15:00.000,36.5,100,0,,,",  # one field too many
)


@dataclass(frozen=True)
class GeneratedDay:
    """Where the day was written and what it holds."""

    data_dir: Path
    day: date
    rows: int  # lines in the trades files, malformed ones included
    malformed: int  # lines the loader must dead-letter
    malformed_line_numbers: tuple[int, ...]  # their 1-based line numbers in trades/7078.csv (BHP)
    rows_per_symbol: dict[str, int]
    bytes: int


def _times_ms(rng: np.random.Generator, n: int) -> np.ndarray:
    """n sorted milliseconds since local midnight: 3 % pre-open, 94 % continuous, 3 % closing/late."""
    hour = 3_600_000
    phase = rng.choice(3, size=n, p=[0.03, 0.94, 0.03])
    low = np.array([7 * hour, 10 * hour, 16 * hour])[phase]
    high = np.array([10 * hour, 16 * hour, 17 * hour + hour // 4])[phase]
    return np.sort(rng.integers(low, high))


def _prices(rng: np.random.Generator, n: int, level: float, tick: float) -> np.ndarray:
    """A random walk around ``level`` with about 1.5 % daily volatility, on the tick, kept > 0."""
    steps = rng.normal(0.0, level * 0.015 / np.sqrt(max(n, 1)), size=n)
    walk = level + np.cumsum(steps)
    ticks = np.maximum(np.rint(walk / tick), 1)
    return ticks * tick


def _company_lines(rng: np.random.Generator, n: int, day: date, level: float, tick: float) -> pl.Series:
    decimals = 3 if tick < 0.01 else 2
    ms = _times_ms(rng, n)
    volume = np.clip(np.rint(rng.lognormal(mean=np.log(70), sigma=1.6, size=n)), 1, 500_000).astype(np.int64)
    codes = np.array(list(QUALIFIERS))
    weights = np.array(list(QUALIFIERS.values()))
    qualifier = codes[rng.choice(len(codes), size=n, p=weights / weights.sum())]
    venue = np.where(rng.random(n) < VENUE_X_SHARE, "X", "")
    price = _prices(rng, n, level, tick)
    field_7_price = np.round(price * (1 + rng.normal(0, 0.002, size=n)), decimals)
    field_7 = rng.random(n) < FIELD_7_SHARE
    frame = pl.DataFrame(
        {
            "ms": ms,
            "price": np.round(price, decimals),
            "volume": volume,
            "qualifier": qualifier,
            "venue": venue,
            "field_7": field_7,
            "field_7_price": field_7_price,
        }
    )
    seconds = pl.col("ms") // 1000
    two = lambda expr: expr.cast(pl.String).str.zfill(2)  # noqa: E731
    clock = (
        pl.concat_str([two(seconds // 3600), two(seconds // 60 % 60), two(seconds % 60)], separator=":")
        + pl.lit(".")
        + (pl.col("ms") % 1000).cast(pl.String).str.zfill(3)
    )
    line = pl.concat_str(
        [
            pl.lit(day.strftime("%m/%d/%Y")),
            clock,
            pl.col("price").cast(pl.String),
            pl.col("volume").cast(pl.String),
            pl.col("qualifier"),
            pl.col("venue"),
            pl.when(pl.col("field_7")).then(pl.col("field_7_price").cast(pl.String)).otherwise(pl.lit("")),
        ],
        separator=",",
    )
    return frame.select(line.alias("raw"))["raw"]


def write_asx_trades_day(
    folder: Path,
    rows: int = 10_000_000,
    day: date = date(2014, 3, 11),
    seed: int = 20140311,
    malformed: int = len(MALFORMED_LINES),
) -> GeneratedDay:
    """Write one ASX trading day of ``rows`` trade lines under ``folder`` (see the module doc)."""
    if not 0 <= malformed <= len(MALFORMED_LINES):
        raise ValueError(f"malformed must be between 0 and {len(MALFORMED_LINES)}")
    rng = np.random.default_rng(seed)
    trades = folder / "trades"
    trades.mkdir(parents=True, exist_ok=True)
    (folder / "reference-data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        DATA_DIR / "asx" / "reference-data" / "company_info.csv", folder / "reference-data" / "company_info.csv"
    )
    ids = list(COMPANIES)
    counts = [max(1, int(rows * COMPANIES[c][1])) for c in ids]
    counts[ids.index("7458")] += rows - sum(counts)
    per_symbol: dict[str, int] = {}
    bad_line_numbers: tuple[int, ...] = ()
    written = 0
    for index, company in enumerate(ids):
        symbol, _, level, tick = COMPANIES[company]
        lines = _company_lines(rng, counts[index], day, level, tick)
        if company == "7078" and malformed:
            # Bad lines at fixed, spread positions of the biggest file, replacing ordinary ones.
            positions = np.linspace(0, len(lines) - 1, malformed + 2, dtype=np.int64)[1:-1]
            bad = [text.format(date=day.strftime("%m/%d/%Y")) for text in MALFORMED_LINES[:malformed]]
            lines = lines.scatter(positions, pl.Series(bad, dtype=pl.String))
            bad_line_numbers = tuple(int(p) + 1 for p in positions)
        path = trades / f"{company}.csv"
        pl.DataFrame({"raw": lines}).write_csv(path, include_header=False, quote_style="never", line_terminator="\r\n")
        per_symbol[symbol] = counts[index]
        written += path.stat().st_size
    return GeneratedDay(folder, day, rows, malformed, bad_line_numbers, per_symbol, written)
