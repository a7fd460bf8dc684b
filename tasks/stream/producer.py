"""`vidflow produce`: read frames from video files, webcams or RTSP streams, publish JPEG frames.

Paced at each source's frame rate by default, so a file behaves like a live camera; `--fps max`
publishes as fast as frames can be read and encoded. Several sources (`--source a.mp4,webcam:0`)
are several cameras in one process, each read, paced and published by a thread of its own.
`--streams N` replays each source as N independent cameras: each decoded frame is JPEG-encoded
once and published N times, each copy with its own camera's stream id, frame index and capture
time, the cameras' clocks staggered by 1/N of a frame period. A live source (a webcam, an
rtsp:// or other stream) is read on a thread of its own that keeps only its newest frame: a
producer that falls behind drops frames (`frames_dropped`) rather than publish ever older ones;
one that drops out is opened again for up to `--reconnect-s` (`source_reconnects`), and lost
after that (`source_error`). A broker gone for longer than
`--broker-grace-s` ends the run with `broker_error` set; the frames it never took count as failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from common.frames import encode_jpeg, opened_video
from common.urls import shown_url, without_userinfo
from tasks.stream.broker_watch import BrokerLostError, BrokerWatch
from tasks.stream.frame_codec import (
    KEY_SEPARATOR,
    MAX_STREAM_ID_CHARS,
    Frame,
    encode_frame_headers,
    new_session,
)
from tasks.stream.kafka_io import make_producer, produce_with_backpressure
from tasks.stream.live_source import LatestFrame, has_no_end, is_live, open_live
from tasks.stream.settings import KafkaSettings, ProducerSettings, shown_sources, source_list

log = logging.getLogger(__name__)
FALLBACK_FPS = 30.0
MAX_NATIVE_FPS = 240.0  # a higher native rate is a time base misread as one


@dataclass
class ProduceStats:
    """What one produce run did; `frames_read` counts messages published, over all streams."""

    stream_id: str  # the stream id base of each source, comma-separated
    source: str
    frames_read: int = 0
    delivered: int = 0
    failed: int = 0
    bytes_published: int = 0
    duration_s: float = 0.0
    target_fps: float | None = None  # per stream (the first source's, where they differ)
    # each camera's pace (None: --fps max), where several sources run at rates of their own
    target_fps_per_stream: dict[str, float | None] = field(default_factory=dict)
    broker_error: str | None = None
    source_error: str | None = None  # a live source (camera, stream) that stopped giving frames
    streams: int = 1
    frames_decoded: int = 0  # source frames decoded and encoded (once for all its streams)
    # live frames replaced by a newer one before the producer had time for them (live_source)
    frames_dropped: int = 0
    source_reconnects: int = 0  # times a live source dropped out and was opened again
    per_stream: dict[str, int] = field(default_factory=dict)  # messages published per stream id
    session: str = field(default_factory=new_session)  # in every frame's key (frame_codec)
    # Wall-clock time (ns) of the pacing schedule's start: with `fps`, camera i of N's frame k
    # is due (k + i/N) frame periods after it, and is never taken before.
    schedule_start_ns: int = 0
    # Per partition of the frames topic, the offset after the last frame delivered there: where
    # a benchmark's consumers have read all of this run's frames (input_end.InputEnd). None
    # where a delivery came back without its offset.
    partition_ends: dict[int, int] | None = field(default_factory=dict)

    @property
    def fps(self) -> float:
        """Messages published per second, all streams together."""
        return self.frames_read / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "fps": round(self.fps, 2)}

    def frames_end(self) -> dict[int, int] | None:
        """`partition_ends` where they are sure: not where frames may be on the broker without
        a delivery report (a flush that ran out, a broker lost) or a report lacked its offset."""
        return None if self.failed or self.broker_error else self.partition_ends


@dataclass(frozen=True)
class Camera:
    """One replayed camera: its stream id and the partition that keeps its frames in order."""

    stream_id: str
    partition: int | None  # None: librdkafka's partitioner picks by key (one stream)


@contextlib.contextmanager
def open_source(source: str) -> Iterator[cv2.VideoCapture]:
    """A capture for `webcam:N`, an rtsp:// (or any URL OpenCV reads) or a video file, released
    when the block ends. A missing file raises FileNotFoundError, a source OpenCV cannot open
    ValueError, so a bad source fails before anything is published."""
    capture = _opened_capture(source)
    try:
        yield capture
    finally:
        capture.release()


def _opened_capture(source: str) -> cv2.VideoCapture:
    """`open_source`'s capture, the caller's to release."""
    capture = cv2.VideoCapture(_checked_target(source))
    if not capture.isOpened():
        capture.release()
        raise ValueError(f"cannot open video source {shown_url(source)}")
    return capture


@contextlib.contextmanager
def _opened_feed(
    source: str, reconnect_s: float
) -> Iterator[tuple[cv2.VideoCapture, LatestFrame | None]]:
    """A source's capture, and for a live one (a camera, a stream) the `LatestFrame` that
    reads it, so that a producer that falls behind drops frames instead of lagging."""
    opened = None if is_live(source) else _opened_capture(source)
    if opened is not None and not has_no_end(source, opened):
        try:
            yield opened, None
        finally:
            opened.release()
        return
    if opened is not None:  # read as a file, an IP camera's frames came older and older
        log.info("%s is a stream with no end: read live", shown_url(source))
    with open_live(_checked_target(source), shown_url(source), reconnect_s, opened) as latest:
        yield latest.capture, latest


def _say_if_cut_short(feed: Feed) -> None:
    """Warn when a file stops giving frames well before the count its header gives: a damaged
    region ends the stream there (the end of a file and a lost camera read the same to OpenCV,
    and a file's replay once ended there in silence, 80 frames of 280)."""
    total = int(feed.capture.get(cv2.CAP_PROP_FRAME_COUNT))
    at = int(feed.capture.get(cv2.CAP_PROP_POS_FRAMES))
    if total > 0 and at < total * 0.95:
        log.warning(
            "%s: no frame could be decoded after frame %d of %d (damaged or cut short?): its "
            "stream ends there", shown_url(feed.source), at, total,
        )  # fmt: skip


def _capture_target(source: str) -> str | int:
    """What OpenCV opens for `source`: a camera's index, else the path or URL."""
    if not source.startswith("webcam:"):
        return source
    index = source.split(":", 1)[1]
    if not index.isdigit():
        raise ValueError(f"webcam:N takes a camera index, a number like webcam:0 (got {source!r})")
    return int(index)


def _checked_target(source: str) -> str | int:
    """`_capture_target`, refusing a video file that is not there (FileNotFoundError)."""
    target = _capture_target(source)
    if isinstance(target, str) and "://" not in target and not Path(target).is_file():
        raise FileNotFoundError(f"video file not found: {source}")
    return target


def check_sources(source: str, stream_id: str | None = None, streams: int = 1) -> None:
    """Refuse a missing file, a file with no video frame or a malformed webcam in `--source`,
    and a `--stream-id` that cannot name them (`stream_bases`), before a broker is contacted or
    a run starts (a camera or a stream is opened by the run itself: opening it here would take
    it for a moment, or wait on the network)."""
    sources = source_list(source)
    stream_bases(sources, stream_id, streams)
    for one in sources:
        target = _checked_target(one)
        if isinstance(target, int):
            _check_camera_device(target)
        elif "://" not in target:
            with opened_video(target) as capture:
                if not capture.grab():  # a capture that did not open grabs nothing
                    raise ValueError(f"{one}: no video frame could be read (not a video?)")


def _check_camera_device(index: int) -> None:
    """On Linux, refuse `webcam:N` where there is no /dev/videoN (OpenCV opens cameras there by
    index): seen from the device list, without opening a camera another program may be using.
    Elsewhere (macOS, Windows) cameras have no device file, and the run's own open says it."""
    devices = Path("/dev")
    if not sys.platform.startswith("linux") or (devices / f"video{index}").exists():
        return
    numbers = (path.name.removeprefix("video") for path in devices.glob("video*"))
    present = sorted(int(number) for number in numbers if number.isdigit())
    have = ", ".join(f"webcam:{number}" for number in present) or "none"
    raise ValueError(
        f"webcam:{index}: no camera /dev/video{index} on this machine (cameras: {have})"
    )


def target_fps(setting: str, capture: cv2.VideoCapture) -> float | None:
    """Frames per second to pace at; None means as fast as possible."""
    if setting == "max":
        return None
    if setting == "native":
        native = capture.get(cv2.CAP_PROP_FPS)
        if native and 0 < native <= MAX_NATIVE_FPS:
            return native
        # Some containers report their time base (1000, 90000) as the rate: replayed at that
        # pace, the file went by at full speed under a target of 1000 fps.
        log.warning("the source reports %r frames/s: paced at %g", native, FALLBACK_FPS)
        return FALLBACK_FPS
    fps = float(setting)
    if fps <= 0:
        raise ValueError(f"--fps must be positive, native or max (got {setting})")
    return fps


def run_cameras(bases: list[str], streams: int, partitions: int) -> list[list[Camera]]:
    """The cameras of a run, per source: a source's `base` alone, or `base-0` .. `base-(N-1)`.

    Hashing the keys (librdkafka's default) can put several cameras of one run in the same
    partition (cam-0 .. cam-3 all land in partition 0 of 2), and then one consumer of a group
    gets them all. The run's camera k goes to partition (crc32(first base) + k) mod partitions
    instead: one camera still stays in one partition, in order, and a run's cameras spread
    evenly. A run of one camera leaves the partition to the key."""
    if len(bases) * streams == 1:
        return [[Camera(bases[0], None)]]
    first = zlib.crc32(bases[0].encode())
    names = [[base] if streams == 1 else [f"{base}-{i}" for i in range(streams)] for base in bases]
    return [
        [Camera(name, (first + j * streams + i) % partitions) for i, name in enumerate(group)]
        for j, group in enumerate(names)
    ]


def source_name(source: str) -> str:
    """The default stream id of a source: a file's name, `webcam:N` as it is, and for a URL
    its host and path (`rtsp://admin:pw@10.0.0.5:554/live` -> `10.0.0.5-live`). The id is in
    every Kafka key, result record and log line, so a URL's password or token never is."""
    if "://" not in source:
        return Path(source).stem or source
    try:  # userinfo first: a password typed with `/` or `#` would read as the host and path
        parts = urlsplit(without_userinfo(source))
        host = parts.hostname or ""
    except ValueError:  # e.g. an unclosed IPv6 bracket; OpenCV refuses it when opened
        return shown_url(source)
    return "-".join([host, *(part for part in parts.path.split("/") if part)]) or parts.scheme


def stream_bases(sources: list[str], stream_id: str | None, streams: int = 1) -> list[str]:
    """Each source's stream id (base): `--stream-id` for one source, else `source_name`;
    names that repeat get `-2`, `-3`, ... so no two cameras share an id."""
    if stream_id and len(sources) > 1:
        raise ValueError("--stream-id names one source's stream; several are named by their files")
    if stream_id and KEY_SEPARATOR in stream_id:
        raise ValueError(
            f"--stream-id {stream_id!r}: {KEY_SEPARATOR!r} parts the stream from the producer's "
            "session in result keys; choose an id without it"
        )
    if stream_id:
        room = MAX_STREAM_ID_CHARS - (STREAM_SUFFIX_CHARS if streams > 1 else 0)  # `-N` added
        if len(stream_id) > room:
            raise ValueError(
                f"--stream-id is {len(stream_id)} characters: at most {room} "
                f"{'with --streams ' if streams > 1 else ''}(consumers refuse longer ids)"
            )
        return [stream_id]
    bases: list[str] = []
    for source in sources:
        # A long URL path made an id the consumers refused: every frame dead-lettered.
        name = base = _within_id_limit(source_name(source).replace(KEY_SEPARATOR, "-"))
        copy = 1
        while base in bases:  # also past a `-2` that an earlier copy or another file took
            copy += 1
            base = f"{name}-{copy}"
        bases.append(base)
    return bases


# Room kept in a stream id for what is added to it: `-2` for a repeated name, `-N` of --streams.
STREAM_SUFFIX_CHARS = 16


def _within_id_limit(name: str) -> str:
    """`name`, or where it is too long to be a stream id, its start and a hash of the whole."""
    room = MAX_STREAM_ID_CHARS - STREAM_SUFFIX_CHARS
    if len(name) <= room:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: room - 11]}-{digest}"


