"""What one step of the capacity sweep measured, whether it held real time, and which step next.

Pure functions on plain figures, so the verdict logic is tested apart from any broker or service.
A step holds real time when every stream's results arrive at >= 0.98 of its source fps, the
end-to-end p99 of classified frames is within the latency budget, no frame was skipped as
stale, and every frame produced has an outcome (none dead-lettered or left unanswered). The
sweep doubles the stream count until a step fails (or `max_streams`), then bisects between the
largest count that held and the smallest that did not.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.stats import summarize_ms
from tasks.stream.frame_codec import FrameResult

MIN_FPS_RATIO = 0.98  # results must keep up with the source to this fraction
DEFAULT_BUDGET_MS = 100.0  # e2e p99 budget of a live view (and the consumer's frame-age budget)
# Frames captured in a step's first second are not judged: the cameras' staggered starts, the
# first calls of fresh consumers (as the load test's warm-up, which is not counted either).
WARMUP_S = 1.0
# A stream's rate is a line fitted through its judged results (`result_rate`): fewer, and it
# reads 0 fps, so every step fails.
MIN_JUDGED_RESULTS = 3


def check_step_judges(fps: float, step_seconds: float) -> None:
    """Raise ValueError where a step at `fps` a stream gives each stream too few results after
    its warm-up to judge its rate: a 2-fps source in 2-s steps read "0 streams" on any box. A
    frame more than the fit needs: a step's clock starts before its cameras (staggered)."""
    needed = MIN_JUDGED_RESULTS + 1
    if fps * (step_seconds - WARMUP_S) < needed:
        shortest = math.ceil((WARMUP_S + needed / fps) * 10) / 10
        raise ValueError(
            f"--step-seconds {step_seconds:g} at {fps:g} fps a stream leaves too few results "
            f"after the {WARMUP_S:g}-s warm-up to judge its rate ({needed} are needed): every "
            f"step would read 0 streams; give --step-seconds {shortest:g} or more"
        )


@dataclass
class StepFigures:
    """The figures of one step: `streams` live cameras at `source_fps` each."""

    streams: int
    source_fps: float
    stream_fps: dict[str, float] = field(default_factory=dict)  # classified results/s, by stream
    e2e_p50_ms: float = 0.0
    e2e_p99_ms: float = 0.0
    classified: int = 0
    skipped_stale: int = 0
    frames_produced: int = 0
    # produced frames with no result or stale record: dead-lettered, failed, or never answered
    without_outcome: int = 0
    lag_at_end: int | None = 0  # frames behind at the last capture, + never answered
    attempt: int = 1  # a count that failed is tried again (`step_tries`): which try this was

    @property
    def fps_min(self) -> float:
        return min(self.stream_fps.values(), default=0.0)

    @property
    def fps_mean(self) -> float:
        return float(np.mean(list(self.stream_fps.values()))) if self.stream_fps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "stream_fps": {stream: round(fps, 2) for stream, fps in self.stream_fps.items()},
            "fps_min": round(self.fps_min, 2),
            "fps_mean": round(self.fps_mean, 2),
        }


def result_rate(frame_indexes: list[int], result_ts_s: list[float]) -> float:
    """Outcomes per second of one stream: the inverse slope of outcome time against frame index.

    A least-squares fit over the whole step rather than first-to-last, so the jitter of the
    first and last results does not decide a short step; a consumer that falls behind stretches
    the slope and the rate drops below the source's."""
    if len(frame_indexes) < MIN_JUDGED_RESULTS:
        return 0.0
    slope, _ = np.polyfit(np.asarray(frame_indexes, float), np.asarray(result_ts_s, float), 1)
    return float(1.0 / slope) if slope > 0 else 0.0


def frames_behind(records: Iterable[FrameResult], at_ns: int) -> int:
    """Frames captured before `at_ns` whose outcome (result or stale record) came after it."""
    return sum(1 for r in records if r.capture_ts_ns < at_ns < r.result_ts_ns)


def lag_series(records: Sequence[FrameResult], every_s: float = 1.0) -> list[int]:
    """Frames behind at every `every_s` from the first capture to the last: a consumer that
    cannot keep up shows it growing second by second."""
    if not records:
        return []
    first = min(r.capture_ts_ns for r in records)
    last = max(r.capture_ts_ns for r in records)
    step_ns = int(every_s * 1e9)
    return [frames_behind(records, t) for t in range(first, last + 1, step_ns)]


