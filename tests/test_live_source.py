"""Live sources: a network stream that runs at its own pace whether or not it is read, served
for real by FFmpeg over TCP on 127.0.0.1, produced to the real local broker."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from common.frames import load_encoded_images
from common.net import free_port
from devstack.video_server import Body, Camera, Guarded, Serve, Status, VideoServer
from tasks.depth.transcode import ffmpeg_exe
from tasks.stream.frame_codec import decode_frame
from tasks.stream.live_source import LatestFrame, is_live, open_live
from tasks.stream.producer import produce_frames
from tasks.stream.settings import KafkaSettings, ProducerSettings
from tests.conftest import VIDEOS
from tests.kafka_helpers import partition_ends, read_topic
from tests.proc_helpers import listening_sockets
from vidflow.cli import main

CLIP = VIDEOS / "k400_arm_wrestling.mp4"  # 10 s at 28 fps
CLIP_FPS = 28.0


def _serve_live(port: int) -> subprocess.Popen:
    """The clip as a live MPEG-TS stream at its own pace (`-re`) on `port`, from its first
    reader on; returned once it listens."""
    server = subprocess.Popen(
        [
            ffmpeg_exe(), "-v", "error", "-re", "-i", str(CLIP), "-an", "-c:v", "copy",
            "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while f"127.0.0.1:{port}" not in listening_sockets(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # a loaded machine starts it late: opened before, the stream is refused
    return server


@pytest.fixture
def live_stream() -> Iterator[tuple[str, subprocess.Popen]]:
    """A live stream of the clip on a free loopback port, and the FFmpeg that serves it."""
    port = free_port()
    server = _serve_live(port)
    try:
        yield f"tcp://127.0.0.1:{port}", server
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def http_camera() -> Iterator[str]:
    """The clip as an IP camera serves it: MJPEG over HTTP (multipart, of no length) at its own
    pace, for as long as anyone reads, on a free loopback port."""
    frames = tuple(load_encoded_images(CLIP, max_frames=400))
    with VideoServer({"video.mjpg": Camera(frames, CLIP_FPS)}) as server:
        yield server.url("video.mjpg")


def _clip_frames() -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(CLIP))
    frames = []
    while (got := capture.read())[0]:
        frames.append(got[1].astype(np.float32))
    capture.release()
    return frames


def _stream_position(jpeg: bytes, clip: list[np.ndarray]) -> int:
    """Which frame of the clip a published JPEG shows (the closest one)."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)
    return int(np.argmin([np.mean((image - frame) ** 2) for frame in clip]))


def test_stream_urls_and_cameras_are_live_and_files_are_not() -> None:
    assert is_live("webcam:0") and is_live("rtsp://10.0.0.5/live") and is_live("TCP://h:1")
    # An http(s) source is told by what it serves, once opened (`has_no_end`)
    assert not is_live(str(CLIP)) and not is_live("https://example.com/clip.mp4")


def test_a_live_stream_read_slower_than_it_runs_drops_frames_instead_of_falling_behind(
    kafka: KafkaSettings, live_stream: tuple[str, subprocess.Popen]
) -> None:
    """OpenCV queues what a network stream sends and `read()` returns the oldest frame: paced
    at 5 of the stream's 28 frames a second, the producer published the stream's first
    frames one after the other, each older than the last (frame 11 of the clip after 2.4 s)."""
    url, _ = live_stream
    _published_at_5_fps_moves_on_with_the_stream(kafka, url)


def _published_at_5_fps_moves_on_with_the_stream(kafka: KafkaSettings, url: str) -> None:
    """12 frames produced at 5 a second from `url`, a live source of the clip at 28: what is
    published is the stream's frame of its moment, the frames between dropped and counted."""
    published = 12
    stats = produce_frames(ProducerSettings(source=url, fps="5", max_frames=published), kafka)
    assert (stats.frames_read, stats.delivered, stats.source_error) == (published, published, None)
    frames = sorted(
        (decode_frame(m.value(), m.headers()) for m in read_topic(
            kafka.bootstrap_servers, kafka.frames_topic, expected=published)),
        key=lambda frame: frame.frame_index,
    )  # fmt: skip
    span_s = (frames[-1].capture_ts_ns - frames[0].capture_ts_ns) / 1e9  # ~2.2 s at 5 fps
    clip = _clip_frames()
    advanced = _stream_position(frames[-1].jpeg, clip) - _stream_position(frames[0].jpeg, clip)
    # Over those seconds the 28-fps stream moved on ~60 frames, and so did what was published
    # (the queue handed back 11 frames, one after the other); the rest dropped and counted.
    assert advanced >= 0.7 * span_s * CLIP_FPS, (advanced, span_s)
    assert stats.frames_dropped >= advanced - published, stats


