"""The stream sensor's memory between ticks: the runs it requested and has not seen commit yet.

Serialised as JSON in the Dagster sensor cursor; a cursor of the version-1 format is read best
effort, and an entry that does not read is dropped (its range is requested again).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

RUN_FAILED = "failed"
RUN_ACTIVE = "active"
RUN_UNKNOWN = "unknown"
RUN_SUCCEEDED = "succeeded"


@dataclass
class InFlight:
    """A requested run (micro-batch or recovery) that has not committed its range yet."""

    start: int
    end: int
    run_key: str
    requested_at: float
    attempt: int = 1


@dataclass
class Recovery(InFlight):
    """A requested recovery run of one pending range; ``kind`` is the range's DEFERRED or SPILLED."""

    kind: str = ""


CURSOR_VERSION = 2  # 1: in_flight plus a free "extra" dict; 2: typed fields


@dataclass
class StreamCursor:
    """The sensor's memory between ticks (serialised as JSON in the Dagster cursor).

    ``in_flight`` and ``recovering``: partition -> the micro-batch / recovery run in flight;
    ``degradation``: the DegradationManager's ``to_state()`` (its format is the manager's);
    ``probe_at``: when the circuit breaker's latest half-open probe round was requested;
    ``follower``: the long-running follower run of the topic, while one is requested or running.
    """

    in_flight: dict[int, InFlight] = field(default_factory=dict)
    recovering: dict[int, Recovery] = field(default_factory=dict)
    degradation: dict[str, Any] = field(default_factory=dict)
    probe_at: float | None = None
    follower: InFlight | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": CURSOR_VERSION,
                "in_flight": {str(p): asdict(f) for p, f in self.in_flight.items()},
                "recovering": {str(p): asdict(f) for p, f in self.recovering.items()},
                "degradation": self.degradation,
                "probe_at": self.probe_at,
                "follower": None if self.follower is None else asdict(self.follower),
            }
        )

    @classmethod
    def from_json(cls, raw: str | None) -> StreamCursor:
        """Read a cursor; one of the version-1 format (free ``extra`` dict) is read best effort."""
        if not raw:
            return cls()
        data = json.loads(raw)
        if not isinstance(data, dict):
            return cls()
        if "extra" in data:  # version 1: {"in_flight": ..., "extra": {"degradation", "breaker", "recovery"}}
            extra = data.get("extra") or {}
            breaker = extra.get("breaker") or {}
            data = {
                "in_flight": data.get("in_flight", {}),
                "recovering": extra.get("recovery", {}),
                "degradation": extra.get("degradation", {}),
                "probe_at": breaker.get("probe_at") if isinstance(breaker, dict) else None,
            }
        probe_at = data.get("probe_at")
        return cls(
            in_flight=_flights(data.get("in_flight"), InFlight),
            recovering=_flights(data.get("recovering"), Recovery),
            degradation=dict(data.get("degradation") or {}),
            probe_at=None if probe_at is None else float(probe_at),
            follower=_flights({"0": data["follower"]} if data.get("follower") else None, InFlight).get(0),
        )


_Flight = TypeVar("_Flight", bound=InFlight)


def _flights(raw: Any, kind: type[_Flight]) -> dict[int, _Flight]:
    """partition -> flight from JSON; an entry that does not read is dropped (its range is requested again)."""
    flights: dict[int, _Flight] = {}
    if not isinstance(raw, dict):
        return flights
    names = {f.name for f in fields(kind)}
    for partition, entry in raw.items():
        try:
            flight = kind(**{k: v for k, v in entry.items() if k in names})
            flight.start, flight.end, flight.attempt = int(flight.start), int(flight.end), int(flight.attempt)
            flight.run_key, flight.requested_at = str(flight.run_key), float(flight.requested_at)
            flights[int(partition)] = flight
        except (TypeError, ValueError, AttributeError):
            continue
    return flights


RUN_FAILED = "failed"
RUN_ACTIVE = "active"
RUN_UNKNOWN = "unknown"
RUN_SUCCEEDED = "succeeded"