def step_figures(
    streams: int,
    source_fps: float,
    records: Iterable[FrameResult],
    expected_streams: Iterable[str],
    frames_produced: int,
    unanswered: int | None,
    warmup_s: float = WARMUP_S,
) -> StepFigures:
    """Figures from the step's result records (classified, or `skipped` stale), first per key,
    leaving out frames captured in the first `warmup_s`.

    A stream that produced frames but got no result counts at 0 fps. `unanswered`: the
    consumers' lag once they stopped (None: unknown)."""
    records = list(records)
    last_capture = max((r.capture_ts_ns for r in records), default=0)
    behind = frames_behind(records, last_capture)
    outcomes = len({r.key for r in records})
    if records:
        judged_from = min(r.capture_ts_ns for r in records) + int(warmup_s * 1e9)
        records = [r for r in records if r.capture_ts_ns >= judged_from]
    seen: set[str] = set()
    per_stream: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
    e2e: list[float] = []
    for record in records:
        if record.key in seen:  # at-least-once: a redelivered frame's second result is not new
            continue
        seen.add(record.key)
        classified = not record.skipped
        per_stream[record.stream_id].append(
            (record.frame_index, record.result_ts_ns / 1e9, classified)
        )
        if classified:
            e2e.append(record.e2e_ms)
    stream_fps = {stream: 0.0 for stream in expected_streams}
    for stream, points in per_stream.items():
        # classified results/s: the pace of the stream's outcomes, less the share skipped
        points.sort()
        pace = result_rate([p[0] for p in points], [p[1] for p in points])
        stream_fps[stream] = pace * sum(p[2] for p in points) / len(points)
    stale = len(seen) - len(e2e)
    latency = summarize_ms(e2e)
    return StepFigures(
        streams=streams,
        source_fps=source_fps,
        stream_fps=dict(sorted(stream_fps.items())),  # unrounded: judged (`shortfalls`) as is
        e2e_p50_ms=latency["p50"],
        e2e_p99_ms=latency["p99"],
        classified=len(e2e),
        skipped_stale=stale,
        frames_produced=frames_produced,
        without_outcome=max(0, frames_produced - outcomes),
        lag_at_end=None if unanswered is None else behind + unanswered,
    )


def shortfalls(
    step: StepFigures, budget_ms: float, min_fps_ratio: float = MIN_FPS_RATIO
) -> list[str]:
    """Why the step did not hold real time; empty when it held."""
    reasons = []
    floor = min_fps_ratio * step.source_fps
    if not step.stream_fps or step.fps_min < floor:
        reasons.append(f"slowest stream {step.fps_min:.3f} fps < {floor:.3f}")
    if step.classified == 0:  # its p99 of 0.0 ms would read as a measurement
        reasons.append("no frame classified")
    elif step.e2e_p99_ms > budget_ms:
        reasons.append(f"e2e p99 {step.e2e_p99_ms:.1f} ms > {budget_ms:.0f} ms")
    if step.skipped_stale:
        reasons.append(f"{step.skipped_stale} frames skipped as stale")
    if step.without_outcome:
        # The rates come from the results that came, so gaps in a stream would not show there.
        reasons.append(f"{step.without_outcome} frames without a result (dead-lettered or lost)")
    return reasons


def holds(step: StepFigures, budget_ms: float, min_fps_ratio: float = MIN_FPS_RATIO) -> bool:
    return not shortfalls(step, budget_ms, min_fps_ratio)


def deciding_steps(steps: Iterable[StepFigures]) -> list[StepFigures]:
    """The last try of each stream count, the one its verdict rests on, in order of count."""
    return sorted({step.streams: step for step in steps}.values(), key=lambda s: s.streams)


def capacity(outcomes: Mapping[int, bool]) -> int:
    """The largest stream count that held below the smallest one that failed (0: none held)."""
    failed = min((n for n, ok in outcomes.items() if not ok), default=None)
    held = [n for n, ok in outcomes.items() if ok and (failed is None or n < failed)]
    return max(held, default=0)


def next_streams(outcomes: Mapping[int, bool], max_streams: int) -> int | None:
    """The next stream count to try (doubling, then bisection), or None when the sweep is done."""
    low = capacity(outcomes)
    failed = min((n for n, ok in outcomes.items() if not ok), default=None)
    if failed is None:
        if low >= max_streams:
            return None
        return min(max(1, 2 * low), max_streams)
    if failed - low <= 1:
        return None
    return (low + failed) // 2


def verdict_line(
    streams: int,
    width: int,
    height: int,
    fps: float,
    most_tried: int | None = None,
    unfinished: bool = False,
    one_failed: list[str] | None = None,
    failed_at: int | None = None,
) -> str:
    """The sweep's answer in one line, e.g. "6 streams of 340x256 at 28 fps on this machine";
    "at least" where the most streams tried held (`most_tried`), or where the sweep was
    stopped before it found the count that fails (`unfinished`): the box may take more. With
    none held, why one stream did not hold (`one_failed`, its `shortfalls`): a bare "0
    streams" sent the user to the log to find out. `failed_at`: the stream count whose step
    failed and ended the sweep (a lost broker or service), which "stopped" read as a Ctrl-C."""
    noun = "stream" if streams == 1 else "streams"
    line = f"{streams} {noun} of {width}x{height} at {fps:g} fps on this machine"
    if not streams and not unfinished and one_failed:
        return f"{line} (one stream did not hold real time: {'; '.join(one_failed)})"
    ended = (
        f"failed in its step of {failed_at} stream{'s' if failed_at != 1 else ''}"
        if failed_at is not None
        else "was stopped"
    )
    if unfinished and not streams:
        return (
            f"no stream count of {width}x{height} at {fps:g} fps measured: the sweep {ended} "
            "before its first stream count was decided"
        )
    if unfinished:
        return f"at least {line} (the sweep {ended} before it ended)"
    if most_tried is not None and streams >= most_tried:
        return f"at least {line} (the most tried: raise --max-streams to look further)"
    return line
