"""Processes K2 starts and stops by pid: the embedded broker, the services of `k2 cluster`, the
services `k2 run` supervises. One notion of "alive" and one way to stop, for all of them.

A process that has ended is not alive, even when it is not reaped yet: our own child is reaped
here (or it stays a zombie), and a zombie that is another process's child (one restarted by a
test or a second `k2` command) counts as ended, because only its parent can reap it and a stop
that waited for it to vanish would wait forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def reaped(pid: int) -> bool:
    """Whether ``pid`` is a child of this process that has ended (it is reaped now)."""
    try:
        finished, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child
        return False
    return finished == pid


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but is not reaped yet: signal 0 still reaches it, yet it is gone.
    A stop that waited for it to vanish would wait forever (its parent may never call wait)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (our own child that ended is reaped; a zombie counts as ended)."""
    if not pid:
        return False
    if reaped(pid):
        return False
    if is_zombie(pid):
        return False  # ended; only its parent (another process, e.g. the one that restarted it) can reap it
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def runs(pid: int | None, program: str) -> bool:
    """Whether ``pid`` is alive and is ``program`` (a pid file left from before a reboot may name another process)."""
    if not alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return True  # no /proc: trust the pid
    return Path(command.decode(errors="replace")).name == program


def pid_in_file(path: Path) -> int | None:
    """The process id written in ``path`` when that process exists and is ours to signal."""
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def _signal(pid: int, number: int, group: bool) -> None:
    if group:
        os.killpg(pid, number)
    else:
        os.kill(pid, number)


def stop_process(
    pid: int | None, first_signal: int, timeout_s: float, *, group: bool = True, poll_s: float = 0.1
) -> None:
    """Send ``first_signal`` to ``pid`` (its process group when ``group``: a service started in a
    session of its own), SIGKILL it if it is still there after ``timeout_s``, and wait until it is
    gone (a zombie not ours counts as gone)."""
    if not alive(pid):
        return
    assert pid is not None
    try:
        _signal(pid, first_signal, group)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            try:
                _signal(pid, signal.SIGKILL, group)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
        time.sleep(poll_s)


def stop_children(processes: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM the process group of each running child (in the order given), wait up to
    ``timeout_s`` for each, SIGKILL the group of one that is still there."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
