"""All of vidflow's settings, in one place.

Every setting is read from an environment variable with a ``VIDFLOW_`` prefix (for example
``VIDFLOW_INFERENCE_PORT``) and can be overridden by the matching CLI flag (``--port``).
Precedence: flag, then environment, then the default written here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The real sample clips live beside the checkout (../shared/data), as in CI.
SAMPLE_VIDEOS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "videos"
SAMPLE_VIDEO = SAMPLE_VIDEOS_DIR / "k400_arm_wrestling.mp4"
KINETICS_VAL_CSV = SAMPLE_VIDEOS_DIR.parent / "kinetics" / "kinetics-400_val.csv"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vidflow"


class LogSettings(BaseSettings):
    """Where log lines go. Lines always carry ISO-8601 UTC timestamps."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_LOG_")

    level: str = Field("INFO", description="log level (DEBUG, INFO, WARNING, ERROR)")
    file: Path | None = Field(None, description="also append log lines to this file")


class InferenceSettings(BaseSettings):
    """The gRPC inference service (`vidflow serve`)."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_INFERENCE_")

    host: str = Field("127.0.0.1", description="address the gRPC and HTTP ports bind to")
    port: int = Field(50051, description="gRPC port")
    http_port: int = Field(8000, description="HTTP port for /healthz, /readyz and /metrics")
    model: str = Field("efficientnet_lite0", description="model name from the registry")
    weights: Path | None = Field(
        None, description="local weights file (state_dict); default: the model's own source"
    )
    onnx_model: Path | None = Field(
        None,
        description="a ready exported .onnx file (onnx backend only; needs no torch at run time)",
    )
    backend: Literal["eager", "torchscript", "onnx"] = Field(
        "onnx", description="inference backend"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run the model")
    strict_device: bool = Field(False, description="fail instead of falling back to CPU")
    max_batch_size: int = Field(8, ge=1, description="largest batch the batcher forms")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, description="longest a request waits for a batch to fill"
    )
    batching: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "hold requests to form batches: on, off (each request runs alone at once), or auto: "
            "on only if the model, measured at start-up on this device, does more images/s at "
            "--max-batch-size than at batch 1 (--batching-min-speedup)"
        ),
    )
    batching_min_speedup: float = Field(
        1.25,
        gt=1.0,
        description="the gain in images/s from batch 1 to the largest batch that auto batches at",
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, description="largest request accepted (RESOURCE_EXHAUSTED above)"
    )
    max_image_pixels: int = Field(40_000_000, description="largest image (width x height) accepted")
    preprocess_threads: int = Field(
        0,
        ge=0,
        description="threads that decode one batch's images in parallel (0: its model worker)",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        description=(
            "model workers: batches run at once (0: auto: on onnx cores + 1 on CPU, 2 on CUDA; "
            "1 on torch backends)"
        ),
    )
    inference_threads: int = Field(
        0, ge=0, description="threads one model call may use (0: auto, cores / workers)"
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR / "models", description="where exported models are cached"
    )
    shutdown_grace_s: float = Field(30.0, description="how long SIGTERM waits for calls in flight")
    tls_cert: Path | None = Field(
        None, description="serve gRPC over TLS with this PEM certificate (chain); needs --tls-key"
    )
    tls_key: Path | None = Field(None, description="the PEM private key of --tls-cert")
    reflection: bool = Field(
        True, description="offer gRPC server reflection (service listing for grpcurl and the like)"
    )

    @model_validator(mode="after")
    def _tls_cert_and_key_together(self) -> InferenceSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        return self


class ClientSettings(BaseSettings):
    """How clients (`vidflow classify`, `vidflow loadtest`, the consumer) reach the service."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_INFERENCE_")

    target: str = Field("127.0.0.1:50051", description="gRPC address HOST:PORT of the service")
    tls_ca: Path | None = Field(
        None, description="reach the service over TLS, trusting this PEM CA certificate"
    )


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[BaseModel], *, only: list[str] | None = None
) -> None:
    """Add one flag per settings field; flags default to None so unset ones fall through."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        if only is not None and name not in only:
            continue
        env_name = f"{prefix}{name}".upper()
        default = "required" if field.is_required() else f"default {field.default}"
        help_text = f"{field.description} (env {env_name}; {default})"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices = get_args(annotation) if get_origin(annotation) is Literal else None
        parser.add_argument(_flag(name), dest=name, default=None, choices=choices, help=help_text)


def settings_from_args(settings_cls: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """Build settings where given flags win over the environment and the defaults."""
    given: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in settings_cls.model_fields and value is not None
    }
    return settings_cls(**given)


class KafkaSettings(BaseSettings):
    """Where the Kafka-protocol broker is and what the topics are called."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_KAFKA_")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    frames_topic: str = Field("frames", description="topic the producer publishes frames to")
    results_topic: str = Field("predictions", description="topic the consumer publishes results to")
    dlq_topic: str = Field("frames.dlq", description="dead-letter topic for undecodable frames")
    partitions: int = Field(4, ge=1, description="partitions for topics vidflow creates")
    # The producer's default message.max.bytes (1,000,000) refuses larger frames.
    max_message_bytes: int = Field(10 * 1024 * 1024, description="largest frame message")
    # Short session timeouts make a group join (and a takeover after a crash) quick; Tansu waits
    # session.timeout.ms / 2 before a join completes.
    session_timeout_ms: int = Field(6000, description="consumer group session timeout")
    heartbeat_interval_ms: int = Field(1000, description="consumer group heartbeat interval")
    # librdkafka lets the broker hold a fetch up to 500 ms by default; frames are latency-bound.
    fetch_wait_max_ms: int = Field(5, description="longest the broker may hold a fetch")
    broker_grace_s: float = Field(
        30.0,
        gt=0,
        description="how long produce/consume wait for a lost broker before they fail (exit 1)",
    )

    @property
    def topics(self) -> list[str]:
        """Every topic a stream run uses."""
        return [self.frames_topic, self.results_topic, self.dlq_topic]


