"""Errors K2 raises for conditions a user can fix; each message names the fix."""


class K2Error(RuntimeError):
    """A problem with a clear cause and a clear fix, shown to users as one message."""


class KafkaUnavailableError(K2Error):
    """The Kafka broker cannot be reached or started."""


class SchemaMismatchError(K2Error):
    """A record or table does not match the K2 V2 schema."""
