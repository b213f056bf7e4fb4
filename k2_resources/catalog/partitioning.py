"""Rows split by a table's partition spec, and Arrow rows cast to a table's schema.

Both serve writers that hand pyiceberg rows already grouped and typed as the table wants them:
partition values are computed with pyiceberg's own transforms (or the Iceberg spec's definition
where that is the same and cheaper), so the keys are the ones pyiceberg's own write would give.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.transforms import DayTransform, Transform
from pyiceberg.types import IcebergType, TimestampType, TimestamptzType

# More runs of equal partition values than this: the rows are not grouped, let pyiceberg split them.
_MAX_PARTITION_RUNS = 10_000


_MICROS_PER_DAY = 86_400_000_000


def partition_values(transform: Transform, source_type: IcebergType, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``transform`` applied to ``column``: the partition values of its rows.

    The day of a microsecond timestamp is a floor division here, as the Iceberg spec and Iceberg
    Java's ``DateTimeUtil.microsToDays`` define it (pyiceberg's ``pyarrow_transform`` gives the
    same days from 1970 on, several times slower on a large day)."""
    if (
        isinstance(transform, DayTransform)
        and isinstance(source_type, (TimestampType, TimestamptzType))
        and pa.types.is_timestamp(column.type)
        and column.type.unit == "us"
        and column.null_count == 0
    ):
        return pa.chunked_array(
            [
                pa.array(np.floor_divide(chunk.cast(pa.int64()).to_numpy(), _MICROS_PER_DAY).astype(np.int32))
                for chunk in column.chunks
            ],
            type=pa.int32(),
        )
    return transform.pyarrow_transform(source_type)(column)


def partition_slices(metadata: TableMetadata, rows: pa.Table) -> list[tuple[PartitionKey, pa.Table]] | None:
    """``rows`` split by the table's partition spec, each partition a concatenation of zero-copy
    slices; None when the table is unpartitioned or the rows are not grouped by partition.

    pyiceberg's own split filters the whole table once per partition (costly on a large day with
    map and list columns); rows sorted by symbol then time come in a few
    runs per partition, so slicing the runs costs nothing. Partition values are computed with
    pyiceberg's own transforms, so the keys are the ones its write would give.
    """
    spec, schema = metadata.spec(), metadata.schema()
    if spec.is_unpartitioned() or rows.num_rows == 0:
        return None
    transformed = {}
    for index, field in enumerate(spec.fields):
        source = schema.find_field(field.source_id)
        column = rows.column(schema.find_column_name(field.source_id))
        transformed[f"p{index}"] = partition_values(field.transform, source.field_type, column)
    keys = pl.from_arrow(pa.table(transformed))
    assert isinstance(keys, pl.DataFrame)
    changed = pl.any_horizontal([pl.col(name).ne_missing(pl.col(name).shift(1)) for name in keys.columns])
    starts = keys.select(pl.arg_where(changed.fill_null(True)))[:, 0].to_list()
    if len(starts) > _MAX_PARTITION_RUNS:
        return None
    bounds = list(zip(starts, starts[1:] + [rows.num_rows]))
    runs: dict[tuple, list[pa.Table]] = {}
    first_rows = keys[starts].rows()
    for values, (start, end) in zip(first_rows, bounds):
        runs.setdefault(values, []).append(rows.slice(start, end - start))
    return [
        (
            PartitionKey(
                field_values=[
                    PartitionFieldValue(field=field, value=value) for field, value in zip(spec.fields, values)
                ],
                partition_spec=spec,
                schema=schema,
            ),
            pa.concat_tables(pieces),
        )
        for values, pieces in runs.items()
    ]


def _decoded_field(field: pa.Field) -> pa.Field:
    """``field`` with every dictionary (at any depth) replaced by its value type."""
    kind = field.type
    if pa.types.is_dictionary(kind):
        return field.with_type(kind.value_type)
    if pa.types.is_map(kind):
        return field.with_type(
            pa.map_(_decoded_field(kind.key_field), _decoded_field(kind.item_field), kind.keys_sorted)
        )
    if pa.types.is_large_list(kind):
        return field.with_type(pa.large_list(_decoded_field(kind.value_field)))
    if pa.types.is_list(kind):
        return field.with_type(pa.list_(_decoded_field(kind.value_field)))
    if pa.types.is_struct(kind):
        return field.with_type(pa.struct([_decoded_field(child) for child in kind]))
    return field


def decoded_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` as it reads once dictionary-encoded columns are decoded."""
    return pa.schema([_decoded_field(field) for field in schema], metadata=schema.metadata)


def _encoded_as(target: pa.Field, source: pa.Field) -> pa.Field:
    """The table's ``target`` field (its type and field ids), dictionary-encoded wherever ``source`` is."""
    have, want = source.type, target.type
    if pa.types.is_dictionary(have):
        return target.with_type(pa.dictionary(have.index_type, want))
    if pa.types.is_map(have) and pa.types.is_map(want):
        return target.with_type(
            pa.map_(
                _encoded_as(want.key_field, have.key_field),
                _encoded_as(want.item_field, have.item_field),
                want.keys_sorted,
            )
        )
    if pa.types.is_large_list(have) and pa.types.is_large_list(want):
        return target.with_type(pa.large_list(_encoded_as(want.value_field, have.value_field)))
    if pa.types.is_list(have) and pa.types.is_list(want):
        return target.with_type(pa.list_(_encoded_as(want.value_field, have.value_field)))
    if pa.types.is_struct(have) and pa.types.is_struct(want) and have.num_fields == want.num_fields:
        return target.with_type(pa.struct([_encoded_as(w, h) for w, h in zip(want, have)]))
    return target


def in_table_schema(rows: pa.Table, table_schema: pa.Schema) -> pa.Table:
    """``rows`` cast to the table's Arrow schema (the catalog assigns field ids when it creates a
    table; files are written with the table's own); dictionary-encoded columns stay encoded."""
    if rows.schema.names != table_schema.names:
        return rows.cast(table_schema)  # the cast names the mismatch
    return rows.cast(
        pa.schema(
            [_encoded_as(want, have) for want, have in zip(table_schema, rows.schema)], metadata=table_schema.metadata
        )
    )
