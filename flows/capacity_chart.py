"""The capacity sweep's chart: per-stream fps and e2e p99 against the number of live streams."""

from __future__ import annotations

import base64
import io
import math
import textwrap

# The object-oriented API without pyplot: no global backend or figure registry to set, and
# savefig renders with Agg (no display), so importing this module changes nothing.
from matplotlib.figure import Figure

from flows.capacity_rules import MIN_FPS_RATIO, StepFigures

TITLE_CHARS_PER_LINE = 70  # at the title's size, what a 7-inch figure holds


def capacity_chart_png(steps: list[StepFigures], budget_ms: float, title: str) -> bytes:
    """The chart (`capacity_chart`) as PNG bytes."""
    buffer = io.BytesIO()
    capacity_chart(steps, budget_ms, title).savefig(buffer, format="png")
    return buffer.getvalue()


def capacity_chart(steps: list[StepFigures], budget_ms: float, title: str) -> Figure:
    """Classified results/s per stream (min and mean) above, e2e p50/p99 below, in order of
    stream count; the real-time floor and the latency budget drawn as dotted lines. The title
    (the verdict, up to ~120 characters) wrapped to the figure's width."""
    steps = sorted(steps, key=lambda s: s.streams)
    counts = [s.streams for s in steps]
    figure = Figure(figsize=(7, 6), dpi=100)
    fps_axis, latency_axis = figure.subplots(2, 1, sharex=True)
    fps_axis.plot(counts, [s.fps_mean for s in steps], "o-", label="mean per stream")
    fps_axis.plot(counts, [s.fps_min for s in steps], "s--", label="slowest stream")
    if steps:
        floor = MIN_FPS_RATIO * steps[0].source_fps
        fps_axis.axhline(floor, color="grey", linestyle=":", label=f"{MIN_FPS_RATIO} x source")
    fps_axis.set_ylabel("classified results/s per stream")
    fps_axis.set_ylim(bottom=0)
    fps_axis.legend(loc="lower left")
    fps_axis.grid(alpha=0.3)
    # A step with no frame classified has no latency: a gap, not a point at 0 ms.
    p99 = [s.e2e_p99_ms if s.classified else math.nan for s in steps]
    p50 = [s.e2e_p50_ms if s.classified else math.nan for s in steps]
    latency_axis.plot(counts, p99, "o-", color="tab:red", label="p99")
    latency_axis.plot(counts, p50, "^-", color="tab:orange", label="p50")
    latency_axis.axhline(budget_ms, color="grey", linestyle=":", label="budget")
    latency_axis.set_ylabel("e2e latency (ms)")
    latency_axis.set_xlabel("live streams")
    latency_axis.legend(loc="upper left")
    latency_axis.grid(alpha=0.3)
    latency_axis.set_xticks(counts)
    figure.suptitle(textwrap.fill(title, TITLE_CHARS_PER_LINE))
    figure.tight_layout()
    return figure


def png_data_uri(png: bytes) -> str:
    """The PNG inline, for a markdown image that needs no file server."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
