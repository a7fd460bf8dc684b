"""Benchmark: `vidflow depth` against video2dataset on the same URL list, in alternating rounds.

    python -m bench.depth_peer [--videos 48] [--rounds 3] [--ray local,cluster] [--baseline DIR]

The same work for both tools: `--videos` copies of the real Kinetics clip
`../shared/data/videos/k400_arm_wrestling.mp4` (10 s, 340x256) served from one loopback HTTP
server, downloaded and transcoded to 360p H.264 (libx264 veryfast, crf 23: the peer's encodes
get the same flags through an `ffmpeg` wrapper, see bench/peer_v2d.py), every output checked.
vidflow also runs depth on every video (the tiny Depth Pro with random weights: no real weights
can be had offline; its CPU per video is measured beside the runs), and writes its Lance table.
Defaults on both sides, except the peer's shards and processes, set as its docs advise for a
2-CPU box (processes_count 2, thread_count 4, 8 shards).

vidflow runs as a user runs it: `vidflow depth` in a fresh process, against a running Prefect
server (`prefect server start`, started once here), either starting its own local Ray
(`local`, with RAY_ADDRESS=local) or joining a running one (`cluster`, a `ray start --head` on
this machine, named by RAY_ADDRESS; without it a run finds one that `ray start` announces), so
the fixed start-up of each is measured. Before the rounds each tool runs once, unmeasured, on a
few videos (`--no-warm-up` skips it).

Per round and tool: wall time, videos/s, the CPU-seconds of every process by kind (from /proc,
bench/cpu_account.py), ffmpeg's own CPU from the wrapper's wait4, and the core-seconds the
machine sat idle (`idle_core_s`: CPUs x wall less the busy CPU of /proc/stat over that wall
time, without the output checks after it). From those:
- `zero_overhead_bound`: CPUs / (ffmpeg + depth-model CPU-s per video), the rate if nothing but
  ffmpeg and the model ran;
- `share_of_bound` (`share_of_bound_while_transcoding`): videos/s over the whole run (over the
  span from the first ffmpeg's start to the last one's end, without the fixed start-up and
  tail) as a share of that bound;
- `overhead_share`: vidflow's CPU-s per video outside ffmpeg and the depth model, over ffmpeg's
  (`..._without_idle_server`: less the Prefect server's idle CPU, its rate in the peer's rounds);
- `share_of_bound_if_never_idle`: ffmpeg and the model's CPU over the run's whole CPU, the share
  of the bound the run would reach had no core ever sat idle: what its own CPU outside ffmpeg
  and the model allows at most, however well the work were packed;
- `cpu_s_not_sampled`: the machine's busy CPU over the run less every process's sampled CPU
  (ffmpeg's from wait4): at most what the half-second samples missed of each process's last
  moments, with anything else the machine ran meanwhile.
`--baseline DIR` (a checkout of earlier code, e.g. `git worktree add DIR REV`) adds the mode
`baseline_local`: that code's `vidflow depth` with its own local Ray (PYTHONPATH=DIR, so the
driver and the Ray workers it starts import it), in the same rounds, for a before/after ratio.
The last stdout line is JSON with every figure, the medians and the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import lance

from bench.cli_args import bench_parser
from bench.cpu_account import SET_ASIDE, CpuAccount, machine_busy_cpu_s, process_tree
from bench.peer_v2d import (
    FFMPEG_LOG,
    NO_EXTRA_FLAGS,
    SINGLE_THREAD_FLAGS,
    check_video,
    ensure_venv,
    exit_on_sigterm,
    read_ffmpeg_log,
    run_video2dataset,
    wrapper_path,
    write_ffmpeg_wrapper,
)
from common.cli_types import choice_list, positive_int, vidflow_checkout
from common.cpus import usable_cpus
from common.net import free_port
from common.settings import SAMPLE_VIDEO
from devstack.local_stack import MARKER_VARIABLE, LocalStack, start_reaper, stop_reaper
from devstack.ray_nodes import stop_ray_nodes
from tasks.depth.output_layout import OutputLayout
from tasks.depth.transcode import ffmpeg_exe

CPUS = usable_cpus()  # the host's count overstates a container's share (common/cpus.py)
PROCESS_KINDS = [
    ("ffmpeg", "ffmpeg"),
    ("DepthActor", "depth_actor"),
    ("prefect server", "prefect_server"),
    ("vidflow.cli", "vidflow_driver"),
    ("raylet", "ray_system"),
    ("gcs_server", "ray_system"),
    ("DashboardAgent", "ray_system"),
    ("RuntimeEnvAgent", "ray_system"),
    ("dashboard", "ray_system"),
    ("monitor", "ray_system"),
    ("ray::", "ray_workers"),
    ("default_worker", "ray_workers"),
    ("video2dataset", "peer"),
    ("bench.depth_peer", "bench"),
]


def classify(cmdline: str, wrappers: frozenset[str] = frozenset()) -> str:
    """A process's kind from its command line. An ffmpeg wrapper is told by its exact path as a
    word of the line: a needle such as `bin/ffmpeg` also matches the real `/usr/bin/ffmpeg`,
    whose CPU wait4 already counts, and would count it twice."""
    if wrappers and not wrappers.isdisjoint(cmdline.split(" ")):
        return "ffmpeg_wrapper"
    for needle, kind in PROCESS_KINDS:
        if needle in cmdline:
            return kind
    return "other"


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A Prefect server on loopback for the whole benchmark, as a user's local stack has."""
    (home / "logs").mkdir(parents=True, exist_ok=True)
    stack = LocalStack(logs_dir=home / "logs", prefect_home=home, ui_port=free_port())
    # The server runs in a session of its own: a SIGKILLed benchmark left it holding its port.
    reaper = start_reaper(MARKER_VARIABLE, stack.stack_id)
    try:
        stack.start_server()
        yield stack.api_url
    finally:
        stack.stop()
        stop_reaper(reaper)


