"""Errors of K2's Kafka client code (the wire-level fetch and offsets client)."""

from __future__ import annotations

from k2_resources.errors import K2Error, KafkaUnavailableError


class FastFetchUnavailable(K2Error):
    """This range needs kafka-python's general path (the message says why).

    A control-flow signal: the caller reads the range with kafka-python instead, so retrying the
    fast path would not help.
    """


class KafkaSecurityError(KafkaUnavailableError):
    """Kafka security settings are missing or wrong, or the cluster refused this client (the
    message names the listener, the principal and the variable to fix)."""
