"""The depth pipeline's settings: download, transcode, depth maps, shards and storage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import DEFAULT_CACHE_DIR, MAX_WAIT_S

FRAMES_CHOICES = "first, middle, uniform:N or all"
# In the flow's parameter schema too: Prefect refuses a run with another value when it is
# created (from the UI or `prefect deployment run`), not on the worker once the run starts.
FRAMES_PATTERN = r"^(first|middle|all|uniform:[1-9][0-9]*)$"


def check_frames_spec(spec: str) -> str:
    """`spec` if it says which frames to depth-map, else ValueError."""
    if not re.fullmatch(FRAMES_PATTERN, spec):
        raise ValueError(f"must be {FRAMES_CHOICES} with N >= 1, not {spec!r}")
    return spec


class DepthSettings(BaseSettings):
    """`vidflow depth` and the depth-extraction flow: download, transcode, depth maps, storage."""

    # No inf in any setting: none means "without end" here, and a wait of inf is none that
    # Python makes (MAX_WAIT_S); a CPU count of inf is none that Ray takes.
    model_config = SettingsConfigDict(env_prefix="VIDFLOW_DEPTH_", allow_inf_nan=False)

    output: Path = Field(Path("depth-output"), description="folder for videos, maps and tables")
    depth_model: str = Field(
        "apple/DepthPro-hf", description="depth model: a Hugging Face hub id or a local folder"
    )
    frames: str = Field(
        "first",
        description=f"frames to run depth on: {FRAMES_CHOICES}",
        json_schema_extra={"pattern": FRAMES_PATTERN},
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where depth runs")
    depth_backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description=(
            "what runs the depth model (auto: ONNX Runtime on the CPU, from an export cached "
            "in cache_dir, and torch on a GPU or where the export fails)"
        ),
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR / "depth", description="where depth model exports are cached"
    )
    depth_workers: int = Field(
        0, ge=0, description="depth model copies (Ray actors); 0: one per GPU, or one on CPU"
    )
    depth_cpus: float = Field(
        0.0,
        ge=0,
        description=(
            "CPUs a shard's depth step reserves while it runs, and a CPU model's threads "
            "(0: none reserved, one thread; an idle model never holds a CPU)"
        ),
    )
    depth_batch_size: int = Field(8, ge=1, description="frames per depth model call")
    depth_keep_alive_s: float = Field(
        300.0,
        ge=0,
        le=MAX_WAIT_S,
        description=(
            "how long a loaded depth model waits for the next run on a cluster that outlives "
            "this one (0: it ends with the run)"
        ),
    )
    lost_node_wait_s: float = Field(
        300.0,
        ge=0,
        le=MAX_WAIT_S,
        description=(
            "how long a run on a Ray cluster that lost what a stage needs (its only node with "
            "the stage's CPUs, the depth actors' GPUs) waits for it again, a node replaced, "
            "before it fails the videos still going"
        ),
    )
    shard_size: int = Field(
        0,
        ge=0,
        description=(
            "most videos per shard, the unit of scheduling; shards are cut even (0: auto, 4 to 32)"
        ),
    )
    shards_in_flight: int = Field(
        0,
        ge=0,
        description="shards started and not yet written (0: auto, as many as transcodes fit)",
    )
    transcode_cpus: int = Field(
        1, ge=1, description="CPUs of a shard's transcode step: that many ffmpeg run at once"
    )
    download_concurrency: int = Field(8, ge=1, description="downloads in flight per shard")
    connect_timeout_s: float = Field(
        10.0, gt=0, le=MAX_WAIT_S, description="time allowed to connect"
    )
    read_timeout_s: float = Field(
        30.0, gt=0, le=MAX_WAIT_S, description="longest wait for the next bytes"
    )
    download_deadline_s: float = Field(
        1800.0,
        gt=0,
        le=MAX_WAIT_S,
        description="longest one video's download may take, retries included",
    )
    download_min_rate_bps: float = Field(
        1024.0,
        ge=0,
        description=(
            "slowest download kept, in bytes/s over download_rate_window_s; slower ones fail "
            "as too slow (0: no minimum)"
        ),
    )
    download_rate_window_s: float = Field(
        30.0,
        gt=0,
        le=MAX_WAIT_S,
        description="seconds over which download_min_rate_bps is measured",
    )
    download_retries: int = Field(4, ge=0, description="retries after a transient failure")
    retry_backoff_s: float = Field(
        0.5, ge=0, le=MAX_WAIT_S, description="first retry delay, doubled each time"
    )
    retry_backoff_max_s: float = Field(
        30.0,
        ge=0,
        le=MAX_WAIT_S,
        description="longest backoff between retries (a server's Retry-After may ask for "
        "longer: it is waited for, up to the download's deadline, its slot let go meanwhile)",
    )
    max_download_bytes: int = Field(1024**3, ge=1, description="largest video downloaded")
    height: int = Field(
        360, ge=2, multiple_of=2, description="height of the transcoded videos (even: H.264)"
    )
    ffmpeg_threads: int = Field(1, ge=0, description="threads per ffmpeg (0: ffmpeg decides)")
    x264_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
        "veryslow", "placebo",
    ] = Field("veryfast", description="x264 preset of the transcode")  # fmt: skip
    x264_crf: int = Field(23, ge=0, le=51, description="x264 quality (lower is better)")
    transcode_timeout_s: float = Field(
        600.0, gt=0, le=MAX_WAIT_S, description="longest one transcode may run"
    )
    transcode_nice: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "how many steps below the pipeline's CPU priority ffmpeg runs (0: the same), so the "
            "Prefect UI, downloads and the depth model answer first on a busy machine"
        ),
    )
    task_retries: int = Field(2, ge=0, description="Prefect retries of a stage that crashed")
    ray_num_cpus: int | None = Field(
        None,
        ge=1,
        description=(
            "CPUs of the private local Ray (default: all); unused on a running cluster. A "
            "deployment run starts Ray before it reads its parameters: set "
            "VIDFLOW_DEPTH_RAY_NUM_CPUS in the worker's environment there"
        ),
    )

    @field_validator("output", "cache_dir")
    @classmethod
    def _home_expanded(cls, folder: Path) -> Path:
        """`~/x` is the home folder's x, as a shell would make it: from the environment or a
        quoted flag it came as written, and made a folder named `~` here."""
        return folder.expanduser()

    _frames_checked = field_validator("frames")(check_frames_spec)

    @field_validator("depth_model")
    @classmethod
    def _model_home_expanded(cls, model: str) -> str:
        return str(Path(model).expanduser()) if model.startswith("~") else model


def with_absolute_paths(settings: DepthSettings) -> DepthSettings:
    """`settings` with its folders as absolute paths: the output, the export cache and a depth
    model given as a local folder (Ray workers, on this node or a cluster's, do not share the
    driver's working directory)."""
    model = Path(settings.depth_model)
    local_model = not model.is_absolute() and model.exists()
    return settings.model_copy(
        update={
            "output": settings.output.resolve(),
            "cache_dir": settings.cache_dir.resolve(),
            "depth_model": str(model.resolve()) if local_model else settings.depth_model,
        }
    )


def shards_in_flight(settings: DepthSettings, cpus: int) -> int:
    """Shards started and not yet written at once: as many as transcodes fit on the CPUs, or
    the setting.

    One more adds a Ray worker (a process importing Prefect, 2-3 CPU-seconds) for its download,
    which costs more than it overlaps (measured: 48 videos on 2 CPUs took 55.7 s with 3 shards
    in flight and 6 workers, 45.7 s with 2 and 3)."""
    return settings.shards_in_flight or max(1, cpus // settings.transcode_cpus)
