"""Waiting on a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline.

    A falsy value means "not yet". Any other exception the condition raises (connection refused, a
    table not created yet, a half-written file) is taken as "not yet" too and retried until the
    deadline, which names the last one. An ``AssertionError`` is not: a condition asserts what must
    never happen while waiting (the process under test exited, a run failed), so it fails the wait at
    once instead of waiting out the deadline. A condition that means "not yet" returns False."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # a condition may fail while the system is still settling
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s:.0f}s waiting for {what}"
        + (f" (last error: {type(last_error).__name__}: {last_error})" if last_error else "")
    ) from last_error
