"""Running the inference service: gRPC and HTTP up at once, the model loaded behind them, and a
graceful stop on SIGTERM or SIGINT.

The parts live beside it: the RPCs in servicer.py, the HTTP probes in http_endpoint.py, the
drain in shutdown.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.extras import missing_extra
from common.files import atomic_output
from common.net import host_port, is_loopback_host
from services.inference.call_auth import TokenCheck
from services.inference.call_pool import CallPool, queued_calls
from services.inference.http_endpoint import start_http
from services.inference.metrics import ServiceMetrics
from services.inference.model_watch import WatchedBackend
from services.inference.request_wait import RequestWait
from services.inference.servicer import SERVICE_NAME, InferenceService, add_classifier
from services.inference.settings import InferenceSettings
from services.inference.shutdown import CallTracker, drain_calls

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ServerStartError(RuntimeError):
    """The server could not start: a port in use, a model that cannot load. The message says
    which; the CLI prints it and exits 2."""


def _server_credentials(settings: InferenceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (PEM), or None to serve plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key: {exc}") from None
    _check_key_pair(settings.tls_cert, settings.tls_key)
    return grpc.ssl_server_credentials([pair])


def _check_key_pair(cert: Path, key: Path) -> None:
    """Refuse a certificate or key that is not PEM, or a key that is not the certificate's.

    gRPC takes any bytes here and fails only when it binds the port, which then read as "in
    use?"; OpenSSL (through Python's ssl) says what is wrong."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = "the key is not the certificate's"
        else:
            problem = _pem_problem(cert.read_bytes(), key.read_bytes(), exc)
        raise ValueError(f"--tls-cert {cert} and --tls-key {key}: {problem}") from None


def _pem_problem(cert: bytes, key: bytes, error: ssl.SSLError) -> str:
    """Which file OpenSSL refused, and why where it shows: it says only "PEM lib" for a
    swapped pair, a key in the certificate's place or a certificate in the key's."""
    has_cert, has_key = b"-----BEGIN CERTIFICATE-----", b"PRIVATE KEY-----"
    if has_cert not in cert:
        swapped = has_key in cert and has_cert in key
        return "--tls-cert holds no PEM certificate" + (
            " (the two files look swapped)" if swapped else ""
        )
    if has_key not in key:
        return "--tls-key holds no PEM private key"
    if b"ENCRYPTED" in key:
        return "--tls-key is encrypted: give it unencrypted (the server cannot ask a passphrase)"
    return f"OpenSSL refused them ({error.reason or error})"


# Calls beyond the classifier's limit that the server still takes: health checks and watches,
# GetModelInfo, reflection, and calls being refused (a burst of 40 watches with 32 here had
# some refused by gRPC's own limit, whose message says nothing of what to do).
OTHER_CALLS_ROOM = 64
# Health watches may take a quarter of that room, reflection streams another: the rest stays
# for checks, however many watch or reflect.
MAX_HEALTH_WATCHES = MAX_REFLECTION_STREAMS = OTHER_CALLS_ROOM // 4
# Threads that run health checks, GetModelInfo and the start of health watches at once (calls
# waiting for their request do not hold one: request_wait.py).
CHECK_THREADS = 4


def server_calls(settings: InferenceSettings) -> int:
    """The calls the gRPC server takes at once: the classifier's, and room for the others."""
    return settings.max_concurrent_rpcs + OTHER_CALLS_ROOM


def checks_pool(settings: InferenceSettings) -> CallPool:
    """The pool of the calls of one request other than Classify (see CHECK_THREADS); a thread
    for each such call the server takes that waits for its request, so none is cut for room."""
    return CallPool(CHECK_THREADS, settings.idle_call_timeout_s, server_calls(settings))


