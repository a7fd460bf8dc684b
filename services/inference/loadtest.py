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
    error_codes: dict[str, int]  # errors by gRPC status (ITEM_ERROR: a stream item's `error`)
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
        self.error_codes: dict[str, int] = {}
        self._counter = itertools.count()

    def running(self) -> bool:
        return self.loop.time() < self.window_end

    def next_request(self) -> inference_pb2.ClassifyRequest:
        index = next(self._counter)
        return inference_pb2.ClassifyRequest(
            image=self.images[index % len(self.images)], request_id=str(index)
        )

    def record(
        self,
        sent_at: float,
        response: inference_pb2.ClassifyResponse | None,
        code: str = "OK",
        detail: str = "",
    ) -> None:
        """Count one answer if it came within the window: a failure when the call ended with
        `code` other than OK, or its response has `error` set.

        By when it ended, as perf_analyzer counts: counting only calls both sent and ended
        in the window left out about one call per caller and read low by latency / window
        (10 % for a 300-ms model in a 3-s window)."""
        done_at = self.loop.time()
        if not self.window_start <= done_at <= self.window_end:
            return
        if response is not None and response.error:
            code, detail = "ITEM_ERROR", response.error
        if code != "OK":
            _say_once(code, detail)
            self.error_codes[code] = self.error_codes.get(code, 0) + 1
        else:
            assert response is not None
            self.latencies_ms.append((done_at - sent_at) * 1e3)
            self.batch_sizes.append(response.timings.batch_size)


async def _unary_caller(stub: inference_pb2_grpc.ClassifierStub, level: _Level) -> None:
    """One outstanding Classify call at a time."""
    while level.running():
        sent_at = level.loop.time()
        try:
            response = await stub.Classify(level.next_request(), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            level.record(sent_at, None, exc.code().name, exc.details() or "")
            if exc.code() in REFUSED_AT_ONCE:
                await asyncio.sleep(ERROR_PAUSE_S)
        else:
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
                # Each write and answer within the unary calls' deadline: a stream has none of
                # its own, and a server that stalled held the load test for ever (a write too,
                # waiting for flow-control window from a server stopped or cut off).
                await asyncio.wait_for(call.write(level.next_request()), CALL_TIMEOUT_S)
                response = await asyncio.wait_for(call.read(), CALL_TIMEOUT_S)
                if response is grpc.aio.EOF:
                    raise RuntimeError("the server ended the stream early")
                level.record(sent_at, response)
            await asyncio.wait_for(call.done_writing(), CALL_TIMEOUT_S)
            await asyncio.wait_for(call.read(), CALL_TIMEOUT_S)  # EOF: nothing is outstanding
            continue
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code().name, exc.details() or ""
        except TimeoutError:
            code, detail = "DEADLINE_EXCEEDED", f"the stream stalled for {CALL_TIMEOUT_S:g} s"
        # A write to a call the server has just ended raises asyncio's InvalidStateError
        except (RuntimeError, asyncio.InvalidStateError) as exc:
            code, detail = "STREAM_ENDED", str(exc) or "the server ended the stream"
        level.record(sent_at, None, code, detail)
        call.cancel()
        await asyncio.sleep(ERROR_PAUSE_S)


# The longest a call (or an answer on a stream) is waited for
CALL_TIMEOUT_S = 30.0
# A server that is down, full (RESOURCE_EXHAUSTED past --max-concurrent-rpcs) or wants a token
# answers at once: a caller pauses before its next call rather than spin the client's one
# event loop on failing calls, which slowed the calls that did succeed.
ERROR_PAUSE_S = 0.1
# The codes of those refusals. A call the server worked on and refused (INVALID_ARGUMENT: an
# image that does not decode) is load like any other: a pause after it halved the rate of an
# image set with one bad file in five, where the streaming callers never paused.
REFUSED_AT_ONCE = frozenset(
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
     grpc.StatusCode.UNIMPLEMENTED]
)  # fmt: skip
_said: set[tuple[str, str]] = set()


def _say_once(code: str, detail: str) -> None:
    """Say once why calls fail (a load test that only counted errors said nothing of why)."""
    if (code, detail) not in _said:
        _said.add((code, detail))
        log.warning("a call failed: %s: %s", code, detail)


def mean_batch(sizes_per_answer: list[int]) -> float:
    """The mean size of the batches the answers came in, over batches (as the server's
    batch-size histogram counts them): an answer's batch of b holds b answers, so it is
    1/b of a batch. The mean over answers read high (batches of 1 and 7: 6.25, not 4) and
    the benchmark timed the bare model at that larger batch."""
    sizes = [size for size in sizes_per_answer if size > 0]  # a server that gives none
    return round(len(sizes) / sum(1 / size for size in sizes), 2) if sizes else 0.0


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
        errors=sum(level.error_codes.values()),
        error_codes=dict(sorted(level.error_codes.items())),
        duration_s=duration_s,
        throughput_rps=round(len(level.latencies_ms) / duration_s, 2),
        latency_ms=summarize_ms(level.latencies_ms),
        mean_batch_size=mean_batch(level.batch_sizes),
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
            if not result.requests:
                log.info("concurrency %d: nothing answered, errors %d", concurrency, result.errors)
            else:
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
        if r.requests:
            figures = f"{r.latency_ms['p50']:>8.1f} {r.latency_ms['p90']:>8.1f} "
            figures += f"{r.latency_ms['p99']:>8.1f} {r.mean_batch_size:>6.1f}"
        else:  # nothing answered: no latency to show, rather than zeros that look measured
            figures = f"{'-':>8} {'-':>8} {'-':>8} {'-':>6}"
        codes = ", ".join(f"{code} {count}" for code, count in r.error_codes.items())
        lines.append(
            f"{r.concurrency:>11} {r.throughput_rps:>9.1f} {figures} {r.errors:>6}"
            + (f"  ({codes})" if codes else "")
        )
    return "\n".join(lines)


def write_json(results: list[LevelResult], path: Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
