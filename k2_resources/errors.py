"""Errors K2 raises for conditions a user can fix; each message names the fix.

Every exception class K2 defines derives from :class:`K2Error` and lives in its concept's
``errors`` module (this one for what everything shares, ``catalog/errors.py``, ``kafka/errors.py``
and so on). ``retriable`` says whether the same call may succeed if simply tried again (a commit
conflict, a busy catalog, a broker that is electing a leader); callers decide retries on that flag,
never on the class name.
"""


class K2Error(RuntimeError):
    """A problem with a clear cause and a clear fix, shown to users as one message."""

    retriable: bool = False


class KafkaUnavailableError(K2Error):
    """The Kafka broker cannot be reached or started."""


class SchemaMismatchError(K2Error):
    """A record or table does not match the K2 V2 schema."""
