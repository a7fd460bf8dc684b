"""What a depth run makes under its output folder, and where: one place for the flow, its
tasks, the demo and the benchmarks (the README documents the same layout to users)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.files import atomic_output
from common.urls import stored_url

SOURCE_NOTE_SUFFIX = "url"  # raw/<video_id>.url: the URL its download came from


def note_source(raw_dir: Path, video_id: str, url: str) -> None:
    """Note where `video_id`'s download came from, before the file takes its name: a stage finds an
    earlier output by its id alone, and an id need not change with its URL (a Kinetics row
    under another --url-template, a corrected URL in a CSV with video ids)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(raw_dir / f"{video_id}.{SOURCE_NOTE_SUFFIX}") as partial:
        partial.write_text(stored_url(url) + "\n")


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    @property
    def raw(self) -> Path:
        """Downloads, as fetched."""
        return self.root / "raw"

    @property
    def videos(self) -> Path:
        """The 360p transcodes."""
        return self.root / "videos"

    @property
    def depth(self) -> Path:
        """Depth maps (`.npy`) and their previews."""
        return self.root / "depth"

    @property
    def lance(self) -> Path:
        """The table of every video's row."""
        return self.root / "videos.lance"

    @property
    def parquet(self) -> Path:
        """The same table exported at the end of a run."""
        return self.root / "videos.parquet"

    @property
    def file_folders(self) -> tuple[Path, Path, Path]:
        """The folders of per-video files: downloads, transcodes, depth maps."""
        return self.raw, self.videos, self.depth

    @property
    def shaped_folders(self) -> tuple[Path, Path]:
        """What the dataset's shaping settings (height, codec, frames, model) made: transcodes
        and depth maps."""
        return self.videos, self.depth

    def drop_other_sources(self, urls: Mapping[str, str]) -> int:
        """Remove the download and transcode of each video of `urls` (id -> URL) that came from
        another URL than its own: reused by id, a Kinetics clip's row under a new
        --url-template held the frames of the whole video it was fetched from before. Files an
        older vidflow made, with no note, are taken for the URL asked now and noted so (a first
        run after an upgrade fetched and encoded again every video it had kept). How many
        files went."""
        with_files = self._ids_with_files()
        changed = set()
        for video_id, url in urls.items():
            if video_id not in with_files:
                continue
            noted = self._noted_source(video_id)
            if noted is None:
                note_source(self.raw, video_id, url)
            elif noted != stored_url(url):
                changed.add(video_id)
        return self.drop_downloads(changed)

    def _ids_with_files(self) -> set[str]:
        ids: set[str] = set()
        for folder in (self.raw, self.videos):
            with contextlib.suppress(FileNotFoundError):
                ids.update(entry.name.rpartition(".")[0] for entry in os.scandir(folder))
        return ids

    def _noted_source(self, video_id: str) -> str | None:
        try:
            return (self.raw / f"{video_id}.{SOURCE_NOTE_SUFFIX}").read_text().strip()
        except OSError:
            return None

    def drop_downloads(self, video_ids: Collection[str]) -> int:
        """Remove the downloads and transcodes of `video_ids` (videos whose row failed in an
        earlier run): a stage finds an earlier output by its name and keeps it, so a
        download cut short at a stream's end, or a mirror's copy fixed since, was never
        fetched again and its video failed on every run. How many files went."""
        if not video_ids:
            return 0
        removed = 0
        for folder in (self.raw, self.videos):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    stem, dot, _suffix = entry.name.rpartition(".")
                    if dot and stem in video_ids and entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            removed += 1
        return removed
