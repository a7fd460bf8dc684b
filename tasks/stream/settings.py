"""The stream pipeline's settings: the broker and its topics, the producer, the consumer."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.certificates import pem_certificates
from common.settings import MAX_WAIT_S, Port, bind_address
from common.urls import shown_url

# How long a lost live source is opened again by default, once its frames stop (0: lost at once)
RECONNECT_S = 30.0

# Kafka's legal topic names (its Topic.validate: at most 249 of these characters)
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")

# The slowest pace taken: a frame every 1,000 s. Slower ones waited past what a thread's wait
# takes (threading.TIMEOUT_MAX at 1e-10 fps): a traceback after the first frame.
MIN_FPS = 0.001

# `--source env:NAME`: the source is the value of the environment variable NAME.
ENV_SOURCE_PREFIX = "env:"


class KafkaSettings(BaseSettings):
    """Where the Kafka-protocol broker is and what the topics are called."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_KAFKA_", allow_inf_nan=False)

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    frames_topic: str = Field("frames", description="topic the producer publishes frames to")
    results_topic: str = Field("predictions", description="topic the consumer publishes results to")
    dlq_topic: str = Field(
        "frames.dlq",
        description="dead-letter topic: malformed frames, and frames the service failed on "
        "--max-attempts times",
    )
    partitions: int = Field(4, ge=1, description="partitions for topics vidflow creates")
    # 1 suits the one local broker; on a cluster a topic with one replica loses its frames with
    # the broker that holds it. (Topics that exist already are used as they are.)
    replication_factor: int = Field(
        1,
        ge=-1,
        le=32767,  # the protocol's int16
        description="replicas of each topic vidflow creates (-1: the broker's "
        "default.replication.factor; 3 on a production cluster)",
    )
    # The producer's default message.max.bytes (1,000,000) refuses larger frames.
    # Bounds of librdkafka's own ranges: outside them the client refused to start, in a
    # traceback, after the topics were made.
    max_message_bytes: int = Field(
        10 * 1024 * 1024, ge=1000, le=1_000_000_000, description="largest frame message"
    )
    # Short session timeouts make a group join (and a takeover after a crash) quick; Tansu waits
    # session.timeout.ms / 2 before a join completes.
    session_timeout_ms: int = Field(
        6000, ge=1, le=3_600_000, description="consumer group session timeout"
    )
    max_poll_interval_ms: int = Field(
        300_000,
        ge=5000,  # a member stuck at its in-flight limit polls after 2-2.5 s (consumer.STUCK_S)
        le=86_400_000,
        description="longest a consumer may go without polling before its group drops it",
    )
    heartbeat_interval_ms: int = Field(
        1000, ge=1, le=3_600_000, description="consumer group heartbeat interval"
    )
    # librdkafka lets the broker hold a fetch up to 500 ms by default; frames are latency-bound.
    fetch_wait_max_ms: int = Field(
        5, ge=0, le=300_000, description="longest the broker may hold a fetch"
    )
    broker_grace_s: float = Field(
        30.0,
        gt=0,
        le=MAX_WAIT_S,
        description="how long produce/consume wait for a lost broker before they fail (exit 1); "
        "a broker not there at the start is waited for this long, 15 s at most",
    )
    # A managed or shared cluster wants TLS, SASL or both; librdkafka does them, these say how.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients reach the broker: TLS (SSL), SASL, both, neither"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)"
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    # From the environment only (no flag: a command line is visible to every account in `ps`);
    # shown as ********** wherever the settings are printed or stored.
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (VIDFLOW_KAFKA_SASL_PASSWORD only)"
    )
    # A file that is there: one missing failed in librdkafka as the first client was made, a
    # traceback (`~` is expanded: a variable's value gets no shell's).
    ssl_ca_location: FilePath | None = Field(
        None, description="CA certificate (PEM) that signed the broker's (default: the system's)"
    )

    @field_validator("ssl_ca_location", mode="before")
    @classmethod
    def _home_expanded(cls, value: object) -> object:
        if isinstance(value, str | Path):
            return Path(value).expanduser() if str(value) else None
        return value

    @field_validator("ssl_ca_location")
    @classmethod
    def _pem(cls, value: Path | None) -> Path | None:
        return None if value is None else pem_certificates(value)

    def __init__(self, **values: Any) -> None:
        """As pydantic-settings builds it, with the password hidden in a failed check's error:
        pydantic puts a model check's whole input there (the password read from the
        environment with it), and Prefect logs that input when a run's parameters fail."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _password_hidden(exc) from None

    @model_validator(mode="after")
    def _sasl_needs_a_user(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"--security-protocol {self.security_protocol} needs --sasl-username and "
                "VIDFLOW_KAFKA_SASL_PASSWORD"
            )
        return self

    @model_validator(mode="after")
    def _credentials_in_use(self) -> KafkaSettings:
        """SASL credentials or a CA under a protocol that does not use them were dropped
        without a word, and the broker then read as "unreachable"."""
        unused = []
        if not self.security_protocol.startswith("SASL"):
            unused += ["--sasl-username"] * bool(self.sasl_username)
            unused += ["VIDFLOW_KAFKA_SASL_PASSWORD"] * (self.sasl_password is not None)
        if not self.security_protocol.endswith("SSL") and self.ssl_ca_location is not None:
            unused.append("--ssl-ca-location")
        if unused:
            raise ValueError(
                f"{' and '.join(unused)} given, but --security-protocol {self.security_protocol} "
                "does not use them: set --security-protocol (SASL_SSL, SASL_PLAINTEXT, SSL), "
                "or leave them out"
            )
        return self

    @model_validator(mode="after")
    def _topics_apart(self) -> KafkaSettings:
        """One topic in two roles loops: dead letters keep their frame's headers, so a dead
        letter read from the dead-letter topic as a frame that fails again is written back to
        it, for ever; results read as frames are all dead letters."""
        roles = {"--frames-topic": self.frames_topic, "--results-topic": self.results_topic,
                 "--dlq-topic": self.dlq_topic}  # fmt: skip
        for topic in set(roles.values()):
            if len(same := [flag for flag, name in roles.items() if name == topic]) > 1:
                raise ValueError(
                    f"{' and '.join(same)} are both {topic!r}: each role needs its own topic"
                )
        return self

    @field_validator("frames_topic", "results_topic", "dlq_topic")
    @classmethod
    def _kafka_topic_name(cls, value: str) -> str:
        """Kafka's own rule, said before anything starts (a broker refuses such a name only as
        the topic is made, and some, such as Tansu, take it)."""
        if not TOPIC_NAME.fullmatch(value) or value in {".", ".."}:
            raise ValueError(
                f"{value!r} is no Kafka topic name: 1 to 249 of the letters a-z and A-Z, the "
                "digits, '.', '_' and '-'"
            )
        return value

    @model_validator(mode="after")
    def _poll_interval_past_session(self) -> KafkaSettings:
        if self.max_poll_interval_ms < self.session_timeout_ms:  # librdkafka refuses it
            raise ValueError(
                f"--max-poll-interval-ms ({self.max_poll_interval_ms}) must be at least "
                f"--session-timeout-ms ({self.session_timeout_ms})"
            )
        return self

    def client_config(self) -> dict[str, Any]:
        """librdkafka's settings to reach the broker: where, and with TLS and SASL as set.
        Every client (producer, group member, admin, results reader) starts from these."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.security_protocol != "PLAINTEXT":
            config["security.protocol"] = self.security_protocol
        if self.security_protocol.startswith("SASL") and self.sasl_password is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        return config

    @property
    def topics(self) -> list[str]:
        """Every topic a stream run uses."""
        return [self.frames_topic, self.results_topic, self.dlq_topic]

    @field_validator("replication_factor")
    @classmethod
    def _replicas_or_broker_default(cls, value: int) -> int:
        if value == 0:
            raise ValueError("a topic needs at least 1 replica (-1: the broker's default)")
        return value

    def with_fresh_topics(self, suffix: str, partitions: int | None = None) -> KafkaSettings:
        """These settings with every topic named anew (`NAME-suffix`), so a run, a benchmark
        round or a sweep step sees no other's messages; `partitions` for topics made now."""
        return self.model_copy(
            update={
                "frames_topic": f"{self.frames_topic}-{suffix}",
                "results_topic": f"{self.results_topic}-{suffix}",
                "dlq_topic": f"{self.dlq_topic}-{suffix}",
                "partitions": self.partitions if partitions is None else partitions,
            }
        )


