"""The gap ledger: every trade-id gap the streamer found, and what became of it.

One JSON line per event in ``K2_HOME/binance/gaps/<topic>.jsonl``, appended (and flushed) as it
happens, so a streamer killed mid-fill finds its open gaps again at start, and the
``sequence_gaps`` check and ``k2 offsets gaps`` read the same file:

- ``open``: a gap to fill (``symbol``, ``first``, ``last``, ``ids``);
- ``filled``: every id of it the source holds is now handed to Kafka (``filled`` ids; ``absent``, when
  present, counts ids the exchange's history skipped: they do not exist at the source);
- ``absent``: the source holds none of the gap's first ``absent`` ids (its history answers with a later
  id: two windows of a recording, or ids the exchange never used). Not a loss, nothing to fill; when
  ``absent < ids`` the rest was opened as a gap of its own;
- ``unfilled``: a loss, with ``reason`` (a gap_plan.LossReason) and the ids ``filled`` before it
  was given up (``ids - filled - absent`` are missing for good);
- ``reset``: an id reset (``high`` then ``id``): reported, never filled;
- ``accepted``: an operator accepted every unfilled gap and reset so far (``by``, ``note``).

A gap's state is its last event. Nothing here is trusted as "filled" except a ``filled`` event,
written only after the last missing id was handed to the producer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from k2_resources.binance.gap_plan import Gap
from k2_resources.paths import state_dir

log = logging.getLogger(__name__)

COMPACT_AFTER_LINES = 20_000  # rewrite the file at start past this many lines ...
KEEP_CLOSED = 2_000  # ... keeping open gaps, unaccepted losses and this many newest closed entries


def ledger_path(topic: str, root: Path | None = None) -> Path:
    return (root or state_dir("binance", "gaps")) / f"{topic}.jsonl"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class GapSummary:
    """What the ledger says: filled and unfilled gaps with ids and counts."""

    filled_gaps: int = 0
    filled_ids: int = 0
    unfilled_gaps: int = 0  # not yet accepted by an operator
    unfilled_ids: int = 0
    open_gaps: int = 0
    open_ids: int = 0
    absent_gaps: int = 0  # gaps with ids the source's history does not hold (not a loss)
    absent_ids: int = 0
    resets: int = 0  # not yet accepted
    unfilled: list[dict[str, Any]] = field(default_factory=list)  # newest last
    open: list[dict[str, Any]] = field(default_factory=list)
    reset_list: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self, limit: int = 20) -> dict[str, Any]:
        """Check metadata: the counts, and the newest ``limit`` unfilled/open gaps and resets by id."""

        def ids(entries: list[dict[str, Any]]) -> str:
            return json.dumps(
                [
                    {k: e[k] for k in ("symbol", "first", "last", "ids", "filled", "reason", "high", "id") if k in e}
                    for e in entries[-limit:]
                ]
            )

        return {
            "gaps_filled": self.filled_gaps,
            "trade_ids_filled": self.filled_ids,
            "gaps_unfilled": self.unfilled_gaps,
            "trade_ids_unfilled": self.unfilled_ids,
            "gaps_filling": self.open_gaps,
            "trade_ids_filling": self.open_ids,
            "gaps_absent_at_source": self.absent_gaps,
            "trade_ids_absent_at_source": self.absent_ids,
            "trade_id_resets": self.resets,
            "unfilled": ids(self.unfilled),
            "filling": ids(self.open),
            "resets": ids(self.reset_list),
        }


class GapLedger:
    """Appends gap events for one topic and reads them back."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_topic(cls, topic: str, root: Path | None = None) -> GapLedger:
        return cls(ledger_path(topic, root))

    def _append(self, event: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({**event, "at": _now()}, separators=(",", ":")) + "\n")
            handle.flush()

    def opened(self, gap: Gap) -> None:
        self._append({"event": "open", "symbol": gap.symbol, "first": gap.first, "last": gap.last, "ids": gap.size})

    def filled(self, gap: Gap, filled: int, absent: int = 0) -> None:
        event = {"event": "filled", "symbol": gap.symbol, "first": gap.first, "last": gap.last, "ids": gap.size}
        self._append({**event, "filled": filled, **({"absent": absent} if absent else {})})

    def absent(self, gap: Gap, absent: int) -> None:
        """The source holds none of the gap's first ``absent`` ids (the rest, if any, is a gap of its own)."""
        event = {"event": "absent", "symbol": gap.symbol, "first": gap.first, "last": gap.last, "ids": gap.size}
        self._append({**event, "absent": absent})

    def unfilled(self, gap: Gap, reason: str, filled: int = 0, detail: str = "", absent: int = 0) -> None:
        event = {"event": "unfilled", "symbol": gap.symbol, "first": gap.first, "last": gap.last, "ids": gap.size}
        extra = {"absent": absent} if absent else {}
        self._append({**event, "filled": filled, **extra, "reason": reason, "detail": detail[:500]})

    def reset(self, symbol: str, high: int, trade_id: int) -> None:
        self._append({"event": "reset", "symbol": symbol, "high": high, "id": trade_id})

    def accept(self, by: str, note: str) -> None:
        self._append({"event": "accepted", "by": by, "note": note})

    def events(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        events = []
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a crash mid-write
        return events

    def states(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """(the last event of each gap by key, the resets), forgetting what an ``accepted`` covers."""
        gaps: dict[str, dict[str, Any]] = {}
        resets: list[dict[str, Any]] = []
        for event in self.events():
            kind = event.get("event")
            if kind == "accepted":
                gaps = {k: e for k, e in gaps.items() if e["event"] != "unfilled"}
                resets = []
            elif kind == "reset":
                resets.append(event)
            elif kind in ("open", "filled", "unfilled", "absent"):
                key = f"{event['symbol']}:{event['first']}-{event['last']}"
                gaps.pop(key, None)  # re-inserted: newest last
                gaps[key] = event
        return gaps, resets

    def open_gaps(self) -> list[Gap]:
        """Gaps opened and neither filled nor given up (a run ended or was killed mid-fill)."""
        gaps, _ = self.states()
        return [Gap(e["symbol"], e["first"], e["last"]) for e in gaps.values() if e["event"] == "open"]

    def summary(self) -> GapSummary:
        gaps, resets = self.states()
        s = GapSummary(resets=len(resets), reset_list=resets)
        for e in gaps.values():
            if e.get("absent"):
                s.absent_gaps += 1
                s.absent_ids += e["absent"]
            if e["event"] == "absent":
                continue
            if e["event"] == "filled":
                s.filled_gaps += 1
                s.filled_ids += e["filled"]
            elif e["event"] == "unfilled":
                s.unfilled_gaps += 1
                s.unfilled_ids += e["ids"] - e.get("filled", 0) - e.get("absent", 0)
                s.filled_ids += e.get("filled", 0)
                s.unfilled.append(e)
            else:
                s.open_gaps += 1
                s.open_ids += e["ids"]
                s.open.append(e)
        return s

    def compact(self) -> None:
        """Rewrite a long ledger: open gaps, unaccepted losses and resets, and the newest closed entries."""
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as handle:
            lines = sum(1 for _ in handle)
        if lines <= COMPACT_AFTER_LINES:
            return
        gaps, resets = self.states()
        closed = ("filled", "absent")
        keep = [e for e in gaps.values() if e["event"] not in closed] + resets
        keep += [e for e in gaps.values() if e["event"] in closed][-KEEP_CLOSED:]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in keep), encoding="utf-8")
        temporary.replace(self.path)
        log.info("gap ledger %s compacted from %d lines to %d", self.path, lines, len(keep))
