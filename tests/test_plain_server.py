"""The plain-server baseline (`bench/plain_server.py`) does the service's work, so comparing
throughput against it is fair: same model file, same preprocessing, same answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.plain_server import start_plain_server
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import channel_options
from services.inference.models import load_model
from services.inference.onnx_export import export_onnx
from services.inference.servicer import SERVICE_NAME
from tests.conftest import EXPECTED_CLASSES

CLASSIFY_POOL = ["--classify-pool", "--lone-call-threads", "2"]


@pytest.mark.parametrize("variant", [[], CLASSIFY_POOL], ids=["plain", "classify-pool"])
def test_the_plain_server_classifies_like_the_service(
    tmp_path: Path, model_cache: Path, photos, onnx_server, variant: list[str]
) -> None:
    onnx_path = export_onnx(load_model("efficientnet_lite0", None), model_cache)
    server = start_plain_server(tmp_path, onnx_path, workers=2, extra_args=variant)
    try:
        server.wait_serving()
        with (
            grpc.insecure_channel(server.target, options=channel_options()) as plain_channel,
            grpc.insecure_channel(onnx_server.target, options=channel_options()) as ours_channel,
        ):
            plain = inference_pb2_grpc.ClassifierStub(plain_channel)
            ours = inference_pb2_grpc.ClassifierStub(ours_channel)
            for name, image in photos.items():
                request = inference_pb2.ClassifyRequest(image=image, top_k=3)
                theirs = plain.Classify(request, timeout=30)
                reference = ours.Classify(request, timeout=30)
                assert theirs.predictions[0].label in EXPECTED_CLASSES[name]
                assert [p.class_index for p in theirs.predictions] == [
                    p.class_index for p in reference.predictions
                ]
                assert theirs.timings.batch_size == 1
            try:
                plain.Classify(inference_pb2.ClassifyRequest(image=b"garbage"), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            else:
                raise AssertionError("garbage was classified")
    finally:
        server.terminate()


def test_a_classify_pool_call_whose_request_never_comes_holds_back_no_other(
    tmp_path: Path, model_cache: Path, photos
) -> None:
    """A pool of one thread: a call whose request does not come gives up its slot (the next
    Classify is answered), and is cancelled after the idle-call timeout; one whose request
    comes late is answered."""
    onnx_path = export_onnx(load_model("efficientnet_lite0", None), model_cache)
    pool_flags = ["--classify-pool", "--idle-call-timeout-s", "3"]
    server = start_plain_server(tmp_path, onnx_path, workers=1, extra_args=pool_flags)
    release = threading.Event()

    def no_request() -> Iterator[inference_pb2.ClassifyRequest]:
        release.wait()
        yield from ()

    def late_request(request: inference_pb2.ClassifyRequest) -> Iterator:
        release.wait(0.5)  # past the pool's STALL_S: its slot has gone to other calls
        yield request

    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target, options=channel_options()) as channel:
            classify_call = channel.stream_unary(
                f"/{SERVICE_NAME}/Classify",
                request_serializer=inference_pb2.ClassifyRequest.SerializeToString,
                response_deserializer=inference_pb2.ClassifyResponse.FromString,
            )
            stalled = classify_call.future(no_request(), timeout=60)
            stub = inference_pb2_grpc.ClassifierStub(channel)
            request = inference_pb2.ClassifyRequest(image=next(iter(photos.values())))
            assert stub.Classify(request, timeout=2).predictions  # before: DEADLINE_EXCEEDED
            assert classify_call(late_request(request), timeout=10).predictions
            with pytest.raises(grpc.RpcError) as ended:
                stalled.result(timeout=30)
            assert ended.value.code() == grpc.StatusCode.CANCELLED
            assert stub.Classify(request, timeout=5).predictions
    finally:
        release.set()
        server.terminate()