def source_list(source: str) -> list[str]:
    """The run's sources (`source_parts`), each `env:NAME` replaced by the value of the
    variable NAME (`resolved_source`)."""
    sources = [resolved_source(part) for part in source_parts(source)]
    if not sources:
        raise ValueError("--source names no video file, webcam or stream")
    return sources


def source_parts(source: str) -> list[str]:
    """`--source` as written: one source, or several separated by commas; a file whose name
    holds a comma is one source (`clip,v2.mp4` was split into two missing files), and so is a
    URL with a comma in its password, query or fragment (`rtsp://admin:pa,ss@cam/live` was
    split, and the refusal of "ss@cam/live" as a missing file showed part of the password)."""
    if Path(source).is_file():
        return [source]
    pieces = source.split(",")
    parts: list[str] = []
    index = 0
    while index < len(pieces):
        piece = pieces[index]
        host_at = _password_end(parts[-1], pieces, index) if parts else None
        if host_at is not None:  # the rest of a password, up to its host's `@`
            parts[-1] = ",".join([parts[-1], *pieces[index : host_at + 1]])
            index = host_at + 1
            continue
        if parts and _continues_url(parts[-1], piece):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
        index += 1
    return [part.strip() for part in parts if part.strip()]


_FILE_NAME = re.compile(r"\.[A-Za-z][A-Za-z0-9]{1,3}$")  # ends like a file name: `clip2.mp4`


