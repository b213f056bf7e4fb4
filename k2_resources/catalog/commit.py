"""The one way K2 commits to Iceberg: attempts retried on a conflict or a busy catalog, one backoff.

Every writer (the sink's micro-batches and recoveries, the ASX day writes, compaction) commits
through :func:`with_commit_retries`. An attempt loads the table afresh, decides what to commit from
what the table holds now, and commits. A retriable failure (:func:`retriable`) means nothing was
committed by that attempt:

- a conflict: another writer committed first (``CommitFailedException``: the snapshot this attempt
  was based on is no longer current), or a concurrent commit changed rows this one validated
  against (``ValidationException``);
- a busy catalog: a SQL catalog's database was locked by another process (SQLite's "database is
  locked" after its busy timeout), see :func:`catalog_busy`;
- a K2 error marked ``retriable`` that the attempt raised itself (:class:`CommitRetry`).

The next attempt starts after :func:`retry_seconds`: the other commit is done (or nearly) when
the conflict is seen, so the wait starts at milliseconds, jittered so two writers that collided
do not collide again in step, and doubles only under sustained contention.

pyiceberg retries a conflicting commit by itself unless told not to, re-basing the appended files
but keeping the table properties and summary computed for the old snapshot; K2's commits carry
state of other writers in those (the committed offsets of every partition), so K2 turns that off
per table (:func:`ensure_no_blind_retries`) and retries from a freshly loaded table instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.table import Table
from sqlalchemy.exc import OperationalError

from k2_resources.catalog.errors import CommitConflictError, CommitRetry
from k2_resources.catalog.pyiceberg_adapter import transaction_of
from k2_resources.errors import K2Error

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ATTEMPTS = 8
COMMIT_RETRIES_PROPERTY = "commit.retry.num-retries"


def catalog_busy(exc: BaseException) -> bool:
    """True when a SQL catalog refused an operation because its database is locked or busy right now
    (SQLite's "database is locked" after its busy timeout): nothing changed, and a retry is safe."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def is_conflict(exc: BaseException) -> bool:
    """True when a commit lost to another writer's commit (nothing of it was committed)."""
    return isinstance(exc, (CommitFailedException, ValidationException))


def retriable(exc: BaseException) -> bool:
    """True when the same commit, attempted again on a freshly loaded table, may succeed."""
    return is_conflict(exc) or catalog_busy(exc) or (isinstance(exc, K2Error) and exc.retriable)


def retry_seconds(attempt: int) -> float:
    """How long to wait after failed attempt ``attempt`` (1, 2, ...) before the next one: 10-20 ms
    after the first, doubling, jittered by half, at most 2 s; seven waits add up to 2.6 s at most."""
    return random.uniform(0.5, 1.0) * min(0.01 * 2**attempt, 2.0)


def with_commit_retries(
    attempt: Callable[[int], T],
    what: str,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    gave_up: str = "run it again",
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``attempt(n)`` for n = 1, 2, ... until it returns, waiting :func:`retry_seconds` after each
    retriable failure; any other exception propagates at once.

    Raises :class:`CommitConflictError` ("<what>: <n> commit attempts conflicted; <gave_up>") when
    every attempt failed. ``on_retry`` is told of each retriable failure (a caller's count).
    """
    for number in range(1, max_attempts + 1):
        try:
            return attempt(number)
        except Exception as exc:
            if not retriable(exc):
                raise
            if catalog_busy(exc):
                log.warning(
                    "the Iceberg catalog is locked by another writer while committing %s (attempt %d): %s; retrying",
                    what,
                    number,
                    exc,
                )
            elif not isinstance(exc, CommitRetry):
                log.info("commit of %s conflicted (attempt %d): %s", what, number, exc)
            if on_retry is not None:
                on_retry(exc)
            if number == max_attempts:
                raise CommitConflictError(f"{what}: {max_attempts} commit attempts conflicted; {gave_up}") from exc
            if not isinstance(exc, CommitRetry):
                time.sleep(retry_seconds(number))
    raise AssertionError("unreachable")


def ensure_no_blind_retries(table: Table) -> None:
    """Raise :class:`CommitRetry` after setting ``commit.retry.num-retries`` = 0 on ``table`` when it
    is not set yet, so the commit layer reloads the table with the property and attempts again.

    A properties-only commit, harmless to repeat; one that conflicts (another writer committed
    meanwhile, maybe this very property) or meets a busy catalog changes nothing: the next attempt
    looks again."""
    if table.properties.get(COMMIT_RETRIES_PROPERTY) == "0":
        return
    try:
        with transaction_of(table) as transaction:
            transaction.set_properties({COMMIT_RETRIES_PROPERTY: "0"})
        log.info("set %s=0 on %s: K2 retries conflicting commits itself", COMMIT_RETRIES_PROPERTY, table.name())
    except Exception as exc:
        if not (is_conflict(exc) or catalog_busy(exc)):
            raise
    raise CommitRetry(f"{COMMIT_RETRIES_PROPERTY} was not 0 on {table.name()}")


def refresh_after_commit(table: Table) -> None:
    """``table.refresh()`` after a commit that succeeded; a busy catalog there changes nothing."""
    try:
        table.refresh()
    except Exception as exc:
        if not catalog_busy(exc):
            raise
