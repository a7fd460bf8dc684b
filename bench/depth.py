"""Benchmark: the depth-extraction stages against their bare equivalents, in one run.

    python -m bench.depth [--videos 24] [--rounds 3]

1. transcode: `tasks.depth.transcode.transcode` (probes, temporary name, rename) against plain
   `ffmpeg` with the same arguments on the same files, alternating; ratio of videos/s.
2. download: `tasks.depth.download.download_videos` (retries, sniffing, size cap, rename) against a
   bare aiohttp loop with the same concurrency, from the same loopback server; ratio of MB/s.
3. ceiling: plain ffmpeg on the flow's files, serially and two at a time; what 2 CPUs can give.
4. flow: the `depth-extraction` flow on local Ray (2 CPUs), run as `vidflow depth` runs it,
   against a serial run of the same stage functions in one process; `--videos` real clips
   served over loopback, the tiny Depth Pro (random weights; no real weights offline). Cold
   once each (the flow starts Ray and its workers, as a one-off CLI run does; the serial loop
   loads its model), then warm in `--rounds` alternating rounds (Ray, its workers and depth
   actor up, as on a long-lived cluster; the serial loop's model loaded). Warm runs of half and
   all the videos split a run into its steady rate (their difference) and the fixed start-up.
The last stdout line is JSON with every figure and its ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from bench.cli_args import bench_parser
from bench.peer_v2d import exit_on_sigterm
from common.cli_types import choice_list, positive_int
from common.settings import SAMPLE_VIDEOS_DIR
from tasks.depth.depth_loader import forget_loaded_models, load_depth_estimator
from tasks.depth.depth_maps import estimate_depth
from tasks.depth.download import download, download_videos
from tasks.depth.output_layout import OutputLayout
from tasks.depth.settings import DepthSettings
from tasks.depth.transcode import ffmpeg_command, transcode
from tasks.depth.video_record import VideoRecord

CLIPS = sorted(SAMPLE_VIDEOS_DIR.glob("*.mp4"))


def _records(urls: list[str]) -> list[VideoRecord]:
    return [VideoRecord(video_id=f"v{i:03d}", source_url=url) for i, url in enumerate(urls)]


def alternating_rates(
    rounds: int,
    work: Path,
    name: str,
    ours: Callable[[Path], float],
    baseline: Callable[[Path], float],
) -> tuple[list[float], list[float]]:
    """Time `ours` and `baseline` in alternating order, each into a fresh folder; their rates.

    Each callable does its work into the folder it is given and returns the amount done (videos,
    bytes); the rate is that amount per second. Alternating evens out a noisy machine's drift;
    each runs once untimed first (the first round's baseline read cold files and caches: the
    slow outlier of every run, set against a warm `ours`).
    """
    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    runs = {"ours": ours, "baseline": baseline}
    for label, run in runs.items():
        out = work / f"{name}-{label}-warmup"
        out.mkdir(parents=True)
        run(out)
        shutil.rmtree(out)
    for round_index in range(rounds):
        order = ("baseline", "ours") if round_index % 2 == 0 else ("ours", "baseline")
        for label in order:
            out = work / f"{name}-{label}-{round_index}"
            out.mkdir(parents=True)
            started = time.perf_counter()
            amount = runs[label](out)
            rates[label].append(amount / (time.perf_counter() - started))
            shutil.rmtree(out)
    return rates["ours"], rates["baseline"]


def bench_transcode(files: list[Path], work: Path, rounds: int) -> dict[str, Any]:
    settings = DepthSettings()

    def ours_run(out: Path) -> float:
        for i, source in enumerate(files):
            record = VideoRecord(video_id=f"v{i}", source_url="x", raw_path=str(source))
            if (done := transcode(record, out, settings)).failed:  # a fast failure is no rate
                raise RuntimeError(f"transcode of {source} failed: {done.error}")
        return len(files)

    def plain_run(out: Path) -> float:
        for i, source in enumerate(files):
            command = ffmpeg_command(source, out / f"v{i}.mp4", settings)
            subprocess.run(command, check=True, capture_output=True)
        return len(files)

    ours, plain = alternating_rates(rounds, work, "transcode", ours_run, plain_run)
    return {
        "ours_videos_per_s": round(statistics.median(ours), 3),
        "ffmpeg_videos_per_s": round(statistics.median(plain), 3),
        "ratio": round(statistics.median(ours) / statistics.median(plain), 3),
        "rounds": {"ours": [round(x, 3) for x in ours], "ffmpeg": [round(x, 3) for x in plain]},
    }


def bench_parallel_ceiling(files: list[Path], work: Path) -> dict[str, Any]:
    """How much two CPUs give plain ffmpeg here: the same files one at a time, then two at once.

    Transcoding is most of a video's work, so this bounds what any scheduler can reach. A lone
    ffmpeg already keeps more than one CPU busy (its demuxer, decoder, filters, encoder and muxer
    run in threads of their own even with `-threads 1`), so the bound is below 2x:
    `serial_cores_used` is that CPU time over the wall time, and `zero_overhead_bound` the
    speedup that 2 CPUs would give if nothing but ffmpeg used them.
    """
    settings = DepthSettings()
    out = work / "ceiling"
    out.mkdir(parents=True)

    def one(index: int) -> None:
        command = ffmpeg_command(files[index], out / f"v{index}.mp4", settings)
        subprocess.run(command, check=True, capture_output=True)

    for source in files:  # in the page cache for both, not read cold by the serial run only
        source.read_bytes()
    cpu_before, started = _children_cpu_s(), time.perf_counter()
    for index in range(len(files)):
        one(index)
    serial_s = time.perf_counter() - started
    serial_cpu_s = _children_cpu_s() - cpu_before
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(len(files))))
    parallel_s = time.perf_counter() - started
    shutil.rmtree(out)
    return {
        "serial_s": round(serial_s, 2),
        "two_at_once_s": round(parallel_s, 2),
        "speedup": round(serial_s / parallel_s, 3),
        "serial_cores_used": round(serial_cpu_s / serial_s, 2),
        "zero_overhead_bound": round(serial_s / (serial_cpu_s / 2), 3),
    }


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


async def _bare_download(urls: list[str], out: Path, concurrency: int) -> int:
    """The baseline: aiohttp with a semaphore, each body streamed to a file; nothing else."""
    limit = asyncio.Semaphore(concurrency)
    total = 0

    async def one(session: aiohttp.ClientSession, index: int, url: str) -> None:
        nonlocal total
        async with limit, session.get(url) as response:
            response.raise_for_status()
            with (out / f"v{index}.mp4").open("wb") as handle:
                async for chunk in response.content.iter_chunked(1 << 20):
                    handle.write(chunk)
                    total += len(chunk)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, i, url) for i, url in enumerate(urls)))
    return total


def bench_download(urls: list[str], work: Path, rounds: int) -> dict[str, Any]:
    settings = DepthSettings()

    def ours_run(out: Path) -> float:
        records = asyncio.run(download_videos(_records(urls), out, settings))
        if failed := [record for record in records if record.failed]:
            raise RuntimeError(f"{len(failed)} downloads failed: {failed[0].error}")
        return sum(record.raw_bytes or 0 for record in records) / 1e6

    def bare_run(out: Path) -> float:
        return asyncio.run(_bare_download(urls, out, settings.download_concurrency)) / 1e6

    ours, bare = alternating_rates(rounds, work, "download", ours_run, bare_run)
    return {
        "ours_mb_per_s": round(statistics.median(ours), 1),
        "aiohttp_mb_per_s": round(statistics.median(bare), 1),
        "ratio": round(statistics.median(ours) / statistics.median(bare), 3),
        "concurrency": settings.download_concurrency,
        "rounds": {"ours": [round(x, 1) for x in ours], "aiohttp": [round(x, 1) for x in bare]},
    }


def serial_run(urls: list[str], output: Path, settings: DepthSettings, cold: bool = True) -> float:
    """The same stages, one video after another, in this process; `cold`: the model loaded in
    the time, warm: the one a run before loaded (as the warm flow's depth actor has it)."""
    started = time.perf_counter()
    if cold:
        forget_loaded_models()
    layout = OutputLayout(output)
    for record in _records(urls):
        record = download(record, layout.raw, settings)
        record = transcode(record, layout.videos, settings)
        record = estimate_depth(record, layout.depth, settings)
        if record.status != "ok":
            raise RuntimeError(f"the serial loop failed on {record.source_url}: {record.error}")
    return time.perf_counter() - started


def flow_run(urls: list[str], output: Path, settings: DepthSettings) -> float:
    """One run of the flow as `vidflow depth` runs it (without flow-run heartbeats, whose
    thread Prefect joins as the flow returns: 0-1 s more a run, counted here and not there)."""
    from common.flow_heartbeats import foreground_heartbeats
    from flows.depth_extraction import depth_extraction
    from flows.ray_runner import ray_task_runner

    listing = output.parent / f"{output.name}.txt"
    listing.write_text("\n".join(urls) + "\n")
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))
    with foreground_heartbeats():
        started = time.perf_counter()
        summary = flow(urls=str(listing), settings=settings.model_copy(update={"output": output}))
        taken = time.perf_counter() - started
    if summary["ok"] != len(urls):  # a run with failed videos is not timed as complete
        raise RuntimeError(f"the flow did {summary['ok']} of {len(urls)} videos: {summary}")
    return taken


