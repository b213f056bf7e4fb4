"""The process checks of the local topology and the broker (k2_resources/platform/processes.py) on real processes.

A service restarted by another process (a test, a second `k2` command) is that process's child:
once stopped it stays a zombie until its parent reaps it. `k2 cluster stop` waited for such a
process to vanish and hung forever; a zombie must count as ended.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from k2_resources.platform.processes import alive, is_zombie, stop_process
from tests.support.waiting import wait_for


def test_a_zombie_that_is_not_our_child_counts_as_ended_and_stopping_it_returns():
    # The child `cat` ends when its input closes, which the test does only once its parent has
    # exec'd `sleep`, which never reaps it: a zombie not ours. (A child that ended at once could
    # be reaped by the shell before the exec, on a busy machine.)
    parent = subprocess.Popen(
        ["sh", "-c", "exec 3<&0; cat <&3 >/dev/null & echo $!; exec sleep 30 <&- 3<&-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        zombie = int(parent.stdout.readline())
        wait_for(
            lambda: Path(f"/proc/{parent.pid}/comm").read_text().strip() == "sleep",
            10,
            "the parent to exec sleep",
            interval_s=0.02,
        )
        parent.stdin.close()
        wait_for(lambda: is_zombie(zombie), 10, "the child to become a zombie", interval_s=0.05)
        assert not alive(zombie)
        stop_process(zombie, 15, timeout_s=1)  # returns at once instead of waiting for it to vanish
        assert alive(parent.pid) and not is_zombie(parent.pid)
    finally:
        parent.kill()
        parent.wait()
