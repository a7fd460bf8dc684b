"""One row of the depth-extraction table: what is known about one input video.

The record travels through the stages (download -> transcode -> depth); each stage fills its
columns, or marks the record failed with the stage and the reason and leaves the rest alone.
A failed record is a value, never an exception, so one bad video cannot stop the others and
every failure ends up as a row (the shape of video2dataset's subsamplers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa

from common.urls import stored_url

Stage = Literal["input", "download", "transcode", "depth", "store"]
ERROR_CHARS = 2000  # the most of an error a row keeps: enough for a table and a traceback's ends


def crash_prefix(stage: str) -> str:
    """How the error of a video begins when its shard's worker died at `stage`
    (shard_tasks.crash_reason): the table tells those rows from the stage's own failures."""
    return f"{stage} crashed: "


Status = Literal["pending", "ok", "failed"]


@dataclass(frozen=True)
class VideoRecord:
    """Every column of `videos.lance`; the field order is the table's column order."""

    video_id: str
    source_url: str  # in the table without credentials or signature (common.urls.stored_url)
    label: str | None = None
    split: str | None = None
    youtube_id: str | None = None
    time_start: int | None = None
    time_end: int | None = None
    raw_path: str | None = None
    raw_bytes: int | None = None
    download_attempts: int = 0
    transcoded_path: str | None = None
    transcoded_bytes: int | None = None
    source_width: int | None = None
    source_height: int | None = None
    source_fps: float | None = None
    source_duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    frame_count: int | None = None
    depth_frame_indices: list[int] = field(default_factory=list)
    depth_path: str | None = None  # float16 .npy: one map per frame in depth_frame_indices
    depth_preview_path: str | None = None  # .png of the first map
    depth_min_m: float | None = None
    depth_mean_m: float | None = None
    depth_max_m: float | None = None
    focal_length_px: float | None = None
    depth_model: str | None = None
    depth_untrained: bool | None = None  # True: a stand-in with random weights made the maps
    download_s: float | None = None
    transcode_s: float | None = None
    depth_s: float | None = None
    status: Status = "pending"
    failed_stage: str | None = None
    error: str | None = None
    attempts: int = 1
    shard: int | None = None  # the run's shard that processed the video
    node_id: str | None = None  # the Ray node that transcoded it
    processed_at: datetime | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def update(self, **changes: object) -> VideoRecord:
        return dataclasses.replace(self, **changes)

    def fail(self, stage: Stage, error: str) -> VideoRecord:
        """This record, failed at `stage` because of `error` (kept short enough for a table).

        Error text quotes what servers sent: aiohttp keeps a reason phrase's or header's bytes
        that are not UTF-8 as lone surrogates, which Arrow refuses, and that one row failed its
        whole shard's write. They are kept as `\\udcXX` escapes instead. A long error keeps its
        head and its tail: the head says the stage and the cause (`crash_reason`), the tail
        where it was raised; its last 2,000 characters alone lost both prefix and cause."""
        if len(error) > ERROR_CHARS:
            error = f"{error[: ERROR_CHARS // 2]}\n[...]\n{error[-ERROR_CHARS // 2 :]}"
        readable = error.encode("utf-8", "backslashreplace").decode("utf-8")
        return self.finish(status="failed", failed_stage=stage, error=readable)

    def finish(self, **changes: object) -> VideoRecord:
        return self.update(processed_at=datetime.now(UTC), **changes)


ARROW_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_url", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("youtube_id", pa.string()),
        ("time_start", pa.int32()),
        ("time_end", pa.int32()),
        ("raw_path", pa.string()),
        ("raw_bytes", pa.int64()),
        ("download_attempts", pa.int32()),
        ("transcoded_path", pa.string()),
        ("transcoded_bytes", pa.int64()),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("source_fps", pa.float64()),
        ("source_duration_s", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("frame_count", pa.int32()),
        ("depth_frame_indices", pa.list_(pa.int32())),
        ("depth_path", pa.string()),
        ("depth_preview_path", pa.string()),
        ("depth_min_m", pa.float32()),
        ("depth_mean_m", pa.float32()),
        ("depth_max_m", pa.float32()),
        ("focal_length_px", pa.float32()),
        ("depth_model", pa.string()),
        ("depth_untrained", pa.bool_()),
        ("download_s", pa.float64()),
        ("transcode_s", pa.float64()),
        ("depth_s", pa.float64()),
        ("status", pa.string()),
        ("failed_stage", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("shard", pa.int32()),
        ("node_id", pa.string()),
        ("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)


def records_to_table(records: list[VideoRecord]) -> pa.Table:
    """Records as an Arrow table with the fixed schema (so empty columns keep their types)."""
    rows = [
        {**dataclasses.asdict(record), "source_url": stored_url(record.source_url)}
        for record in records
    ]
    return pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
