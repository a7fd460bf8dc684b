"""The Classifier RPCs: what each call answers and how it is counted.

It never knows which model or backend runs behind it; it gets a `ServedModel` from the loader
and a `DynamicBatcher` to share model calls between concurrent requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc._cython.cygrpc import ExecuteBatchError

from protos import inference_pb2, inference_pb2_grpc
from services.inference.batch_work import Outcome, run_batch
from services.inference.batcher import DynamicBatcher
from services.inference.call_limit import CallLimit
from services.inference.classify import cancelled_code, classify, failure_status
from services.inference.loader import ServedModel
from services.inference.metrics import ServiceMetrics
from services.inference.model_start import load_warm_model
from services.inference.settings import InferenceSettings
from services.inference.stream import (
    ItemTask,
    StreamIdleError,
    answer_in_order,
    start_counted_item,
)

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name

ClassifyResponse = inference_pb2.ClassifyResponse


class InferenceService(inference_pb2_grpc.ClassifierServicer):
    """Classifier RPCs on top of a served model and a batcher."""

    def __init__(self, settings: InferenceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: ServedModel | None = None
        self.batcher: DynamicBatcher[bytes, Outcome] | None = None
        self.max_batch_size = settings.max_batch_size  # 1 once --batching finds it does not pay
        self.call_limit = CallLimit(
            settings.max_concurrent_rpcs, metrics, settings.idle_call_timeout_s
        )
        self._preprocess_pool = (
            ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
            if settings.preprocess_threads > 0
            else None
        )

    async def load(self) -> None:
        """Load and warm up the model off the event loop, choose whether to batch, then serve."""
        model, self.max_batch_size = await load_warm_model(self.settings)
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=self.max_batch_size,
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            workers=model.workers,
            worker_niceness=self.settings.model_worker_nice,
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

    def _run_batch(self, images: list[bytes]) -> list[Outcome]:
        """The batcher's work (on a model worker's thread): see batch_work.run_batch."""
        assert self.model is not None
        return run_batch(self.model, images, self.settings.max_image_pixels, self._preprocess_pool)

    async def _classify(self, request: inference_pb2.ClassifyRequest) -> ClassifyResponse:
        return await classify(self.model, self.batcher, self.metrics, request)

    def _finish(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(method, code.name).inc()

    # ---- unary Classify ---------------------------------------------------------------------

    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> ClassifyResponse:
        self.metrics.in_flight.inc()
        try:
            response = await self._classify(request)
        except asyncio.CancelledError:
            self._finish("Classify", cancelled_code(context))
            raise
        except Exception as exc:
            code, message = failure_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("Classify failed for request %r", request.request_id)
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
    ) -> ClassifyResponse:
        """Classify, served as a client-streaming handler that reads its one request itself.

        gRPC runs a unary handler only once the request has arrived, so a call whose deadline
        passes first (or that its client cancels) would never reach any code of ours and go
        uncounted; this handler starts with the call and counts it.
        """
        async with self.call_limit.admitted("Classify", context):
            return await self._read_and_classify(request_iterator, context)

    async def _read_and_classify(
        self,
        request_iterator: AsyncIterator[inference_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> ClassifyResponse:
        try:
            async with asyncio.timeout(self.settings.idle_call_timeout_s):
                request = await anext(aiter(request_iterator))
        except TimeoutError:
            await self.call_limit.end_idle_call("Classify", context, "its request has not arrived")
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
            self.metrics.requests.labels("Classify", cancelled_code(context).name).inc()
            raise asyncio.CancelledError from None  # nobody to answer: end quietly
        return await self.Classify(request, context)

    # ---- ClassifyStream ---------------------------------------------------------------------

    async def _classify_stream_item(
        self, request: inference_pb2.ClassifyRequest
    ) -> tuple[ClassifyResponse, grpc.StatusCode]:
        """One stream element and the status a unary call would have got.

        A failed item answers with `error` set instead of ending the stream.
        """
        try:
            return await self._classify(request), grpc.StatusCode.OK
        except Exception as exc:
            code, error = failure_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("ClassifyStream item %r failed", request.request_id)
        return ClassifyResponse(request_id=request.request_id, error=error), code

    def _start_stream_item(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> ItemTask[ClassifyResponse]:
        self.metrics.in_flight.inc()
        return start_counted_item(
            self._classify_stream_item(request),
            context,
            lambda code: self._finish("ClassifyStream", code),
        )

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[inference_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ClassifyResponse]:
        if self.model is None:  # counted as a unary Classify refused now is
            self.metrics.requests.labels("ClassifyStream", "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        responses = answer_in_order(
            request_iterator,
            lambda request: self._start_stream_item(request, context),
            size=lambda request: len(request.image),
            idle_timeout_s=self.settings.idle_call_timeout_s,
        )
        admitted = self.call_limit.admitted("ClassifyStream", context)
        async with admitted, contextlib.aclosing(responses):
            try:
                async for response in responses:
                    yield response
            except StreamIdleError:
                what = "no next request came, with nothing in flight,"
                await self.call_limit.end_idle_call("ClassifyStream", context, what)

    # ---- GetModelInfo -----------------------------------------------------------------------

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
            # No batch is waited for when each request goes alone.
            max_batch_delay_ms=self.settings.max_batch_delay_ms if self.max_batch_size > 1 else 0,
            weights_sha256=model.weights_sha256,
            model_workers=model.workers,
        )


def add_classifier(service: InferenceService, server: grpc.aio.Server) -> None:
    """Register the Classifier service; Classify as client-streaming (see ClassifyCall)."""
    request, response = inference_pb2.ClassifyRequest, ClassifyResponse
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
