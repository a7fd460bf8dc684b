"""Writing a file so that readers see the old one or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def partial_path(final: Path) -> Path:
    """A unique hidden name beside `final`: on the same file system, so the rename is atomic,
    and ending in `final`'s suffix, for writers that go by it (numpy, ffmpeg)."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.part{final.suffix}")


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `final` in one rename when the block ends
    without error, and is removed otherwise. A crash leaves at most a hidden `.part` file,
    never a truncated `final` that a resumed run would take as done."""
    partial = partial_path(Path(final))
    try:
        yield partial
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
