"""IcebergResource: the K2 catalog and its tables.

By default a pyiceberg SqlCatalog on SQLite with the warehouse on the local file system,
both under K2_HOME; any pyiceberg catalog (REST + S3, Glue, ...) by configuration.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError
from pyiceberg.table import Table

from k2_resources.catalog.settings import catalog_properties, default_catalog_properties  # noqa: F401 (re-exported)
from k2_resources.catalog.tables import ALL_TABLES, DEAD_LETTERS, NAMESPACE, QUOTES, TRADES, TableDefinition


class IcebergResource(ConfigurableResource):
    """The Iceberg catalog holding ``market.trades``, ``quotes``, ``dead_letters`` and ``ohlcv``."""

    catalog_name: str = Field(default="k2")
    catalog_properties: dict[str, str] | None = Field(
        default=None,
        description="pyiceberg catalog properties (type, uri, warehouse, s3.*); "
        "default: SQLite catalog and local warehouse under K2_HOME",
    )
    _catalog: Catalog | None = PrivateAttr(default=None)

    def catalog(self) -> Catalog:
        """The catalog, with the K2 namespace and tables created on first use."""
        if self._catalog is None:
            properties = catalog_properties(self.catalog_properties)
            self._catalog = load_catalog(self.catalog_name, **properties)
            ensure_tables(self._catalog)
        return self._catalog

    def table(self, definition: TableDefinition) -> Table:
        return self.catalog().load_table(definition.identifier)

    def trades(self) -> Table:
        """``market.trades``, freshly loaded (current snapshot)."""
        return self.table(TRADES)

    def quotes(self) -> Table:
        return self.table(QUOTES)

    def dead_letters(self) -> Table:
        return self.table(DEAD_LETTERS)


def ensure_tables(catalog: Catalog) -> None:
    """Create the namespace and every K2 table that does not exist yet."""
    try:
        catalog.create_namespace(NAMESPACE)
    except NamespaceAlreadyExistsError:
        pass
    for definition in ALL_TABLES:
        try:
            catalog.load_table(definition.identifier)
        except NoSuchTableError:
            try:
                catalog.create_table(
                    definition.identifier,
                    schema=definition.schema,
                    partition_spec=definition.partition_spec,
                    sort_order=definition.sort_order,
                    properties={
                        "write.parquet.compression-codec": "zstd",
                        "format-version": "2",
                        # Several row groups per file, so Parquet statistics skip by symbol inside a file.
                        "write.parquet.row-group-limit": "131072",
                    },
                )
            except TableAlreadyExistsError:  # created concurrently by another process
                pass


def to_arrow(records: list[dict[str, Any]], definition: TableDefinition) -> pa.Table:
    """Rows (dicts of Python values) as an Arrow table in the table's exact schema."""
    return pa.Table.from_pylist(records, schema=definition.arrow_schema())
