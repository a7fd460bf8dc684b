"""What a depth run makes under its output folder, and where: one place for the flow, its
tasks, the demo and the benchmarks (the README documents the same layout to users)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path


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
