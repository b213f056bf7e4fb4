"""The wait before retrying a commit that lost to another writer: short at first, jittered, bounded."""

from __future__ import annotations

import random

from k2_resources.catalog.commit import retry_seconds as commit_retry_seconds


def test_the_first_retries_wait_milliseconds_and_seven_wait_under_three_seconds() -> None:
    random.seed(7)
    for _ in range(200):
        waits = [commit_retry_seconds(attempt) for attempt in range(1, 8)]
        assert 0.01 <= waits[0] <= 0.02
        assert all(
            0.5 * min(0.01 * 2**attempt, 2.0) <= wait <= min(0.01 * 2**attempt, 2.0)
            for attempt, wait in enumerate(waits, start=1)
        )
        assert sum(waits) <= 2.6
    # Jittered: two sinks that conflicted together do not retry in step.
    assert len({round(commit_retry_seconds(1), 6) for _ in range(20)}) > 10
    assert commit_retry_seconds(30) <= 2.0
