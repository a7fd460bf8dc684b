"""`vidflow serve --tls-cert/--tls-key` and `--no-reflection`, on a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.net import free_ports, host_port
from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from protos import inference_pb2, inference_pb2_grpc
from services.inference import ready_probe
from services.inference.client import health_status, open_channel, wait_until_serving
from services.inference.settings import ClientSettings, InferenceSettings
from tasks.stream.producer import produce_frames
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings
from tests.conftest import EXPECTED_CLASSES, VIDEOS
from tests.kafka_helpers import read_topic, result_keys
from tests.test_service import _http_get


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for 127.0.0.1 and localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vidflow test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[ServerProcess]:
    """The service over TLS, with reflection turned off."""
    directory = tmp_path_factory.mktemp("tls-server")
    cert, key = _self_signed(directory)
    server = start_server(
        directory, model_cache, "--tls-cert", str(cert), "--tls-key", str(key),
        "--no-reflection", tls_ca=cert,
    )  # fmt: skip
    try:
        server.wait_serving()  # the gRPC health check, over TLS
        yield server
    finally:
        server.terminate()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vidflow.cli", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip


def test_classify_over_tls_with_the_ca(tls_server: ServerProcess, photos) -> None:
    settings = ClientSettings(target=tls_server.target, tls_ca=tls_server.tls_ca)
    with open_channel(settings.target, settings.tls_ca) as channel:
        reply = inference_pb2_grpc.ClassifierStub(channel).Classify(
            inference_pb2.ClassifyRequest(image=photos["cat"]), timeout=30
        )
    assert reply.predictions[0].label in EXPECTED_CLASSES["cat"]
    assert "TLS" in tls_server.log()


def test_the_cli_classifies_and_checks_health_over_tls(
    tls_server: ServerProcess, tmp_path: Path, video_frames
) -> None:
    import skimage

    photo = Path(skimage.__file__).parent / "data" / "coffee.png"
    tls = ("--target", tls_server.target, "--tls-ca", str(tls_server.tls_ca))
    classify = _cli("classify", *tls, str(photo))
    assert classify.returncode == 0, classify.stderr
    assert classify.stdout.split("\t")[1] in EXPECTED_CLASSES["coffee"]
    health = _cli("health", *tls)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
    report = tmp_path / "loadtest.json"
    loadtest = _cli(
        "loadtest", *tls, "--images", str(photo), "--concurrency", "2", "--duration", "1",
        "--warmup", "0.2", "--json", str(report),
    )  # fmt: skip
    assert loadtest.returncode == 0, loadtest.stderr
    (level,) = json.loads(report.read_text())
    assert level["requests"] > 0 and level["errors"] == 0
    # Readiness over HTTP is unchanged by TLS on the gRPC port.
    assert _http_get(f"{tls_server.http_url}/readyz")[0] == 200


def test_the_consume_command_classifies_frames_over_tls(
    tls_server: ServerProcess, kafka: KafkaSettings, tmp_path: Path
) -> None:
    stats = produce_frames(
        ProducerSettings(source=str(VIDEOS / "k400_arm_wrestling.mp4"), fps="max",
                         stream_id="tls-cam", max_frames=20),
        kafka,
    )  # fmt: skip
    assert stats.delivered == 20
    summary_path = tmp_path / "summary.json"
    consume = _cli(
        "consume", "--target", tls_server.target, "--tls-ca", str(tls_server.tls_ca),
        "--bootstrap-servers", kafka.bootstrap_servers, "--frames-topic", kafka.frames_topic,
        "--results-topic", kafka.results_topic, "--dlq-topic", kafka.dlq_topic,
        "--idle-timeout", "4", "--summary-json", str(summary_path),
    )  # fmt: skip
    assert consume.returncode == 0, consume.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["results_published"] == 20 and summary["errors"] == 0, summary
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=20)
    assert len(set(result_keys(results))) == 20


def test_a_plaintext_client_cannot_talk_to_the_tls_server(
    tls_server: ServerProcess, photos
) -> None:
    request = inference_pb2.ClassifyRequest(image=photos["cat"])
    with grpc.insecure_channel(tls_server.target) as channel, pytest.raises(grpc.RpcError) as error:
        inference_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health_status(tls_server.target) == "UNREACHABLE"  # plaintext health check
    # And a TLS client that does not trust the server's certificate fails too.
    untrusting = grpc.ssl_channel_credentials()  # the system's CAs only
    with (
        grpc.secure_channel(tls_server.target, untrusting) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        inference_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_tls_mismatch_is_named_not_taken_for_a_server_that_is_down(
    tls_server: ServerProcess, onnx_server, tmp_path: Path
) -> None:
    """Plaintext to a TLS server read "UNAVAILABLE: Socket closed", and `vidflow health`
    said UNREACHABLE: a server that was up looked down."""
    image = tmp_path / "x.png"
    image.write_bytes(b"not read by the server")
    plaintext = _cli("classify", "--target", tls_server.target, str(image))
    assert "if the server serves TLS, give its CA with --tls-ca" in plaintext.stdout, plaintext
    health = _cli("health", "--target", tls_server.target)
    assert "if the server serves TLS, give its CA with --tls-ca" in health.stderr, health
    ca = ("--tls-ca", str(tls_server.tls_ca))
    tls = _cli("classify", "--target", onnx_server.target, *ca, str(image))
    assert "TLS failed: does the server serve TLS with a certificate of this CA?" in tls.stdout, tls


def test_no_reflection_lists_no_services(tls_server: ServerProcess) -> None:
    settings = ClientSettings(target=tls_server.target, tls_ca=tls_server.tls_ca)
    with open_channel(settings.target, settings.tls_ca) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as error:
            next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "reflection off" in tls_server.log()


def test_tls_cert_without_key_is_refused_with_a_reason(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path)
    serve = _cli("serve", "--tls-cert", str(cert), "--port", "0", "--http-port", "0")
    assert serve.returncode == 2
    assert "--tls-cert and --tls-key go together" in serve.stderr


def test_a_key_that_is_not_the_certificates_or_not_pem_is_named_before_binding(
    tmp_path: Path,
) -> None:
    """gRPC takes any bytes as a key pair and fails only when it binds: that read "could not
    bind the gRPC port (in use?)"."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    cert, _ = _self_signed(tmp_path / "one")
    _, other_key = _self_signed(tmp_path / "two")
    serve = _cli("serve", "--tls-cert", str(cert), "--tls-key", str(other_key), "--port", "0")
    assert serve.returncode == 2, serve.stderr
    assert "the key is not the certificate's" in serve.stderr and "in use" not in serve.stderr
    serve = _cli("serve", "--tls-cert", str(REPO_ROOT / "README.md"), "--tls-key", str(other_key))
    assert serve.returncode == 2, serve.stderr
    assert "--tls-cert holds no PEM certificate" in serve.stderr and "None" not in serve.stderr
    # Found in a README walk: a swapped pair read "(OpenSSL: None)".
    serve = _cli("serve", "--tls-cert", str(other_key), "--tls-key", str(cert), "--port", "0")
    assert serve.returncode == 2, serve.stderr
    assert "--tls-cert holds no PEM certificate (the two files look swapped)" in serve.stderr


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--backend", "eager"], "is served by the onnx backend, not eager"),
        (["--model", "resnet18"], "--model and --weights do not apply"),
    ],
    ids=["other-backend", "with-model"],
)
def test_an_onnx_model_with_settings_it_would_ignore_is_refused(
    tmp_path: Path, extra: list[str], reason: str
) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read: refused before")
    serve = _cli("serve", "--onnx-model", str(onnx_file), *extra, "--port", "0")
    assert serve.returncode == 2 and reason in serve.stderr, serve.stderr
    assert "VIDFLOW_INFERENCE_ONNX_MODEL" in serve.stderr  # how the serving image sets it


