"""Closed-loop load test in the manner of Triton's perf_analyzer.

For each concurrency level N, N callers each keep one Classify call outstanding for the whole
measurement window; a warm-up period before the window is not counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import channel_options
from vidflow.stats import summarize_ms

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


async def _run_level(
    stub: inference_pb2_grpc.ClassifierStub,
    images: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> LevelResult:
    latencies_ms: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    counter = itertools.count()
    loop = asyncio.get_running_loop()
    window_start = loop.time() + warmup_s
    window_end = window_start + duration_s

    async def caller() -> None:
        nonlocal errors
        while (sent_at := loop.time()) < window_end:
            index = next(counter)
            request = inference_pb2.ClassifyRequest(
                image=images[index % len(images)], request_id=str(index)
            )
            try:
                response = await stub.Classify(request, timeout=30)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            done_at = loop.time()
            if sent_at >= window_start and done_at <= window_end:
                if ok:
                    latencies_ms.append((done_at - sent_at) * 1e3)
                    batch_sizes.append(response.timings.batch_size)
                else:
                    errors += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return LevelResult(
        concurrency=concurrency,
        requests=len(latencies_ms),
        errors=errors,
        duration_s=duration_s,
        throughput_rps=round(len(latencies_ms) / duration_s, 2),
        latency_ms=summarize_ms(latencies_ms),
        mean_batch_size=round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else 0.0,
    )


async def run_loadtest(
    target: str,
    images: list[bytes],
    concurrencies: list[int],
    duration_s: float,
    warmup_s: float = 2.0,
) -> list[LevelResult]:
    """Measure each concurrency level in turn against one channel."""
    if not images:
        raise ValueError("the load test needs at least one image")
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        stub = inference_pb2_grpc.ClassifierStub(channel)
        results = []
        for concurrency in concurrencies:
            result = await _run_level(stub, images, concurrency, duration_s, warmup_s)
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
