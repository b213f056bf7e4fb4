"""Benchmark: the five ASX trading days from CSV to Iceberg, through the code the assets run.

Writes bench-results/asx_ingest.json: rows/s of k2_resources.asx.writes.ingest_day (read the day's
lines, validate and normalise to V2, replace the day in Iceberg with its dead letters) for
trades and quotes, next to a baseline measured in the same run on the same files: pyarrow
reading the CSVs and writing one zstd Parquet file per file (no validation, no catalog). The
ratio is K2 rows/s over baseline rows/s. Also reported: normalisation alone (no Iceberg), and
a second load of the same days (the replace path that a backfill takes).
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from k2_resources.asx.files import FIELDS, KINDS, default_data_dir, read_raw_day, source_files, trading_days
from k2_resources.asx.normalise import NORMALISERS
from k2_resources.asx.writes import ingest_day
from k2_resources.iceberg import IcebergResource
from k2_resources.settings import PROJECT_ROOT

EXPECTED_ROWS = {"trades": 200_545, "quotes": 169_629}


def _baseline(data_dir: Path, kind: str, out_dir: Path) -> tuple[int, float]:
    """pyarrow CSV -> Parquet for every file of one kind; (rows, seconds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(FIELDS[kind])  # type: ignore[index]
    start = time.perf_counter()
    rows = 0
    for path in source_files(data_dir, kind):  # type: ignore[arg-type]
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names))
        pq.write_table(table, out_dir / f"{path.stem}.parquet", compression="zstd")
        rows += table.num_rows
    return rows, time.perf_counter() - start


def _k2_ingest(data_dir: Path, iceberg: IcebergResource, kind: str, days: list[str]) -> tuple[int, int, float]:
    """ingest_day for every day; (valid rows, dead letters, seconds)."""
    start = time.perf_counter()
    valid = rejected = 0
    for day in days:
        result = ingest_day(data_dir, iceberg, kind, day)  # type: ignore[arg-type]
        valid += result.valid
        rejected += result.rejected
    return valid, rejected, time.perf_counter() - start


def _normalise_only(data_dir: Path, kind: str, days: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    rows = 0
    for day in days:
        rows += NORMALISERS[kind](read_raw_day(data_dir, kind, day), day).valid  # type: ignore[index,arg-type]
    return rows, time.perf_counter() - start


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def test_asx_ingest_rows_per_second(k2_home: Path, tmp_path: Path) -> None:
    data_dir = default_data_dir()
    days = trading_days(data_dir)
    iceberg = IcebergResource()
    iceberg.catalog()  # create the tables outside the timed part
    results: dict[str, object] = {}
    for kind in KINDS:
        # Best of three for the baseline, so one slow moment on a shared machine does not flatter K2.
        baseline_runs = [_baseline(data_dir, kind, tmp_path / f"parquet-{kind}-{i}") for i in range(3)]
        baseline_rows, baseline_seconds = min(baseline_runs, key=lambda run: run[1])
        normalised_rows, normalise_seconds = _normalise_only(data_dir, kind, days)
        valid, rejected, first_seconds = _k2_ingest(data_dir, iceberg, kind, days)
        again_valid, _, replace_seconds = _k2_ingest(data_dir, iceberg, kind, days)

        assert baseline_rows == EXPECTED_ROWS[kind]
        assert valid + rejected == EXPECTED_ROWS[kind] and normalised_rows == valid == again_valid
        stored = (iceberg.trades() if kind == "trades" else iceberg.quotes()).scan(selected_fields=("symbol",)).to_arrow()
        assert stored.num_rows == valid  # the second load replaced the days, it did not append

        k2_rate = _rate(valid + rejected, first_seconds)
        baseline_rate = _rate(baseline_rows, baseline_seconds)
        results[kind] = {
            "rows": valid + rejected,
            "valid_rows": valid,
            "dead_letters": rejected,
            "days": days,
            "k2_csv_to_iceberg": {"seconds": round(first_seconds, 3), "rows_per_s": k2_rate},
            "k2_replace_days_again": {"seconds": round(replace_seconds, 3), "rows_per_s": _rate(valid + rejected, replace_seconds)},
            "k2_normalise_only": {"seconds": round(normalise_seconds, 3), "rows_per_s": _rate(normalised_rows, normalise_seconds)},
            "baseline_pyarrow_csv_to_parquet": {"seconds": round(baseline_seconds, 3), "rows_per_s": baseline_rate},
            "ratio_k2_to_baseline": round(k2_rate / baseline_rate, 4),
        }

    report = {
        "benchmark": "asx_ingest",
        "what": "five ASX trading days (10-14 March 2014) from CSV to Iceberg via k2_resources.asx.writes.ingest_day, "
        "the code the asx_trades/asx_quotes assets run; baseline: pyarrow CSV -> zstd Parquet on the same files",
        "measured_at": datetime.now(timezone.utc).isoformat(),
        "machine": {"python": platform.python_version(), "pyarrow": pa.__version__, "cpus": __import__("os").cpu_count()},
        **results,
    }
    out = PROJECT_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "asx_ingest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
