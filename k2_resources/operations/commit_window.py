"""A window between two of the follower's cycles in which a maintenance commit goes first.

A follower commits each partition about once a second, and faster when it catches up. A
compaction commit that has to be based on the current snapshot (it removes files) loses every
race to such a stream once its commit takes about as long as the gap between two follower
commits: it would be starved. The follower and the maintainer of its process therefore share a
:class:`CommitWindow`: the maintainer asks for the window (:meth:`CommitWindow.exclusive`), the
follower grants it between two cycles (:meth:`CommitWindow.between_cycles`, called from the
follower's pause) and waits until the maintainer's commit is done, at most ``hold_s``. The
follower is delayed by one maintenance commit per window asked for (a compaction per settle
window), never more than ``hold_s``; the maintainer waits at most ``wait_s`` for a window, then
commits anyway and retries on conflicts (a follower in another process, or none at all).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class CommitWindow:
    """Hand-over between one follower and one maintainer in the same process (module docstring)."""

    def __init__(self, hold_s: float = 5.0, wait_s: float = 3.0) -> None:
        self.hold_s = hold_s
        self.wait_s = wait_s
        self._wanted = threading.Event()
        self._granted = threading.Event()
        self._released = threading.Event()
        self.granted = 0  # windows the follower gave
        self.waited_s = 0.0  # seconds the follower spent waiting for maintenance commits

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Maintainer side: wait (at most ``wait_s``) for the follower to stand still, then commit
        inside the ``with`` block; yields whether the follower actually granted the window."""
        self._released.clear()
        self._granted.clear()
        self._wanted.set()
        got = self._granted.wait(self.wait_s)
        try:
            yield got
        finally:
            self._wanted.clear()
            self._released.set()

    def between_cycles(self) -> None:
        """Follower side, between two cycles: let a waiting maintenance commit go first."""
        if not self._wanted.is_set():
            return
        started = time.perf_counter()
        self._granted.set()
        self._released.wait(self.hold_s)
        self._granted.clear()
        self.granted += 1
        self.waited_s += time.perf_counter() - started

    def pause(self, seconds: float) -> None:
        """A follower's pause (``follow_topic(pause=...)``): the window first, then the rest of the sleep."""
        started = time.perf_counter()
        self.between_cycles()
        remaining = seconds - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