@contextmanager
def ray_cluster(temp_dir: Path, bin_dir: Path) -> Iterator[str]:
    """A running single-node Ray on loopback (`ray start --head`), for the `cluster` mode; its
    workers find the ffmpeg wrapper first on PATH."""
    # Single-machine mode keeps every Ray server on 127.0.0.1 (see loopback_only_ray).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # token auth: see main
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    address = f"127.0.0.1:{free_port()}"
    ray = str(Path(sys.executable).with_name("ray"))
    command = [
        ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", address.split(":")[1],
        "--num-cpus", str(CPUS), "--include-dashboard", "false",
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    # Inside the try: a `ray start` that fails or hangs half-way leaves daemonised nodes.
    try:
        _start_ray_head(command, env)
        yield address
    finally:
        stop_ray_nodes(temp_dir, address)  # this node only, not every Ray here


def _start_ray_head(command: list[str], env: dict[str, str]) -> None:
    """Run `ray start`; a failure says why (its output), which a bare CalledProcessError hides."""
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"ray start ran past 120 s: {_text(exc.stderr)[-3000:]}") from exc
    if done.returncode != 0:
        output = f"{done.stdout[-1000:]}\n{done.stderr[-3000:]}".strip()
        raise RuntimeError(f"ray start failed ({done.returncode}): {output}")


