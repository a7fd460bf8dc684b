"""Benchmark: vidflow's service against a plain grpcio server and the bare model, per concurrency.

    python -m bench.service_sweep [--rounds 3] [--duration 5] [--concurrency 1,2,4,8,16]
        [--vidflow LABEL=ARGS ...] [--vidflow-repo LABEL=PATH ...] [--plain LABEL=ARGS ...]

Each round measures, one after the other so they never share the cores: the bare model (ONNX
Runtime called in-process on preprocessed frames, the best of one call at a time and one call
per worker, each at batch 1 and at batch 8, as `bench/service.py` does), then each server in its
own process driven by the closed-loop load test (`services/inference/loadtest.py`, unary
Classify, real frames) at every concurrency level: `vidflow serve` with its defaults (or each
`--vidflow` configuration: extra `vidflow serve` flags, optionally run from another checkout
with `--vidflow-repo`, e.g. an export of an older commit) and the plain server
(`bench/plain_server.py`: same ONNX file, preprocessing and thread budget, no batching), besides
any `--plain` variant of it (extra `bench.plain_server` flags, e.g. `--classify-pool`). The
servers' order alternates between rounds. Reported per level: img/s and p99 (means over rounds),
each other configuration's ratio to the plain server, and at concurrency 8 its ratio to the bare
model. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

from bench.cli_args import add_model_cache_flag, bench_parser
from bench.plain_server import start_plain_server
from bench.service import BareModel, real_frames
from common.cli_types import (
    non_negative_float,
    output_file,
    positive_float,
    positive_int,
    positive_int_list,
    vidflow_checkout,
)
from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from services.inference.loadtest import LevelResult, run_loadtest
from services.inference.models import load_model
from services.inference.onnx_export import export_onnx
from services.inference.settings import InferenceSettings

PLAIN = "plain"


def _pair(value: str) -> tuple[str, str]:
    """A LABEL=VALUE flag."""
    label, sep, rest = value.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"takes LABEL=VALUE, not {value!r}")
    return label, rest


def _measure(server: ServerProcess, frames: list[bytes], args: argparse.Namespace):
    """Every concurrency level against one server, then stop it."""
    try:
        server.wait_serving()
        return asyncio.run(
            run_loadtest(server.target, frames, args.levels, args.duration, args.warmup)
        )
    finally:
        server.terminate()


def _mean_latency(rounds: list[LevelResult], figure: str) -> float | None:
    """A latency figure's mean over the rounds that answered a request: a round that answered
    none (a server gone, every call refused) has a p99 of 0 ms, which pulled the mean down
    (and made a ratio of 0.0, "far better than plain"); None where no round answered."""
    answered = [r.latency_ms[figure] for r in rounds if r.requests]
    return round(mean(answered), 1) if answered else None


def _summary(runs: list[list[LevelResult]]) -> dict[int, dict[str, Any]]:
    """img/s and p99 per level, means over rounds, and each round's img/s."""
    by_level: dict[int, dict[str, Any]] = {}
    for index, level in enumerate(runs[0]):
        rounds = [run[index] for run in runs]
        by_level[level.concurrency] = {
            "img_s": round(mean(r.throughput_rps for r in rounds), 1),
            "p99_ms": _mean_latency(rounds, "p99"),
            "p50_ms": _mean_latency(rounds, "p50"),
            "mean_batch": round(mean(r.mean_batch_size for r in rounds), 2),
            "errors": sum(r.errors for r in rounds),
            "rounds_img_s": [r.throughput_rps for r in rounds],
        }
    return by_level


def _ratio(ours: dict, theirs: dict, level: int, figure: str) -> float | None:
    """ours over theirs at a level; None where theirs is 0 or unknown (the plain server answered
    nothing), or ours unknown, so the other figures still reach the JSON."""
    numerator, denominator = ours[level][figure], theirs[level][figure]
    return round(numerator / denominator, 3) if denominator and numerator is not None else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds")
    parser.add_argument("--duration", type=positive_float, default=5.0, help="seconds per level")
    parser.add_argument(
        "--warmup", type=non_negative_float, default=1.0, help="uncounted seconds per level"
    )
    parser.add_argument(
        "--concurrency", type=positive_int_list, default="1,2,4,8,16", help="comma-separated levels"
    )
    parser.add_argument(
        "--frames-per-video", type=positive_int, default=64, help="frames of each sample clip"
    )
    add_model_cache_flag(parser)
    parser.add_argument(
        "--vidflow",
        type=_pair,
        action="append",
        default=[],
        help="LABEL=ARGS: a vidflow configuration (extra `vidflow serve` flags)",
    )
    parser.add_argument(
        "--vidflow-repo",
        type=_pair,
        action="append",
        default=[],
        help="LABEL=PATH: serve the --vidflow configuration LABEL from the checkout at PATH",
    )
    parser.add_argument(
        "--plain",
        type=_pair,
        action="append",
        default=[],
        help="LABEL=ARGS: a variant of the plain server (extra `bench.plain_server` flags)",
    )
    parser.add_argument("--json", type=output_file, help="also write the JSON here")
    args = parser.parse_args()
    args.levels = args.concurrency
    args.configs = {label: shlex.split(flags) for label, flags in args.vidflow} or {"vidflow": []}
    args.plain_configs = {label: shlex.split(flags) for label, flags in args.plain}
    clashes = {PLAIN, *args.configs} & set(args.plain_configs)
    if clashes:
        parser.error(f"--plain {sorted(clashes)[0]}=...: that label is taken")
    if PLAIN in args.configs:  # served as the plain server, and its ratios 1.0 to itself
        parser.error(f"--vidflow {PLAIN}=...: that label is the plain server's")
    args.repos = {}
    for label, path in args.vidflow_repo:
        if label not in args.configs:
            parser.error(f"--vidflow-repo {label}=...: no --vidflow {label}=... to serve from it")
        try:
            args.repos[label] = vidflow_checkout(path)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--vidflow-repo {label}=...: {exc}")
    args.configs.update(args.plain_configs)
    # The servers run with another cwd (a --vidflow-repo checkout): a relative path would name
    # another folder there.
    args.cache_dir = args.cache_dir.resolve()
    return args