# What a topic's metadata says for a moment after it is made (librdkafka leaves these errors'
# retriable flag unset): asked again, until the start's timeout.
FOR_NOW = frozenset(
    [KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
     KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.REQUEST_TIMED_OUT]
)  # fmt: skip


def _partition_count(producer: Producer, topic: str, timeout_s: float = 15.0) -> int:
    """The topic's partitions, asked again while the broker says so only for now: a topic just
    made has no leader for a moment (LEADER_NOT_AVAILABLE), and a run of several cameras
    failed at its start as if the topic had no partitions."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            metadata = producer.list_topics(topic, timeout=5).topics[topic]
        except KafkaException as exc:  # no answer in time, a transport error: asked again
            error, for_good = exc.args[0], False
        else:
            if metadata.error is None and metadata.partitions:
                return len(metadata.partitions)
            error = metadata.error
            for_good = error is not None and error.code() not in FOR_NOW
        if for_good or time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} has no partitions: {error}")
        time.sleep(0.5)


@dataclass(frozen=True)
class Feed:
    """One source of the run: its open capture, its pace and its cameras."""

    source: str
    capture: cv2.VideoCapture
    fps: float | None  # None: as fast as possible
    cameras: list[Camera]
    native: bool  # paced at the rate the source reports (--fps native)
    live: LatestFrame | None = None  # a camera or stream, read on a thread of its own

    @property
    def pace(self) -> float | None:
        """The rate its turns are scheduled at: a live source at its native rate sets its own
        pace (each turn waits for its next frame; paced at the rate it reports as well, a
        camera that said 25 and sent 30 frames a second lost 5 of them every second)."""
        return None if self.live is not None and self.native else self.fps

    def next_image(
        self, stop: threading.Event, idle: Callable[[], None]
    ) -> tuple[np.ndarray, int] | None:
        """The source's next frame and when it was taken (ns, wall clock); None at its end
        (or, for a live source, on `stop`; `idle` runs while it waits for a frame)."""
        if self.live is not None:
            return self.live.take(stop, idle)
        taken_ns = time.time_ns()  # a file's frame is taken when its turn comes
        ok, image = self.capture.read()
        return (image, taken_ns) if ok else None


def produce_frames(
    settings: ProducerSettings,
    kafka: KafkaSettings,
    stop: threading.Event | None = None,
    session: str | None = None,
    producing: threading.Event | None = None,
) -> ProduceStats:
    """Publish frames until the sources end (unless --loop), --max-frames per stream, or `stop`.
    `session`: the one its frames carry, where the caller's consumers count only those (a new
    one by default). `producing` is set as the first frame's schedule starts (its sources open,
    its broker client made), where a caller times the run from."""
    stop = stop or threading.Event()
    sources = source_list(settings.source)
    bases = stream_bases(sources, settings.stream_id, settings.streams)
    with contextlib.ExitStack() as held:
        opened = [
            held.enter_context(_opened_feed(source, settings.reconnect_s)) for source in sources
        ]
        watch = BrokerWatch(kafka.bootstrap_servers, kafka.broker_grace_s)
        producer = make_producer(kafka, watch)
        n = len(sources) * settings.streams
        partitions = _partition_count(producer, kafka.frames_topic) if n > 1 else 1
        feeds = _feeds(sources, opened, run_cameras(bases, settings.streams, partitions), settings)
        paces = {cam.stream_id: feed.fps for feed in feeds for cam in feed.cameras}
        stats = ProduceStats(
            stream_id=",".join(bases), source=shown_sources(sources),
            target_fps=feeds[0].fps, target_fps_per_stream=paces,
            streams=n, per_stream=dict.fromkeys(paces, 0), session=session or new_session(),
        )  # fmt: skip
        outlet = _FrameOutlet(producer, watch, kafka.frames_topic, stats, stop)
        _say_what_is_produced(feeds, stats.session, kafka.frames_topic)
        started, stats.schedule_start_ns = time.monotonic(), time.time_ns()
        if producing is not None:
            producing.set()
        try:
            _replay_all(feeds, settings, started, stop, outlet)
        except BrokerLostError as exc:
            stats.broker_error = str(exc)
            log.error("%s; stopping", exc)
        finally:
            # The frames' own pace: the flush below may wait up to 30 s for a slow broker.
            stats.duration_s = time.monotonic() - started
            stats.frames_dropped = sum(feed.live.dropped for feed in feeds if feed.live)
            stats.source_reconnects = sum(feed.live.reconnects for feed in feeds if feed.live)
            held.close()  # release the sources before a flush that may wait for the broker
            outlet.flush()
    log.info(
        "produced %d frames in %d stream(s) (%d delivered, %d failed) in %.1f s (%.1f fps)",
        stats.frames_read, n, stats.delivered, stats.failed, stats.duration_s, stats.fps,
    )  # fmt: skip
    if stats.frames_dropped:
        log.warning(
            "%d live frames dropped: newer ones came before they could be published (--fps "
            "below the source's rate, or the producer or the broker slower than it)",
            stats.frames_dropped,
        )  # fmt: skip
    return stats


def _say_what_is_produced(feeds: list[Feed], session: str, topic: str) -> None:
    for feed in feeds:
        log.info(
            "producing %s as %d stream(s) %s (session %s) to %s at %s",
            shown_url(feed.source), len(feed.cameras),
            ", ".join(c.stream_id for c in feed.cameras), session, topic, _shown_pace(feed),
        )  # fmt: skip


def _shown_pace(feed: Feed) -> str:
    """A feed's pace in the start-up line: its fps, "max", or a live source's own."""
    if feed.live is not None and feed.native:
        return f"its own rate ({feed.fps:.2f} as it reports)" if feed.fps else "its own rate"
    return f"{feed.fps:.2f} fps each" if feed.fps else "max fps each"


def _feeds(
    sources: list[str],
    opened: list[tuple[cv2.VideoCapture, LatestFrame | None]],
    cameras: list[list[Camera]],
    settings: ProducerSettings,
) -> list[Feed]:
    native = settings.fps == "native"
    return [
        Feed(source, capture, _feed_fps(settings.fps, capture, live), cams, native, live)
        for source, (capture, live), cams in zip(sources, opened, cameras, strict=True)
    ]


def _feed_fps(setting: str, capture: cv2.VideoCapture, live: LatestFrame | None) -> float | None:
    """A source's pace as reported (`target_fps`); for a live source at its native rate, which
    sets its own pace, the rate it reports where that is one (a webcam may say 0: unknown),
    without the warning of a pace it is not held to."""
    if live is None or setting != "native":
        return target_fps(setting, capture)
    reported = live.reported_fps  # read as it started: its capture is its thread's now
    return reported if 0 < reported <= MAX_NATIVE_FPS else None


# How long a stop waits for the sources' threads to end their turns (a read, a publish) before
# the captures are released (not safe under a read still running: a stalled network read).
HALT_WAIT_S = 5.0


def _replay_all(
    feeds: list[Feed],
    settings: ProducerSettings,
    started: float,
    stop: threading.Event,
    outlet: _FrameOutlet,
) -> None:
    """Replay every source at once: one in this thread, several in a thread each. The first
    error (a lost broker) stops every source and is raised here."""
    if len(feeds) == 1:
        _replay(feeds[0], settings, started, stop, outlet)
        return
    halt = threading.Event()  # the caller's `stop`, or a source's failure, ends them all
    errors: list[BaseException] = []

    def replay(feed: Feed) -> None:
        try:
            _replay(feed, settings, started, halt, outlet)
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)
            halt.set()

    threads = [
        threading.Thread(
            target=replay, args=(feed,), name=f"produce-{shown_url(feed.source)}", daemon=True
        )
        for feed in feeds
    ]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            if stop.wait(0.05):
                halt.set()
    finally:  # a second Ctrl-C too: the captures are released once no thread reads them
        halt.set()
        give_up_at = time.monotonic() + HALT_WAIT_S  # one wait for them all
        for thread in threads:
            thread.join(max(0.0, give_up_at - time.monotonic()))
    if errors:
        raise errors[0]


# How often a paced file source serves its client's events while it waits for its next turn.
SERVE_EVERY_S = 0.1


def _wait_until(due: float, stop: threading.Event, serve_events: Callable[[], None]) -> bool:
    """Wait until `due` (monotonic) or `stop` (True), serving the client's events meanwhile: at
    `--fps 0.05` a broker lost between two frames went unnoticed until the next one, 20 s on,
    and the run outlived `--broker-grace-s` by as much (a live source's wait serves them too)."""
    while (left := due - time.monotonic()) > 0:
        if stop.wait(min(left, SERVE_EVERY_S)):
            return True
        serve_events()
    return stop.is_set()


def _replay(
    feed: Feed,
    settings: ProducerSettings,
    started: float,
    stop: threading.Event,
    outlet: _FrameOutlet,
) -> None:
    """Publish one source's cameras' turns until it ends (unless looping), --max-frames or `stop`.

    The cameras take turns on one schedule: turn t is camera t mod N's frame t // N, due at
    t / (N * fps), so camera i runs at fps with its start i/N of a frame period after camera 0.
    Camera 0's turn decodes and encodes the next source frame; the others publish that JPEG."""
    cams, fps = feed.cameras, feed.pace
    n = len(cams)
    jpeg = b""
    turn = decoded = decoded_at_rewind = taken_ns = 0
    while not stop.is_set():
        camera, frame_index = cams[turn % n], turn // n
        if settings.max_frames is not None and frame_index >= settings.max_frames:
            break
        if fps is not None:  # pace like live cameras: turn t is due at t / (N * fps)
            due = started + turn / (n * fps)
            if _wait_until(due, stop, outlet.serve_events):
                break
        # The camera's turn: its frame is taken now (a live source's copies: when it was read).
        capture_ts_ns = taken_ns if feed.live is not None else time.time_ns()
        if turn % n == 0:  # the others publish this JPEG on their turns
            got = feed.next_image(stop, outlet.serve_events)
            if got is None and feed.live is not None:
                if feed.live.ended:
                    outlet.source_lost(feed.source, decoded, settings.reconnect_s)
                break
            if got is None:
                _say_if_cut_short(feed)
                if settings.loop and decoded > decoded_at_rewind:
                    # Opened again, not seeked: OpenCV could not seek some files (a one-frame
                    # clip) back to frame 0, and this loop spun a core reading nothing.
                    feed.capture.open(_capture_target(feed.source))
                    decoded_at_rewind = decoded
                    continue
                if settings.loop and decoded:
                    log.warning("%s gave no frame from its start again: it ends here",
                                shown_url(feed.source))  # fmt: skip
                break
            image, capture_ts_ns = got
            taken_ns = capture_ts_ns
            if feed.live is not None and fps is not None:
                started = _live_schedule_start(started, turn / (n * fps), fps)
            jpeg = encode_jpeg(image, settings.jpeg_quality)
            decoded += 1
            outlet.count_decoded()
        outlet.publish(
            camera,
            Frame(
                camera.stream_id, frame_index, capture_ts_ns, time.time_ns(), jpeg,
                outlet.stats.session,
            ),
        )  # fmt: skip
        turn += 1


def _live_schedule_start(started: float, due_s: float, fps: float) -> float:
    """A live source's schedule start, moved on where its frame for a turn due `due_s` into
    it came over a frame period late: a live source does not catch up after a stall (a camera
    that dropped out, a slow broker), as what it sent meanwhile is gone; catching up published
    its next frames at the camera's full rate. Its schedule goes on from that frame."""
    late = time.monotonic() - (started + due_s)
    return started + late if late > 1 / fps else started


# Failed deliveries are said at most this often, with how many failed since
FAILURES_SAID_EVERY_S = 5.0


@dataclass
class _FrameOutlet:
    """Where a produce run's frames go: the producer, its broker watch and the run's counts."""

    producer: Producer
    watch: BrokerWatch
    topic: str
    stats: ProduceStats
    stop: threading.Event  # the run's: a wait for room in a full queue ends with it
    # Several sources publish from threads of their own; the counts are shared. (librdkafka's
    # producer is thread-safe; delivery callbacks run in whichever thread polls.)
    _counts: threading.Lock = field(default_factory=threading.Lock)
    _said_too_large: bool = False  # the first frame over the size limit is said, once
    _failure_said_at: float = -math.inf  # when failed deliveries were last said (monotonic)
    _unsaid_failures: int = 0  # failed deliveries since
    # Frames queued and not yet reported on: what a flush that runs out of time leaves. (Its
    # own count, librdkafka's queue length, takes in statistics and error events too.)
    _unreported: int = 0

    def publish(self, camera: Camera, frame: Frame) -> None:
        try:
            queued = produce_with_backpressure(
                self.producer, self.watch, self.topic,
                key=frame.stream_id.encode(), value=frame.jpeg,
                headers=encode_frame_headers(frame), on_delivery=self._on_delivery,
                partition=camera.partition, poll_s=0.1, stopped=self.stop.is_set,
            )  # fmt: skip
        except KafkaException as exc:  # refused before it left
            if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:  # over --max-message-bytes
                self._too_large(len(frame.jpeg))
            else:
                self._not_delivered(frame.stream_id, exc.args[0])
            return
        if not queued:  # stopped while the queue was full: not published, as frames after it
            return
        with self._counts:  # before the poll below, which may report on it
            self._unreported += 1
        self.producer.poll(0)
        with self._counts:
            self.stats.frames_read += 1
            self.stats.per_stream[camera.stream_id] += 1
            self.stats.bytes_published += len(frame.jpeg)
        self.watch.check()

    def _too_large(self, size: int) -> None:
        """A frame over the message size limit: counted failed, the run goes on (a traceback
        ended it, with no summary), said once."""
        with self._counts:
            self.stats.failed += 1
            first, self._said_too_large = not self._said_too_large, True
        if first:
            log.error(
                "a %d-byte frame is over --max-message-bytes with its headers: such frames are "
                "not published (counted failed); lower the source's resolution or raise the limit",
                size,
            )

    def source_lost(self, source: str, frames: int, reconnect_s: float) -> None:
        """A live source that stopped giving frames (and did not come back within
        `reconnect_s`): its streams end, the others go on, and the run reports it (`vidflow
        produce` exits 1)."""
        lost = f"{shown_url(source)} stopped giving frames after {frames}"
        if reconnect_s > 0:
            lost += f" and gave none in the {reconnect_s:g} s it was opened again for"
        lost += ": camera or stream lost"
        log.error("%s", lost)
        with self._counts:
            earlier = self.stats.source_error
            self.stats.source_error = f"{earlier}; {lost}" if earlier else lost

    def serve_events(self) -> None:
        """Serve the producer's delivery reports and statistics while no frame is published
        (a live source waited for): unserved, they pile up in the client for as long as the
        wait lasts, and a broker lost meanwhile goes unnoticed."""
        self.producer.poll(0)
        self.watch.check()

    def count_decoded(self) -> None:
        with self._counts:
            self.stats.frames_decoded += 1

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        with self._counts:
            self._unreported -= 1
            if error is None:
                self.stats.delivered += 1
                self.watch.delivered(message)  # made after an outage: the broker is back
                ends, offset = self.stats.partition_ends, message.offset()
                if ends is not None and offset >= 0:
                    ends[message.partition()] = max(ends.get(message.partition(), 0), offset + 1)
                else:  # the broker did not say where it put the frame: the ends are unknown
                    self.stats.partition_ends = None
                return
        self._not_delivered((message.key() or b"").decode(errors="replace"), error)

    def _not_delivered(self, stream_id: str, error: KafkaError) -> None:
        """A frame the broker refused (in its delivery report) or librdkafka refused as it was
        queued (a partition the topic lacks once its metadata is known): counted failed, the
        run goes on (a traceback ended it, with no summary), and said at most one line every
        few seconds: a broker that refuses every frame (a topic's size limit, an ACL) wrote a
        line per frame, 30 a second per camera."""
        with self._counts:
            self.stats.failed += 1
            self._unsaid_failures += 1
            now = time.monotonic()
            if now - self._failure_said_at < FAILURES_SAID_EVERY_S:
                return
            failures, self._unsaid_failures, self._failure_said_at = self._unsaid_failures, 0, now
        log.error(
            "%d frame(s) not delivered (the last of stream %s): %s", failures, stream_id, error
        )

    def flush(self) -> None:
        """Wait for deliveries; what is still queued after the wait counts as failed.

        With the broker gone, wait for it no longer than the rest of the grace."""
        watch, stats = self.watch, self.stats
        flush_s = 30.0 if not watch.down else max(1.0, watch.grace_s - watch.down_for_s())
        self.producer.flush(flush_s)
        with self._counts:
            unsaid, self._unsaid_failures = self._unsaid_failures, 0
            remaining = max(0, self._unreported)
        if unsaid:
            log.error("%d more frame(s) not delivered", unsaid)
        if remaining:
            stats.failed += remaining
            log.error("%d frames still undelivered after a %.0f s flush", remaining, flush_s)
        # Away at the end, but every frame delivered before its grace ran out: nothing lost
        # (a broker back during the flush was still counted lost until its next statistics).
        lost = remaining or watch.down_for_s() >= watch.grace_s or watch.fatal
        if watch.down and lost and stats.broker_error is None:
            stats.broker_error = watch.describe()
