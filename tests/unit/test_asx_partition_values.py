"""The day partition values K2's ASX writer computes itself, held to pyiceberg's and to the spec."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import StringType, TimestampType, TimestamptzType

from k2_resources.catalog.partitioning import partition_values

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _column(micros: np.ndarray, tz: str | None) -> pa.ChunkedArray:
    half = len(micros) // 2
    kind = pa.timestamp("us", tz=tz)
    return pa.chunked_array([pa.array(micros[:half], kind), pa.array(micros[half:], kind)])


def test_days_equal_pyicebergs_from_1970_on_and_chunks_stay() -> None:
    rng = np.random.default_rng(7)
    micros = np.concatenate(
        [
            rng.integers(0, 4_102_444_800_000_000, 20_000),  # 1970 to 2100
            np.array([0, 86_400_000_000 - 1, 86_400_000_000, 1_394_406_000_000_000]),
        ]
    )
    for tz, source_type in (("UTC", TimestamptzType()), (None, TimestampType())):
        column = _column(micros, tz)
        ours = partition_values(DayTransform(), source_type, column)
        assert ours.equals(DayTransform().pyarrow_transform(source_type)(column))
        assert [len(chunk) for chunk in ours.chunks] == [len(chunk) for chunk in column.chunks]


def test_days_before_1970_round_down_as_the_spec_says() -> None:
    micros = np.array([-1, -86_400_000_000, -86_400_000_001, -1_514_073_600_732_456])
    days = partition_values(DayTransform(), TimestamptzType(), _column(micros, "UTC")).to_pylist()
    expected = [(_EPOCH + timedelta(microseconds=int(value)) - _EPOCH).days for value in micros]
    assert days == expected == [-1, -1, -2, -17525]


def test_other_transforms_are_pyicebergs() -> None:
    column = pa.chunked_array([pa.array(["ASX", "BINANCE"])])
    assert partition_values(IdentityTransform(), StringType(), column).equals(
        IdentityTransform().pyarrow_transform(StringType())(column)
    )
