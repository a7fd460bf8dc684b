"""Storage stage: the run's table, `videos.lance` (queryable, versioned) and `videos.parquet`.

One row per input video, keyed by `video_id`. Rows are written with Lance merge-insert, an
atomic commit that updates a video's row or adds it, so a re-run replaces failed rows instead of
adding new ones, and a crash mid-run keeps every row committed before it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lance
import pyarrow.parquet as pq

from tasks.video_record import VideoRecord, record_from_row, records_to_table

LANCE_NAME = "videos.lance"
PARQUET_NAME = "videos.parquet"


@dataclass(frozen=True)
class WorkPlan:
    """What a run has to do: records to process, and how many inputs are already done."""

    todo: list[VideoRecord]
    already_ok: int


class VideoTable:
    def __init__(self, output_dir: Path) -> None:
        self.lance_path = Path(output_dir) / LANCE_NAME
        self.parquet_path = Path(output_dir) / PARQUET_NAME

    def exists(self) -> bool:
        return (self.lance_path / "_versions").is_dir()

    def records(self) -> dict[str, VideoRecord]:
        if not self.exists():
            return {}
        rows = lance.dataset(self.lance_path).to_table().to_pylist()
        return {row["video_id"]: record_from_row(row) for row in rows}

    def plan(self, sources: Sequence[VideoRecord]) -> WorkPlan:
        """Skip videos already `ok`; give the others their attempt number."""
        stored = self.records()
        todo, already_ok = [], 0
        for source in sources:
            previous = stored.get(source.video_id)
            if previous is not None and previous.status == "ok":
                already_ok += 1
                continue
            attempts = previous.attempts + 1 if previous is not None else 1
            todo.append(source.update(attempts=attempts))
        return WorkPlan(todo=todo, already_ok=already_ok)

    def upsert(self, records: Iterable[VideoRecord]) -> None:
        """Write rows in one atomic commit: replace rows with the same `video_id`, add the rest."""
        table = records_to_table(list(records))
        if table.num_rows == 0:
            return
        if not self.exists():
            self.lance_path.parent.mkdir(parents=True, exist_ok=True)
            lance.write_dataset(table, self.lance_path, mode="create")
            return
        (
            lance.dataset(self.lance_path)
            .merge_insert("video_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(table)
        )

    def export_parquet(self) -> Path:
        """The whole table as Parquet, written to a temporary name and renamed into place."""
        partial = self.parquet_path.with_name(f".{PARQUET_NAME}.{uuid.uuid4().hex}.part")
        try:
            pq.write_table(lance.dataset(self.lance_path).to_table(), partial)
            os.replace(partial, self.parquet_path)
        finally:
            partial.unlink(missing_ok=True)
        return self.parquet_path

    def compact(self) -> None:
        """Merge the small fragments that batched commits leave behind (old versions stay)."""
        if self.exists():
            lance.dataset(self.lance_path).optimize.compact_files()
