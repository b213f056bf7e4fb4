"""Errors of the record schemas and their decoders."""

from __future__ import annotations

from k2_resources.errors import K2Error


class UnsupportedSchema(K2Error):
    """The schema has a type the column-wise decoder does not handle; decode with fastavro instead.

    A control-flow signal (the caller falls back to the exact path), not a user-facing fault.
    """