def _grpc_server(
    settings: InferenceSettings, service: InferenceService, calls: CallTracker, checks: CallPool
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """The gRPC server with the classifier, health and (if asked) reflection, bound to its
    port, and that port (the one the system chose for --port 0).

    Three pools of threads: unary Classify on the service's own (servicer.py); calls of one
    request (health, GetModelInfo) on a small `CallPool`; streams (ClassifyStream, reflection)
    and refusals on the server's pool, a thread per stream up to the calls the server takes."""
    max_calls = server_calls(settings)
    # Outside the call tracker: a call is counted once its request is in (request_wait.py).
    interceptors: list[grpc.ServerInterceptor] = [
        RequestWait(checks, settings.idle_call_timeout_s, service.metrics),
        calls,
    ]
    if (token := settings.auth_token) is not None:  # checked first: a refused call goes no further
        interceptors.insert(0, TokenCheck(token.get_secret_value(), service.metrics))
    server = grpc.server(
        ThreadPoolExecutor(max_calls, thread_name_prefix="grpc-stream"),
        interceptors=interceptors,
        # The classifier's calls are limited by the service (`CallLimit`); this bound, a little
        # above, leaves health checks and model-info calls room when the classifier is full.
        maximum_concurrent_rpcs=max_calls,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_classifier(service, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = host_port(settings.host, settings.port)
    credentials = _server_credentials(settings)
    try:  # grpcio raises RuntimeError where older versions returned 0
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ServerStartError(f"could not bind the gRPC port {address} (in use?)")
    return server, health_servicer, bound


async def _set_health(
    health_servicer: health.HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus
) -> None:
    """The same status for the server as a whole and for the Classifier service (off the
    loop: grpc's servicer sends it to every watcher before it returns)."""
    for name in ("", SERVICE_NAME):
        await asyncio.to_thread(health_servicer.set, name, status)


async def _loaded_before_stop(
    service: InferenceService, stop: asyncio.Event, on_model_health: Callable[[bool], None]
) -> bool:
    """Load the model unless a stop signal comes first; a model that cannot load raises."""
    load = asyncio.ensure_future(service.load(on_model_health))
    await asyncio.wait([load, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED")
    if not load.done():
        load.cancel()
        return False
    try:
        load.result()
    except Exception as exc:  # a model that cannot load ends the server with its reason
        log.debug("loading the model failed", exc_info=True)
        if isinstance(exc, ModuleNotFoundError) and (needs := missing_extra(exc)):
            # a core install: the registry's models are made with torch
            backend = service.settings.backend
            how = "exporting it" if backend == "onnx" else f"the {backend} backend"
            other = (
                "; or serve an exported model with --onnx-model FILE" if backend == "onnx" else ""
            )
            raise ServerStartError(f"the model could not be loaded: {how} {needs}{other}") from exc
        raise ServerStartError(
            f"the model could not be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    return True


def _health_follows_the_model(
    service: InferenceService,
    health_servicer: health.HealthServicer,
    is_ready: asyncio.Event,
    metrics: ServiceMetrics,
    stop: asyncio.Event,
) -> Callable[[bool], None]:
    """What the model's watch (model_watch.py) calls, from a model thread, as the model stops
    answering or answers again: health, `/readyz` and the ready gauge follow it, on the loop,
    one change at a time and as the watch says now (changes told from two threads may come in
    either order); not once the server drains (NOT_SERVING for good then)."""
    loop, applying = asyncio.get_running_loop(), asyncio.Lock()

    async def follow() -> None:
        async with applying:
            backend = service.model.backend if service.model is not None else None
            if stop.is_set() or not isinstance(backend, WatchedBackend):
                return
            answers = backend.answering
            # These first: set after gRPC's health (two thread hops), a probe that had read the
            # change there could find `/readyz` and the gauge not yet saying it. A drain that
            # begins meanwhile clears them after, and gRPC's health ignores sets once draining.
            is_ready.set() if answers else is_ready.clear()
            metrics.ready.set(int(answers))
            status = health_pb2.HealthCheckResponse
            await _set_health(health_servicer, status.SERVING if answers else status.NOT_SERVING)

    def changed(_answers: bool) -> None:
        asyncio.run_coroutine_threadsafe(follow(), loop)

    return changed


async def serve(settings: InferenceSettings) -> None:
    """Run the service until SIGTERM or SIGINT, then drain calls in flight and return."""
    stop, stop_now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # a second Ctrl-C or SIGTERM while draining: cut the calls now
        (stop_now if stop.is_set() else stop).set()

    # Before any port opens, so a stop that comes as soon as the server answers is kept.
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        await _serve_until(stop, stop_now, settings)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def _note_http_port(path: Path | None, http_port: int, host: str) -> None:
    """Where the health check finds /readyz (ready_probe.py): the port and the address bound
    (`serve --host ADDR` alone, the variable at the image's 0.0.0.0: the check asked loopback,
    and the container stayed unhealthy for good), whole or not at all. A file that cannot be
    written is said, and serving goes on."""
    if path is None:
        return
    try:
        with atomic_output(path) as partial:
            partial.write_text(f"{http_port} {host}\n")
    except OSError as exc:
        log.warning("could not write the HTTP port to %s (--http-port-file): %s", path, exc)


def _say_listening(settings: InferenceSettings, grpc_port: int, http_port: int) -> None:
    """Where the server listens and how (the bound ports: --port 0 lets the system choose)."""
    tls = settings.tls_cert is not None and settings.tls_key is not None
    log.info(
        "gRPC on %s (%s, reflection %s, token %s), HTTP on %s; loading model",
        host_port(settings.host, grpc_port),
        "TLS" if tls else "plaintext",
        "on" if settings.reflection else "off",
        "wanted" if settings.auth_token is not None else "not wanted",
        host_port(settings.host, http_port),
    )
    if settings.auth_token is not None and not tls and not is_loopback_host(settings.host):
        log.warning(
            "the token crosses the network in clear on %s: serve with --tls-cert/--tls-key "
            "(clients send it only over TLS or to a loopback address)",
            settings.host,
        )


async def _serve_until(
    stop: asyncio.Event, stop_now: asyncio.Event, settings: InferenceSettings
) -> None:
    metrics = ServiceMetrics()
    service = InferenceService(settings, metrics)
    calls = CallTracker(max_watches=MAX_HEALTH_WATCHES, max_reflections=MAX_REFLECTION_STREAMS)
    checks = checks_pool(settings)
    server, health_servicer, grpc_port = _grpc_server(settings, service, calls, checks)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    is_ready = asyncio.Event()
    try:
        runner = await start_http(metrics.registry, is_ready, settings.host, settings.http_port)
    except OSError as exc:
        server.stop(0)
        raise ServerStartError(
            f"could not serve HTTP on {host_port(settings.host, settings.http_port)}: "
            f"{exc.strerror or exc}"
        ) from None
    http_port = runner.addresses[0][1] if runner.addresses else settings.http_port
    _note_http_port(settings.http_port_file, http_port, settings.host)
    _say_listening(settings, grpc_port, http_port)
    try:
        follow = _health_follows_the_model(service, health_servicer, is_ready, metrics, stop)
        if await _loaded_before_stop(service, stop, follow):
            is_ready.set()
            metrics.ready.set(1)
            await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
            log.info("SERVING")
            await stop.wait()
        log.info(
            "shutting down: no new calls, draining calls in flight (up to %.0f s)",
            settings.shutdown_grace_s,
        )
        is_ready.clear()
        metrics.ready.set(0)
        queued = functools.partial(queued_calls, service.classify_pool, checks)
        await drain_calls(
            server, health_servicer, calls, settings.shutdown_grace_s, stop_now, queued
        )
    finally:
        with contextlib.suppress(Exception):
            server.stop(0)
        await runner.cleanup()
        await asyncio.to_thread(service.close)
        checks.shutdown(wait=False)
