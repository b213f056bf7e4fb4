"""Which Binance trades are repeats: a bounded window of recently accepted trades, per symbol.

A repeat is the same trade again: the same symbol, trade id ``t`` and trade time ``T``. That is what
the overlap after a reconnect, a connection rotation and a resent frame look like. "An id not
above the last id" is *not* taken to mean "seen before": exchange test networks reset their ids
and relisted symbols start again, and those trades are new.

The tracker answers in two steps, so that nothing changes before a trade is accepted:

- :meth:`TradeIdTracker.classify` looks only (no state changes): DUPLICATE, NEW (with the ids
  skipped since the symbol's high-water mark), LATE (below the high-water mark by at most
  ``reset_jump`` and not seen: out of order, kept) or RESET (below it by more than
  ``reset_jump``: an id reset or relisting, kept and reported);
- :meth:`TradeIdTracker.accept` records a trade once it has been validated, encoded and handed
  to the producer.

Memory is bounded whatever the ids do: at most ``window`` trades are remembered (oldest
forgotten first, across all symbols), and at most ``max_symbols`` symbols keep a high-water mark
(the least recently seen is forgotten). The high-water mark only classifies; it never decides
that a trade is a repeat.

:func:`seed_from_topic` fills the window from the tail of each partition of the trade topic, and
:func:`seed_from_spool` from the records a previous run left in its spool (handed over but not yet
in Kafka), so that a restarted streamer still recognises the trades its previous run produced.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kafka import TopicPartition

from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.spool_store import SEGMENT_SUFFIX, decode_records
from k2_resources.schemas import decode_trade

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 100_000  # trades remembered (about 200 bytes each)
DEFAULT_RESET_JUMP = 10_000  # a fall of more ids than this below the high-water mark is a reset
DEFAULT_MAX_SYMBOLS = 10_000  # Binance allows 1,024 streams per connection
DEFAULT_SEED_PER_PARTITION = 10_000  # records read back from each partition's tail at start
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TradeIdVerdict:
    NEW = "new"
    DUPLICATE = "duplicate"
    LATE = "late"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class Classification:
    """What a trade is, judged against the trades accepted so far."""

    verdict: str
    missing: int = 0  # NEW only: ids skipped between the high-water mark and this id
    previous_high: int | None = None  # the symbol's high-water mark before this trade


@dataclass(slots=True)
class _SymbolState:
    high: int | None = None
    recent: set[tuple[int, int]] = field(default_factory=set)  # (trade id, trade time ms)


def trade_time_ms(timestamp: datetime) -> int:
    """The trade time of a trade V2 record (aware UTC datetime) in epoch milliseconds (Binance ``T``), exactly."""
    return (timestamp - _EPOCH) // timedelta(milliseconds=1)


class TradeIdTracker:
    """Recognises repeated trades in a bounded window and classifies ids against a high-water mark."""

    def __init__(
        self, window: int = DEFAULT_WINDOW, reset_jump: int = DEFAULT_RESET_JUMP, max_symbols: int = DEFAULT_MAX_SYMBOLS
    ) -> None:
        if window < 1 or reset_jump < 0 or max_symbols < 1:
            raise K2Error(
                f"TradeIdTracker needs window >= 1, reset_jump >= 0 and max_symbols >= 1, "
                f"not {window}, {reset_jump}, {max_symbols}"
            )
        self.window = window
        self.reset_jump = reset_jump
        self.max_symbols = max_symbols
        self._symbols: OrderedDict[str, _SymbolState] = OrderedDict()
        self._order: deque[tuple[_SymbolState, tuple[int, int]]] = deque()

    def __len__(self) -> int:
        """Trades remembered now (never more than ``window``)."""
        return len(self._order)

    @property
    def symbols(self) -> int:
        """Symbols with a high-water mark now (never more than ``max_symbols``)."""
        return len(self._symbols)

    def high_water_mark(self, symbol: str) -> int | None:
        state = self._symbols.get(symbol)
        return None if state is None else state.high

    def classify(self, symbol: str, trade_id: int, time_ms: int) -> Classification:
        """What this trade is; changes nothing."""
        state = self._symbols.get(symbol)
        if state is None or state.high is None:
            if state is not None and (trade_id, time_ms) in state.recent:
                return Classification(TradeIdVerdict.DUPLICATE)
            return Classification(TradeIdVerdict.NEW)
        if (trade_id, time_ms) in state.recent:
            return Classification(TradeIdVerdict.DUPLICATE, previous_high=state.high)
        if trade_id > state.high:
            return Classification(TradeIdVerdict.NEW, missing=trade_id - state.high - 1, previous_high=state.high)
        if state.high - trade_id > self.reset_jump:
            return Classification(TradeIdVerdict.RESET, previous_high=state.high)
        return Classification(TradeIdVerdict.LATE, previous_high=state.high)

    def accept(self, symbol: str, trade_id: int, time_ms: int, *, backfilled: bool = False) -> None:
        """Remember a trade that was accepted (validated, encoded and handed to the producer).

        A ``backfilled`` trade (fetched to fill a gap, so below the mark) may raise the mark, never reset it."""
        state = self._symbols.get(symbol)
        if state is None:
            state = self._symbols[symbol] = _SymbolState()
            if len(self._symbols) > self.max_symbols:
                self._symbols.popitem(last=False)  # the least recently seen symbol
        else:
            self._symbols.move_to_end(symbol)
        key = (trade_id, time_ms)
        if key not in state.recent:
            state.recent.add(key)
            self._order.append((state, key))
            if len(self._order) > self.window:
                oldest_state, oldest_key = self._order.popleft()
                oldest_state.recent.discard(oldest_key)
        if state.high is None or trade_id > state.high or (state.high - trade_id > self.reset_jump and not backfilled):
            state.high = trade_id  # a reset starts the symbol's ids again from here


@dataclass
class SeedReport:
    """What :func:`seed_from_topic` read back."""

    records: int = 0
    undecodable: int = 0
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (from, to) offsets
    seconds: float = 0.0


def seed_from_topic(
    kafka: KafkaResource,
    topic: str,
    tracker: TradeIdTracker,
    per_partition: int = DEFAULT_SEED_PER_PARTITION,
    timeout_s: float = 120.0,
) -> SeedReport:
    """Accept into ``tracker`` the trades of the last ``per_partition`` records of each partition.

    Each symbol lives in one partition in trade-id order (records are keyed by symbol), so the tail
    of a partition is the newest trades of its symbols: what a restarted source resends first.
    Records that do not decode as trade V2 are skipped (and counted).
    """
    report = SeedReport()
    if per_partition <= 0:
        return report
    started = time.monotonic()
    ends = kafka.end_offsets(topic)
    if not any(ends.values()):
        return report
    consumer = kafka.consumer()
    try:
        partitions = [TopicPartition(topic, p) for p, end in ends.items() if end > 0]
        consumer.assign(partitions)
        beginnings = consumer.beginning_offsets(partitions)
        for tp in partitions:
            start = max(beginnings[tp], ends[tp.partition] - per_partition)
            report.partitions[tp.partition] = (start, ends[tp.partition])
            consumer.seek(tp, start)
        deadline = started + timeout_s
        while any(consumer.position(tp) < ends[tp.partition] for tp in partitions):
            if time.monotonic() > deadline:
                raise K2Error(
                    f"could not read the last {per_partition} records of each partition of {topic} "
                    f"within {timeout_s:.0f} s to seed the duplicate check; is the broker overloaded?"
                )
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for record in batch:
                    if record.offset >= ends[tp.partition]:
                        continue
                    try:
                        trade = decode_trade(record.value)
                        symbol, trade_id = trade["symbol"], trade["source_sequence"]
                        time_ms = trade_time_ms(trade["timestamp"])
                    except Exception:
                        report.undecodable += 1
                        continue
                    if trade_id is None:
                        report.undecodable += 1
                        continue
                    tracker.accept(symbol, trade_id, time_ms, backfilled=_backfilled(trade))
                    report.records += 1
    finally:
        consumer.close()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def seed_from_spool(directory: Path, tracker: TradeIdTracker, limit: int = DEFAULT_WINDOW) -> int:
    """Accept into ``tracker`` the trades in the newest spool segments of a topic (at most ``limit``).

    These were handed to the producer by an earlier run but may not be in Kafka yet; the spool
    replays them, so a source that resends them must find them already seen. Returns the count.
    """
    segments = sorted(Path(directory).glob(f"*{SEGMENT_SUFFIX}"), reverse=True) if Path(directory).is_dir() else []
    newest_first: list[list] = []
    total = 0
    for segment in segments:
        records, _ = decode_records(segment.read_bytes())
        newest_first.append(records)
        total += len(records)
        if total >= limit:
            break
    accepted = 0
    for records in reversed(newest_first):
        for record in records[-limit:]:
            try:
                trade = decode_trade(record.value)
                time_ms = trade_time_ms(trade["timestamp"])
            except Exception:
                continue
            if trade["source_sequence"] is not None:
                tracker.accept(trade["symbol"], trade["source_sequence"], time_ms, backfilled=_backfilled(trade))
                accepted += 1
    return accepted


def _backfilled(trade: dict) -> bool:
    """A trade the gap fill fetched from the REST history (k2_resources.binance.gap_fill)."""
    return (trade.get("vendor_data") or {}).get("backfilled") == "true"
