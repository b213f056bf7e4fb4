"""AsxSourceResource: where the ASX CSV files are, as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field

from k2_resources.asx.files import Kind, company_symbols, default_data_dir, read_raw_day


class AsxSourceResource(ConfigurableResource):
    """Where the ASX CSV files are: ``data_dir`` or ``$K2_ASX_DATA_DIR`` or the project's data/asx."""

    data_dir: str | None = Field(default=None, description="folder with trades/, quotes/ and reference-data/")

    def path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve() if self.data_dir else default_data_dir()

    def read_day(self, kind: Kind, partition_key: str) -> pa.Table:
        return read_raw_day(self.path(), kind, partition_key)

    def symbols(self) -> dict[str, str]:
        return company_symbols(self.path())