def _text(output: str | bytes | None) -> str:
    """A TimeoutExpired's captured output, which is bytes even with text=True."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def run_vidflow(
    urls_file: Path,
    output: Path,
    model: Path,
    env: dict[str, str],
    bin_dir: Path,
    code: Path | None = None,
) -> dict[str, Any]:
    """`vidflow depth` as a user runs it (from the checkout `code`, default this one); wall
    time, and the outputs checked."""
    command = [
        sys.executable, "-m", "vidflow.cli", "depth", "--urls", str(urls_file),
        "--output", str(output), "--depth-model", str(model), "--device", "cpu",
    ]  # fmt: skip
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    busy_before = machine_busy_cpu_s()
    started = time.perf_counter()
    run = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True, timeout=1800)
    ended_at = time.time()  # before the checks below, which are not the run's
    wall_s = time.perf_counter() - started
    busy = machine_busy_cpu_s() - busy_before
    if run.returncode != 0:
        raise RuntimeError(f"vidflow depth failed ({run.returncode}): {run.stderr[-3000:]}")
    rows = lance.dataset(OutputLayout(output).lance).to_table().to_pylist()
    bad = [row["video_id"] for row in rows if not _valid_row(row)]
    if bad or len(rows) != len(urls_file.read_text().split()):
        raise RuntimeError(f"vidflow wrote {len(rows)} rows, invalid: {bad[:5]}")
    return {
        "wall_s": round(wall_s, 2),
        "ok": len(rows),
        "machine_busy_cpu_s": round(busy, 2),
        "ended_at": ended_at,
    }


def _valid_row(row: dict[str, Any]) -> bool:
    if row["status"] != "ok" or not row["depth_path"] or not Path(row["depth_path"]).is_file():
        return False
    return check_video(Path(row["transcoded_path"]), 360) is None


def depth_model_cpu_per_video(model: Path, videos: int) -> float:
    """CPU-s per video of the depth model alone (first 360p frame, batches as the flow's actor
    runs them, one thread, on the backend the flow picks on a CPU), measured in this process."""
    from tasks.depth.depth_loader import load_depth_estimator
    from tasks.depth.frame_choice import read_frames
    from tasks.depth.settings import DepthSettings

    settings = DepthSettings(depth_model=str(model))
    estimator = load_depth_estimator(settings, "cpu", threads=1)
    frame = cv2.resize(read_frames(SAMPLE_VIDEO, [0])[0], (478, 360))
    batch = settings.depth_batch_size
    estimator.estimate([frame] * batch)  # warm-up
    started = time.process_time()
    for _ in range(-(-videos // batch)):
        estimator.estimate([frame] * batch)
    return (time.process_time() - started) / (-(-videos // batch) * batch)


WARM_UP_VIDEOS = 4
BASELINE_MODE = "baseline_local"  # `--baseline`: earlier code, with its own local Ray
NOT_A_TOOLS_OWN = ("bench", "other")
VIDFLOW_SERVICES = ("prefect_server", "ray_system", "ray_workers")  # idle during the peer's runs


def measured(
    work: Any,
    cpu_log: Path,
    wrapper: Path,
    videos: int,
    model_cpu_per_video: float = 0.0,
    not_counted: tuple[str, ...] = NOT_A_TOOLS_OWN,
    set_aside: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Run `work()` under a CPU account; its figures with the CPU by process kind. `cpu_log`
    and `wrapper` are the log and the path of the ffmpeg wrapper that this tool's run uses.

    `cpu_s` is the tool's own CPU (kinds in `not_counted` left out); the CPU outside ffmpeg and
    the model is given twice: without the model's inference only (`..._and_model`), and without
    the whole depth actor, its torch and transformers imports and model load included
    (`..._and_depth_actor`).
    """
    cpu_log.unlink(missing_ok=True)
    kinds = functools.partial(classify, wrappers=frozenset({str(wrapper)}))
    with CpuAccount(kinds, set_aside=set_aside) as account:
        started = time.time()
        result = work()
        ended = time.time()
    # The tool's own end: `work()` goes on to check its outputs, no part of the tail.
    ended = result.pop("ended_at", None) or ended
    by_kind = account.by_kind()
    # Over the run's own wall time: the account's window also holds the output checks.
    busy_s = result.pop("machine_busy_cpu_s", account.machine_busy_s)
    calls = read_ffmpeg_log(cpu_log)
    result.pop("ffmpeg_cpu_s", None)  # the peer's own sum of the same log
    # /proc samples miss the last half second of each short ffmpeg: take wait4's figure.
    ffmpeg_cpu = sum(line["user_s"] + line["sys_s"] for line in calls)
    counted = {kind: cpu for kind, cpu in by_kind.items() if kind not in (*not_counted, SET_ASIDE)}
    # The ffmpeg wrapper is this benchmark's instrument (~10 ms a call), no tool's own CPU: the
    # tool that calls ffmpeg more often would be charged more for it.
    instrument = ("ffmpeg", "ffmpeg_wrapper")
    total = sum(cpu for kind, cpu in counted.items() if kind not in instrument) + ffmpeg_cpu
    outside_ffmpeg = total - ffmpeg_cpu
    outside = outside_ffmpeg - model_cpu_per_video * videos
    return {
        **result,
        "videos_per_s": round(videos / result["wall_s"], 3),
        "cpu_s_by_kind": by_kind,
        "processes_by_kind": account.processes(),
        "ffmpeg_cpu_s": round(ffmpeg_cpu, 2),
        "cpu_s": round(total, 2),
        # Of `cpu_s`, not the peer's own figure over its process tree, wrapper and all (a
        # round's line kept that one beside this `cpu_s`: found in review, stop 62)
        "cpu_s_per_video": round(total / videos, 3),
        "machine_busy_cpu_s": busy_s,
        # Core-seconds no process used: start-up waits, a stage waiting on another.
        "idle_core_s": round(CPUS * result["wall_s"] - busy_s, 1),
        "cpu_s_not_sampled": _not_sampled(busy_s, ffmpeg_cpu, by_kind),
        "cpu_s_outside_ffmpeg_and_model": round(outside, 2),
        "cpu_s_outside_ffmpeg_and_depth_actor": round(
            outside_ffmpeg - by_kind.get("depth_actor", 0.0), 2
        ),
        **ffmpeg_phases(calls, started, ended),
    }


