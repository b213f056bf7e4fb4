"""Errors of the ASX batch (k2_resources.asx)."""

from __future__ import annotations

from k2_resources.errors import K2Error


class ColumnarDeclined(K2Error):
    """A file of the day needs the general path (see :mod:`k2_resources.asx.columnar_trades`).

    A control-flow signal, not a failure: the caller reads the day line by line instead."""
