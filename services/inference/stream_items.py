"""One ClassifyStream element: sent to the batcher, answered with its own status.

A failed item answers with `error` set instead of ending the stream, and each item is counted
once, however it ends: answered, failed, or cancelled before it ran (the stream's deadline
passed or its client left while it waited).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

import grpc

from protos import inference_pb2
from services.inference.batch_work import Outcome
from services.inference.batcher import BatchResult, DynamicBatcher
from services.inference.classify import cancelled_code, failure_status, respond
from services.inference.loader import ServedModel
from services.inference.metrics import ServiceMetrics

log = logging.getLogger(__name__)

ClassifyResponse = inference_pb2.ClassifyResponse


def stream_item_answer(
    model: ServedModel,
    metrics: ServiceMetrics,
    request: inference_pb2.ClassifyRequest,
    batch: Future[BatchResult[Outcome]],
    started: float,
) -> tuple[ClassifyResponse, grpc.StatusCode]:
    """One stream element's answer from its batch entry, and the status a unary call would
    have got."""
    try:
        return respond(model, metrics, request, batch.result(), started), grpc.StatusCode.OK
    except Exception as exc:
        code, error = failure_status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("ClassifyStream item %r failed", request.request_id)
    return ClassifyResponse(request_id=request.request_id, error=error), code


def start_stream_item(
    model: ServedModel,
    batcher: DynamicBatcher[bytes, Outcome],
    metrics: ServiceMetrics,
    request: inference_pb2.ClassifyRequest,
    context: grpc.ServicerContext,
    finish: Callable[[grpc.StatusCode], None],
) -> Future[ClassifyResponse]:
    """Send one element to the batcher; its future answer. `finish` gets its status once it
    ends; cancelling the answer takes the image back from the batcher if no batch has it."""
    started = time.perf_counter()
    answer: Future[ClassifyResponse] = Future()
    batch: Future[BatchResult[Outcome]] = Future()
    try:
        with batcher.admit() as admission:
            batch = admission.submit(request.image)
    except Exception as exc:  # the batcher is closing: the item fails, not the stream
        batch.set_exception(exc)

    def settle(batch: Future[BatchResult[Outcome]]) -> None:
        if batch.cancelled() or answer.cancelled():
            answer.cancel()
            code = cancelled_code(context)
        else:
            response, code = stream_item_answer(model, metrics, request, batch, started)
            if not context.is_active():  # never sent: the call has ended
                code = cancelled_code(context)
            # Counted before its answer is let go, as a unary call is: a client that scraped
            # /metrics right after its last answer missed it (this thread runs lowered, and
            # was often descheduled between the two). Running, it can no longer be cancelled.
            if answer.set_running_or_notify_cancel():
                finish(code)
                answer.set_result(response)
                return
            code = cancelled_code(context)  # cancelled meanwhile by the stream's end
        finish(code)

    answer.add_done_callback(lambda done: batch.cancel() if done.cancelled() else None)
    batch.add_done_callback(settle)
    return answer
