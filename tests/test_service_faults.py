"""Hostile inputs and faults against a real `vidflow serve` process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2

from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import channel_options, health_status
from services.inference.metrics import ServiceMetrics
from services.inference.preprocess import PreprocessSpec
from services.inference.servicer import InferenceService
from services.inference.settings import InferenceSettings
from services.inference.stream import STREAM_WINDOW, AnswersInOrder, StreamIdleError
from services.inference.stream_items import stream_item_answer
from tests.conftest import EXPECTED_CLASSES
from tests.images import png_claiming_size, png_with_chunk_claiming, solid_png
from tests.proc_helpers import children, listening_addresses
from tests.test_service import _http_get, _metric

pytestmark = pytest.mark.faults

# What the server may grow by (peak RSS) while answering images of extreme aspect ratios. The
# decoded 1 x 1,000,000 image is 3 MB; its centre crop, 150 KB. Before the fix a 1 x 6,000 PNG
# alone cost 1.1 GB.
EXTREME_ASPECT_MEMORY_BOUND_MB = 200

EXTREME_ASPECTS = {
    "1x1000000": solid_png(1, 1_000_000),
    "1000000x1": solid_png(1_000_000, 1),
    "1x6000": solid_png(1, 6_000),
    "6000x1": solid_png(6_000, 1),
    "3x40000": solid_png(3, 40_000),
}


def _stub(target: str) -> tuple[grpc.Channel, inference_pb2_grpc.ClassifierStub]:
    channel = grpc.insecure_channel(target, options=channel_options())
    return channel, inference_pb2_grpc.ClassifierStub(channel)


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its RSS now and return that, in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _proc_kib(pid, "VmHWM")


def _answered_or_refused(stub: inference_pb2_grpc.ClassifierStub, image: bytes) -> str:
    """The top label, or 'INVALID_ARGUMENT'; any other status fails the test."""
    try:
        reply = stub.Classify(inference_pb2.ClassifyRequest(image=image), timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        return "INVALID_ARGUMENT"
    assert reply.predictions and reply.predictions[0].label
    return reply.predictions[0].label


def test_extreme_aspect_images_cost_bounded_server_memory(onnx_server: ServerProcess) -> None:
    channel, stub = _stub(onnx_server.target)
    with channel:
        _answered_or_refused(stub, solid_png(64, 64))  # warm, so the baseline is steady
        baseline_kib = _reset_peak_rss(onnx_server.process.pid)
        outcomes = {name: _answered_or_refused(stub, b) for name, b in EXTREME_ASPECTS.items()}
        growth_mb = (_proc_kib(onnx_server.process.pid, "VmHWM") - baseline_kib) / 1024
    assert growth_mb < EXTREME_ASPECT_MEMORY_BOUND_MB, (growth_mb, outcomes)
    # Within --max-image-pixels and libpng's side limit, these are classified, not refused.
    assert "INVALID_ARGUMENT" not in outcomes.values(), outcomes


def test_a_png_chunk_length_bomb_is_refused_within_the_memory_bound(
    onnx_server: ServerProcess,
) -> None:
    """45 bytes whose IEND chunk claims 2 GiB: OpenCV allocated all of it before the fix."""
    channel, stub = _stub(onnx_server.target)
    with channel:
        baseline_kib = _reset_peak_rss(onnx_server.process.pid)
        outcome = _answered_or_refused(stub, png_with_chunk_claiming(2**31 - 1))
        growth_mb = (_proc_kib(onnx_server.process.pid, "VmHWM") - baseline_kib) / 1024
    assert outcome == "INVALID_ARGUMENT"
    assert growth_mb < EXTREME_ASPECT_MEMORY_BOUND_MB, growth_mb


def test_a_refused_image_does_not_fail_the_good_requests_in_its_batch(
    onnx_server: ServerProcess, photos: dict[str, bytes]
) -> None:
    """Seven good photos and, in their midst, one image the decoder refuses, sent together,
    until a round puts the refused one in a batch with good ones: each good one is answered
    with its own photo's label (the model's rows are paired with the items by skipping the
    refused ones: a shift gave the neighbour's, which a check of "some answer" passed), and the
    refused one alone fails."""
    names = ["cat", "coffee", "rocket", "motorcycle", "cat", "coffee", "rocket"]
    refused_image = inference_pb2.ClassifyRequest(image=png_with_chunk_claiming(2**31 - 1))
    channel, stub = _stub(onnx_server.target)
    shared = False
    with channel:
        for round_ in range(10):

            def send(batch: list[str]) -> list[grpc.Future]:
                return [
                    stub.Classify.future(
                        inference_pb2.ClassifyRequest(image=photos[name]), timeout=60
                    )
                    for name in batch
                ]

            before = send(names[:3])
            bad = stub.Classify.future(refused_image, timeout=60)
            after = send(names[3:])
            replies = [future.result() for future in before + after]  # raises on any error
            labels = [reply.predictions[0].label for reply in replies]
            assert all(
                label in EXPECTED_CLASSES[name] for name, label in zip(names, labels, strict=True)
            ), (round_, labels)
            with pytest.raises(grpc.RpcError) as refused:
                bad.result()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, round_
            if shared := _batched_with_another(replies):
                break
    assert shared, "the refused image never shared a batch with good ones"


def _batched_with_another(replies: list[inference_pb2.ClassifyResponse]) -> bool:
    """Whether some batch held an item besides these replies: batch_size counts every item of
    a batch, so when the n replies of batches of size s are not a multiple of s, one of those
    batches held an item that is not among them."""
    sizes = Counter(reply.timings.batch_size for reply in replies)
    return any(count % size for size, count in sizes.items())


def test_a_stream_answers_every_item_around_an_extreme_image(
    onnx_server: ServerProcess, video_frames: list[bytes]
) -> None:
    requests = [
        inference_pb2.ClassifyRequest(image=frame, request_id=f"frame-{i}")
        for i, frame in enumerate(video_frames)
    ]
    middle = len(requests) // 2
    for offset, name in enumerate(("1x1000000", "1x6000")):
        bad = inference_pb2.ClassifyRequest(image=EXTREME_ASPECTS[name], request_id=name)
        requests.insert(middle + offset, bad)
    channel, stub = _stub(onnx_server.target)
    with channel:
        replies = list(stub.ClassifyStream(iter(requests), timeout=120))
    assert [r.request_id for r in replies] == [r.request_id for r in requests]
    for reply in replies:
        if reply.request_id.startswith("frame-"):
            assert reply.predictions and not reply.error, reply
        else:  # classified, or refused with a reason, but never a server failure
            assert reply.predictions or reply.error, reply
            assert "inference failed" not in reply.error, reply


def _classify_counts(http_url: str, method: str) -> dict[str, float]:
    _, body = _http_get(f"{http_url}/metrics")
    codes = ("OK", "INVALID_ARGUMENT", "INTERNAL", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE")
    return {
        code: _metric(body, "vidflow_inference_requests_total", method=method, code=code)
        for code in codes
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {code: after[code] - before[code] for code in after if after[code] != before[code]}


def test_calls_that_expire_before_their_request_arrives_are_counted(
    onnx_server: ServerProcess, photos: dict[str, bytes]
) -> None:
    """The request comes after the deadline: gRPC never runs a unary handler for such a call."""
    before = _classify_counts(onnx_server.http_url, "Classify")
    late_requests = 3

    def late() -> Iterator[inference_pb2.ClassifyRequest]:
        time.sleep(2.5)  # the call (its headers) is open on the server; its request is not
        yield inference_pb2.ClassifyRequest(image=photos["cat"])

    with grpc.insecure_channel(onnx_server.target) as channel:
        # Connected first: the calls must reach the server before their deadline (on a loaded
        # machine a new connection alone can take longer than a short one).
        grpc.channel_ready_future(channel).result(timeout=30)
        # Classify called with the request sent when the client likes: same wire format.
        classify = channel.stream_unary(
            "/vidflow.inference.v1.Classifier/Classify",
            request_serializer=inference_pb2.ClassifyRequest.SerializeToString,
            response_deserializer=inference_pb2.ClassifyResponse.FromString,
        )
        futures = [classify.future(late(), timeout=1.5) for _ in range(late_requests)]
        cancelled = classify.future(late(), timeout=30)
        time.sleep(0.5)
        cancelled.cancel()  # the client leaves before sending its request
        for future in futures:
            with pytest.raises(grpc.RpcError) as error:
                future.result()
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as error:  # half-closed without a request
            classify(iter([]), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # And one that is answered, to show the same path serves.
        inference_pb2_grpc.ClassifierStub(channel).Classify(
            inference_pb2.ClassifyRequest(image=photos["cat"]), timeout=30
        )
    deadline = time.monotonic() + 10
    expected = {"DEADLINE_EXCEEDED": late_requests, "CANCELLED": 1, "INVALID_ARGUMENT": 1, "OK": 1}
    while (delta := _delta(_classify_counts(onnx_server.http_url, "Classify"), before)) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delta == expected


def test_stream_items_cut_by_the_deadline_are_not_counted_ok(
    onnx_server: ServerProcess, video_frames: list[bytes]
) -> None:
    before = _classify_counts(onnx_server.http_url, "ClassifyStream")
    requests = (
        inference_pb2.ClassifyRequest(image=video_frames[i % len(video_frames)], request_id=str(i))
        for i in range(5_000)
    )
    answered = 0
    with grpc.insecure_channel(onnx_server.target, options=channel_options()) as channel:
        # Connected first: a new connection alone can take most of a short deadline on a
        # loaded machine, and the call then ended before any item reached the server.
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = inference_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as error:  # 5,000 frames take far longer than 3 s
            for reply in stub.ClassifyStream(requests, timeout=3.0):
                assert reply.predictions
                answered += 1
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server counts an item cut while a model worker had it once its batch ends: wait
    # until no item is in flight (the next test's counts must not get this one's; a second of
    # quiet was not enough while the model workers, at a lower priority, waited for a core).
    deadline = time.monotonic() + 30
    while _metric(_http_get(f"{onnx_server.http_url}/metrics")[1], "vidflow_inference_in_flight"):
        assert time.monotonic() < deadline, "items still in flight 30 s after the deadline"
        time.sleep(0.1)
    delta = _delta(_classify_counts(onnx_server.http_url, "ClassifyStream"), before)
    # Items in the stream's window when the deadline struck are cut, not classified.
    assert delta.get("DEADLINE_EXCEEDED", 0) >= 1, (delta, answered)
    assert set(delta) <= {"OK", "DEADLINE_EXCEEDED"}, delta
    assert answered <= delta.get("OK", 0) <= answered + STREAM_WINDOW, (delta, answered)


def test_stream_items_refused_are_counted_by_their_status(
    onnx_server: ServerProcess, video_frames: list[bytes]
) -> None:
    before = _classify_counts(onnx_server.http_url, "ClassifyStream")
    images = [video_frames[0], b"not an image", video_frames[1], png_claiming_size(0, 4)]
    with grpc.insecure_channel(onnx_server.target, options=channel_options()) as channel:
        stub = inference_pb2_grpc.ClassifierStub(channel)
        requests = (inference_pb2.ClassifyRequest(image=image) for image in images)
        replies = list(stub.ClassifyStream(requests, timeout=60))
    assert [bool(reply.error) for reply in replies] == [False, True, False, True]
    delta = _delta(_classify_counts(onnx_server.http_url, "ClassifyStream"), before)
    assert delta == {"OK": 2, "INVALID_ARGUMENT": 2}


Requests = queue.Queue[inference_pb2.ClassifyRequest | None]  # None ends the stream
Replies = Iterator[inference_pb2.ClassifyResponse]


@contextlib.contextmanager
def _held_stream(target: str) -> Iterator[tuple[Replies, Requests]]:
    """A ClassifyStream the client never half-closes: requests go in through the queue, and
    the stream stays open until the server ends it (or the block ends)."""
    outgoing: Requests = queue.Queue()

    def requests() -> Iterator[inference_pb2.ClassifyRequest]:
        while (request := outgoing.get()) is not None:
            yield request

    channel, stub = _stub(target)
    with channel:
        try:
            yield stub.ClassifyStream(requests(), timeout=60), outgoing
        finally:
            outgoing.put(None)


@pytest.mark.slow
def test_shutdown_log_says_an_open_stream_was_cancelled_not_drained(
    tmp_path: Path, model_cache: Path, video_frames: list[bytes]
) -> None:
    server = start_server(tmp_path, model_cache, "--shutdown-grace-s", "2")
    server.wait_serving()
    with _held_stream(server.target) as (stream, outgoing):
        for i in range(2):
            outgoing.put(inference_pb2.ClassifyRequest(image=video_frames[i], request_id=str(i)))
            assert next(stream).predictions
        # The stream stays open (the client never half-closes): shutdown must cut it.
        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as error:
            next(stream)
        cut_after_s = time.monotonic() - sigterm_at
    assert error.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert 1.5 < cut_after_s < 10, cut_after_s
    assert server.process.wait(30) == 0, server.log()
    log = server.log()
    assert "all calls drained" not in log
    assert (
        "of 1 call(s) open at shutdown, 0 call(s) drained, 1 cancelled at the end of the 2 s "
        "grace, 0 cancelled by their clients"
    ) in log, log


def test_a_second_stop_signal_cuts_the_drain_short(
    tmp_path: Path, model_cache: Path, video_frames: list[bytes]
) -> None:
    """Ctrl-C twice means now: the second signal cancels the calls still open instead of
    waiting out the grace (30 s by default), and the log says so."""
    server = start_server(tmp_path, model_cache)  # the default 30-s grace
    server.wait_serving()
    with _held_stream(server.target) as (stream, outgoing):
        outgoing.put(inference_pb2.ClassifyRequest(image=video_frames[0]))
        assert next(stream).predictions  # open, and never half-closed by the client
        server.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while "shutting down" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        second_at = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError):
            next(stream)
        assert server.process.wait(10) == 0, server.log()
        took_s = time.monotonic() - second_at
    assert took_s < 5, took_s
    assert (
        "of 1 call(s) open at shutdown, 0 call(s) drained, 1 cancelled on the second stop "
        "signal, 0 cancelled by their clients"
    ) in server.log(), server.log()


@pytest.mark.parametrize("batching", ["off", "on"])
def test_health_follows_a_model_that_stops_answering_and_comes_back(
    model_cache: Path, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, batching: str
) -> None:
    """Found in review: health and /readyz were set once, as the model loaded; a GPU lost
    under load (an Xid, a sticky CUDA error) failed every call with INTERNAL while every probe
    read SERVING. No device here fails on demand, so ONNX Runtime's call is made to fail, in
    a real server on 127.0.0.1 (in this process, to reach it); the rest is the real path. With
    batching on too (on a GPU, `auto` turns it on): the batcher's workers call the model."""
    from common.net import free_ports
    from services.inference import backends, model_watch
    from services.inference.server import _serve_until

    broken, real_run = threading.Event(), backends.OnnxBackend.run

    def run(self, batch):
        if broken.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(self, batch)

    monkeypatch.setattr(backends.OnnxBackend, "run", run)
    monkeypatch.setattr(model_watch, "PROBE_EVERY_S", 0.3)
    port, http_port = free_ports(2)
    settings = InferenceSettings(cache_dir=model_cache, backend="onnx", batching=batching,
                                 port=port, http_port=http_port)  # fmt: skip
    loop, events = asyncio.new_event_loop(), {}

    async def server() -> None:
        events["stop"], events["stop_now"] = asyncio.Event(), asyncio.Event()
        await _serve_until(events["stop"], events["stop_now"], settings)

    running = threading.Thread(target=loop.run_until_complete, args=(server(),), daemon=True)
    running.start()
    target, ready_url = f"127.0.0.1:{settings.port}", f"http://127.0.0.1:{settings.http_port}"
    try:
        deadline = time.monotonic() + 120
        while health_status(target) != "SERVING":
            assert time.monotonic() < deadline and running.is_alive()
            time.sleep(0.2)
        with grpc.insecure_channel(target) as channel:
            classify = inference_pb2_grpc.ClassifierStub(channel).Classify
            request = inference_pb2.ClassifyRequest(image=photos["cat"])
            assert classify(request, timeout=30).predictions
            broken.set()
            bad_image = inference_pb2.ClassifyRequest(image=b"not an image")
            for failures in range(1, model_watch.FAILURES_TO_UNREADY + 1):
                with pytest.raises(grpc.RpcError) as failed:
                    classify(request, timeout=30)
                # The call that turns health is the outage's first: UNAVAILABLE, as the rest
                if failures < model_watch.FAILURES_TO_UNREADY:
                    assert failed.value.code() == grpc.StatusCode.INTERNAL
                else:
                    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                # An image's own error never reaches the model: it breaks no run of failures
                # (nor makes one), and the server stays SERVING until the third.
                with pytest.raises(grpc.RpcError) as refused:
                    classify(bad_image, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                if failures < model_watch.FAILURES_TO_UNREADY:
                    assert health_status(target) == "SERVING"
            deadline = time.monotonic() + 10
            while health_status(target) != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert _http_get(f"{ready_url}/readyz")[0] == 503
            assert _http_get(f"{ready_url}/healthz")[0] == 200  # alive: not to be restarted
            assert _metric(_http_get(f"{ready_url}/metrics")[1], "vidflow_inference_ready") == 0
            time.sleep(1.0)  # the probes fail meanwhile: it stays NOT_SERVING
            assert health_status(target) == "NOT_SERVING"
            # Calls meanwhile are the server's outage, not the frames' fault: UNAVAILABLE,
            # which a client waits out (INTERNAL: the stream's consumer dead-lettered every
            # frame of the outage; found in review, stop 61)
            with pytest.raises(grpc.RpcError) as outage:
                classify(request, timeout=30)
            assert outage.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "NOT_SERVING" in (outage.value.details() or "")
            broken.clear()  # mended: a probe sees it, with no call sent
            deadline = time.monotonic() + 10
            while health_status(target) != "SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert _http_get(f"{ready_url}/readyz")[0] == 200
            assert classify(request, timeout=30).predictions
    finally:
        loop.call_soon_threadsafe(events["stop"].set)
        running.join(60)
    assert not running.is_alive()
    loop.close()


def test_an_unexpected_failure_of_one_image_fails_only_that_image(
    model_cache: Path, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is not bad input (a mock: no real image makes one since the fix above)."""
    import services.inference.batch_work as server_module

    real_preprocess = server_module.preprocess

    def preprocess_failing_on_7x7(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
        if rgb.shape[:2] == (7, 7):
            raise MemoryError("out of memory (simulated)")
        return real_preprocess(rgb, spec)

    monkeypatch.setattr(server_module, "preprocess", preprocess_failing_on_7x7)
    service = InferenceService(
        InferenceSettings(cache_dir=model_cache, backend="onnx"), ServiceMetrics()
    )
    poison = solid_png(7, 7)

    asyncio.run(service.load())
    try:
        outcomes = service._run_batch([photos["cat"], poison, photos["coffee"]])
        model = service.model
        assert model is not None
        stream_items = []
        for image in (poison, photos["cat"]):
            assert service.batcher is not None
            with service.batcher.admit() as admission:
                batch = admission.submit(image)
            request = inference_pb2.ClassifyRequest(image=image)
            answer = stream_item_answer(model, service.metrics, request, batch, time.perf_counter())
            stream_items.append(answer)
    finally:
        service.close()
    assert [outcome.probabilities is not None for outcome in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, MemoryError)
    # Each good image's row, past the failed one in between: its own label, not a neighbour's
    labels = [model.class_names[int(np.argmax(outcome.probabilities))]
              for outcome in (outcomes[0], outcomes[2])]  # fmt: skip
    assert labels[0] in EXPECTED_CLASSES["cat"] and labels[1] in EXPECTED_CLASSES["coffee"], labels
    (failed, failed_code), (good, good_code) = stream_items
    assert failed_code == grpc.StatusCode.INTERNAL and "inference failed" in failed.error
    assert good_code == grpc.StatusCode.OK and good.predictions


@pytest.mark.faults
def test_a_sigkilled_server_leaves_no_process_and_frees_its_ports(
    tmp_path: Path, model_cache: Path
) -> None:
    server = start_server(tmp_path, model_cache)
    try:
        server.wait_serving()
        assert children(server.process.pid) == []  # nothing of its own that could outlive it
    finally:
        server.process.kill()
        server.process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (listening_addresses(server.port) or listening_addresses(server.http_port)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert listening_addresses(server.port) == [] and listening_addresses(server.http_port) == []


@pytest.mark.faults
def test_a_server_started_for_a_test_or_benchmark_dies_with_its_starter(
    tmp_path: Path, model_cache: Path
) -> None:
    """A test that failed before its stop, or a benchmark killed, left its `vidflow serve`
    running for good, holding its ports and a core of the next run's two."""
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTS_A_SERVER, str(tmp_path), str(model_cache)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert starter.stdout is not None
        server = psutil.Process(int(starter.stdout.readline()))
        # setpriv sets the death signal after its own start: a starter killed before that
        # left the server running, the test's fault, not the launcher's
        deadline = time.monotonic() + 30
        while not server.name().startswith("python"):  # (setpriv's own line names it too)
            assert time.monotonic() < deadline, server.cmdline()
            time.sleep(0.01)
    finally:
        starter.kill()
        starter.wait(30)

    def gone() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return server.status() == psutil.STATUS_ZOMBIE
        return True

    deadline = time.monotonic() + 15
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert gone(), "the server outlived the process that started it"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            server.kill()


STARTS_A_SERVER = """
import sys, time
from pathlib import Path
from devstack.launcher import start_server
server = start_server(Path(sys.argv[1]), Path(sys.argv[2]))
print(server.process.pid, flush=True)
time.sleep(600)
"""


def _answered_after(delay_s: float, value: object, done: list | None = None) -> Future:
    """A stand-in for a stream item's work: its future is answered after `delay_s`, unless it
    was cancelled first (then it never finishes, as an item taken back from the batcher)."""
    future: Future = Future()

    def finish() -> None:
        if future.set_running_or_notify_cancel():
            future.set_result(value)
            if done is not None:
                done.append(value)

    threading.Timer(delay_s, finish).start()
    return future


def test_a_stream_of_large_images_holds_no_more_than_its_byte_window() -> None:
    """32 requests of up to --max-message-bytes each held 512 MiB for one stream: the window
    also stops at its bytes (one request always goes, however large), and reading waits."""
    most_held = 0
    held: list[int] = []
    lock = threading.Lock()

    def start(nbytes: int) -> Future:
        nonlocal most_held
        with lock:
            held.append(nbytes)
            most_held = max(most_held, sum(held))
        future = _answered_after(0.01, nbytes)
        future.add_done_callback(lambda _: held.remove(nbytes))
        return future

    requests = iter([30, 30, 30, 100, 5, 5])
    answers = AnswersInOrder(requests, start, window=32, size=lambda n: n, window_bytes=64)
    assert list(answers) == [30, 30, 30, 100, 5, 5]  # all answered, in order
    assert most_held == 100  # two of 30 at most, then the 100 alone, never 64 exceeded else


def test_a_stream_that_ends_early_leaves_no_started_item_running() -> None:
    """A client that leaves mid-stream: every item started is answered or cancelled (none runs
    on to take model time and be counted OK), and no more than the window run ahead."""
    started: list[int] = []
    finished: list[int] = []

    def start(index: int) -> Future:
        started.append(index)
        return _answered_after(0.01 if index == 0 else 2.0, index, finished)

    answers = AnswersInOrder(iter(range(100)), start, window=4)
    responses = iter(answers)
    assert next(responses) == 0
    deadline = time.monotonic() + 10  # the client holds its first answer, then leaves
    while len(started) < 5:
        assert time.monotonic() < deadline, started
        time.sleep(0.01)
    answers.close()  # its call ends, well before the items' own 2 s on a loaded machine
    time.sleep(2.5)  # past them
    assert finished == [0]
    assert started == [0, 1, 2, 3, 4]  # the answered one, then a window of 4


def test_a_stream_idles_out_only_with_nothing_in_flight() -> None:
    """An item slower than the idle timeout is no idleness: it is answered; once the stream
    has nothing in flight and sends nothing for the timeout, it ends with StreamIdleError
    (and a stream that keeps sending never does)."""
    answered: list[int] = []
    more = threading.Event()  # set only at the end: the client goes quiet after its requests

    def requests() -> Iterator[int]:
        for index in range(3):
            yield index
            time.sleep(0.1)  # steady requests, each well inside the timeout (room for a hitch)
        more.wait()

    def start(index: int) -> Future:
        return _answered_after(3.0 if index == 2 else 0.01, index)  # the last: 3 x the timeout

    started_at = time.monotonic()
    try:
        with pytest.raises(StreamIdleError):
            for response in AnswersInOrder(requests(), start, idle_timeout_s=1.0):
                answered.append(response)
                time.sleep(0.05)  # the answer being sent: the stream is not idle yet
    finally:
        more.set()
    assert answered == [0, 1, 2]
    # Idle from the last answer's end: 0.2 s of requests, 3 s of work, 0.05 s sending it.
    assert 0.2 + 3.0 + 0.05 + 1.0 <= time.monotonic() - started_at < 15


def _open_calls_reach(server: ServerProcess, count: int, within_s: float) -> bool:
    """Whether the server's gauge of calls holding a place reads `count` within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        metrics = _http_get(f"{server.http_url}/metrics")[1]
        if _metric(metrics, "vidflow_inference_open_calls") == count:
            return True
        time.sleep(0.02)
    return False


def test_idle_calls_are_ended_and_free_their_places(
    tmp_path: Path, model_cache: Path, video_frames: list[bytes]
) -> None:
    """A client that opens calls and sends nothing (a unary call whose request never comes, a
    stream that goes quiet) held --max-concurrent-rpcs places for good: each is ended after
    --idle-call-timeout-s with DEADLINE_EXCEEDED, counted, and its place is free again."""
    idle_timeout_s = 4.0  # roomy: the silent call must be seen holding its place before
    server = start_server(
        tmp_path, model_cache, "--max-concurrent-rpcs", "2", "--idle-call-timeout-s", "4"
    )
    server.wait_serving()
    never = threading.Event()

    def no_request() -> Iterator[inference_pb2.ClassifyRequest]:
        never.wait()
        yield from ()

    try:
        with (
            _held_stream(server.target) as (stream, outgoing),
            grpc.insecure_channel(server.target) as channel,
        ):
            outgoing.put(inference_pb2.ClassifyRequest(image=video_frames[0]))
            assert next(stream).predictions
            quiet_from = time.monotonic()
            silent = channel.stream_unary(
                "/vidflow.inference.v1.Classifier/Classify",
                request_serializer=inference_pb2.ClassifyRequest.SerializeToString,
                response_deserializer=inference_pb2.ClassifyResponse.FromString,
            ).future(no_request(), timeout=60)
            # gRPC does not keep the order of calls: a third sent now could take the place first.
            assert _open_calls_reach(server, 2, within_s=idle_timeout_s * 0.75)
            stub = inference_pb2_grpc.ClassifierStub(channel)
            request = inference_pb2.ClassifyRequest(image=video_frames[1])
            with pytest.raises(grpc.RpcError) as refused:  # both places held by idle calls
                stub.Classify(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - quiet_from < idle_timeout_s  # refused while still idle
            for ended in (lambda: next(stream), silent.result):
                with pytest.raises(grpc.RpcError) as idle:
                    ended()
                assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "--idle-call-timeout-s" in idle.value.details()
            assert idle_timeout_s <= time.monotonic() - quiet_from < 15
            assert _admitted_within(stub, video_frames[1], 10.0)
        # every place given back (a unary call's a moment after its client has its answer)
        assert _open_calls_reach(server, 0, within_s=10)
        metrics = _http_get(f"{server.http_url}/metrics")[1]
        assert _metric(metrics, "vidflow_inference_max_open_calls") == 2
        for method in ("Classify", "ClassifyStream"):
            labels = {"method": method, "code": "DEADLINE_EXCEEDED"}
            assert _metric(metrics, "vidflow_inference_requests_total", **labels) == 1, method
            ended = _metric(metrics, "vidflow_inference_idle_calls_ended_total", method=method)
            assert ended == 1, method
    finally:
        never.set()
        assert server.terminate() == 0


def test_a_stream_whose_client_reads_no_answer_is_ended_and_frees_its_place(
    tmp_path: Path, model_cache: Path, video_frames: list[bytes]
) -> None:
    """Found in review, stop 62: a ClassifyStream client that sends and never reads its answers
    left the handler thread waiting in grpcio's send for flow-control window that never came,
    where no idle check runs: the call held its place (and threads, and images) for ever. An
    answer in sending for --idle-call-timeout-s ends it, DEADLINE_EXCEEDED, counted."""
    server = start_server(
        tmp_path, model_cache, "--max-concurrent-rpcs", "1", "--idle-call-timeout-s", "3"
    )
    try:
        server.wait_serving()
        with _held_stream(server.target) as (stream, outgoing):
            top_k = 1000  # big answers (~25 kB each) fill the client's window soon
            for index in range(400):
                outgoing.put(
                    inference_pb2.ClassifyRequest(image=video_frames[index % 4], top_k=top_k)
                )
            assert _open_calls_reach(server, 1, within_s=10)
            sent_from = time.monotonic()
            # Its place is given back within the timeout (and the watch's look) of its last answer
            # sent: the client has read nothing meanwhile.
            assert _open_calls_reach(server, 0, within_s=20), server.log()
            assert time.monotonic() - sent_from >= 2.5
            answered = 0
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    answered += 1
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "its client read no answer sent within 3 s" in ended.value.details()
            assert 0 < answered < 400
        with grpc.insecure_channel(server.target) as channel:
            stub = inference_pb2_grpc.ClassifierStub(channel)
            assert _admitted_within(stub, video_frames[1], 10.0)
        metrics = _http_get(f"{server.http_url}/metrics")[1]
        ended_idle = _metric(
            metrics, "vidflow_inference_idle_calls_ended_total", method="ClassifyStream"
        )
        assert ended_idle == 1
    finally:  # no server left running past a failed check
        assert server.terminate() == 0


@pytest.mark.slow
def test_sigterm_while_the_model_is_exported_ends_the_server_without_waiting_for_it(
    tmp_path: Path,
) -> None:
    """A first start exports the model (torch, then ONNX: seconds to minutes) after the gRPC
    port is up; a stop meanwhile has nothing to drain and must not wait for the export."""
    cache = tmp_path / "cache"
    server = start_server(tmp_path, cache, "--backend", "onnx")
    try:
        _refused_while_loading(server)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0, server.log()
    finally:
        if server.process.poll() is None:  # failed: leave no server behind
            server.process.kill()
    exported = [p for p in cache.rglob("*.onnx") if not p.name.startswith(".")]
    assert exported == [], server.log()  # it ended before the export did
    assert "shutting down" in server.log()


def _refused_while_loading(server: ServerProcess) -> None:
    """While the server loads its model, every kind of call is refused and counted alike."""
    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = inference_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as loading:
            stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=10)
        # Both kinds of call are refused while it loads, and counted alike.
        request = inference_pb2.ClassifyRequest(image=solid_png(8, 8))
        for call in (stub.Classify, lambda one: list(stub.ClassifyStream(iter([one])))):
            with pytest.raises(grpc.RpcError) as refused:
                call(request)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert loading.value.code() == grpc.StatusCode.UNAVAILABLE  # still loading
    metrics = _http_get(f"{server.http_url}/metrics")[1]
    for method in ("Classify", "ClassifyStream"):
        refusals = _metric(
            metrics, "vidflow_inference_requests_total", method=method, code="UNAVAILABLE"
        )
        assert refusals == 1, method


def test_calls_past_the_concurrent_limit_are_refused_not_held(
    tmp_path: Path, model_cache: Path, video_frames: list[bytes]
) -> None:
    """Each held call may carry --max-message-bytes: past --max-concurrent-rpcs a new call is
    refused at once (RESOURCE_EXHAUSTED, counted), and admitted again when one ends. Health
    checks are still answered meanwhile: a busy server is not a dead one to its orchestrator."""
    server = start_server(tmp_path, model_cache, "--max-concurrent-rpcs", "2")
    server.wait_serving()
    feeds: list[queue.Queue] = [queue.Queue(), queue.Queue()]

    def requests(feed: queue.Queue) -> Iterator[inference_pb2.ClassifyRequest]:
        while (image := feed.get()) is not None:
            yield inference_pb2.ClassifyRequest(image=image)

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = inference_pb2_grpc.ClassifierStub(channel)
            streams = [stub.ClassifyStream(requests(feed), timeout=60) for feed in feeds]
            for feed, replies in zip(feeds, streams, strict=True):
                feed.put(video_frames[0])
                assert next(replies).predictions  # both held open, answering
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(inference_pb2.ClassifyRequest(image=video_frames[1]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs" in refused.value.details()
            assert health_status(server.target) == "SERVING"
            metrics = _http_get(f"{server.http_url}/metrics")[1]
            exhausted = {"method": "Classify", "code": "RESOURCE_EXHAUSTED"}
            assert _metric(metrics, "vidflow_inference_requests_total", **exhausted) == 1
            feeds[0].put(None)  # one stream ends...
            assert list(streams[0]) == []
            assert _admitted_within(stub, video_frames[1], 10.0)  # ...and a new call gets its place
            feeds[1].put(None)
            assert list(streams[1]) == []
    finally:
        for feed in feeds:
            feed.put(None)
        assert server.terminate() == 0


def test_classify_calls_waiting_for_the_model_hold_places_too(
    tmp_path: Path, model_cache: Path, video_frames: list[bytes]
) -> None:
    """Unary calls queue for the model's threads (one per core): queued unrefused, a burst
    filled gRPC's own limit on calls, whose refusals say nothing of what to do, and health
    checks with them. Each call takes a place as it comes; past the limit it is refused."""
    server = start_server(tmp_path, model_cache, "--max-concurrent-rpcs", "4")
    server.wait_serving()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = inference_pb2_grpc.ClassifierStub(channel)
            request = inference_pb2.ClassifyRequest(image=video_frames[0])
            burst = [stub.Classify.future(request, timeout=60) for _ in range(40)]
            assert health_status(server.target) == "SERVING"  # with the burst still there
            outcomes = Counter()
            for call in burst:
                try:
                    call.result()
                    outcomes["OK"] += 1
                except grpc.RpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
                    assert "--max-concurrent-rpcs" in refused.details(), refused.details()
                    outcomes["RESOURCE_EXHAUSTED"] += 1
            assert outcomes["OK"] >= 4 and outcomes["RESOURCE_EXHAUSTED"] >= 1, outcomes
            assert health_status(server.target) == "SERVING"
            metrics = _http_get(f"{server.http_url}/metrics")[1]
            exhausted = {"method": "Classify", "code": "RESOURCE_EXHAUSTED"}
            counted = _metric(metrics, "vidflow_inference_requests_total", **exhausted)
            assert counted == outcomes["RESOURCE_EXHAUSTED"]
            assert _open_calls_reach(server, 0, within_s=10)
    finally:
        assert server.terminate() == 0


def test_health_watches_opening_and_leaving_at_once_never_stop_the_server(
    tmp_path: Path, model_cache: Path
) -> None:
    """grpcio's send waits for its completion-queue thread, and grpc's health servicer sent a
    watch's status while holding the lock that a leaving watch's callback takes on that thread:
    watches opening while others left could stop every call for good."""
    server = start_server(tmp_path, model_cache)
    server.wait_serving()
    watch = "/grpc.health.v1.Health/Watch"
    request = health_pb2.HealthCheckRequest().SerializeToString()

    def churn() -> int:
        seen = 0
        with grpc.insecure_channel(server.target) as channel:
            for _ in range(60):
                call = channel.unary_stream(watch)(request, timeout=10)
                seen += bool(next(call))
                call.cancel()  # leaves while the others open
        return seen

    try:
        with ThreadPoolExecutor(6) as pool:
            seen = sum(pool.map(lambda _: churn(), range(6)))
        assert seen == 360
        assert health_status(server.target, timeout_s=5) == "SERVING"
    finally:
        assert server.terminate() == 0


def _admitted_within(stub: inference_pb2_grpc.ClassifierStub, image: bytes, limit_s: float) -> bool:
    """Whether a Classify call is answered within `limit_s`: the server frees an ended call's
    place a moment after its client has seen the end."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return bool(stub.Classify(inference_pb2.ClassifyRequest(image=image), timeout=30))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.slow
def test_reflection_streams_past_their_limit_are_refused_and_checks_still_answer(
    tmp_path: Path, model_cache: Path
) -> None:
    """A reflection stream needs no token and lasts as long as its client stays: 320 of them,
    idle after one request, took every place of the server, and its health checks and
    Classify calls were refused by gRPC itself. At most 16 reflect at once."""
    from grpc_reflection.v1alpha import reflection_pb2

    server = start_server(tmp_path, model_cache)
    server.wait_serving()
    idle = threading.Event()

    def one_request_then_idle() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        idle.wait(60)

    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    try:
        with grpc.insecure_channel(server.target) as channel:
            reflect = channel.stream_stream(
                method, reflection_pb2.ServerReflectionRequest.SerializeToString,
                reflection_pb2.ServerReflectionResponse.FromString,
            )  # fmt: skip
            streams = [reflect(one_request_then_idle(), timeout=60) for _ in range(20)]
            answers: Counter = Counter()
            for call in streams:
                try:
                    answers["listed" if next(call).list_services_response else "other"] += 1
                except grpc.RpcError as refused:
                    answers[refused.code()] += 1
            assert answers == {"listed": 16, grpc.StatusCode.RESOURCE_EXHAUSTED: 4}, answers
            assert health_status(server.target, timeout_s=5) == "SERVING"  # 16 reflecting
            idle.set()
            for call in streams:
                call.cancel()
    finally:
        idle.set()
        assert server.terminate() == 0


@pytest.mark.slow
def test_health_watches_past_their_limit_are_refused_and_checks_still_answer(
    tmp_path: Path, model_cache: Path
) -> None:
    """A Watch lasts as long as its client stays: 33 watchers took every place of a server of
    --max-concurrent-rpcs 1 (its limit + 32), and its health checks were refused from then on.
    At most 16 watch at once; the rest are refused and checks keep their room."""
    server = start_server(tmp_path, model_cache, "--max-concurrent-rpcs", "1")
    server.wait_serving()
    watch = "/grpc.health.v1.Health/Watch"
    request = health_pb2.HealthCheckRequest().SerializeToString()
    try:
        with grpc.insecure_channel(server.target) as channel:
            watches = [channel.unary_stream(watch)(request, timeout=60) for _ in range(40)]
            answers = Counter()
            refusals = set()
            for call in watches:
                try:
                    answers[health_pb2.HealthCheckResponse.FromString(next(call)).status] += 1
                except grpc.RpcError as refused:
                    answers[refused.code()] += 1
                    refusals.add(refused.details())
            serving = health_pb2.HealthCheckResponse.SERVING
            assert answers == {serving: 16, grpc.StatusCode.RESOURCE_EXHAUSTED: 24}, answers
            assert refusals == {
                "the server holds its limit of 16 health watches, which keeps room for health "
                "checks: use Check, or watch when one ends"
            }
            assert health_status(server.target, timeout_s=5) == "SERVING"  # 16 watching
            for call in watches:
                call.cancel()
            deadline = time.monotonic() + 10  # until the server has heard the cancels
            while True:
                again = channel.unary_stream(watch)(request, timeout=10)
                try:
                    status = health_pb2.HealthCheckResponse.FromString(next(again)).status
                    break
                except grpc.RpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the ended watches kept their places"
                    time.sleep(0.2)
            assert status == serving  # a place freed
            again.cancel()
    finally:
        assert server.terminate() == 0


def test_health_and_model_info_calls_whose_request_never_comes_are_ended(
    tmp_path: Path, model_cache: Path
) -> None:
    """gRPC runs a handler of one request only once it has come: health Checks, Watches or
    GetModelInfo calls that never sent theirs held the server's places (--max-concurrent-rpcs
    + 64) until their deadline, for good without one, and every health check was refused
    while they did. Each now ends after --idle-call-timeout-s, counted, and frees its place."""
    server = start_server(
        tmp_path, model_cache, "--max-concurrent-rpcs", "1", "--idle-call-timeout-s", "3"
    )
    server.wait_serving()
    never = threading.Event()

    def no_request() -> Iterator[bytes]:
        never.wait()
        yield from ()

    check = "/grpc.health.v1.Health/Check"
    info_method = "/vidflow.inference.v1.Classifier/GetModelInfo"
    try:
        with grpc.insecure_channel(server.target) as channel:
            opened = time.monotonic()
            silent = [channel.stream_unary(path).future(no_request(), timeout=60)
                      for path in (check, info_method)]  # fmt: skip
            watch = channel.stream_stream("/grpc.health.v1.Health/Watch")(no_request(), timeout=60)
            crowd = [channel.stream_unary(check).future(no_request(), timeout=60)
                     for _ in range(70)]  # fmt: skip  # more than the server's 65 places
            # The crowd's calls take their places as they reach the server: a check sent
            # first could still find one free (gRPC keeps no order across channels).
            deadline = time.monotonic() + 5
            while (status := health_status(server.target, timeout_s=2)) != "RESOURCE_EXHAUSTED":
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            for ended in [*(call.result for call in silent), lambda: next(watch)]:
                with pytest.raises(grpc.RpcError) as idle:
                    ended()
                assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "--idle-call-timeout-s" in idle.value.details()
            assert 3 <= time.monotonic() - opened < 20
            codes = Counter()
            for call in crowd:
                with pytest.raises(grpc.RpcError) as ended_call:
                    call.result(timeout=30)
                codes[ended_call.value.code()] += 1
            ended_as = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert set(codes) <= ended_as and codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0
            # Their places are free again: the probe and the model info answer.
            assert health_status(server.target, timeout_s=10) == "SERVING"
            info = inference_pb2_grpc.ClassifierStub(channel).GetModelInfo(
                inference_pb2.ModelInfoRequest(), timeout=10
            )
            assert info.model_name
        metrics = _http_get(f"{server.http_url}/metrics")[1]
        # Each counted once: the three silent calls, and every check of the crowd that got a
        # place and idled out (those refused a place never started).
        idled = codes[grpc.StatusCode.DEADLINE_EXCEEDED]
        assert idled > 0, codes
        for method, expected in (("Check", 1 + idled), ("Watch", 1), ("GetModelInfo", 1)):
            ended = _metric(metrics, "vidflow_inference_idle_calls_ended_total", method=method)
            assert ended == expected, (method, ended, codes)
    finally:
        never.set()
        assert server.terminate() == 0
