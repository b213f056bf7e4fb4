"""Benchmark: the five ASX trading days from CSV to Iceberg, through the code the assets run.

Writes bench-results/asx_ingest.json: rows/s of k2_resources.asx.writes.ingest_day (read the day's
lines, validate and normalise to V2, replace the day in Iceberg with its dead letters) for
trades and quotes, next to a baseline measured in the same run on the same files: pyarrow
reading the CSVs and writing one zstd Parquet file per file (no validation, no catalog). The
ratio is K2 rows/s over baseline rows/s. Also reported: normalisation alone (no Iceberg), and
a second load of the same days (the replace path that a backfill takes).

A second entry, ``trades_generated_day``, does the same at scale: one ASX trading day of 10M
generated trade rows (tests/support/asx_generator.py, written to a temp dir, with one malformed
line of each kind, so the dead-letter count is checked exactly), K2 next to pyarrow CSV ->
Parquet of the same files. ``K2_BENCH_ASX_ROWS`` changes the size.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from k2_resources.asx.columnar_trades import normalise_trade_files
from k2_resources.asx.files import FIELDS, KINDS, default_data_dir, read_raw_day, source_files, trading_days
from k2_resources.asx.normalise import NORMALISERS
from k2_resources.asx.writes import day_filter, dead_letter_filter, ingest_day
from k2_resources.catalog.data_files import leaf_paths
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.paths import PROJECT_ROOT
from tests.support.asx_generator import write_asx_trades_day

EXPECTED_ROWS = {"trades": 200_545, "quotes": 169_629}
# Rounds of the baseline and K2 on the 10M-row day.
ROUNDS = 3


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
        stored = (
            (iceberg.trades() if kind == "trades" else iceberg.quotes()).scan(selected_fields=("symbol",)).to_arrow()
        )
        assert stored.num_rows == valid  # the second load replaced the days, it did not append

        k2_rate = _rate(valid + rejected, first_seconds)
        baseline_rate = _rate(baseline_rows, baseline_seconds)
        results[kind] = {
            "rows": valid + rejected,
            "valid_rows": valid,
            "dead_letters": rejected,
            "days": days,
            "k2_csv_to_iceberg": {"seconds": round(first_seconds, 3), "rows_per_s": k2_rate},
            "k2_replace_days_again": {
                "seconds": round(replace_seconds, 3),
                "rows_per_s": _rate(valid + rejected, replace_seconds),
            },
            "k2_normalise_only": {
                "seconds": round(normalise_seconds, 3),
                "rows_per_s": _rate(normalised_rows, normalise_seconds),
            },
            "baseline_pyarrow_csv_to_parquet": {"seconds": round(baseline_seconds, 3), "rows_per_s": baseline_rate},
            "ratio_k2_to_baseline": round(k2_rate / baseline_rate, 4),
        }

    report = {
        "benchmark": "asx_ingest",
        "what": "five ASX trading days (10-14 March 2014) from CSV to Iceberg via k2_resources.asx.writes.ingest_day, "
        "the code the asx_trades/asx_quotes assets run; baseline: pyarrow CSV -> zstd Parquet on the same files",
        "measured_at": datetime.now(UTC).isoformat(),
        "machine": {
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "cpus": __import__("os").cpu_count(),
        },
        **results,
    }
    _write_report(report)
    print(json.dumps(report, indent=2))


def _write_report(entries: dict) -> None:
    """Merge ``entries`` into bench-results/asx_ingest.json (both tests of this module write to it)."""
    out = PROJECT_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / "asx_ingest.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(entries)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _baseline_skipping_bad_rows(data_dir: Path, out_dir: Path) -> tuple[int, float, float]:
    """pyarrow CSV -> zstd Parquet for every trades file; rows of the wrong width are skipped (no
    validation, no dead letters: what a plain converter does). (rows, seconds, CPU seconds of all threads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options = pacsv.ParseOptions(invalid_row_handler=lambda row: "skip")
    start, cpu_start = time.perf_counter(), time.process_time()
    rows = 0
    for path in source_files(data_dir, "trades"):
        table = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=list(FIELDS["trades"])), parse_options=options
        )
        pq.write_table(table, out_dir / f"{path.stem}.parquet", compression="zstd")
        rows += table.num_rows
    return rows, time.perf_counter() - start, time.process_time() - cpu_start


