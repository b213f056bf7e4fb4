"""The one commit-retry loop: which failures it retries, the wait before each retry (short at first,
jittered, bounded), and giving up with one error that names what and the fix."""

from __future__ import annotations

import random

import pytest
from pyiceberg.exceptions import CommitFailedException
from sqlalchemy.exc import OperationalError

from k2_resources.catalog import commit
from k2_resources.catalog.commit import retry_seconds as commit_retry_seconds
from k2_resources.catalog.errors import CommitConflictError, CommitRetry
from k2_resources.errors import K2Error


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


# --- with_commit_retries: the one retry loop ----------------------------------------------------


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the loop asks for, instead of sleeping them."""
    asked: list[float] = []
    monkeypatch.setattr(commit.time, "sleep", asked.append)
    return asked


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    def attempt(number: int) -> str:
        calls.append(number)
        if number <= times:
            raise error
        return f"committed on attempt {number}"

    return calls, attempt


@pytest.mark.parametrize(
    "error",
    [
        CommitFailedException("branch main has changed"),
        OperationalError("INSERT", {}, Exception("database is locked")),
        CommitConflictError("a nested commit gave up"),
    ],
)
def test_a_retriable_failure_is_attempted_again_after_a_backoff(waits: list[float], error: Exception) -> None:
    calls, attempt = failing(2, error)
    assert commit.with_commit_retries(attempt, "a batch") == "committed on attempt 3"
    assert calls == [1, 2, 3]
    assert len(waits) == 2 and all(0 < wait <= 2.0 for wait in waits)


def test_any_other_error_propagates_at_once(waits: list[float]) -> None:
    calls, attempt = failing(5, K2Error("the table's schema does not match"))
    with pytest.raises(K2Error, match="schema does not match"):
        commit.with_commit_retries(attempt, "a batch")
    assert calls == [1] and waits == []
    calls, attempt = failing(5, OperationalError("INSERT", {}, Exception("no such table: iceberg_tables")))
    with pytest.raises(OperationalError):
        commit.with_commit_retries(attempt, "a batch")
    assert calls == [1]


def test_it_gives_up_after_max_attempts_naming_what_and_the_fix(waits: list[float]) -> None:
    retried: list[BaseException] = []
    calls, attempt = failing(99, CommitFailedException("conflict"))
    with pytest.raises(CommitConflictError, match="market.trades day 2014-03-10: 4 commit attempts conflicted; reload"):
        commit.with_commit_retries(
            attempt, "market.trades day 2014-03-10", max_attempts=4, gave_up="reload", on_retry=retried.append
        )
    assert calls == [1, 2, 3, 4] and len(retried) == 4 and len(waits) == 3


def test_a_commit_retry_signal_reloads_at_once_without_waiting(waits: list[float]) -> None:
    calls, attempt = failing(1, CommitRetry("a property was just set"))
    assert commit.with_commit_retries(attempt, "a batch") == "committed on attempt 2"
    assert waits == []
