"""`vidflow produce`: read frames from a video file, webcam or RTSP stream, publish JPEG frames.

Paced at the source's frame rate by default, so a file behaves like a live camera; `--fps max`
publishes as fast as frames can be read and encoded. A broker gone for longer than
`--broker-grace-s` ends the run with `broker_error` set; the frames it never took count as failed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
from confluent_kafka import KafkaError, Message, Producer

from tasks.broker_watch import BrokerLostError, BrokerWatch
from tasks.frame_codec import Frame, encode_frame_headers
from vidflow.config import KafkaSettings, ProducerSettings
from vidflow.frames import encode_jpeg

log = logging.getLogger(__name__)
FALLBACK_FPS = 30.0


@dataclass
class ProduceStats:
    stream_id: str
    source: str
    frames_read: int = 0
    delivered: int = 0
    failed: int = 0
    bytes_published: int = 0
    duration_s: float = 0.0
    target_fps: float | None = None
    broker_error: str | None = None

    @property
    def fps(self) -> float:
        return self.frames_read / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "fps": round(self.fps, 2)}


def open_source(source: str) -> cv2.VideoCapture:
    """A capture for `webcam:N`, an rtsp:// (or any URL OpenCV reads) or a video file."""
    if source.startswith("webcam:"):
        capture = cv2.VideoCapture(int(source.split(":", 1)[1]))
    elif "://" in source:
        capture = cv2.VideoCapture(source)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"video file not found: {source}")
        capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise ValueError(f"cannot open video source {source}")
    return capture


def target_fps(setting: str, capture: cv2.VideoCapture) -> float | None:
    """Frames per second to pace at; None means as fast as possible."""
    if setting == "max":
        return None
    if setting == "native":
        native = capture.get(cv2.CAP_PROP_FPS)
        return native if native and native > 0 else FALLBACK_FPS
    fps = float(setting)
    if fps <= 0:
        raise ValueError(f"--fps must be positive, native or max (got {setting})")
    return fps


def make_producer(kafka: KafkaSettings, watch: BrokerWatch | None = None) -> Producer:
    """The producer of frames and results; `watch` hears of its broker connection's state."""
    return Producer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "message.max.bytes": kafka.max_message_bytes,
            "acks": "all",
            "linger.ms": 2,
            "enable.idempotence": False,  # an idempotent producer dies on a broker restart
            **(watch.client_config() if watch is not None else {}),
        }
    )


def produce_frames(
    settings: ProducerSettings, kafka: KafkaSettings, stop: threading.Event | None = None
) -> ProduceStats:
    """Publish frames until the source ends (unless --loop), --max-frames, or `stop` is set."""
    stop = stop or threading.Event()
    capture = open_source(settings.source)
    fps = target_fps(settings.fps, capture)
    stream_id = settings.stream_id or Path(settings.source).stem or settings.source
    stats = ProduceStats(stream_id=stream_id, source=settings.source, target_fps=fps)
    watch = BrokerWatch(kafka.bootstrap_servers, kafka.broker_grace_s)
    producer = make_producer(kafka, watch)

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is None:
            stats.delivered += 1
            return
        stats.failed += 1
        log.error("frame %s not delivered: %s", message.key(), error)

    log.info(
        "producing %s as stream %r to %s at %s fps",
        settings.source, stream_id, kafka.frames_topic, f"{fps:.2f}" if fps else "max",
    )  # fmt: skip
    started = time.monotonic()
    try:
        while not stop.is_set():
            if settings.max_frames is not None and stats.frames_read >= settings.max_frames:
                break
            if fps is not None:  # pace like a live camera: frame i is due at i / fps
                delay = started + stats.frames_read / fps - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            ok, image = capture.read()
            if not ok:
                if settings.loop and stats.frames_read > 0:
                    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                break
            capture_ts_ns = time.time_ns()
            jpeg = encode_jpeg(image, settings.jpeg_quality)
            frame = Frame(stream_id, stats.frames_read, capture_ts_ns, time.time_ns(), jpeg)
            _produce(producer, kafka.frames_topic, frame, on_delivery, watch)
            stats.frames_read += 1
            stats.bytes_published += len(frame.jpeg)
            watch.check()
    except BrokerLostError as exc:
        stats.broker_error = str(exc)
        log.error("%s; stopping", exc)
    finally:
        capture.release()
        # With the broker gone, wait for it no longer than the rest of the grace: what is still
        # queued then is counted as failed.
        flush_s = 30.0 if not watch.down else max(1.0, watch.grace_s - watch.down_for_s())
        remaining = producer.flush(flush_s)
        if remaining:
            stats.failed += remaining
            log.error("%d frames still undelivered after a %.0f s flush", remaining, flush_s)
        if watch.down and stats.broker_error is None:
            stats.broker_error = watch.describe()
        stats.duration_s = time.monotonic() - started
    log.info(
        "produced %d frames (%d delivered, %d failed) in %.1f s (%.1f fps)",
        stats.frames_read, stats.delivered, stats.failed, stats.duration_s, stats.fps,
    )  # fmt: skip
    return stats


def _produce(producer: Producer, topic: str, frame: Frame, on_delivery, watch: BrokerWatch) -> None:
    while True:
        try:
            producer.produce(
                topic,
                key=frame.stream_id.encode(),
                value=frame.jpeg,
                headers=encode_frame_headers(frame),
                on_delivery=on_delivery,
            )
            break
        except BufferError:  # the local queue is full: let deliveries drain, then retry
            producer.poll(0.1)
            watch.check()
    producer.poll(0)