def _password_end(so_far: str, pieces: list[str], index: int) -> int | None:
    """Where a password cut at a comma ends: the first piece from `index` on that holds its
    host's `@`, where `so_far` is a URL's `scheme://user:pa` (not `host:port`, not `[v6]`)
    and no other URL starts before it; None otherwise."""
    _, found, rest = so_far.partition("://")
    user, colon, secret = rest.partition(":")
    if not found or not colon or "@" in rest or "/" in rest or user.startswith("["):
        return None
    if secret.isdigit():  # `cam:554`: a port, no password
        return None
    for at, piece in enumerate(pieces[index:], start=index):
        if "://" in piece:
            return None
        if "@" in piece.split("/", 1)[0]:
            return at
    return None


def _continues_url(so_far: str, piece: str) -> bool:
    """Whether `piece`, after a comma, is the rest of the URL `so_far` (in its query or
    fragment), not a source of its own: a URL, `webcam:N`, `env:NAME`, a path, a file that is
    there, or a name that reads as one (a mistyped file after a URL is refused as missing, not
    read as part of the URL)."""
    _, found, rest = so_far.partition("://")
    piece = piece.strip()
    if not found or not piece or "://" in piece or Path(piece).is_file():
        return False
    if piece.startswith(("webcam:", ENV_SOURCE_PREFIX, "/", "./", "~")):
        return False
    if "#" in rest:  # a fragment (`#t=1,2`): what follows is in it
        return True
    if "?" in rest:  # a query: `a=1,b=2` or `ch=1,2`
        return "=" in piece or ("/" not in piece and not _FILE_NAME.search(piece))
    return False  # in a path a comma parts sources (such a URL goes as `env:NAME`)


def resolved_source(source: str) -> str:
    """`source`, or for `env:NAME` the source the environment variable NAME holds.

    A camera URL often carries its password (`rtsp://admin:pw@cam/live`). Named by a variable,
    only the name is in a Prefect deployment's parameters, the UI and the run's records; the
    URL is read where the producer runs (for a deployment: the worker's environment). A value
    that is no URL, camera or file is refused without being echoed: a mistyped URL
    (`rtsp:/admin:pw@cam`) would otherwise be shown, password and all, as a missing file."""
    if not source.startswith(ENV_SOURCE_PREFIX) or Path(source).is_file():
        return source
    name = source.removeprefix(ENV_SOURCE_PREFIX).strip()
    value = os.environ.get(name) if name else None
    if value is None or not value.strip():
        where = (
            "names no variable"
            if not name
            else f"the variable {name} is " + ("not set" if value is None else "empty")
        )
        raise ValueError(
            f"--source {source}: {where} here; set it to the camera's URL or file where the "
            "producer runs (for a deployment: in the Prefect worker's environment)"
        )
    value = value.strip()
    if "://" not in value and not value.startswith("webcam:") and not Path(value).is_file():
        raise ValueError(
            f"--source {source}: the value of {name} is neither a URL (scheme://...), "
            "webcam:N nor a file here (not shown: it may hold a password)"
        )
    return value


def shown_sources(sources: list[str]) -> str:
    """The sources as logs, stats and reports show them: camera URLs without a password or
    token."""
    return ",".join(shown_url(source) for source in sources)


def check_fps(value: str) -> str:
    """A frame rate as the producer takes it: `native`, `max` or a positive number; refused
    when the settings are made, not when the first source opens."""
    if value in ("native", "max"):
        return value
    try:
        fps = float(value)
    except ValueError:
        fps = 0.0
    if not MIN_FPS <= fps < float("inf"):
        raise ValueError(
            f"fps must be a number from {MIN_FPS:g} (a frame every {1 / MIN_FPS:g} s), native "
            f"or max (got {value!r})"
        )
    return value


