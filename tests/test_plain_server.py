"""The plain-server baseline (`bench/plain_server.py`) does the service's work, so comparing
throughput against it is fair: same model file, same preprocessing, same answers."""

from __future__ import annotations

from pathlib import Path

import grpc

from bench.plain_server import start_plain_server
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import channel_options
from services.inference.models import load_model
from services.inference.onnx_export import export_onnx
from tests.conftest import EXPECTED_CLASSES


def test_the_plain_server_classifies_like_the_service(
    tmp_path: Path, model_cache: Path, photos, onnx_server
) -> None:
    onnx_path = export_onnx(load_model("efficientnet_lite0", None), model_cache)
    server = start_plain_server(tmp_path, onnx_path, workers=2)
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
