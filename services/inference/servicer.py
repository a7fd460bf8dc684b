"""The Classifier RPCs: what each call answers and how it is counted.

It never knows which model or backend runs behind it; it gets a `ServedModel` from the loader
and a `DynamicBatcher` to share model calls between concurrent requests.

Served by grpcio's synchronous server. A unary `Classify` runs on a pool of its own
(`CallPool`): where batching does not pay (`--batching auto` on a CPU) at most one call per
model worker and core runs, and it decodes, preprocesses and runs the model on the thread that
took it, as a plain grpcio server does; that shape held the plain server's img/s at every
concurrency where handing each call to a model thread, from an event loop or from handler
threads, lost 5-10 % from concurrency 2 (docs/benchmarks.md). Where batching pays, the calls
wait for the batcher on that pool instead. `ClassifyStream` items always go through the batcher,
so one stream fills batches.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import grpc

from common.cpus import usable_cpus
from protos import inference_pb2, inference_pb2_grpc
from services.inference.batch_work import Outcome, run_batch
from services.inference.batcher import BatchResult, DynamicBatcher
from services.inference.call_limit import CallLimit
from services.inference.call_pool import CallPool, Wait, ends_within, queued_since
from services.inference.classify import (
    ModelNotReadyError,
    cancelled_code,
    failure_status,
    respond,
)
from services.inference.loader import ServedModel
from services.inference.metrics import ServiceMetrics
from services.inference.model_start import load_warm_model
from services.inference.model_watch import WatchedBackend, watched
from services.inference.settings import InferenceSettings
from services.inference.stream import AnswersInOrder, StreamClosedError, StreamIdleError
from services.inference.stream_items import start_stream_item

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name

ClassifyResponse = inference_pb2.ClassifyResponse
NO_ANSWER = ClassifyResponse()  # returned by a handler whose call has ended: never sent
# How long a call whose request stream ended empty is given to show that it was cancelled: the
# cancel comes in the same pass of grpcio's completion queue as the end of the stream; without
# the wait, 1 in 4 runs of a test counted a call that outlived its deadline as INVALID_ARGUMENT.
END_OF_CALL_S = 0.05
CANCEL_WAIT_S = 1.0  # the most a handler waits for the call pool's watchdog to end its call
# What a ClassifyStream client that stops reading its answers is told, as the server ends it.
UNREAD = "its client read no answer sent"
# How the watchdog ends a call waiting for its request: idle, or to make room (made_room).
_ENDED_WAIT = {False: grpc.StatusCode.DEADLINE_EXCEEDED, True: grpc.StatusCode.RESOURCE_EXHAUSTED}


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
        # Unary Classify's threads; how many may run calls is set once the model is loaded.
        self.classify_pool = CallPool(
            usable_cpus(),
            settings.idle_call_timeout_s,
            max_threads=settings.max_concurrent_rpcs,
            places=self.call_limit,
        )
        self._preprocess_pool = (
            ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
            if settings.preprocess_threads > 0
            else None
        )

    async def load(self, on_model_health: Callable[[bool], None] = lambda _answers: None) -> None:
        """Load and warm up the model off the event loop, choose whether to batch, then serve;
        `on_model_health(answers)` hears when the model stops answering, and answers again."""
        model, self.max_batch_size = await load_warm_model(self.settings)
        model = watched(model, on_model_health, self.settings.hung_model_call_s)
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=self.max_batch_size,
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            workers=model.workers,
            worker_niceness=self.settings.model_worker_nice,
            on_batch=self.metrics.batch_size.observe,
        )
        self.batcher.start()
        # Inline, one call per model worker and core; waiting for the batcher, any number.
        inline_calls, batched = min(model.workers, usable_cpus()), self.max_batch_size > 1
        self.classify_pool.set_limit(self.settings.max_concurrent_rpcs if batched else inline_calls)
        self.model = model
        _say_ready(model, self.max_batch_size, self.settings.max_batch_delay_ms, inline_calls)

    def close(self) -> None:
        if self.model is not None and isinstance(self.model.backend, WatchedBackend):
            self.model.backend.close()
        if self.batcher is not None:
            self.batcher.close()
        self.classify_pool.shutdown(wait=False)
        if self._preprocess_pool is not None:
            self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

    def _run_batch(self, images: list[bytes]) -> list[Outcome]:
        """The batcher's work (on a model worker's thread): see batch_work.run_batch."""
        assert self.model is not None
        return run_batch(self.model, images, self.settings.max_image_pixels, self._preprocess_pool)

    def _finish(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(method, code.name).inc()

    # ---- unary Classify ---------------------------------------------------------------------

    def _classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.ServicerContext, came: float
    ) -> ClassifyResponse:
        model, batcher = self.model, self.batcher
        if model is None or batcher is None:
            raise ModelNotReadyError("the model is still loading; retry when health is SERVING")
        if self.max_batch_size == 1:  # on this thread: no hand-off, as the plain server
            if not context.is_active():  # ended as it waited for this thread: no model run
                raise CancelledError
            pixels = self.settings.max_image_pixels
            queued_s = time.perf_counter() - came  # for a thread: how the direct path queues
            result = BatchResult(run_batch(model, [request.image], pixels)[0], queued_s, 1)
            self.metrics.batch_size.observe(1)
        else:
            with batcher.admit() as admission:
                future = admission.submit(request.image)
            if not context.add_callback(future.cancel):  # a call that ends takes it back
                future.cancel()
            result = future.result()
        return respond(model, self.metrics, request, result, came)

    def Classify(
        self,
        request: inference_pb2.ClassifyRequest,
        context: grpc.ServicerContext,
        came: float | None = None,
    ) -> ClassifyResponse:
        self.metrics.in_flight.inc()  # `came`: when its request was there (_request_came)
        try:
            response = self._classify(request, context, came or time.perf_counter())
        except Exception as exc:  # CancelledError included: the call ended while it waited
            if not context.is_active():
                self._finish("Classify", cancelled_code(context))
                return NO_ANSWER
            code, message = failure_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("Classify failed for request %r", request.request_id)
        else:
            # A call that ended meanwhile (its deadline, its client) gets no answer: not OK.
            code = grpc.StatusCode.OK if context.is_active() else cancelled_code(context)
            self._finish("Classify", code)
            return response
        # Counted before aborting: the client sees the status as soon as abort sends it, so a
        # scrape right after the error must already include it.
        self._finish("Classify", code)
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort always raises

    def ClassifyCall(
        self, requests: Iterator[inference_pb2.ClassifyRequest], context: grpc.ServicerContext
    ) -> ClassifyResponse:
        """Classify, served as a client-streaming handler that reads its one request itself.

        gRPC runs a unary handler only once the request has arrived (on a pool thread that it
        holds meanwhile), so a call whose deadline passes first, or whose client never sends,
        would never reach any code of ours and go uncounted; this handler starts with the call,
        counts it and reads inside the pool's wait, which frees the thread's slot while it waits
        and ends the call past --idle-call-timeout-s.
        """
        if self.classify_pool.refusing():  # its place is taken when the call comes (CallPool)
            self.call_limit.refuse("Classify", context)
        idle = self.call_limit.idle_ender("Classify", context, "its request has not arrived")
        try:
            with self.classify_pool.waiting_for_request(context, idle) as wait:
                request, came = next(requests, None), _request_came(wait)  # in that order
        except grpc.RpcError:  # the call ended first: nobody to answer
            _count_ended_wait(self.metrics, wait, context)
            return NO_ANSWER
        if wait.cancelled:  # ended by the watchdog as its request came
            _end_cancelled_wait(self.metrics, wait, context)
            return NO_ANSWER
        if request is None:  # half-closed without a request, or ending
            _end_without_request(self.metrics, context)
            return NO_ANSWER
        return self.Classify(request, context, came)

    # ---- ClassifyStream ---------------------------------------------------------------------

    def _start_stream_item(
        self, request: inference_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> Future[ClassifyResponse]:
        assert self.model is not None and self.batcher is not None
        self.metrics.in_flight.inc()
        finish = functools.partial(self._finish, "ClassifyStream")
        return start_stream_item(self.model, self.batcher, self.metrics, request, context, finish)

    def ClassifyStream(
        self, requests: Iterator[inference_pb2.ClassifyRequest], context: grpc.ServicerContext
    ) -> Iterator[ClassifyResponse]:
        if self.model is None:  # counted as a unary Classify refused now is
            self.metrics.requests.labels("ClassifyStream", "UNAVAILABLE").inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        with self.call_limit.admitted("ClassifyStream", context):
            answers = AnswersInOrder(
                requests,
                functools.partial(self._start_stream_item, context=context),
                size=lambda request: len(request.image),
                idle_timeout_s=self.settings.idle_call_timeout_s,
                on_unread=self.call_limit.idle_ender("ClassifyStream", context, UNREAD),
            )
            context.add_callback(answers.close)  # the call ended: nothing more to answer
            try:
                yield from answers
            except StreamIdleError:
                what = "no next request came, with nothing in flight,"
                self.call_limit.end_idle_call("ClassifyStream", context, what)
            except (grpc.RpcError, StreamClosedError):  # the call has ended: nobody to answer
                return

    # ---- GetModelInfo -----------------------------------------------------------------------

    def GetModelInfo(
        self, request: inference_pb2.ModelInfoRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ModelInfo:
        model = self.model
        if model is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
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


def add_classifier(service: InferenceService, server: grpc.Server) -> None:
    """Register the Classifier service: Classify as client-streaming (see ClassifyCall) on its
    own pool (grpcio's synchronous server runs a method on the pool set as its behaviour's
    `experimental_thread_pool`, every other on the server's)."""
    request, response = inference_pb2.ClassifyRequest, ClassifyResponse
    classify = functools.partial(service.ClassifyCall)
    classify.experimental_thread_pool = service.classify_pool  # type: ignore[attr-defined]
    handlers = {
        "Classify": grpc.stream_unary_rpc_method_handler(
            classify,
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


def _say_ready(model: ServedModel, max_batch: int, max_delay_ms: float, inline_calls: int) -> None:
    log.info(
        "model %s ready on %s/%s (max batch %d, max delay %.1f ms; Classify %s)",
        model.name, model.backend.name, model.backend.device, max_batch, max_delay_ms,
        f"on {inline_calls} handler thread(s)" if max_batch == 1 else "batched",
    )  # fmt: skip


def _request_came(wait: Wait) -> float:
    """When a Classify call's request was there to be served: as it was read, where the read
    stalled (its request came late), else as the call came to the pool (it waited in the
    queue, and that wait counts in its latency: 24 clients on 2 threads read as the model's
    time). By the watchdog's mark, not a read's own time: grpcio's handoff of a request
    already there can take milliseconds under load."""
    now = time.perf_counter()
    return now if wait.stalled else (queued_since() or now)


def _end_cancelled_wait(metrics: ServiceMetrics, wait: Wait, context: grpc.ServicerContext) -> None:
    """Counted, once the watchdog has ended the call (else an empty OK went out); an end that
    is late is made here, with the watchdog's status: never an empty OK either."""
    _count_ended_wait(metrics, wait, context)
    if not ends_within(context, CANCEL_WAIT_S):
        context.abort(_ENDED_WAIT[wait.made_room], "the call was ended as its request came")


def _end_without_request(metrics: ServiceMetrics, context: grpc.ServicerContext) -> None:
    """A call half-closed without its request (INVALID_ARGUMENT), or ending (counted so). One
    whose deadline has passed is ending: its cancel, heard a moment after the end of its request
    stream, came past the wait on a loaded machine and it was counted INVALID_ARGUMENT."""
    remaining = context.time_remaining()
    ending = remaining is not None and remaining <= 0
    if not ending and not ends_within(context, END_OF_CALL_S):
        metrics.requests.labels("Classify", "INVALID_ARGUMENT").inc()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no ClassifyRequest")
    metrics.requests.labels("Classify", cancelled_code(context).name).inc()


def _count_ended_wait(metrics: ServiceMetrics, wait: Wait, context: grpc.ServicerContext) -> None:
    """Count a Classify call that ended while it waited for its request: ended by its client,
    or by the watchdog to make room (RESOURCE_EXHAUSTED); one ended idle is counted by IdleEnd."""
    if wait.made_room:
        metrics.requests.labels("Classify", "RESOURCE_EXHAUSTED").inc()
    elif not wait.cancelled:
        metrics.requests.labels("Classify", cancelled_code(context).name).inc()