def _not_sampled(busy_s: float, ffmpeg_cpu: float, by_kind: dict[str, float]) -> float:
    """What the half-second samples missed (each process's last moments), at most: the
    machine's busy CPU over the run less every process sampled, ffmpeg taken from wait4, this
    benchmark's own process left out (its output checks come after the run)."""
    sampled = sum(cpu for kind, cpu in by_kind.items() if kind not in ("ffmpeg", "bench"))
    return round(busy_s - ffmpeg_cpu - sampled, 2)


def ffmpeg_phases(calls: list[dict[str, Any]], started: float, ended: float) -> dict[str, float]:
    """Start-up (to the first ffmpeg), the span of the ffmpeg calls, and the tail after the
    last: where a run's fixed costs sit in its wall time."""
    if not calls:
        return {}
    first, last = min(c["start"] for c in calls), max(c["end"] for c in calls)
    return {
        "to_first_ffmpeg_s": round(first - started, 2),
        "ffmpeg_span_s": round(last - first, 2),
        "after_last_ffmpeg_s": round(ended - last, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--videos", type=positive_int, default=48, help="10-s clips in the list")
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="alternating rounds of each tool"
    )
    parser.add_argument(
        "--ray",
        type=choice_list(("local", "cluster")),
        default="local,cluster",
        help="vidflow modes: its own local Ray, and/or a running Ray cluster",
    )
    parser.add_argument("--no-peer", action="store_true", help="vidflow only (for tuning)")
    parser.add_argument(
        "--no-warm-up", action="store_true", help="skip the unmeasured first run of each tool"
    )
    parser.add_argument(
        "--peer-shards", type=positive_int, default=8, help="video2dataset's shards"
    )
    parser.add_argument(
        "--peer-single-thread-ffmpeg",
        action="store_true",
        help="run the peer's ffmpeg single-threaded, as vidflow runs its own (default: the "
        "peer's own ffmpeg defaults)",
    )
    parser.add_argument(
        "--baseline", type=vidflow_checkout,
        help="a checkout of earlier code, run as mode baseline_local (needs --ray local)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.baseline is not None and "local" not in args.ray:  # its ratio is to `local`
        parser.error("--baseline: compared with vidflow_local, so --ray must include local")
    exit_on_sigterm()  # so the `finally`s below stop the servers, Ray and the peer on SIGTERM
    # Ray's token auth, as a run's private Ray has it (flows.ray_start.private_ray_auth), with
    # one token for the `cluster` mode's `ray start` and the runs that join it.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    modes = args.ray
    if args.baseline is not None:
        modes.append(BASELINE_MODE)

    if not args.no_peer:
        ensure_venv()
    work = Path(tempfile.mkdtemp(prefix="vidflow-bench-peer-"))
    results: dict[str, Any] = {
        "benchmark": "depth_peer",
        "cpus": CPUS,
        "videos": args.videos,
        "peer_ffmpeg": "single-threaded" if args.peer_single_thread_ffmpeg else "its defaults",
        # A process per CPU, as vidflow's Ray and the bounds count them (a fixed 2 gave the
        # peer half a 4-core box's CPUs and vidflow all of them).
        "peer_processes": CPUS,
    }
    try:
        results.update(measure_alternating(args, modes, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results), flush=True)
    return 0


def measure_alternating(args: argparse.Namespace, modes: list[str], work: Path) -> dict[str, Any]:
    """The rounds, the peer and each vidflow mode in turn, on the same loopback videos."""
    from devstack.tiny_depth_pro import save_tiny_depth_pro
    from devstack.video_server import Serve, VideoServer

    rounds: dict[str, list[dict[str, Any]]] = {} if args.no_peer else {"video2dataset": []}
    rounds.update({f"vidflow_{mode}": [] for mode in modes})
    model = save_tiny_depth_pro(work / "tiny-depth-pro")
    model_cpu = depth_model_cpu_per_video(model, args.videos)
    # vidflow's wrapper only logs (its encodes set their flags); each peer run writes its own.
    bin_dir, cpu_log = work / "bin", work / FFMPEG_LOG
    ours_wrapper = write_ffmpeg_wrapper(bin_dir, ffmpeg_exe(), cpu_log)
    peer_flags = SINGLE_THREAD_FLAGS if args.peer_single_thread_ffmpeg else NO_EXTRA_FLAGS
    routes = {f"v{i}.mp4": Serve(SAMPLE_VIDEO) for i in range(args.videos)}
    with VideoServer(routes) as server, prefect_server(work / "prefect-home") as api_url:
        urls = [server.url(f"v{i}.mp4") for i in range(args.videos)]
        urls_file = work / "urls.txt"
        urls_file.write_text("\n".join(urls) + "\n")
        base_env = {**os.environ, "PREFECT_API_URL": api_url}
        base_env["PREFECT_HOME"] = str(work / "prefect-home")

        def idle_cluster() -> frozenset[int]:
            """The running cluster's processes (its loaded depth actor too), idle while the
            peer or vidflow's local mode runs: not theirs."""
            return process_tree(str(work / "ray")) if cluster_address else frozenset()

        def peer(index: int) -> dict[str, Any]:
            out = work / f"v2d-{index}"
            return measured(
                lambda: run_video2dataset(
                    urls, out, processes=CPUS, shards=args.peer_shards, ffmpeg_flags=peer_flags
                ),
                out / FFMPEG_LOG,  # the peer's own wrapper logs there
                wrapper_path(out),
                args.videos,
                not_counted=(*NOT_A_TOOLS_OWN, *VIDFLOW_SERVICES),
                set_aside=idle_cluster(),
            )

        def ours(mode: str, index: int) -> dict[str, Any]:
            out = work / f"vidflow-{mode}-{index}"
            env = dict(base_env)
            # local: its own Ray, even where `ray start` runs one on this machine.
            env["RAY_ADDRESS"] = cluster_address if mode == "cluster" else "local"
            code = args.baseline if mode == BASELINE_MODE else None
            return measured(
                lambda: run_vidflow(urls_file, out, model, env, bin_dir, code), cpu_log,
                ours_wrapper, args.videos, model_cpu,
                set_aside=idle_cluster() if mode != "cluster" else frozenset(),
            )  # fmt: skip

        # One cluster for every round, as a cluster is used: it outlives runs, and so do
        # its loaded depth actors (the first cluster round pays their start).
        cluster = ray_cluster(work / "ray", bin_dir) if "cluster" in modes else nullcontext("")
        if not args.no_warm_up:
            warm_up(urls, model, {**base_env, "RAY_ADDRESS": "local"}, bin_dir, work,
                    None if args.no_peer else peer_flags, args.baseline)  # fmt: skip
        with cluster as cluster_address:
            run_rounds(args.rounds, rounds, peer, ours, work)
    return summarise(rounds, model_cpu, args.videos)


def warm_up(
    urls: list[str],
    model: Path,
    env: dict[str, str],
    bin_dir: Path,
    work: Path,
    peer_flags: tuple[str, ...] | None,
    baseline: Path | None = None,
) -> None:
    """One unmeasured run of each tool on a few videos: the first run after a while reads its
    libraries from disk (video2dataset's first round took 81-85 s against 49-52 s for the
    next ones), and a fresh checkout's first compiles its bytecode, which is not what the
    rounds compare. `peer_flags`: the peer's extra ffmpeg flags, None for no peer;
    `baseline`: the earlier code's checkout, warmed up too."""
    few = work / "warm-up-urls.txt"
    few.write_text("\n".join(urls[:WARM_UP_VIDEOS]) + "\n")
    if peer_flags is not None:
        run_video2dataset(
            urls[:WARM_UP_VIDEOS], work / "warm-up-v2d", shards=1, ffmpeg_flags=peer_flags
        )
    run_vidflow(few, work / "warm-up-vidflow", model, env, bin_dir)
    if baseline is not None:
        run_vidflow(few, work / "warm-up-baseline", model, env, bin_dir, baseline)
    for output in work.glob("warm-up-*"):
        if output.is_dir():
            shutil.rmtree(output, ignore_errors=True)


def run_rounds(
    count: int,
    rounds: dict[str, list[dict[str, Any]]],
    peer: Callable[[int], dict[str, Any]],
    ours: Callable[[str, int], dict[str, Any]],
    work: Path,
) -> None:
    """`count` rounds of every tool, the order reversed every other round: a machine's drift
    then hits every tool alike."""
    for index in range(count):
        names = list(rounds)
        for name in names if index % 2 == 0 else reversed(names):
            if name == "video2dataset":
                figures = peer(index)
            else:
                figures = ours(name.removeprefix("vidflow_"), index)
            rounds[name].append(figures)
            print(json.dumps({"round": index, "tool": name, **figures}), flush=True)
        for output in work.glob(f"*-{index}"):
            shutil.rmtree(output, ignore_errors=True)


def summarise(
    rounds: dict[str, list[dict[str, Any]]], model_cpu: float, videos: int
) -> dict[str, Any]:
    """Medians per tool; each vidflow mode's ratio to the peer round by round; the bound."""
    summary: dict[str, Any] = {"depth_model_cpu_s_per_video": round(model_cpu, 4)}
    peer_rounds = rounds.get("video2dataset", [])
    # The Prefect server's CPU per second while only the peer runs: its idle background, which a
    # user with a server up pays whether or not a run is going.
    server_idle = [r["cpu_s_by_kind"].get("prefect_server", 0.0) / r["wall_s"] for r in peer_rounds]
    server_idle_per_s = statistics.median(server_idle) if server_idle else None
    if server_idle_per_s is not None:
        summary["prefect_server_idle_cpu_per_s"] = round(server_idle_per_s, 4)
    for name, figures in rounds.items():
        rates = [r["videos_per_s"] for r in figures]
        ffmpeg_per_video = statistics.median(r["ffmpeg_cpu_s"] for r in figures) / videos
        entry: dict[str, Any] = {
            "videos_per_s": round(statistics.median(rates), 3),
            "rounds": rates,
            "ffmpeg_cpu_s_per_video": round(ffmpeg_per_video, 3),
            "cpu_s_per_video": round(statistics.median(r["cpu_s"] for r in figures) / videos, 3),
            "idle_core_s": round(statistics.median(r["idle_core_s"] for r in figures), 2),
            "cpu_s_not_sampled": round(
                statistics.median(r["cpu_s_not_sampled"] for r in figures), 2
            ),
        }
        if name == "video2dataset":
            bound = CPUS / ffmpeg_per_video
            entry["zero_overhead_bound"] = round(bound, 3)
            entry["share_of_bound"] = round(statistics.median(rates) / bound, 3)
            entry.update(steady_share(figures, videos, bound))
        else:
            peer_rates = [r["videos_per_s"] for r in peer_rounds]
            mode = _mode_figures(
                figures, rates, ffmpeg_per_video, peer_rates, model_cpu, videos, server_idle_per_s
            )
            entry.update(mode)
        summary[name] = entry
    after, before = rounds.get("vidflow_local", []), rounds.get(f"vidflow_{BASELINE_MODE}", [])
    if after and before:  # `--baseline`: the change's own ratio, round by round
        ratios = [a["videos_per_s"] / b["videos_per_s"] for a, b in zip(after, before, strict=True)]
        summary["after_to_before"] = {
            "videos_per_s_ratio": round(statistics.median(ratios), 3),
            "ratio_rounds": [round(ratio, 3) for ratio in ratios],
        }
    return summary


def steady_share(figures: list[dict[str, Any]], videos: int, bound: float) -> dict[str, float]:
    """The share of the bound between the first ffmpeg's start and the last one's end: the
    steady rate, without the fixed start-up before and the tail after, which a longer list
    spreads over more videos (bench/depth_scale.py)."""
    spans = [r["ffmpeg_span_s"] for r in figures if r.get("ffmpeg_span_s")]
    if not spans:
        return {}
    return {"share_of_bound_while_transcoding": round(videos / statistics.median(spans) / bound, 3)}


def _mode_figures(
    figures: list[dict[str, Any]],
    rates: list[float],
    ffmpeg_per_video: float,
    peer_rates: list[float],
    model_cpu: float,
    videos: int,
    server_idle_per_s: float | None,
) -> dict[str, Any]:
    """A vidflow mode's ratios to the peer, share of the bound and overhead shares (`rates`
    and `ffmpeg_per_video` as `summarise` has them)."""
    rate = statistics.median(rates)
    outside = statistics.median(r["cpu_s_outside_ffmpeg_and_model"] for r in figures)
    outside_actor = statistics.median(r["cpu_s_outside_ffmpeg_and_depth_actor"] for r in figures)
    actor = statistics.median(r["cpu_s_by_kind"].get("depth_actor", 0) for r in figures)
    bound = CPUS / (ffmpeg_per_video + model_cpu)
    useful = (ffmpeg_per_video + model_cpu) * videos
    bound_with_load = CPUS / (ffmpeg_per_video + actor / videos)
    entry: dict[str, Any] = {}
    if peer_rates:
        ratios = [ours / peer for ours, peer in zip(rates, peer_rates, strict=True)]
        entry["ratio_to_video2dataset"] = round(statistics.median(ratios), 3)
        entry["ratio_rounds"] = [round(r, 3) for r in ratios]
    entry.update(
        zero_overhead_bound=round(bound, 3),
        share_of_bound=round(rate / bound, 3),
        **steady_share(figures, videos, bound),
        overhead_share=round(outside / videos / ffmpeg_per_video, 3),
        share_of_bound_if_never_idle=round(useful / (useful + outside), 3),
        depth_actor_cpu_s=actor,
        zero_overhead_bound_with_model_load=round(bound_with_load, 3),
        share_of_bound_with_model_load=round(rate / bound_with_load, 3),
        overhead_share_with_model_load_as_model=round(outside_actor / videos / ffmpeg_per_video, 3),
    )
    if server_idle_per_s is not None:
        # The same, counting only what the run added to the Prefect server's CPU.
        marginal = statistics.median(
            r["cpu_s_outside_ffmpeg_and_model"] - server_idle_per_s * r["wall_s"] for r in figures
        )
        entry["overhead_share_without_idle_server"] = round(marginal / videos / ffmpeg_per_video, 3)
    return entry


if __name__ == "__main__":
    sys.exit(main())