class ProducerSettings(BaseSettings):
    """`vidflow produce`: frames from a video file, a webcam or an RTSP stream."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_PRODUCER_")

    source: str = Field(..., description="video file, webcam:N or rtsp://...")
    fps: str = Field("native", description="frames per second: a number, native or max")
    loop: bool = Field(False, description="start the file again at its end")
    max_frames: int | None = Field(None, description="stop after this many frames (per stream)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of published frames")
    stream_id: str | None = Field(
        None, description="stream id (default: the source's name); with --streams N, the base"
    )
    streams: int = Field(
        1,
        ge=1,
        description=(
            "replay the source as this many live cameras (ids BASE-0 .. BASE-N-1), each paced "
            "at --fps, starts staggered over one frame period; --max-frames counts per camera"
        ),
    )


class ConsumerSettings(BaseSettings):
    """`vidflow consume`: a consumer-group member that classifies frames."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_CONSUMER_")

    group: str = Field("vidflow-classifier", description="consumer group id")
    concurrency: int = Field(8, ge=1, description="inference calls in flight")
    duration: float = Field(30.0, gt=0, description="seconds to run before the summary")
    idle_timeout: float | None = Field(
        None, description="stop after this many seconds without a message (input exhausted)"
    )
    max_frames: int | None = Field(None, description="stop after this many frames")
    summary_json: Path | None = Field(None, description="write the summary here as JSON")
    metrics_port: int | None = Field(None, description="serve Prometheus /metrics on this port")
    metrics_host: str = Field(
        "127.0.0.1", description="address /metrics binds to (0.0.0.0: every interface)"
    )
    rpc_timeout_s: float = Field(10.0, description="deadline of one inference call")
    retry_max_backoff_s: float = Field(5.0, description="longest wait between retries")
    max_attempts: int = Field(
        3,
        ge=1,
        description=(
            "calls for a frame the service fails on (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, ...) "
            "before it goes to the dead-letter topic; UNAVAILABLE waits for the service instead"
        ),
    )
    max_frame_age_ms: float | None = Field(
        None,
        gt=0,
        description=(
            "latency budget: a frame older than this (since capture) when its inference call "
            "is due is not classified but gets a result record skipped=stale (default: off)"
        ),
    )


class DepthSettings(BaseSettings):
    """`vidflow depth` and the depth-extraction flow: download, transcode, depth maps, storage."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_DEPTH_")

    output: Path = Field(Path("depth-output"), description="folder for videos, maps and tables")
    depth_model: str = Field(
        "apple/DepthPro-hf", description="depth model: a Hugging Face hub id or a local folder"
    )
    frames: str = Field(
        "first", description="frames to run depth on: first, middle, uniform:N or all"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where depth runs")
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
        description=(
            "how long a loaded depth model waits for the next run on a cluster that outlives "
            "this one (0: it ends with the run)"
        ),
    )
    shard_size: int = Field(
        0, ge=0, description="videos per shard, the unit of scheduling (0: auto, 1 to 32)"
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
    connect_timeout_s: float = Field(10.0, gt=0, description="time allowed to connect")
    read_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next bytes")
    download_deadline_s: float = Field(
        1800.0, gt=0, description="longest one video's download may take, retries included"
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
        30.0, gt=0, description="seconds over which download_min_rate_bps is measured"
    )
    download_retries: int = Field(4, ge=0, description="retries after a transient failure")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay, doubled each time")
    retry_backoff_max_s: float = Field(30.0, ge=0, description="longest retry delay")
    max_download_bytes: int = Field(1024**3, ge=1, description="largest video downloaded")
    height: int = Field(360, ge=2, description="height of the transcoded videos")
    ffmpeg_threads: int = Field(1, ge=0, description="threads per ffmpeg (0: ffmpeg decides)")
    x264_preset: str = Field("veryfast", description="x264 preset of the transcode")
    x264_crf: int = Field(23, ge=0, le=51, description="x264 quality (lower is better)")
    transcode_timeout_s: float = Field(600.0, gt=0, description="longest one transcode may run")
    task_retries: int = Field(2, ge=0, description="Prefect retries of a stage that crashed")
    ray_num_cpus: int | None = Field(
        None, description="CPUs of the local Ray instance (default: all); unused with RAY_ADDRESS"
    )