def test_an_empty_onnx_model_variable_unsets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDFLOW_INFERENCE_ONNX_MODEL", "")
    assert InferenceSettings(backend="eager").onnx_model is None
    # Compose's `${TLS_CERT:-}` and the like: empty is unset, not the current folder (which
    # turned TLS on with "." for a certificate).
    for name in ("WEIGHTS", "TLS_CERT", "TLS_KEY", "CACHE_DIR", "TLS_CA", "HOST"):
        monkeypatch.setenv(f"VIDFLOW_INFERENCE_{name}", "")
    empty = InferenceSettings(backend="eager")
    assert (empty.weights, empty.tls_cert, empty.tls_key) == (None, None, None)
    assert empty.host == "127.0.0.1"  # gRPC refused "" as a port in use; never every interface
    monkeypatch.setenv("VIDFLOW_CONSUMER_METRICS_HOST", "")  # "" bound /metrics everywhere
    assert ConsumerSettings().metrics_host == "127.0.0.1"
    assert empty.cache_dir == InferenceSettings.model_fields["cache_dir"].default
    assert ClientSettings().tls_ca is None
    monkeypatch.setenv("VIDFLOW_INFERENCE_ONNX_MODEL", "/opt/model/m.onnx")
    with pytest.raises(ValueError, match="VIDFLOW_INFERENCE_ONNX_MODEL"):
        InferenceSettings(model="resnet18")


