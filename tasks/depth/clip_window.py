"""A clip's time window within its video, carried in its URL as a W3C Media Fragment.

A Kinetics row names a 10-s window of a YouTube video. A mirror of the clips (file names with
the window, `{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`) serves the window itself; one
of whole videos (`{youtube_id}.mp4`) serves the video, and the window must be cut from it, or
every frame and depth map was of the whole video, not the labelled clip. The window rides in
the URL's fragment (`#t=417,427`, https://www.w3.org/TR/media-frags/), which no HTTP request
sends, so a URL list can ask for a window the same way; the transcode cuts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class ClipWindow:
    """Seconds into the video: from `start_s` to `end_s` (None: its end)."""

    start_s: float
    end_s: float | None

    @property
    def length_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s


def with_window(url: str, start_s: float, end_s: float) -> str:
    """`url` asking for the window from `start_s` to `end_s` (`#t=start,end`); ValueError
    where the window is empty once written (to the millisecond)."""
    start, end = seconds_text(start_s), seconds_text(end_s)
    if not float(start) < float(end):
        raise ValueError(f"an empty window: {start_s:g} to {end_s:g} s")
    return f"{url.split('#', 1)[0]}#t={start},{end}"


def seconds_text(seconds: float) -> str:
    """Seconds as FFmpeg and a media fragment read them: plain decimals to the millisecond,
    never `1e+06` (nor `-0`)."""
    return f"{seconds + 0.0:.3f}".rstrip("0").rstrip(".")  # + 0.0: -0.0 is 0.0


def _seconds(text: str) -> float:
    """A media fragment's time: seconds (`417`, `417.5`) or a clock time (`0:06:57`,
    `06:57.5`); ValueError otherwise."""
    parts = text.split(":")
    if len(parts) > 3 or not all(parts):
        raise ValueError(text)
    values = [float(part) for part in parts]
    if any(value < 0 for value in values) or any(value >= 60 for value in values[1:]):
        raise ValueError(text)  # `2:-30`, `1:99`: no clock time
    seconds = 0.0
    for value in values:
        seconds = seconds * 60 + value
    return seconds


def window_of(url: str) -> ClipWindow | None:
    """The window a URL's `#t=start[,end]` asks for (seconds or clock times, optionally
    `npt:`), or None where it asks for none or one this does not read (a fragment may mean
    something else)."""
    try:
        return asked_window(url)
    except ValueError:
        return None


def asked_window(url: str) -> ClipWindow | None:
    """The window a URL's `#t=` asks for, or None where it asks for none (no `t=`, or the
    whole video: `#t=0`); ValueError saying why where its `t=` is no window this reads
    (`#t=30,10`, `#t=1:75`): a URL list that asks so is refused, not done as the whole video."""
    try:
        fragment = urlsplit(url).fragment
    except ValueError:  # no URL to ask with (`http://[::1/x`): its download fails it, saying so
        return None
    for part in fragment.split("&"):
        name, _, value = part.partition("=")
        if name == "t":
            return _window(value)
    return None


def _window(value: str) -> ClipWindow | None:
    """A `t=` value as a window (None: the whole video), or ValueError saying why it is none."""
    start_text, _, end_text = value.removeprefix("npt:").partition(",")
    try:
        start = _seconds(start_text) if start_text else 0.0
        end = _seconds(end_text) if end_text else None
    except ValueError:
        raise ValueError(
            f"#t={value} is not a time window (seconds or clock times: #t=417,427 or "
            "#t=0:06:57,0:07:07)"
        ) from None
    if not math.isfinite(start) or (end is not None and not math.isfinite(end)):
        raise ValueError(f"#t={value}: a window's times are finite numbers of seconds")
    if end is not None and not start < end:
        raise ValueError(f"#t={value}: the window's end is not after its start")
    return ClipWindow(start, end) if start > 0 or end is not None else None