def export_untimed(settings: DepthSettings) -> None:
    """The fresh model's ONNX export, made once before any timed run: the first arm to load
    the model paid it, and the other found it made (found in review, stop 62: the cold serial
    loop, always first, paid it, and `speedup_cold` read high)."""
    load_depth_estimator(settings, "cpu", threads=1)
    forget_loaded_models()


def bench_flow(urls: list[str], work: Path, model: Path, rounds: int) -> dict[str, Any]:
    """Serial loop and flow cold once each, then `rounds` alternating warm rounds of each at
    half and all the videos: the difference of the two gives the steady time per video, the
    rest of a run is fixed start-up; the ratios are medians of the rounds' own."""
    import ray

    from flows.ray_start import local_ray_init_kwargs, private_ray_start

    settings = DepthSettings(depth_model=str(model), frames="uniform:2", device="cpu")
    export_untimed(settings)
    serial_cold_s = serial_run(urls, work / "serial-cold", settings)
    cold_s = flow_run(urls, work / "flow-cold", settings)
    # Warm: Ray up and its workers and depth actor started, as on a long-lived cluster. Held
    # while it runs: leaving `private_ray_start` takes its token away from the driver.
    with private_ray_start():
        ray.init(**local_ray_init_kwargs(num_cpus=2))
        try:
            flow_run(urls, work / "flow-warmup", settings)
            warm = warm_rounds(urls, work, settings, rounds)
        finally:
            ray.shutdown()
    return {
        "videos": len(urls),
        "serial_cold_s": round(serial_cold_s, 2),
        "ray_cold_s": round(cold_s, 2),
        "speedup_cold": round(serial_cold_s / cold_s, 3),
        **summarise_warm(warm, cold_s, len(urls)),
    }


