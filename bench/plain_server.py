"""Baseline: a plain synchronous grpcio server, no batching, serving the same Classifier service.

    python -m bench.plain_server --onnx-model FILE --port PORT [--workers N]
        [--classify-pool [--idle-call-timeout-s S]] [--lone-call-threads N]

What a first version of this service would be: `grpc.server` with a thread pool, each Classify
call decoded, preprocessed and run through ONNX Runtime on its own handler thread at batch 1.
It shares with `vidflow serve` what the comparison must hold equal: the ONNX file, the
preprocessing function (`services/inference/preprocess.py`) and ONNX Runtime's thread budget
(`OnnxBackend` with one session of cores / workers threads per worker; no wide session for lone
calls, which is vidflow's own). It answers the gRPC health check so `wait_until_serving` works.
Run it as its own process: `start_plain_server` does so for the benchmark.

`--classify-pool` is the shape `vidflow serve` has taken (docs/benchmarks.md): Classify on a
pool of its own (`services/inference/call_pool.py`) where at most `workers` threads run calls,
each running the model on the thread that took the call, a call whose request does not come
giving up its slot and ended after `--idle-call-timeout-s`; every other RPC on a pool of
SPARE_THREADS. `--lone-call-threads` adds vidflow's wide session for lone calls.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.cli_args import bench_parser
from common.cli_types import existing_file, non_negative_int, port, positive_float
from common.cpus import usable_cpus
from common.net import free_port
from devstack.launcher import REPO_ROOT, ServerProcess, launch_logged
from protos import inference_pb2, inference_pb2_grpc
from services.inference.backends import OnnxBackend, threads_per_call
from services.inference.call_pool import CallPool
from services.inference.classify import top_k_response
from services.inference.onnx_export import ExportedModelInfo
from services.inference.preprocess import InvalidImageError, decode_image, preprocess
from services.inference.servicer import SERVICE_NAME
from services.inference.settings import InferenceSettings


class PlainClassifier(inference_pb2_grpc.ClassifierServicer):
    """Classify one image per call on the calling thread: decode, preprocess, model, top-k."""

    def __init__(self, backend: OnnxBackend, info: ExportedModelInfo) -> None:
        self.backend = backend
        self.info = info

    def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        started = time.perf_counter()
        try:
            rgb = decode_image(request.image)
        except InvalidImageError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        decoded = time.perf_counter()
        tensor = preprocess(rgb, self.info.preprocess)
        prepared = time.perf_counter()
        probabilities = self.backend.run(tensor[np.newaxis])[0]
        done = time.perf_counter()
        timings = inference_pb2.Timings(
            decode_ms=(decoded - started) * 1e3,
            preprocess_ms=(prepared - decoded) * 1e3,
            inference_ms=(done - prepared) * 1e3,
            batch_size=1,
        )
        info = self.info
        return top_k_response(request, info.name, info.class_names, probabilities, timings)


SPARE_THREADS = 16  # the other RPCs' pool with --classify-pool
IDLE_CALL_TIMEOUT_S = InferenceSettings.model_fields["idle_call_timeout_s"].default  # serve's


class PooledClassifier(PlainClassifier):
    """Classify as a client-streaming call that reads its one request itself, on a `CallPool`:
    the handler starts before the request is in, so a request that never comes is seen."""

    def __init__(self, backend: OnnxBackend, info: ExportedModelInfo, pool: CallPool) -> None:
        super().__init__(backend, info)
        self.pool = pool

    def ClassifyCall(
        self,
        requests: Iterator[inference_pb2.ClassifyRequest],
        context: grpc.ServicerContext,
    ) -> inference_pb2.ClassifyResponse:
        try:
            with self.pool.waiting_for_request(context):
                request = next(requests, None)
        except grpc.RpcError:  # cancelled while waiting: nobody to answer
            return inference_pb2.ClassifyResponse()
        if request is None:
            if not context.is_active():  # cancelled (the pool's idle timeout) or gone
                return inference_pb2.ClassifyResponse()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no ClassifyRequest")
        return self.Classify(request, context)

    def add_to(self, server: grpc.Server) -> None:
        """Classify alone, on the pool: grpcio's synchronous server runs a method on the pool
        set as its behaviour's `experimental_thread_pool`, every other on the server's."""
        behaviour = functools.partial(self.ClassifyCall)
        behaviour.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        classify = grpc.stream_unary_rpc_method_handler(
            behaviour,
            request_deserializer=inference_pb2.ClassifyRequest.FromString,
            response_serializer=inference_pb2.ClassifyResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Classify": classify}),)
        )


def serve(
    onnx_model: Path,
    port: int,
    workers: int,
    lone_call_threads: int,
    classify_pool_idle_timeout_s: float | None,
) -> None:
    """Serve until killed: `workers` handler threads, one single-call ORT session each (with a
    Classify pool: that pool's `workers` threads, others for the other RPCs)."""
    backend = OnnxBackend(
        onnx_model,
        threads=threads_per_call(workers, 0),
        sessions=workers,
        lone_call_threads=lone_call_threads,
    )
    info = ExportedModelInfo.from_metadata(backend.metadata)
    backend.warm_up([np.zeros((1, *info.preprocess.input_shape), np.float32)])
    if classify_pool_idle_timeout_s is None:
        server = grpc.server(ThreadPoolExecutor(max_workers=workers))
        inference_pb2_grpc.add_ClassifierServicer_to_server(PlainClassifier(backend, info), server)
    else:
        server = grpc.server(ThreadPoolExecutor(max_workers=SPARE_THREADS))
        pool = CallPool(workers, classify_pool_idle_timeout_s)
        PooledClassifier(backend, info, pool).add_to(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"plain server on 127.0.0.1:{port}, {workers} worker(s)", flush=True)
    server.wait_for_termination()


def start_plain_server(
    tmp_dir: Path, onnx_model: Path, workers: int = 0, extra_args: Sequence[str] = ()
) -> ServerProcess:
    """Start the plain server as its own process (wait for SERVING with `wait_serving`)."""
    port = free_port()
    log_path = tmp_dir / f"plain-server-{port}.log"
    args = [
        sys.executable, "-m", "bench.plain_server", "--onnx-model", str(onnx_model),
        "--port", str(port), "--workers", str(workers), *extra_args,
    ]  # fmt: skip
    return ServerProcess(launch_logged(args, log_path, REPO_ROOT), port, 0, log_path, args)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--onnx-model", type=existing_file, required=True, help="an .onnx file")
    parser.add_argument("--port", type=port, required=True, help="port on 127.0.0.1")
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="handler threads and ORT sessions (0: the cores)",
    )
    parser.add_argument(
        "--classify-pool",
        action="store_true",
        help=f"Classify on its own pool of --workers threads, safe from calls whose request "
        f"never comes (services/inference/call_pool.py); other RPCs on {SPARE_THREADS}",
    )
    parser.add_argument(
        "--idle-call-timeout-s",
        type=positive_float,
        help="with --classify-pool: a Classify whose request has not come by then is cancelled "
        f"(default: {IDLE_CALL_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--lone-call-threads",
        type=non_negative_int,
        default=0,
        help="a wide session for lone calls, as vidflow's (0: none)",
    )
    args = parser.parse_args()
    workers = args.workers or usable_cpus()
    if args.idle_call_timeout_s is not None and not args.classify_pool:
        parser.error("--idle-call-timeout-s: only with --classify-pool")
    idle_timeout_s = (
        (args.idle_call_timeout_s or IDLE_CALL_TIMEOUT_S) if args.classify_pool else None
    )
    serve(args.onnx_model, args.port, workers, args.lone_call_threads, idle_timeout_s)


if __name__ == "__main__":
    main()
