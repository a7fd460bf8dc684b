"""Benchmark: does `vidflow depth` cost grow linearly with the list? 200 and 2,000 rows.

    python -m bench.depth_scale [--sizes 200,2000]

Each size is one run of `vidflow depth` over the first N rows of the real Kinetics-400
validation CSV (`../shared/data/kinetics/`), served by the local mirror (the real sample clips
under the real Kinetics names, devstack/sample_mirror.py), against a running Prefect server, on
a local Ray, with the tiny Depth Pro (random weights). Per run:
- videos/s over the whole run;
- the driver's peak RSS (VmHWM of the `vidflow depth` process, sampled from /proc);
- the Prefect task runs of the flow run, against the shards (at most 4 per shard plus a few);
- how fast the Prefect UI answers while the run goes on: its page and the API calls its flow
  run view makes, every 2 s, worst and 95th percentile.
The last stdout line is JSON with both runs and the ratios (2,000 over 200).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.cli_args import bench_parser
from bench.depth import export_untimed
from bench.depth_peer import prefect_server
from bench.peer_v2d import exit_on_sigterm
from common.cli_types import positive_int_list
from common.processes import batch_child, stop_process
from common.settings import KINETICS_VAL_CSV
from devstack.sample_mirror import running_mirror
from tasks.depth.settings import DepthSettings

PROBE_EVERY_S = 2.0
DRIVER_STOP_GRACE_S = 30.0  # for the driver to stop its own Ray on SIGTERM before SIGKILL


class RunProbe:
    """Samples the driver's peak RSS and the Prefect UI's answer times while a run goes on."""

    def __init__(self, pid: int, api_url: str) -> None:
        self.pid, self.api_url = pid, api_url
        self.peak_rss_mb = 0.0
        self.answer_s: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RunProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        ui_root = self.api_url.removesuffix("/api")
        while not self._stop.wait(PROBE_EVERY_S):
            self._sample_rss()
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{ui_root}/", timeout=10) as page:
                    page.read()
                self._post("/flow_runs/filter", {"limit": 10, "sort": "START_TIME_DESC"})
                self._post("/task_runs/filter", {"limit": 50, "sort": "EXPECTED_START_TIME_DESC"})
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                # no answer: the timeout at least (a refusal at once read as a 10-s answer,
                # and two requests' waits as one)
                self.answer_s.append(max(10.0, time.perf_counter() - started))
                continue
            self.answer_s.append(time.perf_counter() - started)

    def _post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.api_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def _sample_rss(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)


def task_runs_of(api_url: str, flow_run_id: str) -> int:
    """Task runs the Prefect API recorded for a flow run."""
    body = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode()
    request = urllib.request.Request(
        f"{api_url}/task_runs/count", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(json.load(answer))


def one_run(size: int, work: Path, template: str, api_url: str, model: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "vidflow.cli", "depth", "--kinetics-csv", str(KINETICS_VAL_CSV),
        "--limit", str(size), "--url-template", template, "--output", str(work / f"out-{size}"),
        "--depth-model", str(model), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": api_url}
    env["RAY_ADDRESS"] = "local"  # its own Ray, even where `ray start` runs one on this machine
    args, preexec = batch_child(command)  # dies with this process, even SIGKILLed
    log_path = work / f"driver-{size}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log_file:
        driver = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=log_file, preexec_fn=preexec
        )
        with RunProbe(driver.pid, api_url) as probe:
            try:
                stdout, _ = driver.communicate(timeout=6 * 3600)
            except BaseException:
                # A timeout (or Ctrl-C, an error) would leave the driver running, its Ray too.
                stop_process(driver, DRIVER_STOP_GRACE_S)
                raise
    wall_s = time.perf_counter() - started
    if driver.returncode != 0:  # after a long run, say why
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vidflow depth exited {driver.returncode}; its log ends:\n{tail}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    answers = sorted(probe.answer_s)
    try:
        task_runs: int | str = task_runs_of(api_url, summary["flow_run_id"])
    except OSError as exc:  # keep a long run's figures even if the count cannot be had
        task_runs = f"count failed: {exc}"
    return {
        "videos": size,
        "ok": summary["ok"],
        "shards": summary["shards"],
        "wall_s": round(wall_s, 1),
        "videos_per_s": round(summary["ok"] / wall_s, 3),
        "driver_peak_rss_mb": round(probe.peak_rss_mb, 1),
        "task_runs": task_runs,
        "ui_answer_max_s": round(answers[-1], 3) if answers else None,
        "ui_answer_p95_s": round(answers[int(0.95 * (len(answers) - 1))], 3) if answers else None,
        "ui_answer_median_s": round(statistics.median(answers), 3) if answers else None,
        "ui_probes": len(answers),
        "ui_errors": sorted(set(probe.errors))[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--sizes",
        type=positive_int_list,
        default="200,2000",
        help="comma-separated list sizes (Kinetics-400 val rows), one run each",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes
    exit_on_sigterm()  # so the `finally`s below stop the run, its server and mirror on SIGTERM

    from devstack.tiny_depth_pro import save_tiny_depth_pro

    work = Path(tempfile.mkdtemp(prefix="vidflow-bench-scale-"))
    results: dict[str, Any] = {"benchmark": "depth_scale", "cpus": os.cpu_count(), "runs": []}
    try:
        model = save_tiny_depth_pro(work / "tiny-depth-pro")
        # Its ONNX export, untimed: the first size's run paid it, and `rate_ratio` read high
        export_untimed(DepthSettings(depth_model=str(model), device="cpu"))
        with running_mirror() as template, prefect_server(work / "prefect-home") as api_url:
            for size in sizes:
                run = one_run(size, work, template, api_url, model)
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                shutil.rmtree(work / f"out-{size}", ignore_errors=True)
        first, last = results["runs"][0], results["runs"][-1]
        results["rate_ratio"] = round(last["videos_per_s"] / first["videos_per_s"], 3)
        results["rss_ratio"] = round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"], 3)
        results["task_runs_within_5_per_shard_plus_10"] = all(
            isinstance(run["task_runs"], int) and run["task_runs"] <= 5 * run["shards"] + 10
            for run in results["runs"]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