def test_an_ip_camera_s_endless_http_stream_is_read_live(
    kafka: KafkaSettings, http_camera: str
) -> None:
    """An http(s) source may be a file or a camera: one with no end (an IP camera's MJPEG, a
    live HLS) is read live too (found in review, stop 59: read as a file, paced at 5 of its
    28 frames a second it was published frame after frame of the camera's queue, each older
    than the last, none counted dropped; its loss would read as the end of a file)."""
    _published_at_5_fps_moves_on_with_the_stream(kafka, http_camera)


def test_a_file_served_over_http_stays_a_file_though_opencv_counts_no_frames(
    kafka: KafkaSettings, tmp_path
) -> None:
    """A raw MJPEG file (OpenCV counts no frames in it) served with its length is a file: read
    live, it played at the reader's pace and was opened again at its end, for ever."""
    raw = tmp_path / "clip.mjpeg"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(CLIP), "-t", "2", "-an", "-vf", "scale=160:-2",
         "-c:v", "mjpeg", "-f", "mjpeg", str(raw)],
        check=True, timeout=120,
    )  # fmt: skip
    with VideoServer({"clip.mjpeg": Serve(raw)}) as server:
        stats = produce_frames(ProducerSettings(source=server.url("clip.mjpeg"), fps="max"), kafka)
    assert (stats.frames_read, stats.frames_dropped, stats.source_reconnects) == (56, 0, 0), stats
    assert stats.source_error is None


def test_what_an_http_server_sends_decides_whether_its_source_is_live(tmp_path) -> None:
    """A camera's multipart stream and a live playlist (whatever its content type) are live; a
    file served with its length, a finished playlist and a file behind a login answered are
    not; a server that cannot be asked is taken as a camera held by the capture just opened."""
    from tasks.stream.live_source import _served_live

    clip = tmp_path / "clip.mjpeg"
    clip.write_bytes(b"\xff\xd8" + bytes(1000))
    growing = b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nseg1.ts\n"
    routes = {
        "camera.mjpg": Camera((b"\xff\xd8\xff\xd9",), 10.0),
        "live.m3u8": Body(growing, "text/plain"),  # a store's type for any file
        "vod.m3u8": Body(growing + b"#EXT-X-ENDLIST\n", "application/vnd.apple.mpegurl"),
        "clip.mjpeg": Serve(clip),
        "guarded.mjpeg": Guarded(clip, "admin", "pa:ss"),
        "gone.mjpeg": Status(404),
    }
    with VideoServer(routes) as server:
        login = server.url("guarded.mjpeg").replace("//", "//admin:pa%3Ass@", 1)
        wrong = server.url("guarded.mjpeg").replace("//", "//admin:nope@", 1)
        assert _served_live(server.url("camera.mjpg")) and _served_live(server.url("live.m3u8"))
        assert not _served_live(server.url("vod.m3u8"))
        assert not _served_live(server.url("clip.mjpeg")) and not _served_live(login)
        assert _served_live(wrong) and _served_live(server.url("gone.mjpeg"))
        # The login went only where it was challenged: never before, never unasked
        assert server.requests["guarded.mjpeg"] == 4  # 2 probes, each refused once first


def test_a_live_stream_is_read_from_its_opening_so_its_first_frame_is_fresh(
    live_stream: tuple[str, subprocess.Popen],
) -> None:
    """Found in review (stop 57): the reading thread began at the first frame taken, so what
    the stream queued meanwhile (the producer's start: seconds on a busy machine) came first,
    stamped as read then, and was counted as dropped by a producer that had kept up."""
    url, _ = live_stream
    with open_live(url, "live", reconnect_s=0.0) as latest:
        time.sleep(2.0)  # the producer starting: its client, the topic's partitions
        got = latest.take(threading.Event())
        taken_ns = time.time_ns()
        assert got is not None
        image, read_ns = got
    position = int(
        np.argmin([np.mean((image.astype(np.float32) - f) ** 2) for f in _clip_frames()])
    )
    assert position >= 0.7 * 2.0 * CLIP_FPS, position  # the stream's now, not its start
    assert taken_ns - read_ns < 1e9  # read as the stream ran, not queued since its start


def test_copies_of_a_live_frame_carry_its_read_time(
    kafka: KafkaSettings, live_stream: tuple[str, subprocess.Popen]
) -> None:
    """Each camera's copy of a live frame (`--streams 2`) had its own turn's time, not the
    time the frame was read: both copies now carry the read time."""
    url, _ = live_stream
    settings = ProducerSettings(source=url, fps="native", streams=2, max_frames=20)
    stats = produce_frames(settings, kafka)
    assert stats.frames_read == 40 and stats.source_error is None, stats
    frames = [
        decode_frame(m.value(), m.headers())
        for m in read_topic(kafka.bootstrap_servers, kafka.frames_topic, expected=40)
    ]
    assert sorted(stats.per_stream.values()) == [20, 20], stats.per_stream  # two cameras
    taken: dict[int, list[int]] = {}
    for frame in frames:
        taken.setdefault(frame.frame_index, []).append(frame.capture_ts_ns)
    assert sorted(taken) == list(range(20))
    assert all(len(times) == 2 and len(set(times)) == 1 for times in taken.values()), taken


