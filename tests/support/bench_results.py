"""Benchmark results under bench-results/: several benchmarks write keys of one JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from k2_resources.paths import PROJECT_ROOT

BENCH_RESULTS = PROJECT_ROOT / "bench-results"


def merge_bench_json(name: str, keys: dict) -> Path:
    """Read-modify-write ``bench-results/<name>``: ``keys`` replace theirs, every other key stays
    (``make bench`` runs bench_freshness before bench_stream; both write stream.json)."""
    path = BENCH_RESULTS / name
    path.parent.mkdir(exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(keys)
    path.write_text(json.dumps(current, indent=2) + "\n")
    return path
