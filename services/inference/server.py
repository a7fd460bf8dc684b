"""The gRPC inference service: wire protocol, health, metrics and shutdown.

It never knows which model or backend runs behind it; it gets a `ServedModel` from the loader
and a `DynamicBatcher` to share model calls between concurrent requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from grpc._cython.cygrpc import ExecuteBatchError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protos import inference_pb2, inference_pb2_grpc
from services.inference.batcher import DynamicBatcher, choose_batch_size
from services.inference.loader import ServedModel, load_served_model
from services.inference.metrics import ServiceMetrics
from services.inference.preprocess import InvalidImageError, decode_image, preprocess
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
# Requests of one ClassifyStream processed at once; enough to fill batches from a single stream.
STREAM_WINDOW = 32


class ModelNotReadyError(RuntimeError):
    pass


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a call or stream item was cancelled: its deadline passed, or its client left."""
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if context.time_remaining() == 0
        else grpc.StatusCode.CANCELLED
    )


def _add_classifier(service: InferenceService, server: grpc.aio.Server) -> None:
    """Register the Classifier service; Classify as client-streaming (see ClassifyCall)."""
    request, response = inference_pb2.ClassifyRequest, inference_pb2.ClassifyResponse
    handlers = {
        "Classify": grpc.stream_unary_rpc_method_handler(
            service.ClassifyCall,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            service.ClassifyStream,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo,
            request_deserializer=inference_pb2.ModelInfoRequest.FromString,
            response_serializer=inference_pb2.ModelInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


@dataclass(frozen=True)
class _Prepared:
    """One image after decoding: the model input, or why there is none."""

    tensor: np.ndarray | None
    # InvalidImageError for bad input; any other exception is the server's fault, of this item.
    error: Exception | None
    decode_s: float
    preprocess_s: float


@dataclass(frozen=True)
class _Outcome:
    """One image's result from a batch: class probabilities, or why there are none."""

    probabilities: np.ndarray | None
    error: Exception | None
    decode_s: float
    preprocess_s: float
    inference_s: float


class InferenceService(inference_pb2_grpc.ClassifierServicer):
    """Classifier RPCs on top of a served model and a batcher."""

    def __init__(self, settings: InferenceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: ServedModel | None = None
        self.batcher: DynamicBatcher[bytes, _Outcome] | None = None
        self.max_batch_size = settings.max_batch_size  # 1 once --batching finds it does not pay
        self._preprocess_pool = (
            ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
            if settings.preprocess_threads > 0
            else None
        )

    # ---- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        """Load and warm up the model off the event loop, choose whether to batch, then serve."""
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, load_served_model, self.settings)
        shape = model.preprocess.input_shape
        # First calls allocate; keep them out of requests' time.
        sizes = sorted({1, self.settings.max_batch_size})
        zeros = {size: np.zeros((size, *shape), np.float32) for size in sizes}
        await loop.run_in_executor(None, model.backend.warm_up, list(zeros.values()))
        choice = await loop.run_in_executor(
            None,
            functools.partial(
                choose_batch_size,
                self.settings.batching,
                self.settings.max_batch_size,
                lambda size: model.backend.run(zeros[size]),
                callers=model.workers,
                min_speedup=self.settings.batching_min_speedup,
            ),
        )
        log.info("%s", choice.reason)
        self.max_batch_size = choice.max_batch_size
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=self.max_batch_size,
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            workers=model.workers,
            on_batch=self.metrics.batch_size.observe,
        )
        self.batcher.start()
        self.model = model
        log.info(
            "model %s ready on %s/%s (max batch %d, max delay %.1f ms)",
            model.name,
            model.backend.name,
            model.backend.device,
            self.max_batch_size,
            self.settings.max_batch_delay_ms,
        )

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self._preprocess_pool is not None:
            self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

    # ---- the work of one batch and of one request ----------------------------------------

    def _prepare(self, image: bytes) -> _Prepared:
        """Decode and preprocess one image; a failure is this image's alone, never its batch's."""
        assert self.model is not None
        started = decoded = time.perf_counter()
        try:
            rgb = decode_image(image, self.settings.max_image_pixels)
            decoded = time.perf_counter()
            tensor = preprocess(rgb, self.model.preprocess)
        except InvalidImageError as exc:
            return _Prepared(None, exc, time.perf_counter() - started, 0.0)
        except Exception as exc:  # e.g. cv2.error: a bug or an exhausted server, not bad input
            log.exception("decoding or preprocessing one image of a batch failed")
            return _Prepared(None, exc, decoded - started, time.perf_counter() - decoded)
        return _Prepared(tensor, None, decoded - started, time.perf_counter() - decoded)

    def _run_batch(self, images: list[bytes]) -> list[_Outcome]:
        """Decode, preprocess and classify a batch (on a model worker's thread).

        Decoding here, right before the model call, spares each request a hop through a thread
        pool on arrival; with a worker per core, each decodes its own batch while the other runs
        the model (docs/benchmarks.md). A bad image fails only its own entry of the batch.
        """
        assert self.model is not None
        if self._preprocess_pool is None or len(images) == 1:
            prepared = [self._prepare(image) for image in images]
        else:
            prepared = list(self._preprocess_pool.map(self._prepare, images))
        valid = [p.tensor for p in prepared if p.tensor is not None]
        started = time.perf_counter()
        batch = valid[0][np.newaxis] if len(valid) == 1 else np.stack(valid) if valid else None
        probabilities = iter(self.model.backend.run(batch) if batch is not None else [])
        inference_s = time.perf_counter() - started
        return [
            _Outcome(
                next(probabilities) if p.tensor is not None else None,
                p.error,
                p.decode_s,
                p.preprocess_s,
                inference_s if p.tensor is not None else 0.0,
            )
            for p in prepared
        ]

    async def _classify(
        self, request: inference_pb2.ClassifyRequest
    ) -> inference_pb2.ClassifyResponse:
        model, batcher = self.model, self.batcher
        if model is None or batcher is None:
            raise ModelNotReadyError("the model is still loading; retry when health is SERVING")
        started = time.perf_counter()
        with batcher.admit() as admission:
            result = await admission.submit(request.image)
        outcome = result.value
        if outcome.error is not None:
            raise outcome.error
        assert outcome.probabilities is not None
        top_k = max(1, min(request.top_k or 1, len(model.class_names)))
        best = np.argsort(outcome.probabilities)[::-1][:top_k]
        stages = self.metrics.stage_seconds
        stages.labels("decode").observe(outcome.decode_s)
        stages.labels("preprocess").observe(outcome.preprocess_s)
        stages.labels("queue").observe(result.queue_s)
        stages.labels("inference").observe(outcome.inference_s)
        stages.labels("total").observe(time.perf_counter() - started)
        return inference_pb2.ClassifyResponse(
            request_id=request.request_id,
            model_name=model.name,
            predictions=[
                inference_pb2.Prediction(
                    label=model.class_names[index],
                    class_index=int(index),
                    score=float(outcome.probabilities[index]),
                )
                for index in best
            ],
            timings=inference_pb2.Timings(
                decode_ms=outcome.decode_s * 1e3,
                preprocess_ms=outcome.preprocess_s * 1e3,
                queue_ms=result.queue_s * 1e3,
                inference_ms=outcome.inference_s * 1e3,
                batch_size=result.batch_size,
            ),
        )

    # ---- RPCs ------------------------------------------------------------------------------

    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        self.metrics.in_flight.inc()
        try:
            response = await self._classify(request)
        except InvalidImageError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except ModelNotReadyError as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except asyncio.CancelledError:
            self._finish("Classify", _cancelled_code(context))
            raise
        except Exception as exc:
            log.exception("Classify failed for request %r", request.request_id)
            code, message = grpc.StatusCode.INTERNAL, f"inference failed: {exc}"
        else:
            self._finish("Classify", grpc.StatusCode.OK)
            return response
        # Counted before aborting: the client sees the status as soon as abort sends it, so a
        # scrape right after the error must already include it.
        self._finish("Classify", code)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort always raises

    async def ClassifyCall(
        self,
        request_iterator: AsyncIterator[inference_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.ClassifyResponse:
        """Classify, served as a client-streaming handler that reads its one request itself.

        gRPC runs a unary handler only once the request has arrived, so a call whose deadline
        passes first (or that its client cancels) would never reach any code of ours and go
        uncounted; this handler starts with the call and counts it.
        """
        try:
            request = await anext(aiter(request_iterator))
        except (StopAsyncIteration, asyncio.CancelledError, grpc.aio.UsageError):
            # No request: the call ended first (reading then gives EOF or UsageError), or its
            # client half-closed without one. Only answering tells which, as the cancellation
            # reaches the context later than the EOF.
            if context.time_remaining() != 0:
                with contextlib.suppress(ExecuteBatchError):  # failed: the client has gone
                    try:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT, "the call carried no ClassifyRequest"
                        )
                    except grpc.aio.AbortError:
                        self.metrics.requests.labels("Classify", "INVALID_ARGUMENT").inc()
                        raise
            self.metrics.requests.labels("Classify", _cancelled_code(context).name).inc()
            raise asyncio.CancelledError from None  # nobody to answer: end quietly
        return await self.Classify(request, context)

    def _finish(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(method, code.name).inc()

    async def _classify_stream_item(
        self, request: inference_pb2.ClassifyRequest
    ) -> tuple[inference_pb2.ClassifyResponse, grpc.StatusCode]:
        """One stream element and the status a unary call would have got.

        A failed item answers with `error` set instead of ending the stream.
        """
        try:
            return await self._classify(request), grpc.StatusCode.OK
        except InvalidImageError as exc:
            code, error = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except ModelNotReadyError as exc:
            code, error = grpc.StatusCode.UNAVAILABLE, str(exc)
        except Exception as exc:
            log.exception("ClassifyStream item %r failed", request.request_id)
            code, error = grpc.StatusCode.INTERNAL, f"inference failed: {exc}"
        return inference_pb2.ClassifyResponse(request_id=request.request_id, error=error), code

    def _start_stream_item(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> asyncio.Task[tuple[inference_pb2.ClassifyResponse, grpc.StatusCode]]:
        """Start one stream element; it is counted when it ends, however it ends.

        Counting in a done callback includes items cancelled before they ever ran (the stream's
        deadline passed or its client left while they waited in the window).
        """
        self.metrics.in_flight.inc()

        def count(task: asyncio.Task[tuple[inference_pb2.ClassifyResponse, grpc.StatusCode]]):
            if task.cancelled():
                code = _cancelled_code(context)
            elif task.exception() is not None:
                code = grpc.StatusCode.INTERNAL
            else:
                code = task.result()[1]
            self._finish("ClassifyStream", code)

        task = asyncio.ensure_future(self._classify_stream_item(request))
        task.add_done_callback(count)
        return task

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[inference_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.ClassifyResponse]:
        if self.model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        # Requests are worked on concurrently (so one stream fills batches) and answered in order.
        in_order: asyncio.Queue[
            asyncio.Task[tuple[inference_pb2.ClassifyResponse, grpc.StatusCode]] | None
        ] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read_requests() -> None:
            async for request in request_iterator:
                await in_order.put(self._start_stream_item(request, context))
            await in_order.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (task := await in_order.get()) is not None:
                response, _ = await task  # raises only if cancelled: items answer errors
                yield response
            await reader  # surface a failure to read the request stream
        finally:
            reader.cancel()
            while not in_order.empty():
                if (leftover := in_order.get_nowait()) is not None:
                    leftover.cancel()

    async def GetModelInfo(
        self, request: inference_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInfo:
        model = self.model
        if model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        _, height, width = model.preprocess.input_shape
        return inference_pb2.ModelInfo(
            model_name=model.name,
            backend=model.backend.name,
            device=model.backend.device,
            num_classes=len(model.class_names),
            input_height=height,
            input_width=width,
            max_batch_size=self.max_batch_size,
            max_batch_delay_ms=self.settings.max_batch_delay_ms,
            weights_sha256=model.weights_sha256,
        )


class CallTracker(grpc.aio.ServerInterceptor):
    """Counts the calls being handled and how they ended, so shutdown can say what it did.

    A call is drained when its handler returns or raises (any status), cancelled when gRPC
    cancels it: by the server at the end of the shutdown grace, or because its client left.
    """

    def __init__(self) -> None:
        self.open = 0
        self.ended = 0
        self.cancelled_by_clients = 0
        self.cancelled_by_shutdown = 0
        self.grace_ends: float | None = None  # loop time; set when shutdown begins

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(
            **{
                kind: self._tracked(behaviour)
                for kind in kinds
                if (behaviour := getattr(handler, kind)) is not None
            }
        )

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        self.open += 1
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream abandoned
            loop_time = asyncio.get_running_loop().time()
            if self.grace_ends is not None and loop_time >= self.grace_ends:
                self.cancelled_by_shutdown += 1
            else:
                self.cancelled_by_clients += 1
            raise
        except BaseException:
            self.ended += 1
            raise
        else:
            self.ended += 1
        finally:
            self.open -= 1

    def _tracked(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._tracking():
                    async for response in behaviour(request, context):
                        yield response

            return stream
        if inspect.iscoroutinefunction(behaviour):

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._tracking():
                    return await behaviour(request, context)

            return call
        return behaviour  # a synchronous handler: runs in a thread; not ours, not counted

    def summary(self, ended_before: int, grace_s: float) -> str:
        """What shutdown did with the calls open when it began."""
        return (
            f"{self.ended - ended_before} call(s) drained, {self.cancelled_by_shutdown} "
            f"cancelled at the end of the {grace_s:.0f} s grace, {self.cancelled_by_clients} "
            "cancelled by their clients"
        )


def _http_app(service: InferenceService, is_ready: asyncio.Event) -> web.Application:
    """/healthz (the process is up), /readyz (503 until the model serves) and /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if is_ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
    )
    return app


def _server_credentials(settings: InferenceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (PEM), or None to serve plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([pair])


async def serve(settings: InferenceSettings) -> None:
    """Run the service until SIGTERM or SIGINT, then drain calls in flight and return."""
    metrics = ServiceMetrics()
    service = InferenceService(settings, metrics)
    calls = CallTracker()
    server = grpc.aio.server(
        interceptors=[calls],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    _add_classifier(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = f"{settings.host}:{settings.port}"
    credentials = _server_credentials(settings)
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"could not bind the gRPC port {address}")

    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, not_serving)
    await server.start()

    is_ready = asyncio.Event()
    runner = web.AppRunner(_http_app(service, is_ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.http_port).start()
    log.info(
        "gRPC on %s (%s, reflection %s), HTTP on %s:%d; loading model",
        address,
        "TLS" if credentials is not None else "plaintext",
        "on" if settings.reflection else "off",
        settings.host,
        settings.http_port,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        load = asyncio.ensure_future(service.load())
        await asyncio.wait(
            [load, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED"
        )
        if load.done():
            load.result()  # a model that cannot load ends the server with its reason
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            is_ready.set()
            metrics.ready.set(1)
            log.info("SERVING")
            await stop.wait()
        else:
            load.cancel()
        log.info(
            "shutting down: no new calls, draining calls in flight (up to %.0f s)",
            settings.shutdown_grace_s,
        )
        is_ready.clear()
        metrics.ready.set(0)
        await health_servicer.enter_graceful_shutdown()
        calls.cancelled_by_clients = calls.cancelled_by_shutdown = 0
        ended_before, open_at_stop = calls.ended, calls.open
        calls.grace_ends = loop.time() + settings.shutdown_grace_s
        await server.stop(settings.shutdown_grace_s)
        for _ in range(100):  # cancelled handlers finish on the loop just after stop returns
            if calls.open == 0:
                break
            await asyncio.sleep(0.01)
        log.info(
            "stopped: of %d call(s) open at shutdown, %s",
            open_at_stop,
            calls.summary(ended_before, settings.shutdown_grace_s),
        )
    finally:
        with contextlib.suppress(Exception):
            await server.stop(0)
        await runner.cleanup()
        await service.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
