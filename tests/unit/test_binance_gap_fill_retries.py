"""A gap above the bound asks the history one question; a slow answer is asked again, not a loss."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from k2_resources.binance.errors import RestUnavailable
from k2_resources.binance.gap_fill import GapFiller
from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import Gap, GapFillSettings
from k2_resources.binance.stream_metrics import StreamMetrics, StreamStats

JUMP = Gap("BTCUSDT", 1_000, 900_000_999)  # far above the bound: the source is asked where its ids go on


def _filler(tmp_path, answers: list) -> tuple[GapFiller, list[str]]:
    asked: list[str] = []

    def fetch(url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        asked.append(url)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    settings = replace(GapFillSettings(), retry_initial_s=0.01, max_attempts=3, fill_timeout_s=30)
    filler = GapFiller(
        settings,
        "http://127.0.0.1:9/api",
        handle=lambda message: "produced",
        live_high=lambda symbol: None,
        ledger=GapLedger(tmp_path / "ledger.jsonl"),
        metrics=StreamMetrics(),
        stats=StreamStats(),
        fetch=fetch,
    )
    return filler, asked


def test_a_timed_out_question_beyond_the_bound_is_asked_again_and_the_jump_is_absent(tmp_path):
    next_held = JUMP.last + 1  # the source's history goes on after the whole jump: nothing was lost
    answer = (200, {}, json.dumps([{"id": next_held, "price": "1", "qty": "1", "time": 1}]).encode())
    filler, asked = _filler(tmp_path, [RestUnavailable("GET /api/v3/historicalTrades failed: timed out"), answer])
    asyncio.run(filler._fill(JUMP))
    assert len(asked) == 2
    summary = filler.ledger.summary()
    assert (summary.unfilled_gaps, summary.absent_ids) == (0, JUMP.size)
    assert filler.stats.gaps_unfilled == 0


def test_a_history_that_never_answers_is_a_loss_after_max_attempts(tmp_path):
    failures = [RestUnavailable("GET /api/v3/historicalTrades failed: timed out")] * 3
    filler, asked = _filler(tmp_path, failures)
    asyncio.run(filler._fill(JUMP))
    assert len(asked) == 3  # max_attempts, then the gap is reported
    summary = filler.ledger.summary()
    assert summary.unfilled_gaps == 1 and [e["reason"] for e in summary.unfilled] == ["too_large"]
    assert "timed out" in summary.unfilled[0]["detail"]
