"""`k2 run`'s supervision policy (k2_assets/cli/supervise.py) with short-lived real processes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from k2_assets.cli.supervise import Supervisor, backoff_s
from tests.support.waiting import wait_for


@dataclass
class FakeService:
    name: str
    argv: list[str]
    log: Path
    cwd: Path | None = None
    may_finish: bool = False


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(n, 1.0, 60.0) for n in (1, 2, 3, 4, 7, 8, 20)] == [1, 2, 4, 8, 60, 60, 60]


def test_a_dying_service_is_restarted_and_a_crash_loop_reported_once(tmp_path, capsys):
    supervisor = Supervisor(
        {},
        tmp_path / "run",
        lambda path: path.read_text(),
        initial_backoff_s=0.01,
        max_backoff_s=0.02,
        flap_limit=3,
        flap_window_s=60,
    )
    service = FakeService("flaky", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "flaky.log")
    entry = supervisor.start(service)

    def exits() -> int:
        supervisor.check()
        return len(entry.exits) >= 4

    wait_for(exits, timeout_s=60, what="four exits of the flaky service", interval_s=0.01)
    err = capsys.readouterr().err
    assert "flaky exited with code 3" in err and "boom" in err
    assert err.count("flaky is crash looping: it exited 3 times within 60 s") == 1
    assert entry.restarts >= 3
    supervisor.stop_all()
    assert not list((tmp_path / "run").glob("*.pid"))


def test_a_finished_playback_is_done_not_dead(tmp_path, capsys):
    supervisor = Supervisor({}, tmp_path / "run", lambda path: "")
    entry = supervisor.start(
        FakeService("streamer", [sys.executable, "-c", "pass"], tmp_path / "s.log", may_finish=True)
    )
    wait_for(lambda: supervisor.check() or entry.done, timeout_s=60, what="the playback to finish")
    assert entry.restarts == 0 and "streamer finished (exit code 0)" in capsys.readouterr().out
