"""Small client helpers: open a channel, classify files, wait for health."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr, ValidationError

from common.net import is_loopback_target
from common.settings import one_line
from protos import inference_pb2, inference_pb2_grpc
from services.inference.settings import ServiceToken

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # of an answer: a few hundred bytes each
RECONNECT_BACKOFF_MAX_MS = 2000  # between a channel's tries to reach a service gone away


def channel_options() -> list[tuple[str, int]]:
    """Client channel options: the server, not the client, decides how large a request may be
    (its --max-message-bytes goes up to ~2 GiB: a cap here refused what it would take); an
    answer is kept within DEFAULT_MAX_MESSAGE_BYTES. A service that went away is tried again
    every 2 s at most: gRPC's own backoff grows to 120 s, and a consumer whose service was
    back within seconds of a restart went on failing its calls at once for tens of seconds."""
    return [
        ("grpc.max_send_message_length", -1),  # gRPC's "no limit"
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


def service_token() -> SecretStr | None:
    """VIDFLOW_INFERENCE_AUTH_TOKEN, checked; a malformed one is refused in one line that
    does not show it."""
    try:
        return ServiceToken().auth_token
    except ValidationError as exc:
        raise ValueError(one_line(exc, ServiceToken, flags_given=())) from None


def channel_credentials(
    target: str, tls_ca: Path | None, send_token: bool = True
) -> grpc.ChannelCredentials | None:
    """TLS credentials that trust the PEM CA certificate `tls_ca`, with the service's token
    (`ServiceToken`, from the environment) as call credentials when there is one and
    `send_token`; None means plaintext.

    gRPC sends call credentials only over TLS, or over its local credentials, which connect to
    a loopback address alone: a token is never sent in clear across a network."""
    token = service_token() if send_token else None
    if tls_ca is None and token is None:
        return None
    if tls_ca is not None:
        transport = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    elif is_loopback_target(target):
        transport = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        raise ValueError(
            f"VIDFLOW_INFERENCE_AUTH_TOKEN is sent only over TLS (--tls-ca) or to a loopback "
            f"address, and {target} is neither"
        )
    if token is None:
        return transport
    call = grpc.access_token_call_credentials(token.get_secret_value())
    return grpc.composite_channel_credentials(transport, call)


def open_channel(target: str, tls_ca: Path | None = None, send_token: bool = True) -> grpc.Channel:
    """A channel to the service: TLS when `tls_ca` is given, plaintext otherwise; the token
    with every call (health checks need none: `send_token=False`)."""
    return _open(grpc, target, tls_ca, send_token)


def open_aio_channel(target: str, tls_ca: Path | None = None) -> grpc.aio.Channel:
    """The asyncio flavour of `open_channel`."""
    return _open(grpc.aio, target, tls_ca)


def _open(flavour: Any, target: str, tls_ca: Path | None, send_token: bool = True) -> Any:
    credentials = channel_credentials(target, tls_ca, send_token)
    if credentials is None:
        return flavour.insecure_channel(target, options=channel_options())
    return flavour.secure_channel(target, credentials, options=channel_options())


@dataclass(frozen=True)
class FileResult:
    path: Path
    response: inference_pb2.ClassifyResponse | None
    error: str | None


def health_status(
    target: str, timeout_s: float = 2.0, service: str = "", tls_ca: Path | None = None
) -> str:
    """The gRPC health status name (SERVING, NOT_SERVING, ...), UNREACHABLE when nothing
    answered in time, or the gRPC code a reachable server ended the check with (e.g.
    UNIMPLEMENTED: no health service there)."""
    return health_check(target, timeout_s, service, tls_ca)[0]


def health_check(
    target: str, timeout_s: float = 2.0, service: str = "", tls_ca: Path | None = None
) -> tuple[str, str]:
    """`health_status`, and gRPC's words for a check that failed ("" for an answer)."""
    with open_channel(target, tls_ca, send_token=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            status = "UNREACHABLE" if exc.code() in unreachable else exc.code().name
            why = rpc_failure(exc, tls_ca)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # a refusal comes at once
                why = f"nothing within {timeout_s:g} s: {why}"
            return status, why
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), ""


# What rpc_failure adds to gRPC's words where the server is up but not what the client expects.
HTTP_PORT_HINT = "that port speaks HTTP/1.1, not gRPC"
TLS_CA_HINT = "if the server serves TLS, give its CA with --tls-ca"
TLS_FAILED_HINT = "TLS failed"


