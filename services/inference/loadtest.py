"""Closed-loop load test in the manner of Triton's perf_analyzer.

For each concurrency level N, N callers each keep one request outstanding for the whole
measurement window, as unary Classify calls or (`--streaming`) on one ClassifyStream each; a
warm-up period before the window is not counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from common.stats import summarize_ms
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import open_aio_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelResult:
    """The figures for one concurrency level."""

    concurrency: int
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    latency_ms: dict[str, float]
    mean_batch_size: float


class _Level:
    """The measurement window of one level and what was seen inside it."""

    def __init__(self, images: list[bytes], duration_s: float, warmup_s: float) -> None:
        self.images = images
        self.loop = asyncio.get_running_loop()
        self.window_start = self.loop.time() + warmup_s
        self.window_end = self.window_start + duration_s
        self.latencies_ms: list[float] = []
        self.batch_sizes: list[int] = []
        self.errors = 0
        self._counter = itertools.count()

    def running(self) -> bool:
        return self.loop.time() < self.window_end

    def next_request(self) -> inference_pb2.ClassifyRequest:
        index = next(self._counter)
        return inference_pb2.ClassifyRequest(
            image=self.images[index % len(self.images)], request_id=str(index)
        )

    def record(self, sent_at: float, response: inference_pb2.ClassifyResponse | None) -> None:
        """Count one answer (None or one with `error` set: a failure) if it fell in the window."""
        done_at = self.loop.time()
        if sent_at < self.window_start or done_at > self.window_end:
            return
        if response is None or response.error:
            self.errors += 1
        else:
            self.latencies_ms.append((done_at - sent_at) * 1e3)
            self.batch_sizes.append(response.timings.batch_size)


async def _unary_caller(stub: inference_pb2_grpc.ClassifierStub, level: _Level) -> None:
    """One outstanding Classify call at a time."""
    while level.running():
        sent_at = level.loop.time()
        try:
            response = await stub.Classify(level.next_request(), timeout=30)
        except grpc.aio.AioRpcError:
            response = None
        level.record(sent_at, response)


async def _streaming_caller(stub: inference_pb2_grpc.ClassifierStub, level: _Level) -> None:
    """One ClassifyStream kept open, one request outstanding on it (perf_analyzer --streaming).

    A stream that breaks counts one error and is opened again.
    """
    while level.running():
        call = stub.ClassifyStream()
        sent_at = level.loop.time()
        try:
            while level.running():
                sent_at = level.loop.time()
                await call.write(level.next_request())
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise RuntimeError("the server ended the stream early")
                level.record(sent_at, response)
            await call.done_writing()
            await call.read()  # EOF: nothing is outstanding
        except (grpc.aio.AioRpcError, RuntimeError):
            level.record(sent_at, None)
            call.cancel()


async def _run_level(
    stub: inference_pb2_grpc.ClassifierStub,
    images: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    streaming: bool = False,
) -> LevelResult:
    level = _Level(images, duration_s, warmup_s)
    caller = _streaming_caller if streaming else _unary_caller
    await asyncio.gather(*(caller(stub, level) for _ in range(concurrency)))
    return LevelResult(
        concurrency=concurrency,
        requests=len(level.latencies_ms),
        errors=level.errors,
        duration_s=duration_s,
        throughput_rps=round(len(level.latencies_ms) / duration_s, 2),
        latency_ms=summarize_ms(level.latencies_ms),
        mean_batch_size=(
            round(sum(level.batch_sizes) / len(level.batch_sizes), 2) if level.batch_sizes else 0.0
        ),
    )


async def run_loadtest(
    target: str,
    images: list[bytes],
    concurrencies: list[int],
    duration_s: float,
    warmup_s: float = 2.0,
    streaming: bool = False,
    tls_ca: Path | None = None,
) -> list[LevelResult]:
    """Measure each concurrency level in turn against one channel (TLS when `tls_ca` is set).

    `streaming` drives ClassifyStream (one stream per concurrent caller) instead of Classify.
    """
    if not images:
        raise ValueError("the load test needs at least one image")
    async with open_aio_channel(target, tls_ca) as channel:
        stub = inference_pb2_grpc.ClassifierStub(channel)
        results = []
        for concurrency in concurrencies:
            result = await _run_level(stub, images, concurrency, duration_s, warmup_s, streaming)
            log.info(
                "concurrency %d: %.1f infer/s, p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, "
                "mean batch %.1f, errors %d",
                concurrency,
                result.throughput_rps,
                result.latency_ms["p50"],
                result.latency_ms["p90"],
                result.latency_ms["p99"],
                result.mean_batch_size,
                result.errors,
            )
            results.append(result)
        return results


def format_table(results: list[LevelResult]) -> str:
    header = f"{'concurrency':>11} {'infer/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
    header += f"{'batch':>6} {'errors':>6}"
    lines = [header]
    for r in results:
        lines.append(
            f"{r.concurrency:>11} {r.throughput_rps:>9.1f} {r.latency_ms['p50']:>8.1f} "
            f"{r.latency_ms['p90']:>8.1f} {r.latency_ms['p99']:>8.1f} "
            f"{r.mean_batch_size:>6.1f} {r.errors:>6}"
        )
    return "\n".join(lines)


def write_json(results: list[LevelResult], path: Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