HIDDEN = "**********"


def _password_hidden(error: ValidationError) -> ValidationError:
    """`error` with the SASL password in no input it shows."""
    details: list[Any] = []
    for item in error.errors():
        shown = item["input"]
        if item["loc"][-1:] == ("sasl_password",):
            shown = HIDDEN
        elif isinstance(shown, dict) and shown.get("sasl_password") is not None:
            shown = {**shown, "sasl_password": HIDDEN}
        # Made again with its words as they were (pydantic-core knows only its own types).
        kind = PydanticCustomError(item["type"], item["msg"])
        details.append({"type": kind, "loc": item["loc"], "input": shown})
    return ValidationError.from_exception_data(error.title, details)


class ProducerSettings(BaseSettings):
    """`vidflow produce`: frames from a video file, a webcam or an RTSP stream."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_PRODUCER_")

    source: str = Field(
        ...,
        description=(
            "video file, webcam:N, rtsp://... or env:NAME (the URL in variable NAME, so its "
            "password is in no command line or record); several, comma-separated, are several "
            "cameras (each paced at its own rate, named after its file)"
        ),
    )
    fps: str = Field("native", description="frames per second: a number, native or max")
    loop: bool = Field(False, description="start the file again at its end")
    max_frames: int | None = Field(
        None, ge=1, description="stop after this many frames (per stream)"
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of published frames")
    stream_id: str | None = Field(
        None,
        description="stream id of a single source (default: its name); with --streams N, the base",
    )
    streams: int = Field(
        1,
        ge=1,
        description=(
            "replay each source as this many live cameras (ids BASE-0 .. BASE-N-1), each paced "
            "at --fps, starts staggered over one frame period; --max-frames counts per camera"
        ),
    )

    reconnect_s: float = Field(
        RECONNECT_S,
        ge=0,
        description=(
            "a live source (camera, stream) that stops giving frames is opened again, with "
            "backoff, for up to this many seconds after its frames stop, then lost (0: lost at "
            "once; inf: tried for ever)"
        ),
    )

    _fps_checked = field_validator("fps")(check_fps)


class ConsumerSettings(BaseSettings):
    """`vidflow consume`: a consumer-group member that classifies frames."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_CONSUMER_")

    group: str = Field("vidflow-classifier", description="consumer group id")
    concurrency: int = Field(
        8,
        ge=1,
        description="inference calls in flight (with --max-frame-age-ms no more than the "
        "service works on at once, plus one, shared by --group-members)",
    )
    group_members: int = Field(
        1,
        ge=1,
        description="consumers that share the service (a stream benchmark sets its group's): "
        "with --max-frame-age-ms each keeps its share of the calls the service works on",
    )
    duration: float = Field(30.0, gt=0, description="seconds to run before the summary")
    idle_timeout: float | None = Field(
        None, gt=0, description="stop after this many seconds without a message (input exhausted)"
    )
    max_frames: int | None = Field(None, ge=1, description="stop after this many frames")
    summary_json: Path | None = Field(None, description="write the summary here as JSON")
    metrics_port: Port | None = Field(None, description="serve Prometheus /metrics on this port")
    metrics_host: str = Field(
        "127.0.0.1", description="address /metrics binds to (0.0.0.0: every interface)"
    )
    # Finite: gRPC read a deadline of inf (or past ~7e9 s) as long past, every call failed at
    # once and each frame went to the dead-letter topic.
    rpc_timeout_s: float = Field(
        10.0, gt=0, le=MAX_WAIT_S, description="deadline of one inference call"
    )
    # At least the first retry's backoff: at 0 a down service was called in a tight loop.
    retry_max_backoff_s: float = Field(
        5.0, ge=0.1, le=3600, description="longest wait between retries"
    )
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
    produced_since_ms: int | None = Field(
        None,
        description=(
            "frames produced before this time (ms since the epoch, the message timestamp) are "
            "passed over, uncounted: a benchmark's new group reads only its own run's frames"
        ),
    )
    producer_session: str | None = Field(
        None,
        pattern=r"^[0-9A-Za-z_-]{1,64}$",
        description=(
            "only frames of this producer start (the session `vidflow produce` logs) are "
            "classified; the others are passed over, uncounted, as with --produced-since-ms"
        ),
    )

    # An empty one (compose's `${HOST:-}`) bound every interface: `bind_address`.
    _metrics_host_checked = field_validator("metrics_host")(bind_address)