WARM_ARMS = ("serial_half", "flow_half", "serial", "flow")


def warm_rounds(
    urls: list[str], work: Path, settings: DepthSettings, rounds: int
) -> dict[str, list[float]]:
    """Seconds of each warm arm per round, serial loop and flow alternating (the order turned
    round every round): one run of each, timed alone, swung a verdict with the machine's
    drift (1.38x and 1.46x in two runs of the same commit). The serial loop is warm as the
    flow is (its model loaded by the run before, as the warm flow's depth actor has it)."""
    half = urls[: len(urls) // 2]
    seconds: dict[str, list[float]] = {arm: [] for arm in WARM_ARMS}
    for index in range(rounds):
        order = WARM_ARMS if index % 2 == 0 else WARM_ARMS[::-1]
        for arm in order:
            listed = half if arm.endswith("_half") else urls
            out = work / f"{arm}-{index}"
            if arm.startswith("serial"):
                seconds[arm].append(serial_run(listed, out, settings, cold=False))
            else:
                seconds[arm].append(flow_run(listed, out, settings))
            shutil.rmtree(out, ignore_errors=True)
    return seconds


def summarise_warm(warm: dict[str, list[float]], cold_s: float, videos: int) -> dict[str, Any]:
    """Medians of the warm rounds, and their ratios taken round by round."""
    half_videos = videos // 2
    per_round = [
        steady_figures((serial_half, serial), cold_s, (flow_half, half_videos), (flow, videos))
        for serial_half, flow_half, serial, flow in zip(
            *(warm[arm] for arm in WARM_ARMS), strict=True
        )
    ]
    speedups = [s / f for s, f in zip(warm["serial"], warm["flow"], strict=True)]
    figures: dict[str, Any] = {
        "serial_s": round(statistics.median(warm["serial"]), 2),
        "serial_half_s": round(statistics.median(warm["serial_half"]), 2),
        "ray_warm_s": round(statistics.median(warm["flow"]), 2),
        "ray_warm_half_s": round(statistics.median(warm["flow_half"]), 2),
        "speedup_warm": round(statistics.median(speedups), 3),
        "serial_videos_per_s": round(videos / statistics.median(warm["serial"]), 3),
    }
    for key in STEADY_KEYS:
        known = [round_[key] for round_ in per_round if round_[key] is not None]
        figures[key] = round(statistics.median(known), 3) if known else None
    figures["rounds"] = {
        **{arm: [round(x, 2) for x in warm[arm]] for arm in WARM_ARMS},
        "speedup_warm": [round(x, 3) for x in speedups],
        "steady_speedup": [round_["steady_speedup"] for round_ in per_round],
    }
    return figures


STEADY_KEYS = (
    "warm_steady_videos_per_s",
    "warm_fixed_startup_s",
    "cold_fixed_startup_s",
    "steady_speedup",
)


def steady_figures(
    serial: tuple[float, float], cold_s: float, half: tuple[float, int], whole: tuple[float, int]
) -> dict[str, float | None]:
    """The steady rate from two warm runs (seconds, videos) of half and all the list, and the
    fixed start-up it leaves in a run; `serial`: the warm serial loop's seconds for the same
    half and whole, whose steady rate the flow's is set against. Where the whole list took no
    longer than its half (noise on a short list), their difference gives no rate: None, with a
    warning, rather than a negative rate or a division by zero."""
    (half_s, half_videos), (warm_s, videos) = half, whole
    serial_half_s, serial_s = serial
    if warm_s <= half_s or serial_s <= serial_half_s:
        print(
            f"warning: {videos} videos took {warm_s:.2f} s (the serial loop {serial_s:.2f} s), "
            f"half of them {half_s:.2f} s ({serial_half_s:.2f} s): no steady rate (rerun with "
            "more --videos)",
            file=sys.stderr,
        )
        return dict.fromkeys(STEADY_KEYS)
    steady_s_per_video = (warm_s - half_s) / (videos - half_videos)
    return {
        "warm_steady_videos_per_s": round(1 / steady_s_per_video, 3),
        "warm_fixed_startup_s": round(warm_s - videos * steady_s_per_video, 2),
        "cold_fixed_startup_s": round(cold_s - videos * steady_s_per_video, 2),
        "steady_speedup": round(
            (serial_s - serial_half_s) / (videos - half_videos) / steady_s_per_video, 3
        ),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--videos", type=positive_int, default=24, help="videos in the flow comparison"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="alternating rounds per ratio"
    )
    parser.add_argument(
        "--transcode-files", type=positive_int, default=6, help="files in the transcode part"
    )
    parser.add_argument(
        "--download-files", type=positive_int, default=64, help="files in the download part"
    )
    parser.add_argument(
        "--parts",
        type=choice_list(("transcode", "download", "flow")),
        default="transcode,download,flow",
        help="comma-separated parts to run",
    )
    args = parser.parse_args(argv)
    if args.videos < 2:  # the flow's steady rate is the difference of half and all the videos
        parser.error("--videos: must be 2 or more")
    if not CLIPS:
        parser.error(f"no sample clips (*.mp4) in {SAMPLE_VIDEOS_DIR}: see ../shared/data")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    exit_on_sigterm()  # so the `finally`s below remove the work folder on SIGTERM too
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its own Ray, even where `ray start` runs one on this machine or RAY_ADDRESS names one:
    # joined, a warm cluster (perhaps of more CPUs) was timed as the cold start.
    os.environ["RAY_ADDRESS"] = "local"

    from devstack.prefect_api import prefect_api
    from devstack.tiny_depth_pro import save_tiny_depth_pro
    from devstack.video_server import Serve, VideoServer

    work = Path(tempfile.mkdtemp(prefix="vidflow-bench-depth-"))
    results: dict[str, Any] = {"benchmark": "depth", "cpu_count": os.cpu_count()}
    try:
        parts = set(args.parts)
        if "transcode" in parts:
            files = [CLIPS[i % len(CLIPS)] for i in range(args.transcode_files)]
            results["transcode"] = bench_transcode(files, work, args.rounds)
            print(json.dumps({"transcode": results["transcode"]}), flush=True)
        if "flow" in parts:
            files = [CLIPS[i % len(CLIPS)] for i in range(args.videos)]
            results["ffmpeg_two_cpu_ceiling"] = bench_parallel_ceiling(files, work)
            print(json.dumps({"ceiling": results["ffmpeg_two_cpu_ceiling"]}), flush=True)

        names = max(args.download_files, args.videos)
        routes = {f"v{i}.mp4": Serve(CLIPS[i % len(CLIPS)]) for i in range(names)}
        with VideoServer(routes) as server:
            urls = [server.url(f"v{i}.mp4") for i in range(names)]
            if "download" in parts:
                results["download"] = bench_download(urls[: args.download_files], work, args.rounds)
                print(json.dumps({"download": results["download"]}), flush=True)
            if "flow" in parts:
                model = save_tiny_depth_pro(work / "tiny-depth-pro")
                with prefect_api() as api_url:  # a configured one is used: the JSON says which
                    results["prefect_api_url"] = api_url
                    results["flow"] = bench_flow(urls[: args.videos], work, model, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