def test_an_onnx_file_that_scores_more_classes_than_it_names_ends_serve_with_the_reason(
    model_cache: Path, tmp_path: Path
) -> None:
    """Found in review (stop 57): a file whose metadata names fewer classes than it scores (a
    1001-class model given the 1000 ImageNet names) served as SERVING, and every call whose
    top-k held the unnamed index failed with INTERNAL "list index out of range"."""
    import onnx

    from services.inference.loader import load_served_model

    load_served_model(InferenceSettings(backend="onnx", cache_dir=model_cache))  # the export
    export = next(model_cache.glob("efficientnet_lite0-*.onnx"))
    model = onnx.load(export)
    (names,) = [p for p in model.metadata_props if p.key == "vidflow.class_names"]
    names.value = json.dumps(json.loads(names.value)[:999])
    short = tmp_path / "short-names.onnx"
    onnx.save(model, short)
    serve = _cli("serve", "--onnx-model", str(short), "--port", "0", "--http-port", "0")
    assert serve.returncode == 2, serve.stderr
    assert "gives scores of shape (1, 1000) for a batch of 1, and names 999 classes" in (
        serve.stderr
    ), serve.stderr


def test_a_model_that_cannot_load_or_a_port_in_use_ends_serve_with_the_reason(
    tmp_path: Path,
) -> None:
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an ONNX file")
    serve = _cli("serve", "--onnx-model", str(corrupt), "--port", "0", "--http-port", "0")
    assert serve.returncode == 2, serve.stderr
    assert "the model could not be loaded: InvalidProtobuf" in serve.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = _cli("serve", "--port", "0", "--http-port", str(port))
    assert serve.returncode == 2, serve.stderr
    assert f"could not serve HTTP on 127.0.0.1:{port}" in serve.stderr
    assert "address already in use" in serve.stderr
    for run in ("Traceback", "Exception ignored"):
        assert run not in serve.stderr, serve.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = _cli("serve", "--port", str(port), "--http-port", "0")
    assert serve.returncode == 2, serve.stderr
    assert f"could not bind the gRPC port 127.0.0.1:{port}" in serve.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_host_port_brackets_ipv6_addresses() -> None:
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("127.0.0.1", 50051) == "127.0.0.1:50051"


@contextlib.contextmanager
def _serving(model_cache: Path, target: str, *args: str) -> Iterator[None]:
    """`vidflow serve ARGS` for the block, SERVING at `target` first; it must exit 0."""
    server = subprocess.Popen(
        [sys.executable, "-m", "vidflow.cli", "serve", *args, "--cache-dir", str(model_cache)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_serving(target, 120)
        yield
    finally:
        server.terminate()
        code = server.wait(60)
    assert code == 0


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "[::1]"])  # bracketed: gRPC bound, then HTTP failed
def test_serve_binds_an_ipv6_loopback_address(tmp_path: Path, model_cache: Path, host: str) -> None:
    port, http_port = free_ports(2)
    args = ["--host", host, "--port", str(port), "--http-port", str(http_port)]
    with _serving(model_cache, f"[::1]:{port}", *args):
        assert _http_get(f"http://[::1]:{http_port}/readyz")[0] == 200
        # The image's health check finds it on ::1 (127.0.0.1 has nothing on that port).
        assert ready_probe.ready(str(http_port))


def test_the_health_check_asks_the_one_address_the_service_binds(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container told to bind its pod's own IP (VIDFLOW_INFERENCE_HOST) was asked on loopback
    alone, and stayed unhealthy for good (found in review, stop 57). 127.0.0.2 stands in for
    that address: a loopback address other than the two asked before."""
    port, http_port = free_ports(2)
    monkeypatch.setenv("VIDFLOW_INFERENCE_HOST", "127.0.0.2")
    with _serving(model_cache, f"127.0.0.2:{port}", "--port", str(port), "--http-port",
                  str(http_port)):  # fmt: skip
        deadline = time.monotonic() + 10  # /readyz follows gRPC's SERVING by a moment
        while not ready_probe.ready(str(http_port)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        monkeypatch.setenv("VIDFLOW_INFERENCE_HOST", "0.0.0.0")  # every address: loopback
        assert not ready_probe.ready(str(http_port))  # nothing on 127.0.0.1 or ::1 there
    # Bound by the flag (`serve --host ADDR`, a compose `command:`), the variable left at the
    # image's 0.0.0.0: the check asked loopback alone, unhealthy for good (found in review,
    # stop 58). The port file the image sets says the address too.
    port_file = tmp_path / "http-port"
    monkeypatch.setenv("VIDFLOW_INFERENCE_HTTP_PORT_FILE", str(port_file))
    port, http_port = free_ports(2)
    with _serving(model_cache, f"127.0.0.2:{port}", "--host", "127.0.0.2", "--port", str(port),
                  "--http-port", str(http_port)):  # fmt: skip
        deadline = time.monotonic() + 10
        while ready_probe.main() != 0:
            assert time.monotonic() < deadline, port_file.read_text()
            time.sleep(0.1)
        assert port_file.read_text() == f"{http_port} 127.0.0.2\n"
    # An empty variable (compose's `${X:-}`) is no file: it stopped the listening server.
    monkeypatch.setenv("VIDFLOW_INFERENCE_HTTP_PORT_FILE", "")
    assert InferenceSettings().http_port_file is None
