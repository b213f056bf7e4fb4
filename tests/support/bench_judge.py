"""The judge of the benchmarks: bench-results/*.json against tests/benchmarks/targets.toml.

The benchmarks report figures and never assert them; this is the one place that decides. It prints
a table (file, figure, value, target, status) and exits 1 when any target is not met:

- ``met`` / ``short``: the figure against its target (``min``: >= target; ``max``: < target);
- ``missing``: the file exists but the figure is not in it (or is not a number);
- ``off-spec``: the run did not measure what the target is about (a ``requires`` figure too low);
- ``not run``: the file is not there (or, with ``--since``, older than this run): its benchmark did
  not run. ``--files`` names the files to judge when only some benchmarks ran.

Files in bench-results/ without a target are listed as reported only. Exit status 2: the targets
file itself is wrong.

Run: ``python -m tests.support.bench_judge [--results DIR] [--targets FILE] [--files a.json,b.json]
[--since EPOCH]`` (``make bench`` runs it after the benchmarks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS = PROJECT_ROOT / "tests" / "benchmarks" / "targets.toml"
RESULTS = PROJECT_ROOT / "bench-results"

DIRECTIONS = {"min": ">=", "max": "<"}
FAILING = ("short", "missing", "off-spec", "not run", "unreadable")


class TargetsError(ValueError):
    """The targets file is malformed (a test-tool error: the judge exits 2)."""


@dataclass(frozen=True)
class Target:
    file: str
    key: str
    direction: str
    target: float
    label: str
    requires: dict[str, float] = field(default_factory=dict)

    def bound(self) -> str:
        return f"{DIRECTIONS[self.direction]} {self.target:g}"

    def met_by(self, value: float) -> bool:
        return value >= self.target if self.direction == "min" else value < self.target


@dataclass(frozen=True)
class Verdict:
    target: Target
    status: str
    value: float | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILING


def load_targets(path: Path = TARGETS) -> list[Target]:
    """Every [[target]] of ``path``, checked: the fields, a known direction, numbers."""
    try:
        entries = tomllib.loads(path.read_text())["target"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise TargetsError(f"{path}: no [[target]] entries ({type(exc).__name__}: {exc})") from exc
    targets = []
    for number, entry in enumerate(entries, 1):
        where = f"{path} target {number} ({entry.get('file')} {entry.get('key')})"
        missing = {"file", "key", "direction", "target", "label"} - set(entry)
        unknown = set(entry) - {"file", "key", "direction", "target", "label", "requires"}
        if missing or unknown:
            raise TargetsError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if entry["direction"] not in DIRECTIONS:
            raise TargetsError(f"{where}: direction {entry['direction']!r} is not one of {sorted(DIRECTIONS)}")
        requires = entry.get("requires", {})
        if not _is_number(entry["target"]) or not all(_is_number(v) for v in requires.values()):
            raise TargetsError(f"{where}: target and requires must be numbers")
        targets.append(
            Target(
                file=entry["file"],
                key=entry["key"],
                direction=entry["direction"],
                target=float(entry["target"]),
                label=entry["label"],
                requires={k: float(v) for k, v in requires.items()},
            )
        )
    return targets


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def figure(document: object, key: str) -> float | None:
    """The number at the dotted ``key`` of ``document``; None when absent or not a number."""
    value = document
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if _is_number(value) else None  # type: ignore[arg-type]


def judge(
    targets: Sequence[Target], results: Path = RESULTS, files: set[str] | None = None, since: float | None = None
) -> list[Verdict]:
    """One verdict per target (those of ``files`` only, when given)."""
    documents: dict[str, object | None | str] = {}
    verdicts = []
    for target in targets:
        if files is not None and target.file not in files:
            continue
        if target.file not in documents:
            documents[target.file] = _read(results / target.file, since)
        document = documents[target.file]
        if document is None:
            verdicts.append(Verdict(target, "not run", note=_not_run_note(results / target.file, since)))
            continue
        if isinstance(document, str):
            verdicts.append(Verdict(target, "unreadable", note=document))
            continue
        value = figure(document, target.key)
        if value is None:
            verdicts.append(Verdict(target, "missing", note=f"no number at {target.key}"))
            continue
        low = []
        for key, least in target.requires.items():
            have = figure(document, key)
            if have is None or have < least:
                low.append(f"{key} = {'absent' if have is None else f'{have:g}'}, needs >= {least:g}")
        if low:
            verdicts.append(Verdict(target, "off-spec", value, "; ".join(low)))
            continue
        verdicts.append(Verdict(target, "met" if target.met_by(value) else "short", value))
    return verdicts


def _read(path: Path, since: float | None) -> object | None | str:
    """The parsed JSON; None when the file is absent or older than ``since``; a message when unreadable."""
    if not path.is_file() or (since is not None and path.stat().st_mtime < since):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _not_run_note(path: Path, since: float | None) -> str:
    return "written before this run" if path.is_file() and since is not None else f"no {path.name}"


def untargeted(targets: Sequence[Target], results: Path = RESULTS) -> list[str]:
    """Result files no target reads (reported only)."""
    judged = {t.file for t in targets}
    return sorted(p.name for p in results.glob("*.json") if p.name not in judged) if results.is_dir() else []


def table(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as a fixed-width text table."""
    rows = [("file", "figure", "value", "target", "status", "target set by / note")]
    for v in verdicts:
        value = "-" if v.value is None else f"{v.value:g}"
        note = f"{v.target.label} [{v.note}]" if v.note else v.target.label
        rows.append((v.target.file, v.target.key, value, v.target.bound(), v.status, note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5] for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 20)
    return "\n".join(lines)


def summary(verdicts: Sequence[Verdict]) -> str:
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    failed = sum(v.failed for v in verdicts)
    return f"{len(verdicts)} targets: {parts}" + (f"; {failed} not met" if failed else "; every target met")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.bench_judge", description="Judge bench-results/*.json against targets.toml."
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the bench-results directory")
    parser.add_argument("--targets", type=Path, default=TARGETS, help="the targets file")
    parser.add_argument(
        "--files", help="comma-separated result files to judge (the benchmarks that ran); default: every file"
    )
    parser.add_argument(
        "--since", type=float, help="epoch seconds: a result file older than this counts as not run (stale)"
    )
    args = parser.parse_args(argv)
    try:
        targets = load_targets(args.targets)
    except TargetsError as exc:
        print(f"judge: {exc}", file=sys.stderr)
        return 2
    files = {name.strip() for name in args.files.split(",") if name.strip()} if args.files else None
    if files is not None and (unknown := files - {t.file for t in targets}):
        print(f"judge: no target reads {sorted(unknown)}", file=sys.stderr)
        return 2
    verdicts = judge(targets, args.results, files, args.since)
    print(f"benchmark targets ({args.targets}) against {args.results}:")
    print(table(verdicts))
    if others := untargeted(targets, args.results):
        print(f"reported only, no target: {', '.join(others)}")
    print(summary(verdicts))
    return 1 if any(v.failed for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
