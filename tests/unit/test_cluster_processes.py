"""The local topology's process checks (k2_resources/cluster_services.py) on real processes.

A service restarted by another process (a test, a second `k2` command) is that process's child:
once stopped it stays a zombie until its parent reaps it. `k2 cluster stop` waited for such a
process to vanish and hung forever; a zombie must count as ended.
"""

from __future__ import annotations

import subprocess

from k2_resources.cluster_services import _alive, _is_zombie, _stop_process
from tests.support.waiting import wait_for


def test_a_zombie_that_is_not_our_child_counts_as_ended_and_stopping_it_returns():
    # `true` ends at once; its parent then execs `sleep`, which never reaps it: a zombie not ours.
    parent = subprocess.Popen(["sh", "-c", "true & echo $!; exec sleep 30"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        zombie = int(parent.stdout.readline())
        wait_for(lambda: _is_zombie(zombie), 10, "the child to become a zombie", interval_s=0.05)
        assert not _alive(zombie)
        _stop_process(zombie, 15, timeout_s=1)  # returns at once instead of waiting for it to vanish
        assert _alive(parent.pid) and not _is_zombie(parent.pid)
    finally:
        parent.kill()
        parent.wait()
