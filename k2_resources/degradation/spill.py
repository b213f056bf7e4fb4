"""Local Parquet spill of raw record batches, keyed by the Kafka offset range they hold.

At AGGRESSIVE degradation the stream path writes raw batches here instead of to Iceberg, so it
keeps pace with Kafka. Layout::

    K2_HOME/spill/<topic>/<partition>/<start>-<end>.parquet      offsets [start, end)

Each file is written to a hidden temporary name in the same folder and renamed into place, so a
reader sees a whole file or none. Exactly-once into Iceberg is the caller's protocol:

1. ``list()`` the spilled batches (oldest offsets first);
2. skip the Iceberg append when the table's committed offsets already cover the range (a
   previous attempt committed it and died before step 3), else append with the range in the
   snapshot summary;
3. ``delete()`` the file.

Re-spilling the same range replaces the file (same data, idempotent); a range that overlaps a
different spilled range is refused, since both would later be committed.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from k2_resources.errors import K2Error
from k2_resources.paths import state_dir

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_FILE_RE = re.compile(r"^(\d+)-(\d+)\.parquet$")
METADATA_KEY = b"k2.spill"


@dataclass(frozen=True)
class SpilledBatch:
    """One spilled file: offsets [start, end) of ``topic``/``partition`` and its row count."""

    topic: str
    partition: int
    start: int
    end: int
    path: Path
    rows: int

    @property
    def size(self) -> int:
        """Number of offsets the batch covers (can exceed ``rows`` when records were filtered)."""
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "start": self.start,
            "end": self.end,
            "path": str(self.path),
            "rows": self.rows,
        }


class SpillStore:
    """Writes, lists, reads and deletes spilled batches under ``root`` (default ``K2_HOME/spill``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else state_dir("spill")
        self.root.mkdir(parents=True, exist_ok=True)

    # -- paths -------------------------------------------------------------------------------

    def _folder(self, topic: str, partition: int) -> Path:
        if not _TOPIC_RE.match(topic) or topic in (".", ".."):
            raise K2Error(f"cannot spill topic {topic!r}: a Kafka topic name uses only letters, digits, '.', '_', '-'")
        if partition < 0:
            raise K2Error(f"cannot spill partition {partition} of {topic}: partitions are >= 0")
        return self.root / topic / str(partition)

    def path_for(self, topic: str, partition: int, start: int, end: int) -> Path:
        """Where the batch for offsets [start, end) lives."""
        return self._folder(topic, partition) / f"{start}-{end}.parquet"

    # -- write -------------------------------------------------------------------------------

    def write(
        self,
        topic: str,
        partition: int,
        start: int,
        end: int,
        records: pa.Table | Sequence[Mapping[str, Any]],
        schema: pa.Schema | None = None,
    ) -> SpilledBatch:
        """Spill ``records`` (offsets [start, end)) atomically; returns the stored batch.

        ``records`` is a pyarrow Table or a list of dicts (``schema`` optional for dicts; needed
        when the list is empty and the columns must still be known).
        """
        if start < 0 or end <= start:
            raise K2Error(
                f"cannot spill offsets {start}..{end} of {topic}/{partition}: "
                "the range must be [start, end) with 0 <= start < end"
            )
        folder = self._folder(topic, partition)
        table = records if isinstance(records, pa.Table) else pa.Table.from_pylist(list(records), schema=schema)
        for existing in self.list(topic, partition):
            same = existing.start == start and existing.end == end
            if not same and existing.start < end and start < existing.end:
                raise K2Error(
                    f"cannot spill offsets {start}..{end} of {topic}/{partition}: they overlap the spilled batch "
                    f"{existing.start}..{existing.end} ({existing.path}); commit or delete that batch first, "
                    "or spill exactly the same range again"
                )
        meta = json.dumps(
            {"topic": topic, "partition": partition, "start": start, "end": end, "written_at": time.time()}
        ).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: meta})
        folder.mkdir(parents=True, exist_ok=True)
        final = self.path_for(topic, partition, start, end)
        temp = folder / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temp, "wb") as handle:
                pq.write_table(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(folder)
        return SpilledBatch(topic, partition, start, end, final, table.num_rows)

    # -- read --------------------------------------------------------------------------------

    def list(self, topic: str | None = None, partition: int | None = None) -> list[SpilledBatch]:
        """Spilled batches (optionally of one topic / partition), ordered by topic, partition, start."""
        batches: list[SpilledBatch] = []
        topics = [topic] if topic is not None else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        for name in topics:
            topic_dir = self.root / name
            if not topic_dir.is_dir():
                continue
            partitions = (
                [partition]
                if partition is not None
                else sorted(int(p.name) for p in topic_dir.iterdir() if p.is_dir() and p.name.isdigit())
            )
            for part in partitions:
                folder = topic_dir / str(part)
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    match = _FILE_RE.match(path.name)
                    if match is None:
                        continue  # temporary or foreign file
                    rows = pq.ParquetFile(path).metadata.num_rows
                    batches.append(SpilledBatch(name, part, int(match[1]), int(match[2]), path, rows))
        batches.sort(key=lambda b: (b.topic, b.partition, b.start))
        return batches

    def read(self, batch: SpilledBatch) -> pa.Table:
        """The records of ``batch`` (without the spill metadata)."""
        if not batch.path.exists():
            raise K2Error(f"spilled batch {batch.path} is gone; it was committed and deleted, list() again")
        table = pq.read_table(batch.path)
        metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != METADATA_KEY}
        return table.replace_schema_metadata(metadata or None)

    def delete(self, batch: SpilledBatch) -> bool:
        """Remove the file of ``batch`` (after its range is committed); False when it was already gone."""
        try:
            batch.path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(batch.path.parent)
        return True

    def backlog(self) -> dict[str, int]:
        """Counts for checks and metrics: spilled batches, rows and offsets not yet committed."""
        batches = self.list()
        return {
            "batches": len(batches),
            "rows": sum(b.rows for b in batches),
            "offsets": sum(b.size for b in batches),
        }

    def remove_stale_temporaries(self, older_than_seconds: float = 3600.0) -> int:
        """Delete temporary files left by writers that died mid-write; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for temp in self.root.glob("*/*/.*.tmp"):
            if temp.stat().st_mtime < cutoff:
                temp.unlink(missing_ok=True)
                removed += 1
        return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
