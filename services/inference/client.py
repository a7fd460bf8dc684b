"""Small client helpers: classify files, wait for health, ask for model info."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_pb2, inference_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Client channel options: let the server, not the client, decide what is too large."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class FileResult:
    path: Path
    response: inference_pb2.ClassifyResponse | None
    error: str | None


def health_status(target: str, timeout_s: float = 2.0, service: str = "") -> str:
    """The gRPC health status name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_until_serving(target: str, timeout_s: float = 120.0) -> None:
    """Block until health says SERVING, or raise TimeoutError with the last status seen."""
    deadline = time.monotonic() + timeout_s
    status = "UNREACHABLE"
    while time.monotonic() < deadline:
        status = health_status(target)
        if status == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f} s (last status {status})")


def classify_files(
    target: str, paths: Iterable[Path], top_k: int = 1, timeout_s: float = 30.0
) -> list[FileResult]:
    """Classify each file with one unary call; errors are reported per file, not raised."""
    results = []
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        stub = inference_pb2_grpc.ClassifierStub(channel)
        for path in paths:
            path = Path(path)
            try:
                request = inference_pb2.ClassifyRequest(
                    image=path.read_bytes(), top_k=top_k, request_id=path.name
                )
                results.append(FileResult(path, stub.Classify(request, timeout=timeout_s), None))
            except grpc.RpcError as exc:
                results.append(FileResult(path, None, f"{exc.code().name}: {exc.details()}"))
            except OSError as exc:
                results.append(FileResult(path, None, str(exc)))
    return results