def main() -> None:
    args = parse_args()
    frames = real_frames(args.frames_per_video)
    served = InferenceSettings(backend="onnx", cache_dir=args.cache_dir)
    onnx_path = export_onnx(load_model(served.model, served.weights), args.cache_dir)
    bare_model = BareModel(args.cache_dir, frames)  # the frames the servers get

    bare_runs: list[float] = []
    runs: dict[str, list[list[LevelResult]]] = {label: [] for label in [*args.configs, PLAIN]}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_index in range(args.rounds):
                # Every measure in reverse order every other round, the bare model's too: a
                # machine's drift over a round then weighs on each alike.
                reverse = round_index % 2 == 1
                if not reverse:
                    bare_runs.append(bare_model.fps(args.duration))
                for label in [*args.configs, PLAIN][:: -1 if reverse else 1]:
                    server = _start(label, Path(tmp), onnx_path, args)
                    runs[label].append(_measure(server, frames, args))
                if reverse:
                    bare_runs.append(bare_model.fps(args.duration))
                _print_round(round_index, bare_runs[-1], runs, args)
    except BaseException as exc:
        # A round takes minutes: a failure (or Ctrl-C) in round N keeps rounds 1..N-1.
        _emit(_partial_result(bare_runs, runs, args, exc) | {"frames": len(frames)}, args)
        raise
    result = _result(
        bare_runs, {label: _summary(level_runs) for label, level_runs in runs.items()}, args
    )
    _emit(result | {"frames": len(frames)}, args)


def _print_round(
    round_index: int,
    bare: float,
    runs: dict[str, list[list[LevelResult]]],
    args: argparse.Namespace,
) -> None:
    """One line per round on stderr, to follow a long sweep."""
    line = ", ".join(
        f"{label} " + "/".join(f"{lv.throughput_rps:.0f}" for lv in levels[-1])
        for label, levels in runs.items()
        if levels
    )
    print(
        f"round {round_index + 1}: bare {bare:.0f} img/s; img/s at "
        f"concurrency {args.concurrency}: {line}",
        file=sys.stderr,
    )


def _emit(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON line, then the --json file."""
    print(json.dumps(result), flush=True)  # first: a file that cannot be written loses nothing
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def _partial_result(
    bare_runs: list[float],
    runs: dict[str, list[list[LevelResult]]],
    args: argparse.Namespace,
    exc: BaseException,
) -> dict[str, Any]:
    """The figures of the rounds every server finished (a round cut short is left out, so the
    ratios compare the same rounds), with the error that ended the sweep."""
    done = min([len(bare_runs), *(len(level_runs) for level_runs in runs.values())])
    error = f"{type(exc).__name__}: {exc}"
    if done == 0:
        return {"benchmark": "service_sweep", "rounds_completed": 0, "error": error}
    summaries = {label: _summary(level_runs[:done]) for label, level_runs in runs.items()}
    return _result(bare_runs[:done], summaries, args) | {"rounds_completed": done, "error": error}


def _start(label: str, tmp: Path, onnx_path: Path, args: argparse.Namespace) -> Any:
    """The plain baseline server, a variant of it, or vidflow's service with the label's
    flags."""
    if label == PLAIN:
        return start_plain_server(tmp, onnx_path)
    if label in args.plain_configs:
        return start_plain_server(tmp, onnx_path, extra_args=args.plain_configs[label])
    return start_server(
        tmp, args.cache_dir, "--backend", "onnx", *args.configs[label],
        repo_root=args.repos.get(label, REPO_ROOT),
    )  # fmt: skip


def _result(
    bare_runs: list[float], summaries: dict[str, dict], args: argparse.Namespace
) -> dict[str, Any]:
    """The JSON line: every server's levels, and each vidflow configuration against plain."""
    bare = mean(bare_runs)
    plain = summaries[PLAIN]
    verdicts: dict[str, dict[str, object]] = {}
    for label in args.configs:
        ours = summaries[label]
        verdicts[label] = {
            "img_s_ratio_to_plain": {c: _ratio(ours, plain, c, "img_s") for c in ours},
            "p99_ratio_to_plain": {c: _ratio(ours, plain, c, "p99_ms") for c in ours},
            "c8_ratio_to_bare": round(ours[8]["img_s"] / bare, 3) if 8 in ours else None,
        }
    print(f"{'':>10}" + "".join(f"{'c=' + str(c):>16}" for c in args.levels), file=sys.stderr)
    for label, summary in summaries.items():
        cells = "".join(
            f"{summary[c]['img_s']:>8.1f} {_ms(summary[c]['p99_ms']):>8}" for c in args.levels
        )
        print(f"{label:>10}{cells}", file=sys.stderr)
    return {
        "benchmark": "service_sweep",
        "bare_model_img_s": round(bare, 1),
        "bare_rounds_img_s": [round(run, 1) for run in bare_runs],
        "levels": summaries,
        "vs_plain": verdicts,
        "configs": {label: shlex.join(flags) for label, flags in args.configs.items()},
        "repos": {label: str(path) for label, path in args.repos.items()},
        "rounds": args.rounds,
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
