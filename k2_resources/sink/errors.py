"""Errors of the Kafka-to-Iceberg sink."""

from __future__ import annotations

from k2_resources.errors import K2Error


class OffsetGapError(K2Error):
    """A micro-batch does not start where the table's committed offsets end."""


class RetentionLossError(K2Error):
    """Kafka deleted offsets of a range before they were read, and the caller cannot record the loss."""
