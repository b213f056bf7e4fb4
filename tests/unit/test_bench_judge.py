"""The benchmark judge (tests/support/bench_judge.py) on synthetic bench-results: met, short either
way, a missing figure, a missing file, an off-spec run, a stale file; and the repo's targets file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.support import bench_judge as judge
from tests.support.bench_judge import Target, TargetsError, load_targets, main

TARGETS = """
[[target]]
file = "stream.json"
key = "throughput.ratio_to_baseline"
direction = "min"
target = 0.8
label = "sink >= 0.8 of raw consume"

[[target]]
file = "stream.json"
key = "freshness_deployed.p99_s"
direction = "max"
target = 10
label = "freshness p99 < 10 s"
requires = { "freshness_deployed.achieved_input_rate_msg_s" = 900 }

[[target]]
file = "cli.json"
key = "k2_help.median_s"
direction = "max"
target = 0.3
label = "k2 --help < 0.3 s"
"""


@pytest.fixture
def targets_file(tmp_path: Path) -> Path:
    path = tmp_path / "targets.toml"
    path.write_text(TARGETS)
    return path


def _results(tmp_path: Path, **files: dict) -> Path:
    results = tmp_path / "bench-results"
    results.mkdir(exist_ok=True)
    for name, document in files.items():
        (results / f"{name}.json").write_text(json.dumps(document))
    return results


def _stream(ratio: float = 1.28, p99: float = 1.8, rate: float = 1000.0) -> dict:
    return {
        "throughput": {"ratio_to_baseline": ratio, "rounds": []},
        "freshness_deployed": {"p99_s": p99, "achieved_input_rate_msg_s": rate},
    }


def _statuses(results: Path, targets_file: Path, **options) -> dict[str, str]:
    verdicts = judge.judge(load_targets(targets_file), results, **options)
    return {v.target.key: v.status for v in verdicts}


def test_every_target_met_exits_0_and_prints_the_table(tmp_path, targets_file, capsys):
    results = _results(tmp_path, stream=_stream(), cli={"k2_help": {"median_s": 0.05}})
    assert main(["--results", str(results), "--targets", str(targets_file)]) == 0
    out = capsys.readouterr().out
    assert "throughput.ratio_to_baseline  1.28" in out and ">= 0.8" in out
    assert "k2_help.median_s" in out and "0.05" in out and "< 0.3" in out
    assert out.count(" met ") == 3 and "every target met" in out


def test_a_min_target_below_its_floor_is_short(tmp_path, targets_file, capsys):
    results = _results(tmp_path, stream=_stream(ratio=0.79), cli={"k2_help": {"median_s": 0.05}})
    assert _statuses(results, targets_file)["throughput.ratio_to_baseline"] == "short"
    assert main(["--results", str(results), "--targets", str(targets_file)]) == 1
    assert "1 not met" in capsys.readouterr().out


def test_a_max_target_at_or_above_its_ceiling_is_short(tmp_path, targets_file):
    for p99, status in ((9.99, "met"), (10.0, "short"), (10.2, "short")):
        results = _results(tmp_path, stream=_stream(p99=p99), cli={"k2_help": {"median_s": 0.05}})
        assert _statuses(results, targets_file)["freshness_deployed.p99_s"] == status, p99


def test_the_floor_itself_meets_a_min_target(tmp_path, targets_file):
    results = _results(tmp_path, stream=_stream(ratio=0.8), cli={"k2_help": {"median_s": 0.05}})
    assert _statuses(results, targets_file)["throughput.ratio_to_baseline"] == "met"


def test_a_figure_missing_from_an_existing_file_fails(tmp_path, targets_file, capsys):
    stream = _stream()
    del stream["throughput"]["ratio_to_baseline"]
    results = _results(tmp_path, stream=stream, cli={"k2_help": {"median_s": "fast"}})  # not a number either
    statuses = _statuses(results, targets_file)
    assert statuses["throughput.ratio_to_baseline"] == "missing"
    assert statuses["k2_help.median_s"] == "missing"
    assert statuses["freshness_deployed.p99_s"] == "met"
    assert main(["--results", str(results), "--targets", str(targets_file)]) == 1
    assert "no number at throughput.ratio_to_baseline" in capsys.readouterr().out


def test_a_missing_file_is_not_run_and_fails_unless_only_other_files_are_expected(tmp_path, targets_file, capsys):
    results = _results(tmp_path, stream=_stream())  # bench_cli did not run
    assert _statuses(results, targets_file)["k2_help.median_s"] == "not run"
    assert main(["--results", str(results), "--targets", str(targets_file)]) == 1
    assert "no cli.json" in capsys.readouterr().out
    # Only bench_stream was run on purpose: cli.json is not expected.
    assert main(["--results", str(results), "--targets", str(targets_file), "--files", "stream.json"]) == 0
    assert "k2_help" not in capsys.readouterr().out
    # ... but a file that was expected and is absent still fails.
    assert main(["--results", str(results), "--targets", str(targets_file), "--files", "cli.json"]) == 1


def test_a_run_that_did_not_measure_what_the_target_is_about_is_off_spec(tmp_path, targets_file, capsys):
    results = _results(tmp_path, stream=_stream(p99=1.0, rate=640.0), cli={"k2_help": {"median_s": 0.05}})
    assert _statuses(results, targets_file)["freshness_deployed.p99_s"] == "off-spec"
    assert main(["--results", str(results), "--targets", str(targets_file)]) == 1
    assert "freshness_deployed.achieved_input_rate_msg_s = 640, needs >= 900" in capsys.readouterr().out


def test_a_file_older_than_this_run_counts_as_not_run(tmp_path, targets_file):
    results = _results(tmp_path, stream=_stream(), cli={"k2_help": {"median_s": 0.05}})
    an_hour_ago = time.time() - 3600
    os.utime(results / "cli.json", (an_hour_ago, an_hour_ago))
    statuses = _statuses(results, targets_file, since=time.time() - 60)
    assert statuses["k2_help.median_s"] == "not run" and statuses["throughput.ratio_to_baseline"] == "met"


def test_an_unreadable_file_fails(tmp_path, targets_file):
    results = _results(tmp_path, stream=_stream())
    (results / "cli.json").write_text('{"k2_help": ')  # a benchmark killed while writing
    assert _statuses(results, targets_file)["k2_help.median_s"] == "unreadable"


def test_files_without_targets_are_listed_as_reported_only(tmp_path, targets_file, capsys):
    results = _results(tmp_path, stream=_stream(), cli={"k2_help": {"median_s": 0.05}}, peer={"k2_msg_s": 1})
    assert main(["--results", str(results), "--targets", str(targets_file)]) == 0
    assert "reported only, no target: peer.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ('file = "a.json"\nkey = "x"\ndirection = "up"\ntarget = 1\nlabel = "l"', "direction 'up'"),
        ('file = "a.json"\nkey = "x"\ndirection = "min"\nlabel = "l"', "missing ['target']"),
        ('file = "a.json"\nkey = "x"\ndirection = "min"\ntarget = "1"\nlabel = "l"', "must be numbers"),
        ('file = "a.json"\nkey = "x"\ndirection = "min"\ntarget = 1\nlabel = "l"\ngoal = 2', "unknown ['goal']"),
    ],
)
def test_a_malformed_targets_file_is_refused(tmp_path, entry, complaint, capsys):
    path = tmp_path / "targets.toml"
    path.write_text(f"[[target]]\n{entry}\n")
    with pytest.raises(TargetsError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        load_targets(path)
    assert main(["--targets", str(path), "--results", str(tmp_path)]) == 2


def test_the_repo_targets_cover_the_stated_targets_with_known_files():
    """The targets file parses, and holds the targets the benchmarks and issues 5, 12, 13 and 22 state."""
    targets = {(t.file, t.key): t for t in load_targets()}
    expected = {
        ("stream.json", "throughput.ratio_to_baseline"): ("min", 0.8),
        ("stream.json", "parallel_partitions.speed_up"): ("min", 1.7),
        ("stream.json", "freshness_deployed.p99_s"): ("max", 10),
        ("asx_ingest.json", "trades_generated_day.ratio_k2_to_baseline"): ("min", 0.5),
        ("cli.json", "k2_help.median_s"): ("max", 0.3),
        ("cli.json", "k2_query_sql_count.median_s"): ("max", 1.0),
        ("cli.json", "hybrid_first_recent_trades.median_s"): ("max", 0.5),
        ("hybrid.json", "recent_trades_15min.p99_ms"): ("max", 500),
        ("hybrid.json", "point_query.p99_ms"): ("max", 100),
        ("api.json", "recent_json.p99_ms"): ("max", 100),
        ("api.json", "recent_json.rps"): ("min", 300),
        ("api.json", "recent_arrow.rps"): ("min", 1000),
        ("api.json", "point_json.p99_ms"): ("max", 100),
        ("api.json", "point_json.rps"): ("min", 300),
        ("api.json", "overload.p99_ms"): ("max", 1000),
        ("soak.json", "tick_p99_ms"): ("max", 2000),
    }
    for key, (direction, value) in expected.items():
        assert key in targets, key
        assert (targets[key].direction, targets[key].target) == (direction, value), key
    benchmarks = judge.TARGETS.parent
    for target in targets.values():
        assert isinstance(target, Target) and target.label
        # every file is one a benchmark writes
        assert any(target.file in path.read_text() for path in benchmarks.glob("bench_*.py")), target.file
