"""Benchmark: seconds from `vidflow serve` to SERVING, against another checkout, alternating.

    python -m bench.serve_start --baseline-repo PATH [--rounds 5] [--args "--batching off"]

What a user waits for at every start and restart (a container's health check, a crash loop, a
test run), with the ONNX export already in the cache: each round starts the server from this
checkout and from `--baseline-repo` (e.g. `git worktree add /tmp/before <rev>`), in alternating
order, with the same flags and model cache, and times each until its health check says
SERVING. Reported: the seconds of each and their ratio (baseline / this, above 1 when this
starts faster). The last stdout line is JSON.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.cli_args import add_model_cache_flag, bench_parser
from common.cli_types import positive_int, vidflow_checkout
from devstack.launcher import REPO_ROOT, start_server


def seconds_to_serving(repo: Path, tmp: Path, cache_dir: Path, flags: list[str]) -> float:
    """One start of `vidflow serve` from `repo`, timed until SERVING, then stopped."""
    started = time.perf_counter()
    server = start_server(tmp, cache_dir, "--backend", "onnx", *flags, repo_root=repo)
    try:
        server.wait_serving()
        return time.perf_counter() - started
    finally:
        server.terminate()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--baseline-repo", type=vidflow_checkout, required=True, help="checkout")
    parser.add_argument("--rounds", type=positive_int, default=5, help="alternating rounds")
    parser.add_argument("--args", default="", help="extra `vidflow serve` flags for both")
    add_model_cache_flag(parser)
    args = parser.parse_args()
    flags = shlex.split(args.args)
    cache_dir = args.cache_dir.resolve()  # each server runs in its own checkout's folder
    repos = {"this": REPO_ROOT, "baseline": args.baseline_repo.resolve()}
    seconds: dict[str, list[float]] = {label: [] for label in repos}
    with tempfile.TemporaryDirectory() as tmp:
        for label in repos:  # untimed: the first start of each may export or fill the OS caches
            seconds_to_serving(repos[label], Path(tmp), cache_dir, flags)
        for round_index in range(args.rounds):
            for label in list(repos)[:: -1 if round_index % 2 else 1]:
                took = seconds_to_serving(repos[label], Path(tmp), cache_dir, flags)
                seconds[label].append(round(took, 2))
            print(f"round {round_index + 1}: {seconds}", file=sys.stderr)
    this, baseline = median(seconds["this"]), median(seconds["baseline"])
    result = {
        "benchmark": "serve_start",
        "flags": flags,
        "seconds_to_serving": {"this": this, "baseline": baseline},
        "rounds": seconds,
        "baseline_over_this": round(baseline / this, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