def _floor_for_v2_rows(data_dir: Path, day: str, out_dir: Path) -> dict[str, float]:
    """What any loader that stores these V2 columns pays at least: pyarrow reading the CSV files
    (wrong widths skipped) plus pyarrow writing K2's V2 rows of the day, already in memory, to
    zstd Parquet (two files written at once) with the table's encodings. No validation, no Iceberg."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options = pacsv.ParseOptions(invalid_row_handler=lambda row: "skip")
    start = time.perf_counter()
    for path in source_files(data_dir, "trades"):
        pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=list(FIELDS["trades"])), parse_options=options)
    read_seconds = time.perf_counter() - start
    columnar = normalise_trade_files(data_dir, day)
    assert columnar is not None
    rows = columnar[1].rows.cast(TRADES.arrow_schema())
    encodings = {
        "message_id": "DELTA_BYTE_ARRAY",
        "trade_id": "DELTA_BYTE_ARRAY",
        "timestamp": "DELTA_BINARY_PACKED",
        "source_sequence": "DELTA_BINARY_PACKED",
    }

    def write(half: int) -> None:
        size = (rows.num_rows + 1) // 2
        pq.write_table(
            rows.slice(half * size, size),
            out_dir / f"v2-{half}.parquet",
            compression="zstd",
            store_decimal_as_integer=True,
            column_encoding=encodings,
            use_dictionary=[path for field in rows.schema if field.name not in encodings for path in leaf_paths(field)],
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:  # two files at once, as K2 writes them
        list(pool.map(write, (0, 1)))
    write_seconds = time.perf_counter() - start
    return {
        "csv_read_seconds": round(read_seconds, 3),
        "v2_parquet_write_seconds": round(write_seconds, 3),
        "seconds": round(read_seconds + write_seconds, 3),
    }


@pytest.mark.timeout(900)
def test_asx_ingest_of_a_10m_row_day(k2_home: Path, tmp_path: Path) -> None:
    """One generated ASX trading day (K2_BENCH_ASX_ROWS rows, default 10M, with one malformed line of
    each kind) through ingest_day, next to pyarrow CSV -> Parquet of the same files in the same run."""
    rows = int(os.environ.get("K2_BENCH_ASX_ROWS", "10000000"))
    generating = time.perf_counter()
    generated = write_asx_trades_day(tmp_path / "asx", rows=rows)
    generate_seconds = time.perf_counter() - generating
    day = generated.day.isoformat()
    iceberg = IcebergResource()
    iceberg.catalog()  # create the tables outside the timed part

    # Three rounds, each the baseline and then K2 (the first K2 load, then replaces of the day, as a
    # backfill's re-run does); the fastest run of each counts. Alternating spreads a slow moment on
    # a shared machine over both instead of one.
    load_before = os.getloadavg()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    baselines, loads = [], []
    for round_index in range(ROUNDS):
        baselines.append(_baseline_skipping_bad_rows(generated.data_dir, tmp_path / f"parquet-{round_index}"))
        start, cpu_start = time.perf_counter(), time.process_time()
        result = ingest_day(generated.data_dir, iceberg, "trades", day)
        loads.append((time.perf_counter() - start, time.process_time() - cpu_start, result))
    k2_seconds, k2_cpu_seconds, result = min(loads, key=lambda load: load[0])
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    baseline_rows, baseline_seconds, baseline_cpu_seconds = min(baselines, key=lambda run: run[1])

    # Validation and dead letters stay exact: every malformed line, and only those, is a dead letter.
    assert result.raw_rows == rows
    assert result.rejected == generated.malformed
    assert result.valid == rows - generated.malformed
    assert result.rows_per_symbol["BHP"] == generated.rows_per_symbol["BHP"] - generated.malformed
    letters = iceberg.dead_letters().scan(row_filter=dead_letter_filter("asx_trades", day)).to_arrow()
    assert letters.num_rows == generated.malformed
    assert sorted(letters.column("line_number").to_pylist()) == list(generated.malformed_line_numbers)
    assert all(reason for reason in letters.column("reason").to_pylist())
    stored = iceberg.trades().scan(row_filter=day_filter(day), selected_fields=("source_sequence",)).to_arrow()
    assert stored.num_rows == result.valid

    floor = _floor_for_v2_rows(generated.data_dir, day, tmp_path / "floor")
    k2_rate = _rate(rows, k2_seconds)
    baseline_rate = _rate(rows, baseline_seconds)
    _write_report(
        {
            "trades_generated_day": {
                "what": "one generated ASX trading day (tests/support/asx_generator.py: real price levels, skew, "
                "qualifiers, venues; fixed seed) through ingest_day (column-wise read of the files, validation with "
                "dead letters, V2 rows, replace the day in Iceberg); baseline pyarrow CSV -> zstd Parquet of the same "
                "files, rows of the wrong width skipped; three rounds of the baseline then K2 (a first load, then "
                "replaces of the same day), the fastest of each",
                "rows": rows,
                "valid_rows": result.valid,
                "dead_letters": result.rejected,
                "malformed_lines_generated": generated.malformed,
                "csv_bytes": generated.bytes,
                "generate_seconds": round(generate_seconds, 1),
                "k2_csv_to_iceberg": {
                    "seconds": round(k2_seconds, 3),
                    "rows_per_s": k2_rate,
                    "phases_s": result.seconds,
                    "seconds_per_round": [round(load[0], 3) for load in loads],
                },
                "baseline_pyarrow_csv_to_parquet": {
                    "seconds": round(baseline_seconds, 3),
                    "rows_per_s": baseline_rate,
                    "rows": baseline_rows,
                    "seconds_per_round": [round(run[1], 3) for run in baselines],
                },
                "ratio_k2_to_baseline": round(k2_rate / baseline_rate, 4),
                "ratio_per_round": [round(run[1] / load[0], 4) for run, load in zip(baselines, loads)],
                "ratio_of_medians": round(
                    statistics.median(run[1] for run in baselines) / statistics.median(load[0] for load in loads), 4
                ),
                # The V2 rows are 15 columns (two unique ids per row, a map, a list) where the baseline
                # writes the 7 CSV fields: writing them alone bounds the ratio any loader can reach.
                "floor_read_csv_and_write_v2_rows": {
                    "what": "pyarrow reading the same CSV files plus pyarrow writing K2's V2 rows of the day from "
                    "memory to zstd Parquet (two files written at once) with the table's encodings; no validation, "
                    "no Iceberg commit",
                    **floor,
                    "best_ratio_to_baseline_any_v2_loader": round(baseline_seconds / floor["seconds"], 4),
                    "k2_ratio_to_floor": round(floor["seconds"] / k2_seconds, 4),
                },
                # CPU seconds (all threads) are far less sensitive than wall time to other load on a shared machine.
                "cpu_seconds": {
                    "k2": round(k2_cpu_seconds, 2),
                    "baseline": round(baseline_cpu_seconds, 2),
                    "baseline_per_round": [round(run[2], 2) for run in baselines],
                    "ratio_k2_to_baseline": round(baseline_cpu_seconds / k2_cpu_seconds, 4),
                },
                "dead_letters_expected": generated.malformed,
                "dead_letters_found": letters.num_rows,
                "compression": "both zstd at pyarrow's default level (the table's write.parquet.compression-codec; "
                "no level set, as pyiceberg leaves it)",
                "peak_rss_gib": round(peak_gib, 2),
                "peak_rss_gib_before_ingest": round(peak_before / 2**20, 2),
                "load_average_1_5_15_min_at_k2_start": [round(x, 2) for x in load_before],
                "cpus": os.cpu_count(),
                "measured_at": datetime.now(UTC).isoformat(),
            }
        }
    )
