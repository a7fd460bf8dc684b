"""What a depth run makes under its output folder, and where: one place for the flow, its
tasks, the demo and the benchmarks (the README documents the same layout to users)."""

from __future__ import annotations

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
