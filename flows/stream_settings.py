"""The stream-benchmark flow's one parameter: the run's own knobs, the broker and the service.

A pydantic model, so Prefect shows it as a form in a custom run. The broker and the service are
the settings `vidflow produce`, `consume` and `classify` read too: each of their fields the
caller leaves out comes from the environment (``VIDFLOW_KAFKA_*``, ``VIDFLOW_INFERENCE_*``), then
the default. The run's own knobs are the run's to say, like the CLI's flags, and read no
variable, but for where its files go: ``VIDFLOW_STREAM_OUTPUT_DIR``, as ``VIDFLOW_DEPTH_OUTPUT``
for depth, so that an image can send them to its data volume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.settings import MAX_WAIT_S, SAMPLE_VIDEO, flag_name, one_line
from flows.capacity_rules import DEFAULT_BUDGET_MS, WARMUP_S, check_step_judges
from services.inference.settings import ClientSettings
from tasks.stream.live_source import is_live
from tasks.stream.settings import (
    ConsumerSettings,
    KafkaSettings,
    ProducerSettings,
    check_fps,
    shown_sources,
    source_list,
    source_parts,
)

OUTPUT_DIR_VARIABLE = "VIDFLOW_STREAM_OUTPUT_DIR"
# Its settings that `vidflow stream-benchmark` takes as flags (the others are flow parameters).
STREAM_BENCHMARK_FLAGS = (
    "source", "duration", "fps", "streams", "concurrency", "consumers", "max_frame_age_ms",
    "capacity", "step_seconds", "max_streams", "step_tries", "keep_step_topics", "output_dir",
    "service_wait_s",
)  # fmt: skip
# Each consumer holds a thread of the flow's task runner for the whole run, beside the
# producer's: with 16 consumers on 16 threads the producer waited for them to end, and the run
# reported 0 frames/s as a success.
MAX_CONSUMERS = 15
FLOW_THREADS = MAX_CONSUMERS + 1
# What defines a consumer's or producer's part in a run, and so is the flow's alone to say: the
# fields the flow leaves out are these defaults, not `VIDFLOW_CONSUMER_*` / `VIDFLOW_PRODUCER_*`
# (an exported VIDFLOW_CONSUMER_MAX_FRAMES=100 meant for `vidflow consume` stopped every
# consumer of a sweep at 100 frames: "0 streams"). The rest, tuning such as the call deadline,
# retries or JPEG quality, still comes from the environment as for the commands.
FLOW_CONSUMER_RUN = {
    "max_frames": None,
    "summary_json": None,
    "metrics_port": None,
    "produced_since_ms": None,
    "producer_session": None,
    "idle_timeout": None,
    "max_frame_age_ms": None,
}
FLOW_PRODUCER_RUN = {"max_frames": None, "stream_id": None, "loop": False, "streams": 1}
# A capacity step's shortest length: its first WARMUP_S s are not judged, and a stream's rate
# needs a second of results after them (a 1-s step judged no frame: "0 streams" on any box).
MIN_STEP_S = WARMUP_S + 1.0
# The knobs only one of the two modes reads: set to other than their defaults in the other mode,
# they are refused rather than ignored (`--capacity --duration 60` ran 10-s steps, and said not).
ONE_RUN_ONLY = ("duration", "max_frames", "loop", "group")
SWEEP_ONLY = (
    "step_seconds", "max_streams", "step_tries", "keep_step_topics", "output_dir", "load_wait_s"
)  # fmt: skip


LIVE_REFUSED = (
    "--capacity replays a file as N cameras and judges each against the file's frame rate; a "
    "live source runs at its own rate: give a clip recorded from it"
)


def refuse_live_for_capacity(sources: list[str]) -> None:
    """ValueError for a live source in a capacity sweep: a sweep judges each stream against the
    source's frame rate, which a camera or a stream only reports, and may not keep."""
    if any(is_live(source) for source in sources):
        raise ValueError(LIVE_REFUSED)


def default_output_dir() -> Path:
    """Where a capacity sweep writes its chart unless told: the environment's, else a folder
    under the working directory."""
    return Path(os.environ.get(OUTPUT_DIR_VARIABLE) or "runs/stream-benchmark")


