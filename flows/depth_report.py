"""What a depth-extraction run did: counts by status, failures by stage, time per stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, get_args

from tasks.depth.video_record import Stage, VideoRecord

STAGES = ("download", "transcode", "depth")
ORDER = get_args(Stage)  # in pipeline order: a video failed at one stage got through those before
VIDEO_ROWS_SHOWN = 10_000  # a table artifact of more rows is of no use in the UI
FAILURES_SHOWN = 100  # in the failures artifact; the log names the first 10


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 3) if seconds is not None else None


@dataclass
class RunReport:
    total: int
    skipped: int
    depth_model: str = ""
    depth_untrained: bool = False  # a stand-in with random weights: its depth means nothing
    started: float = field(default_factory=time.perf_counter)
    ok: int = 0
    failed: int = 0
    failed_at: dict[str, int] = field(default_factory=dict)
    done_at: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    stage_seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    # Only what the artifacts show: a run of 100,000 videos kept every record (with `--frames
    # all`, a list of frame indices each) in the driver until it ended, ~1 GB.
    failures: list[VideoRecord] = field(default_factory=list)  # the first FAILURES_SHOWN
    _rows: list[dict[str, Any]] = field(default_factory=list)  # of the lowest shards

    def add(self, record: VideoRecord) -> None:
        self._keep_row(record)
        if record.failed:
            self.failed += 1
            stage = record.failed_stage or "unknown"
            self.failed_at[stage] = self.failed_at.get(stage, 0) + 1
            if len(self.failures) < FAILURES_SHOWN:
                self.failures.append(record)
        else:
            self.ok += 1
        failed_step = ORDER.index(record.failed_stage) if record.failed_stage in ORDER else 0
        for stage in STAGES:
            # Done by its status, not its timing: a failed download has one, and a download
            # kept from an earlier attempt has none.
            if not record.failed or failed_step > ORDER.index(stage):
                self.done_at[stage] += 1
            if (seconds := getattr(record, f"{stage}_s")) is not None:
                self.stage_seconds[stage].append(seconds)

    def summary(self) -> dict[str, Any]:
        wall_s = time.perf_counter() - self.started
        processed = self.ok + self.failed
        return {
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "skipped": self.skipped,
            "failed_at": dict(self.failed_at),
            "stage_seconds": {
                stage: round(sum(seconds), 3) for stage, seconds in self.stage_seconds.items()
            },
            "wall_s": round(wall_s, 3),
            "videos_per_s": round(processed / wall_s, 4) if wall_s > 0 else 0.0,
            "depth_model": self.depth_model,
            "depth_untrained": self.depth_untrained,
        }

    def headline(self) -> str:
        """One line for the summary artifact; says first when the depth model is untrained."""
        counts = f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped"
        if self.depth_untrained:
            return (
                f"UNTRAINED depth model {self.depth_model} (random weights; depth values mean "
                f"nothing): {counts}"
            )
        return f"{counts}; depth model {self.depth_model}"

    def table(self) -> list[dict[str, Any]]:
        """One row per stage: how many videos got through, failed there, and the time spent
        (seconds summed over the videos that spent any there this run; none for the store);
        then the run's row,
        its wall-clock seconds and videos per second."""
        rows = []
        for stage in STAGES:
            seconds = self.stage_seconds[stage]
            rows.append(
                {
                    "stage": stage,
                    "done": self.done_at[stage],
                    "failed": self.failed_at.get(stage, 0),
                    "total_s": round(sum(seconds), 2),
                    "mean_s": round(sum(seconds) / len(seconds), 3) if seconds else None,
                    "videos_per_s": None,
                }
            )
        # The driver's commit, or a write worker killed: these failed in no stage above.
        store = {"stage": "store", "done": self.ok, "failed": self.failed_at.get("store", 0)}
        rows.append(store | {"total_s": None, "mean_s": None, "videos_per_s": None})
        summary = self.summary()
        rows.append(
            {
                "stage": "run",
                "done": self.ok,
                "failed": self.failed,
                "total_s": summary["wall_s"],
                "mean_s": None,
                "videos_per_s": summary["videos_per_s"],
            }
        )
        return rows

    def _keep_row(self, record: VideoRecord) -> None:
        """Keep the video's row while it may be among the VIDEO_ROWS_SHOWN of the lowest
        shards (shards end in any order: the list is cut back now and then, never below
        them)."""
        self._rows.append(
            {
                "video_id": record.video_id,
                "shard": _shard_number(record),
                "status": record.status,
                "failed_stage": record.failed_stage,
                "download_s": _rounded(record.download_s),
                "transcode_s": _rounded(record.transcode_s),
                "depth_s": _rounded(record.depth_s),
                "error": (record.error or "")[:200] or None,
            }
        )
        if len(self._rows) >= 2 * VIDEO_ROWS_SHOWN:
            self._rows = self.video_rows()

    def video_rows(self, limit: int = VIDEO_ROWS_SHOWN) -> list[dict[str, Any]]:
        """One row per video of this run (the first `limit`, by shard), for the UI's table
        artifact. Shards are numbered from 1 there, as in the task runs' names ("download
        shard 2/4 ..."), so a row leads to its task runs; the dataset keeps the index."""
        return sorted(self._rows, key=lambda row: row["shard"] or 0)[:limit]

    def video_rows_description(self) -> str:
        """What the per-video table holds: said when it is cut (a run of 50,000 videos showed
        10,000 rows under "every video of this run"), and that videos done before are not in it."""
        processed = self.ok + self.failed
        which = "Every video" if processed <= VIDEO_ROWS_SHOWN else (
            f"The first {VIDEO_ROWS_SHOWN} videos, by shard, of the {processed}"
        )  # fmt: skip
        skipped = (
            f"; the {self.skipped} done in earlier runs are not listed" if self.skipped else ""
        )
        return f"{which} this run processed: shard, status, stage times, failure reason{skipped}"

    def failure_lines(self, limit: int = 10) -> list[str]:
        """The first `limit` failures, one line each, for the run's log: on the console of a
        command line run, whose temporary Prefect server (and artifacts) end with it."""
        lines = [  # one line each: ffmpeg's stderr tail has several
            f"{record.video_id}: {record.failed_stage} failed: "
            f"{' '.join((record.error or '').split())[:300]}"
            for record in self.failures[:limit]
        ]
        if self.failed > limit:
            more = self.failed - limit
            lines.append(f"{more} more failed: the table's rows with status = 'failed' say "
                         f"why{self._rowless_note()}")  # fmt: skip
        return lines

    def _rowless_note(self) -> str:
        """Where a shard's commit failed (its videos failed at `store`), none of its videos
        has a row to look up, its other failures included. By the run's counts, not the
        failures kept to show: a commit that failed after 100 other failures went unsaid."""
        if not self.failed_at.get("store"):
            return ""
        return (  # the earlier rows of a shard that redid videos: found in review, stop 62
            "; a shard whose commit failed (videos failed at store) left no row for any of its "
            "videos (or, for videos an earlier run failed, that run's row and error, not this "
            "one's): the next run does them again"
        )

    def failures_markdown(self, limit: int = FAILURES_SHOWN) -> str:
        if not self.failures:
            return "# Failures\n\nNone: every video processed in this run is `ok`."
        lines = ["# Failures", "", "| video | shard | stage | error |", "| --- | --- | --- | --- |"]
        for record in self.failures[:limit]:
            shard = _shard_number(record) or ""
            error = _as_code(record.error or "")
            lines.append(f"| {record.video_id} | {shard} | {record.failed_stage} | {error} |")
        if self.failed > limit:
            lines.append(
                f"\n{self.failed - limit} more in the table (status = 'failed')"
                f"{self._rowless_note()}."
            )
        return "\n".join(lines)


def _as_code(text: str, limit: int = 300) -> str:
    """`text` as a code span in a table cell: an error carries what a remote server sent (its
    reason phrase, its content type), which must show as text, never as a link, an image or
    HTML in the UI."""
    # Every line break, a lone carriage return too (CommonMark ends a line there), as a space:
    # a row of the table is one line.
    cell = " ".join(text.replace("`", "'").splitlines())[:limit].replace("|", "\\|")
    return f"`{cell}`" if cell else ""


def _shard_number(record: VideoRecord) -> int | None:
    """A video's shard as the task runs' names number it (from 1)."""
    return None if record.shard is None else record.shard + 1
