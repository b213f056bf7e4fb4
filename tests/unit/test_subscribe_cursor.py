"""The subscription cursor: its text round-trips, and anything else is refused naming the fix."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from k2_resources.errors import K2Error
from k2_resources.trades.errors import CursorError
from k2_resources.trades.subscribe_cursor import HISTORY, LIVE, PREFIX, StreamCursor, micros

START = datetime(2024, 8, 9, 0, 5, tzinfo=UTC)


def _cursor(**changes) -> StreamCursor:
    fields = dict(
        phase=HISTORY,
        symbols=("BTCUSDT", "ETHUSDT"),
        exchange="BINANCE",
        start_us=micros(START),
        offsets={"market.trades.binance": {0: 120, 2: 7}},
        snapshot_id=4242,
        after=(micros(START) + 5, "BINANCE-BTCUSDT-1"),
    )
    return StreamCursor(**{**fields, **changes})


def _raw(payload: dict) -> str:
    return PREFIX + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [_cursor(), _cursor(phase=LIVE, snapshot_id=None, after=None), _cursor(symbols=None, exchange=None, start_us=None)],
)
def test_a_cursor_round_trips_through_its_text(cursor):
    text = cursor.encode()
    assert text.startswith(PREFIX) and "=" not in text
    assert StreamCursor.decode(text) == cursor


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "does not start with"),
        ("eyJ2IjoxfQ", "does not start with"),  # a page cursor of /v1/trades, not a stream's
        (PREFIX + "%%%", "damaged"),
        (PREFIX + "bm90IGpzb24", "damaged"),
        (_raw({"v": 2, "ph": "live", "o": {}}), "damaged"),
        (_raw({"v": 1, "ph": "later", "o": {}}), "damaged"),
        (_raw({"v": 1, "ph": "live", "o": {"t": {"0": -1}}}), "damaged"),
        (_raw({"v": 1, "ph": "live", "o": {}, "sn": 5}), "damaged"),
        (_raw({"v": 1, "ph": "history", "o": {}, "af": [1]}), "damaged"),
    ],
)
def test_a_bad_cursor_is_one_clear_error_naming_the_fix(text, words):
    with pytest.raises(CursorError) as refused:
        StreamCursor.decode(text)
    message = str(refused.value)
    assert words in message
    assert "pass the `cursor` of the last message" in message and "start=" in message
    assert isinstance(refused.value, K2Error) and not refused.value.retriable


def test_filters_given_with_a_cursor_must_be_its_own():
    cursor = _cursor()
    cursor.check_filters(None, None, None)  # the cursor alone: its filters
    cursor.check_filters(("ETHUSDT", "BTCUSDT"), "BINANCE", START)  # the same ones, in any order
    with pytest.raises(CursorError, match="symbols SOLUSDT .cursor: BTCUSDT, ETHUSDT.*drop it"):
        cursor.check_filters(("SOLUSDT",), None, None)
    with pytest.raises(CursorError, match="exchange ASX"):
        cursor.check_filters(None, "ASX", None)
    with pytest.raises(CursorError, match="start 2024-08-10"):
        cursor.check_filters(None, None, datetime(2024, 8, 10, tzinfo=UTC))
