"""A token (VIDFLOW_INFERENCE_AUTH_TOKEN) guarding the classifier of a real `vidflow serve` on
127.0.0.1, plaintext and over TLS; health checks stay open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import classify_files, open_channel
from services.inference.settings import ClientSettings, InferenceSettings
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
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret


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
        metrics = _http_get(f"{server.http_url}/metrics")[1]
        refusals = {
            method: _metric(
                metrics, "vidflow_inference_requests_total", method=method, code="UNAUTHENTICATED"
            )
            for method in ("Classify", "ClassifyStream")
        }
        assert refusals == {"Classify": 2, "ClassifyStream": 1}
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


def test_an_empty_token_variable_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """compose's `${VIDFLOW_INFERENCE_AUTH_TOKEN:-}` gives an empty string: a server wanting
    `Bearer ` and clients sending it would be a token anyone has."""
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", "")
    assert InferenceSettings().auth_token is None
    assert ClientSettings().auth_token is None
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", TOKEN)
    assert TOKEN not in repr(InferenceSettings())  # shown masked wherever settings are printed
