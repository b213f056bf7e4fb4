"""The cursor of a trade subscription: exactly where the next delivered trade starts.

A subscription delivers, for its filters (symbols, exchange, trades at or after ``start``), first
the history of one pinned Iceberg snapshot, then the Kafka log from the offsets that snapshot's
commit recorded (see :mod:`k2_resources.trades.subscribe`). A cursor names the position in that
sequence without any guess:

* ``phase="history"``: ``snapshot_id`` is the pinned snapshot, ``after`` the (timestamp in
  microseconds, message_id) of the last history row delivered (None: none yet; history is
  ordered by that pair, which is unique once rows are deduplicated by message_id), ``offsets``
  the per-partition Kafka offsets the live part will start at;
* ``phase="live"``: ``offsets`` are, per topic and partition, the next offset to read: every
  message below it was delivered (or did not match the filters), none at or above it was.

The filters travel in the cursor, so a reconnect with the cursor alone resumes the same stream,
and a reconnect that names other filters is refused rather than silently skipping trades.

Text form: ``k2s1.`` then URL-safe base64 (no padding) of a compact JSON object.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from k2_resources.trades.errors import CursorError

PREFIX = "k2s1."
HISTORY = "history"
LIVE = "live"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIX = (
    "pass the `cursor` of the last message you received unchanged, or drop the cursor and give "
    "start=<ISO time> to begin a new stream"
)


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(value))


@dataclass(frozen=True)
class StreamCursor:
    """One position in a subscription (see the module doc); ``encode()`` gives its text form."""

    phase: str
    symbols: tuple[str, ...] | None
    exchange: str | None
    start_us: int | None
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    snapshot_id: int | None = None
    after: tuple[int, str] | None = None

    def encode(self) -> str:
        payload = {
            "v": 1,
            "ph": self.phase,
            "sy": list(self.symbols) if self.symbols is not None else None,
            "ex": self.exchange,
            "st": self.start_us,
            "o": {
                topic: {str(p): o for p, o in sorted(parts.items())} for topic, parts in sorted(self.offsets.items())
            },
            "sn": self.snapshot_id,
            "af": list(self.after) if self.after is not None else None,
        }
        text = json.dumps(payload, separators=(",", ":"))
        return PREFIX + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> StreamCursor:
        """The cursor of ``text``, or a :class:`CursorError` naming the fix."""
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise CursorError(f"cursor is not a trade-stream cursor (it does not start with {PREFIX!r}); {_FIX}")
        body = text[len(PREFIX) :]
        try:
            raw = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            cursor = cls._from_json(raw)
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
            raise CursorError(f"cursor is damaged ({type(exc).__name__}); {_FIX}") from None
        return cursor

    @classmethod
    def _from_json(cls, raw: Any) -> StreamCursor:
        if raw["v"] != 1:
            raise ValueError(f"version {raw['v']}")
        phase = raw["ph"]
        if phase not in (HISTORY, LIVE):
            raise ValueError(f"phase {phase!r}")
        offsets = {
            str(topic): {int(p): _natural(o) for p, o in parts.items()} for topic, parts in dict(raw["o"]).items()
        }
        symbols = raw.get("sy")
        after = raw.get("af")
        snapshot = raw.get("sn")
        start = raw.get("st")
        if after is not None and (len(after) != 2 or not isinstance(after[1], str)):
            raise ValueError("after")
        if phase == LIVE and (snapshot is not None or after is not None):
            raise ValueError("a live cursor names no snapshot")
        return cls(
            phase=phase,
            symbols=tuple(str(s) for s in symbols) if symbols is not None else None,
            exchange=str(raw["ex"]) if raw.get("ex") is not None else None,
            start_us=int(start) if start is not None else None,
            offsets=offsets,
            snapshot_id=int(snapshot) if snapshot is not None else None,
            after=(int(after[0]), after[1]) if after is not None else None,
        )

    @property
    def start(self) -> datetime | None:
        return from_micros(self.start_us) if self.start_us is not None else None

    def check_filters(self, symbols: tuple[str, ...] | None, exchange: str | None, start: datetime | None) -> None:
        """A request that names filters with a cursor must name the cursor's own (the cursor carries
        them; a stream resumed with other filters would silently miss trades)."""
        differs = []
        if symbols is not None and (self.symbols is None or sorted(symbols) != sorted(self.symbols)):
            differs.append(f"symbols {', '.join(symbols)} (cursor: {', '.join(self.symbols or ('all',))})")
        if exchange is not None and exchange != self.exchange:
            differs.append(f"exchange {exchange} (cursor: {self.exchange or 'all'})")
        if start is not None and (self.start_us is None or micros(start) != self.start_us):
            cursor_start = self.start.isoformat() if self.start is not None else "none"
            differs.append(f"start {start.isoformat()} (cursor: {cursor_start})")
        if differs:
            raise CursorError(
                "cursor was issued for other filters: the request gives "
                + "; ".join(differs)
                + ". Send the cursor alone (it carries its filters) or with the same ones, or drop it to "
                "start a new stream"
            )


def _natural(value: Any) -> int:
    number = int(value)
    if number < 0 or isinstance(value, bool):
        raise ValueError(f"offset {value!r}")
    return number
