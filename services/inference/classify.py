"""One ClassifyRequest's ClassifyResponse from its model outcome, and the status of a failure.

Shared by the unary Classify and each ClassifyStream item, so both answer and count alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import numpy as np

from protos import inference_pb2
from services.inference.batch_work import Outcome
from services.inference.batcher import BatchResult
from services.inference.loader import ServedModel
from services.inference.metrics import ServiceMetrics
from services.inference.model_watch import ModelNotAnsweringError
from services.inference.preprocess import InvalidImageError


class ModelNotReadyError(RuntimeError):
    """A request came before the model was loaded and warmed up."""


def failure_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a failed classification answers with."""
    if isinstance(exc, InvalidImageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelNotReadyError | ModelNotAnsweringError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"inference failed: {exc}"


# The server's deadline trails the client's by the time the call took to arrive, so a client
# whose own deadline fired cancels while the server still sees a little time left (tens of ms
# on a loaded box). HTTP/2 gives both kinds of leaving the same RST_STREAM, so time is the only
# sign; a client that leaves this close to its deadline is counted as timed out.
DEADLINE_SLACK_S = 0.5


def cancelled_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why a call or stream item was cancelled: its deadline passed, or its client left."""
    remaining = context.time_remaining()
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if remaining is not None and remaining <= DEADLINE_SLACK_S
        else grpc.StatusCode.CANCELLED
    )


def respond(
    model: ServedModel,
    metrics: ServiceMetrics,
    request: inference_pb2.ClassifyRequest,
    result: BatchResult[Outcome],
    started: float,
) -> inference_pb2.ClassifyResponse:
    """The top-k answer to one request from its model outcome (`started`: when the request
    was taken, perf_counter); raises the image's error if it has one."""
    outcome = result.value
    if outcome.error is not None:
        raise outcome.error
    stages = metrics.stage_seconds
    stages.labels("decode").observe(outcome.decode_s)
    stages.labels("preprocess").observe(outcome.preprocess_s)
    stages.labels("queue").observe(result.queue_s)
    stages.labels("inference").observe(outcome.inference_s)
    stages.labels("total").observe(time.perf_counter() - started)
    timings = inference_pb2.Timings(
        decode_ms=outcome.decode_s * 1e3,
        preprocess_ms=outcome.preprocess_s * 1e3,
        queue_ms=result.queue_s * 1e3,
        inference_ms=outcome.inference_s * 1e3,
        batch_size=result.batch_size,
    )
    assert outcome.probabilities is not None
    return top_k_response(request, model.name, model.class_names, outcome.probabilities, timings)


def top_k_response(
    request: inference_pb2.ClassifyRequest,
    model_name: str,
    class_names: Sequence[str],
    probabilities: np.ndarray,
    timings: inference_pb2.Timings,
) -> inference_pb2.ClassifyResponse:
    """The answer to `request`: its top-k classes (at least 1, at most every class), best
    first. Shared with the benchmarks' plain server, which must answer exactly the same."""
    top_k = max(1, min(request.top_k or 1, len(class_names)))
    best = np.argsort(probabilities)[::-1][:top_k]
    return inference_pb2.ClassifyResponse(
        request_id=request.request_id,
        model_name=model_name,
        predictions=[
            inference_pb2.Prediction(
                label=class_names[index], class_index=int(index), score=float(probabilities[index])
            )
            for index in best
        ],
        timings=timings,
    )
