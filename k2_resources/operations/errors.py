"""Errors of the operations helpers (the Dagster instance, retention, exports)."""

from __future__ import annotations

from k2_resources.errors import K2Error


class BrokenInstanceError(K2Error):
    """The Dagster instance's storage is inconsistent and holds history K2 will not delete."""


class TimeTravelExpiredError(K2Error):
    """Time travel asked for a snapshot or a time older than what the table's snapshot policy keeps."""
