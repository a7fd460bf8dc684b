"""A token (VIDFLOW_INFERENCE_AUTH_TOKEN) guarding the classifier of a real `vidflow serve` on
127.0.0.1, plaintext and over TLS; health checks stay open."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import classify_files, health_status, open_channel
from services.inference.settings import ClientSettings, InferenceSettings, ServiceToken
from tests.conftest import EXPECTED_CLASSES
from tests.test_service import _http_get, _metric
from tests.test_service_tls import _self_signed

TOKEN = "t0ken-for-the-test"


def _refused_without_the_token(channel: grpc.Channel, image: bytes) -> None:
    """Each classifier method answers UNAUTHENTICATED without the token (or with another
    one); health answers."""
    stub = inference_pb2_grpc.ClassifierStub(channel)
    request = inference_pb2.ClassifyRequest(image=image)
    calls = {
        "Classify": lambda: stub.Classify(request, timeout=30),
        "ClassifyStream": lambda: list(stub.ClassifyStream(iter([request]), timeout=30)),
        "GetModelInfo": lambda: stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=30),
        "another token": lambda: stub.Classify(
            request, timeout=30, metadata=[("authorization", "Bearer not-the-token")]
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "VIDFLOW_INFERENCE_AUTH_TOKEN" in refused.value.details(), name
        # one that sent a token is told it is the wrong one, not to set it
        wrong = "the token sent is not this service's"
        assert (wrong in refused.value.details()) == (name == "another token"), name
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret


def _refused_at_once_without_its_request(channel: grpc.Channel) -> None:
    """A caller without the token that never sends its request is refused when its call opens
    (gRPC runs a unary handler only once the request is in: such calls held the server's
    places, and health checks were refused once they were all taken)."""
    never = threading.Event()

    def no_request() -> Iterator[inference_pb2.ModelInfoRequest]:
        never.wait()
        yield from ()

    silent = channel.stream_unary(
        "/vidflow.inference.v1.Classifier/GetModelInfo",
        request_serializer=inference_pb2.ModelInfoRequest.SerializeToString,
        response_deserializer=inference_pb2.ModelInfo.FromString,
    )
    try:
        with pytest.raises(grpc.RpcError) as refused:
            silent(no_request(), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        never.set()


def _served(server: ServerProcess) -> ServerProcess:
    server.wait_serving()
    return server


def test_a_token_guards_the_classifier_and_the_clients_send_it(
    tmp_path: Path, model_cache: Path, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)  # the server's and the clients'
    server = _served(start_server(tmp_path, model_cache))
    try:
        with grpc.insecure_channel(server.target) as bare:  # a client without the token
            _refused_without_the_token(bare, photos["cat"])
            _refused_at_once_without_its_request(bare)
        cat = tmp_path / "cat.jpg"
        cat.write_bytes(photos["cat"])
        [result] = classify_files(server.target, [cat])  # the project's client sends it
        assert result.error is None and result.response is not None, result.error
        assert result.response.predictions[0].label in EXPECTED_CLASSES["cat"]
        cli = subprocess.run(
            [sys.executable, "-m", "vidflow.cli", "classify", "--target", server.target, str(cat)],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        with grpc.insecure_channel(server.target) as channel:  # HTTP's scheme has no case
            stub = inference_pb2_grpc.ClassifierStub(channel)
            request = inference_pb2.ModelInfoRequest()
            stub.GetModelInfo(request, timeout=30, metadata=[("authorization", f"bearer {TOKEN}")])
            with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):
                stub.GetModelInfo(request, timeout=30, metadata=[("authorization", TOKEN)])
        metrics = _http_get(f"{server.http_url}/metrics")[1]
        refusals = {
            method: _metric(
                metrics, "vidflow_inference_requests_total", method=method, code="UNAUTHENTICATED"
            )
            for method in ("Classify", "ClassifyStream", "GetModelInfo")
        }
        # GetModelInfo's refusals were counted as classification requests; they have their own
        assert refusals == {"Classify": 2, "ClassifyStream": 1, "GetModelInfo": 0}
        refused = {
            method: _metric(metrics, "vidflow_inference_unauthenticated_calls_total", method=method)
            for method in ("Classify", "ClassifyStream", "GetModelInfo")
        }
        assert refused == {"Classify": 2, "ClassifyStream": 1, "GetModelInfo": 3}
        assert TOKEN not in server.log()
    finally:
        assert server.terminate() == 0


def test_over_tls_the_token_is_sent_with_the_ca(
    tmp_path: Path, model_cache: Path, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)
    cert, key = _self_signed(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    server = _served(start_server(tmp_path, model_cache, *tls, tls_ca=cert))
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(server.target, credentials) as without_token:
            _refused_without_the_token(without_token, photos["cat"])
        with open_channel(server.target, cert) as channel:
            reply = inference_pb2_grpc.ClassifierStub(channel).Classify(
                inference_pb2.ClassifyRequest(image=photos["cat"]), timeout=30
            )
        assert reply.predictions[0].label in EXPECTED_CLASSES["cat"]
    finally:
        assert server.terminate() == 0


@pytest.mark.parametrize("target", ["192.0.2.7:50051", "inference:50051", "dns:///svc:50051"])
def test_the_token_is_never_sent_in_clear_across_a_network(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's call credentials go only over TLS or to a loopback address: without --tls-ca a
    client refuses, saying so, before any byte is sent."""
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)
    with pytest.raises(ValueError, match=r"only over TLS \(--tls-ca\) or to a loopback address"):
        open_channel(target)


def test_an_empty_token_is_none_and_a_malformed_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`${VIDFLOW_INFERENCE_AUTH_TOKEN:-}` gives an empty string: a server wanting `Bearer `
    and clients sending it would be a token anyone has. A token with a line break (a secret
    file read whole) made every call fail with UNAVAILABLE "Illegal metadata", health too."""
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", "")
    assert InferenceSettings().auth_token is None
    assert ServiceToken().auth_token is None
    for malformed in (f"{TOKEN}\n", "two words", "t\u00f6ken"):
        monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", malformed)
        for settings in (InferenceSettings, ServiceToken):
            with pytest.raises(ValueError, match="printable ASCII without spaces or line breaks"):
                settings()
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)
    assert TOKEN not in repr(InferenceSettings())  # shown masked wherever settings are printed
    assert "auth_token" not in ClientSettings.model_fields  # never a flow parameter


def test_loopback_targets_take_the_token_in_every_spelling(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token reaches a guarded service through each way of writing a loopback target (a
    channel that dropped it, or could not connect, would be refused or fail)."""
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)
    server = _served(start_server(tmp_path, model_cache))
    try:
        for host in ("localhost", "ipv4:127.0.0.1", "dns:///localhost"):
            with open_channel(f"{host}:{server.port}") as channel:
                stub = inference_pb2_grpc.ClassifierStub(channel)
                info = stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=30)
                assert info.model_name == "efficientnet_lite0", host
    finally:
        assert server.terminate() == 0


def test_health_needs_no_token_wherever_the_service_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A health check sends no token, so it is not refused for a plaintext target elsewhere."""
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)
    assert health_status("192.0.2.7:50051", timeout_s=0.5) == "UNREACHABLE"