class StreamBenchmarkSettings(BaseModel):
    """`vidflow stream-benchmark` and the stream-benchmark flow: one run, or a capacity sweep."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    source: str = Field(
        str(SAMPLE_VIDEO),
        description="video file, webcam:N, rtsp:// or env:NAME (a camera URL with its password "
        "kept in the variable NAME where the run happens, out of Prefect's parameters)",
    )
    # The waits below are at most a day: inf (or 1e10) overflowed the threads' waits.
    duration: float = Field(30.0, gt=0, le=MAX_WAIT_S, description="seconds of producing")
    fps: str = Field("native", description="a number, native or max")
    loop: bool = Field(True, description="start the file again at its end")
    max_frames: int | None = Field(None, ge=1, description="stop producing after this many frames")
    streams: int = Field(
        1,
        ge=1,
        description="replay --source as this many live cameras (as `produce --streams`); a "
        "camera's frames go to one partition, so N consumers need N cameras or more to share",
    )
    consumers: int = Field(
        1,
        ge=1,
        le=MAX_CONSUMERS,
        description="members of the consumer group (more run as `vidflow consume` processes)",
    )
    concurrency: int = Field(8, ge=1, description="calls in flight per consumer")
    group: str | None = Field(None, description="consumer group id (default: a new one per run)")
    max_frame_age_ms: float | None = Field(
        None,
        gt=0,
        description="latency budget: consumers skip older frames as stale (capacity mode: "
        f"default {DEFAULT_BUDGET_MS:g})",
    )
    capacity: bool = Field(
        False,
        description="sweep the number of live streams of --source for the most that hold real time",
    )
    step_seconds: float = Field(
        10.0,
        ge=MIN_STEP_S,
        le=MAX_WAIT_S,
        description=f"capacity: s per step (at least {MIN_STEP_S:g}: its first {WARMUP_S:g} s "
        "are warm-up, not judged)",
    )
    max_streams: int = Field(16, ge=1, description="capacity: most streams tried")
    step_tries: int = Field(
        2, ge=1, description="capacity: tries a stream count gets before it counts as failed"
    )
    keep_step_topics: bool = Field(
        False,
        description="capacity: keep each step's topics on the broker (by default deleted once "
        "read, each holding every frame its step sent; a dead-letter topic with letters stays)",
    )
    output_dir: Path = Field(
        default_factory=default_output_dir,
        description=f"capacity: where the chart PNG is written (default ${OUTPUT_DIR_VARIABLE}, "
        "else runs/stream-benchmark)",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="broker and topics")
    client: ClientSettings = Field(
        default_factory=ClientSettings, description="how to reach the inference service"
    )
    load_wait_s: float = Field(
        600.0,
        gt=0,
        le=MAX_WAIT_S,
        description="capacity: how long the sweep waits for a service still loading its model "
        "to serve before its first step",
    )
    service_wait_s: float = Field(
        15.0,
        gt=0,
        le=MAX_WAIT_S,
        description="how long the run waits at its start for the inference service to answer "
        "(one still loading its model counts as there); it fails then, before producing",
    )

    _fps_checked = field_validator("fps")(check_fps)

    @model_validator(mode="after")
    def _streams_or_capacity(self) -> StreamBenchmarkSettings:
        if self.capacity and self.streams != 1:
            raise ValueError("--streams does not apply to --capacity: the sweep sets the count")
        if self.capacity and len(source_parts(self.source)) > 1:
            raise ValueError(
                "--capacity replays one source as N cameras: give --source one file or camera"
            )
        if self.capacity and self.fps == "max":  # refused before a server and a run start
            raise ValueError("--capacity paces each stream like a camera: --fps max does not apply")
        if self.capacity and self.fps != "native":  # native: once the source is open
            check_step_judges(float(self.fps), self.step_seconds)
        if self.capacity:
            refuse_live_for_capacity(source_parts(self.source))
        mode, unused = ("--capacity", ONE_RUN_ONLY) if self.capacity else ("one run", SWEEP_ONLY)
        ignored = [  # a field set to other than its default that this mode would not read
            name
            for name in unused
            if name in self.model_fields_set and getattr(self, name) != _default(name)
        ]
        if ignored:
            # A flow parameter that is no flag is named as the parameter it is (`--max-frames`
            # was named, which no command takes).
            shown = ", ".join(
                flag_name(name) if name in STREAM_BENCHMARK_FLAGS else name for name in ignored
            )
            raise ValueError(f"{shown} does not apply to {mode}")
        return self

    @property
    def shown_source(self) -> str:
        """The source as reports show it: a camera URL without its password or token."""
        return shown_sources(source_list(self.source))

    @property
    def budget_ms(self) -> float:
        """The capacity sweep's latency budget."""
        return DEFAULT_BUDGET_MS if self.max_frame_age_ms is None else self.max_frame_age_ms


def _default(name: str) -> object:
    return StreamBenchmarkSettings.model_fields[name].get_default(call_default_factory=True)


def flow_consumer_settings(**run: Any) -> ConsumerSettings:
    """A consumer of the flow's own: `run` over FLOW_CONSUMER_RUN, tuning from the environment."""
    return ConsumerSettings(**{**FLOW_CONSUMER_RUN, **run})


def flow_producer_settings(**run: Any) -> ProducerSettings:
    """The flow's producer: `run` over FLOW_PRODUCER_RUN, tuning from the environment."""
    return ProducerSettings(**{**FLOW_PRODUCER_RUN, **run})


def check_tuning(settings: StreamBenchmarkSettings) -> None:
    """Raise ValueError naming each bad `VIDFLOW_CONSUMER_*` / `VIDFLOW_PRODUCER_*` tuning value
    the run's consumers and producer would read: found before a Prefect server starts and a
    group joins, not as a flow run's traceback once they have. The fields the flow sets itself
    are given (as a run or a sweep step sets them), so their variables are not read."""
    consumer = {**FLOW_CONSUMER_RUN, "group": "check", "concurrency": settings.concurrency,
                "group_members": settings.consumers, "duration": 1.0}  # fmt: skip
    producer = {**FLOW_PRODUCER_RUN, "source": settings.source, "fps": settings.fps,
                "loop": settings.loop, "max_frames": settings.max_frames,
                "stream_id": "check"}  # fmt: skip
    for settings_cls, run in ((ConsumerSettings, consumer), (ProducerSettings, producer)):
        try:
            settings_cls(**run)
        except ValidationError as exc:
            raise ValueError(one_line(exc, settings_cls, run)) from None