@pytest.mark.usefixtures("restore_root_logging")  # `main` sets up logging on capsys' stderr
def test_a_live_stream_that_ends_is_a_lost_source_and_produce_exits_1(
    kafka: KafkaSettings,
    live_stream: tuple[str, subprocess.Popen],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file that ends is done; a camera or a stream that ends is lost, and `vidflow
    produce` said nothing and exited 0 as if the run had gone well."""
    url, server = live_stream

    def camera_lost_mid_run() -> None:  # once frames come
        read_topic(kafka.bootstrap_servers, kafka.frames_topic, expected=5)
        server.kill()

    threading.Thread(target=camera_lost_mid_run, daemon=True).start()
    code = main(["produce", "--bootstrap-servers", kafka.bootstrap_servers,
                 "--frames-topic", kafka.frames_topic, "--source", url,
                 "--reconnect-s", "1"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1
    assert "stopped giving frames" in summary["source_error"] and url in summary["source_error"]
    assert "gave none in the 1 s it was opened again for" in summary["source_error"]
    assert summary["frames_read"] > 0 and summary["failed"] == 0
    assert summary["source_reconnects"] == 0


def test_a_live_stream_that_drops_out_and_comes_back_is_opened_again(
    kafka: KafkaSettings, live_stream: tuple[str, subprocess.Popen]
) -> None:
    """A camera's stream server restarted (a network blip, a rebooted RTSP server): the
    producer opened it again and went on, where it had called the camera lost at once. Paced
    at 5 of its 28 frames a second, it goes on at 5: it published its overdue turns at the
    camera's full rate (~36 ms apart) until its schedule had caught up."""
    url, server = live_stream
    port = int(url.rsplit(":", 1)[1])
    restarted: list[subprocess.Popen] = []

    def server_restarted_mid_run() -> None:  # once frames come
        while partition_ends(kafka.bootstrap_servers, kafka.frames_topic, 1)[0] < 5:
            time.sleep(0.05)
        server.kill()
        server.wait()
        time.sleep(1.5)  # the producer's first tries to open it again are refused
        restarted.append(_serve_live(port))

    threading.Thread(target=server_restarted_mid_run, daemon=True).start()
    try:
        settings = ProducerSettings(source=url, fps="5", max_frames=20, reconnect_s=20)
        stats = produce_frames(settings, kafka)
    finally:
        for again in restarted:
            again.kill()
            again.wait()
    assert (stats.source_error, stats.frames_read, stats.delivered) == (None, 20, 20), stats
    assert stats.source_reconnects >= 1, stats
    frames = sorted(
        (decode_frame(m.value(), m.headers()) for m in read_topic(
            kafka.bootstrap_servers, kafka.frames_topic, expected=20)),
        key=lambda frame: frame.frame_index,
    )  # fmt: skip
    read_gaps_s = [
        (later.capture_ts_ns - earlier.capture_ts_ns) / 1e9
        for earlier, later in itertools.pairwise(frames)
    ]
    outage = read_gaps_s.index(max(read_gaps_s))
    assert read_gaps_s[outage] >= 1.4, read_gaps_s  # frames from both sides of the outage
    # Then at 5 a second again (0.18-0.21 s apart), not a burst (~36 ms apart, turn after
    # turn): a turn late on a loaded machine shortens the one gap after it, never two in a row
    short = [gap < 0.1 for gap in read_gaps_s[outage + 1 :]]
    assert not any(a and b for a, b in itertools.pairwise(short)), read_gaps_s


class _OpensButSendsNothing:
    """A camera server that takes the connection and sends nothing (an NVR whose channel is
    dead): opening it works, reading gives no frame. Made up: FFmpeg waits 30 s on such a
    server before each of its reads gives up, too long for a test."""

    def __init__(self) -> None:
        self.opens = self.releases = 0

    def open(self, target: str) -> bool:
        self.opens += 1
        return True

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, None]:
        return False, None

    def get(self, prop: int) -> float:
        return 0.0  # a rate it does not know

    def release(self) -> None:
        self.releases += 1


def test_a_source_that_opens_but_sends_nothing_backs_off_is_not_counted_back_and_is_lost() -> None:
    """Each open that gave no frame started the backoff again (a new open every 0.25 s, for
    ever with `inf`) and counted as a reconnect."""
    capture = _OpensButSendsNothing()
    latest = LatestFrame(capture, name="dead-channel", reopen="rtsp://nvr/ch9", reconnect_s=1.5)
    started = time.monotonic()
    assert latest.take(threading.Event()) is None  # lost, in its window
    took_s = time.monotonic() - started
    latest.close()
    assert 1.4 <= took_s < 6, took_s
    assert latest.reconnects == 0  # opened, but never back
    assert capture.releases == 1  # released once, as it was closed
    assert 1 <= capture.opens <= 4, capture.opens  # 0.25 s doubling over the whole outage