def rpc_failure(exc: grpc.RpcError, tls_ca: Path | None) -> str:
    """gRPC's code and words for a failed call, with what a TLS mismatch likely means: a TLS
    server ends a plaintext call as "Socket closed", and a plaintext server fails a TLS
    handshake, both UNAVAILABLE, which otherwise read as a server that is down."""
    said = f"{exc.code().name}: {exc.details()}"
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return said
    details = (exc.details() or "").lower()
    if "http1.x server" in details:
        return (
            f"{said} ({HTTP_PORT_HINT}: is it the service's HTTP port, for /readyz and "
            "/metrics, rather than its gRPC port?)"
        )
    if tls_ca is None and ("socket closed" in details or "connection reset" in details):
        return f"{said} ({TLS_CA_HINT})"
    if tls_ca is not None and ("handshake" in details or "ssl" in details):
        return (
            f"{said} ({TLS_FAILED_HINT}: does the server serve TLS with a certificate of this CA?)"
        )
    return said


class ServerExitedError(RuntimeError):
    """The server being waited for exited before it served."""


class ServiceUnreachableError(RuntimeError):
    """Nothing answered a health check at the service's address for the whole wait."""


def wait_until_reachable(target: str, timeout_s: float, tls_ca: Path | None = None) -> str:
    """The health status once anything answers at `target` (a model still loading answers
    NOT_SERVING, and counts: its calls wait for it), or ServiceUnreachableError with gRPC's
    words for the last try after `timeout_s`. For a bounded run to say at its start that the
    service is not there, where it would otherwise run its length and answer nothing; a
    long-running consumer waits for the service instead."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        status, why = health_check(target, max(0.5, min(2.0, left)), tls_ca=tls_ca)
        if status != "UNREACHABLE":
            return status
        misdialled = HTTP_PORT_HINT in why or TLS_FAILED_HINT in why  # waiting changes nothing
        if misdialled or time.monotonic() >= deadline:
            if misdialled or TLS_CA_HINT in why:  # up, but not as asked: "start it" would mislead
                raise ServiceUnreachableError(f"inference service {target}: {why}")
            raise ServiceUnreachableError(
                f"inference service {target} unreachable for {timeout_s:g} s ({why}): start it "
                "(`vidflow serve`) or point the run at it (--target, VIDFLOW_INFERENCE_TARGET)"
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def wait_until_serving(
    target: str,
    timeout_s: float = 120.0,
    tls_ca: Path | None = None,
    exited: Callable[[], bool] | None = None,
    also: Collection[str] = (),
) -> str:
    """Block until health says SERVING (or a status in `also`) and return it, or raise
    TimeoutError with the last status seen, or ServerExitedError as soon as `exited` says the
    server's process is gone. A target that answers as no gRPC service would (an HTTP port, a
    TLS handshake that fails) is ServiceUnreachableError at once: waiting changes nothing (a
    load test pointed at the HTTP port sat out its whole --wait before it said so)."""
    deadline = time.monotonic() + timeout_s
    status = "UNREACHABLE"
    while time.monotonic() < deadline:
        if exited is not None and exited():
            raise ServerExitedError(f"{target} will never serve: its process exited")
        status, why = health_check(target, tls_ca=tls_ca)
        if status == "SERVING" or status in also:
            return status
        if HTTP_PORT_HINT in why or TLS_FAILED_HINT in why:
            raise ServiceUnreachableError(f"inference service {target}: {why}")
        time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f} s (last status {status})")


def classify_files(
    target: str,
    paths: Iterable[Path],
    top_k: int = 1,
    timeout_s: float = 30.0,
    tls_ca: Path | None = None,
) -> list[FileResult]:
    """Classify each file with one unary call; errors are reported per file, not raised."""
    results = []
    with open_channel(target, tls_ca) as channel:
        stub = inference_pb2_grpc.ClassifierStub(channel)
        for path in paths:
            path = Path(path)
            try:
                request = inference_pb2.ClassifyRequest(
                    image=path.read_bytes(), top_k=top_k, request_id=path.name
                )
                results.append(FileResult(path, stub.Classify(request, timeout=timeout_s), None))
            except grpc.RpcError as exc:
                results.append(FileResult(path, None, rpc_failure(exc, tls_ca)))
            except OSError as exc:
                results.append(FileResult(path, None, str(exc)))
    return results
