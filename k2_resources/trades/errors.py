"""Errors of reading market.trades (subscriptions so far); each message names the fix."""

from __future__ import annotations

from k2_resources.errors import K2Error


class CursorError(K2Error, ValueError):
    """A subscription cursor that cannot be used: not one K2 issued, damaged, issued for other
    filters, or pointing at a snapshot that has expired since. Not retriable: the same cursor
    fails again; the message says what to send instead."""
