"""Hostile inputs and faults against a real `vidflow serve` process on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import channel_options
from services.inference.launcher import ServerProcess
from tests.images import solid_png

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


def test_an_extreme_image_does_not_fail_the_good_requests_in_its_batch(
    onnx_server: ServerProcess, video_frames: list[bytes]
) -> None:
    channel, stub = _stub(onnx_server.target)
    with channel:
        for round_ in range(3):
            good = [
                stub.Classify.future(inference_pb2.ClassifyRequest(image=frame), timeout=60)
                for frame in video_frames[:7]
            ]
            bad = stub.Classify.future(
                inference_pb2.ClassifyRequest(image=EXTREME_ASPECTS["1x1000000"]), timeout=60
            )
            replies = [future.result() for future in good]  # raises on any error status
            assert all(reply.predictions for reply in replies), round_
            assert max(reply.timings.batch_size for reply in replies) > 1  # they shared batches
            try:
                assert bad.result().predictions
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()


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
