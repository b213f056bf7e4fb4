"""tests/support/waiting.wait_for: an assertion fails at once, a transient error is ridden over,
the deadline names what was awaited. Counted in calls of the condition, never in seconds."""

from __future__ import annotations

import pytest

from tests.support.waiting import wait_for


class Condition:
    """A condition that answers from a script, one entry per call; counts its calls."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> object:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_an_assertion_from_the_condition_fails_at_once():
    condition = Condition(False, AssertionError("the API process exited with code 1"), True)
    with pytest.raises(AssertionError, match="the API process exited with code 1"):
        # A deadline the test could never wait out: only an immediate failure ends it.
        wait_for(condition, timeout_s=3600, what="the query API", interval_s=0)
    assert condition.calls == 2  # the assertion was not retried


def test_connection_refused_and_other_transient_errors_are_retried_until_the_condition_holds():
    condition = Condition(
        ConnectionRefusedError(111, "Connection refused"),
        OSError("timed out"),
        KeyError("data"),
        False,
        None,
        {"ready": True},
    )
    assert wait_for(condition, timeout_s=3600, what="the service", interval_s=0) == {"ready": True}
    assert condition.calls == 6


def test_the_deadline_names_what_was_awaited_and_the_last_error():
    condition = Condition(ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(AssertionError, match="waiting for the query API at http://x") as failure:
        wait_for(condition, timeout_s=0.05, what="the query API at http://x", interval_s=0.001)
    assert "ConnectionRefusedError" in str(failure.value) and "Connection refused" in str(failure.value)
    assert isinstance(failure.value.__cause__, ConnectionRefusedError)
    assert condition.calls >= 2  # it kept trying until the deadline


def test_a_condition_that_stays_false_times_out_naming_what_without_an_error():
    condition = Condition(False)
    with pytest.raises(AssertionError) as failure:
        wait_for(condition, timeout_s=0.05, what="every trade in market.trades", interval_s=0.001)
    assert str(failure.value) == "timed out after 0s waiting for every trade in market.trades"
    assert condition.calls >= 2


def test_the_truthy_value_is_returned_on_the_first_call():
    condition = Condition([1, 2])
    assert wait_for(condition, timeout_s=3600, what="a list", interval_s=3600) == [1, 2]
    assert condition.calls == 1
