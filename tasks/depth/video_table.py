"""Storage stage: the run's table, `videos.lance` (queryable, versioned) and `videos.parquet`.

One row per input video, keyed by `video_id`. Lance's distributed-write path: a worker writes a
shard's rows as data fragments (`write_fragments`, files no version points at yet), and the
driver alone commits them (`commit_fragments`). A shard that re-did videos with a row already
(failed before) is committed by `upsert` instead, replacing those rows in the same single
commit. So a re-run replaces failed rows instead of adding new ones, a crash mid-run keeps every
row committed before it, and a killed worker leaves only unreferenced files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lance
import pyarrow.parquet as pq
from lance.fragment import FragmentMetadata, write_fragments

from common.files import atomic_output
from tasks.depth.output_layout import OutputLayout
from tasks.depth.video_record import ARROW_SCHEMA, VideoRecord, records_to_table


@dataclass(frozen=True)
class WorkPlan:
    """What a run has to do: records to process, and how many inputs are already done."""

    todo: list[VideoRecord]
    already_ok: int
    # videos in `todo` whose row failed at fetching or transcoding them: their files are
    # redone (a depth or store failure keeps its checked transcode)
    rerun_ids: frozenset[str]


class TableSchemaError(ValueError):
    """The output folder holds a table of another layout (an older vidflow's)."""


def write_rows(records: Sequence[VideoRecord], lance_path: Path) -> list[FragmentMetadata]:
    """A shard's rows as new Lance data files, on the worker; nothing is visible until the
    driver commits them."""
    table = records_to_table(list(records))
    if table.num_rows == 0:
        return []
    return write_fragments(table, lance_path, schema=ARROW_SCHEMA)


class VideoTable:
    def __init__(self, output_dir: Path) -> None:
        layout = OutputLayout(Path(output_dir))
        self.lance_path, self.parquet_path = layout.lance, layout.parquet

    def exists(self) -> bool:
        return (self.lance_path / "_versions").is_dir()

    def create(self) -> None:
        """An empty table if there is none; refuse one whose columns differ from this version's."""
        if not self.exists():
            self.lance_path.parent.mkdir(parents=True, exist_ok=True)
            lance.write_dataset(ARROW_SCHEMA.empty_table(), self.lance_path, mode="create")
            return
        self.check_layout()

    def has_done_rows(self) -> bool:
        """Whether a video's row says `ok` (its layout checked first: `check_layout`)."""
        if not self.exists():
            return False
        self.check_layout()
        return lance.dataset(self.lance_path).count_rows(filter="status = 'ok'") > 0

    def check_layout(self) -> None:
        """Refuse an existing table whose columns differ from the ones this version writes."""
        if not self.exists():
            return
        found = lance.dataset(self.lance_path).schema
        way_out = "move it away or choose another output folder"
        if set(found.names) != set(ARROW_SCHEMA.names):
            raise TableSchemaError(
                f"{self.lance_path} has other columns than this vidflow writes (an older "
                f"version's table?): {way_out}. "
                f"Missing: {sorted(set(ARROW_SCHEMA.names) - set(found.names))}; "
                f"unknown: {sorted(set(found.names) - set(ARROW_SCHEMA.names))}"
            )
        # Same names, other types (a table rewritten through pandas: int columns with NULLs
        # as float64): every shard's write was refused by Lance after its whole work, as
        # "failed at store", and every rerun did it all again.
        retyped = [(f, found.field(f.name).type) for f in ARROW_SCHEMA]
        if other := [f"{f.name} ({was}, not {f.type})" for f, was in retyped if was != f.type]:
            raise TableSchemaError(
                f"{self.lance_path} has columns of other types than this vidflow writes: "
                f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}: {way_out}"
            )
        if found.names != ARROW_SCHEMA.names:
            raise TableSchemaError(f"{self.lance_path} has its columns in another order: {way_out}")

    def commit_fragments(self, fragments: Sequence[FragmentMetadata]) -> None:
        """Make a shard's written rows visible, in one commit. Only for rows of videos with
        no row yet: one with a row (a re-run) goes through `upsert`, whose single commit
        replaces it (a delete and then an append were two: a failure between them lost the
        earlier row, its error and its attempt count)."""
        if not fragments:
            return
        dataset = lance.dataset(self.lance_path)
        append = lance.LanceOperation.Append(list(fragments))
        lance.LanceDataset.commit(self.lance_path, append, read_version=dataset.version)

    def plan(self, sources: Sequence[VideoRecord]) -> WorkPlan:
        """Skip videos already `ok`; give the others their attempt number."""
        stored: dict[str, dict[str, Any]] = {}
        if self.exists():
            columns = ["video_id", "status", "attempts", "failed_stage"]
            for row in lance.dataset(self.lance_path).to_table(columns=columns).to_pylist():
                stored[row["video_id"]] = row
        todo, already_ok, refetch = [], 0, set()
        for source in sources:
            row = stored.get(source.video_id)
            if row is not None and row["status"] == "ok":
                already_ok += 1
                continue
            todo.append(source.update(attempts=(row["attempts"] if row else 0) + 1))
            if row is not None and not _transcode_taken(row["failed_stage"]):
                refetch.add(source.video_id)
        return WorkPlan(todo=todo, already_ok=already_ok, rerun_ids=frozenset(refetch))

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
        """The whole table as Parquet, written to a temporary name and renamed into place.
        Batch by batch: a table read whole (its frame-index lists with `--frames all`) could
        run the driver out of memory at the end of a run whose rows were all committed."""
        dataset = lance.dataset(self.lance_path)
        with (
            atomic_output(self.parquet_path) as partial,
            pq.ParquetWriter(partial, dataset.schema) as writer,
        ):
            for batch in dataset.to_batches():
                writer.write_batch(batch)
        return self.parquet_path

    def compact(self) -> None:
        """Merge the small fragments that batched commits leave behind (old versions stay)."""
        if self.exists():
            lance.dataset(self.lance_path).optimize.compact_files()


def _transcode_taken(failed_stage: str | None) -> bool:
    """Whether a video that failed had a transcode ffmpeg and the probe took: it failed at depth
    or store, its own failure or its shard's worker's death there (a death fails only the
    videos that had got through every stage before it, `_Chain.crashed_rows`). Dropped, 20,000
    clips were fetched and transcoded again after a model fault."""
    return failed_stage in ("depth", "store")
