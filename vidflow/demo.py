"""`make demo`: both vidflow flows as Prefect deployments on a local stack, end to end.

Starts a local Prefect server (embedded SQLite, history kept in runs/prefect), the work pool
`vidflow-local` and a worker, the local Kafka-protocol broker, the inference service and a local
Kinetics mirror serving the sample clips; deploys `depth-extraction/local` and
`stream-benchmark/local` from prefect.yaml; runs both with `prefect deployment run ... --watch`;
prints their summaries, where the Lance dataset and the logs are, and the UI address; stops
everything it started on exit, Ctrl-C or SIGTERM.

Depth Pro's weights come from the Hugging Face hub. Where they cannot be had (no internet), the
demo says so and runs a Depth Pro of the same architecture with untrained weights; every depth
output of that run is labelled untrained (column `depth_untrained`, artifact descriptions).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.cli_types import positive_float, positive_int
from common.frames import encode_jpeg, iter_video_frames
from common.logs import setup_logging
from common.net import reach_loopback_directly
from common.settings import (
    KINETICS_VAL_CSV,
    SAMPLE_VIDEO,
    SAMPLE_VIDEOS_DIR,
    LogSettings,
    one_line,
)
from devstack.broker import LocalBroker, start_broker
from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from devstack.local_stack import (
    MARKER_VARIABLE,
    LocalStack,
    port_or_free,
    post_json,
    start_reaper,
    stop_reaper,
)
from devstack.run_echo import RunLogEcho
from devstack.sample_mirror import running_mirror
from flows import artifact_keys
from services.inference.client import classify_files
from services.inference.settings import ModelSource
from tasks.depth.depth_model import check_depth_model
from tasks.depth.model_files import (
    HubUnreachableError,
    cached_model_dir,
    check_hub_reachable,
    is_local_model,
)
from tasks.depth.output_layout import OutputLayout
from tasks.depth.output_lock import NoLocksError, OutputBusyError, output_lock
from tasks.depth.settings import DepthSettings

log = logging.getLogger("vidflow.demo")

DEPLOYMENTS = ("depth-extraction/local", "stream-benchmark/local")
UI_CHECK_EVERY_S = 1.0  # how soon --keep-ui sees that its Prefect server exited


def sample_frames(out_dir: Path, per_video: int) -> list[Path]:
    """Save a few evenly spaced frames of each sample clip as JPEG files."""
    paths = []
    for video in sorted(SAMPLE_VIDEOS_DIR.glob("*.mp4")):
        frames = list(iter_video_frames(video))
        step = max(1, len(frames) // per_video)
        for index in range(0, len(frames), step)[:per_video]:
            path = out_dir / f"{video.stem}_frame{index:04d}.jpg"
            path.write_bytes(encode_jpeg(frames[index]))
            paths.append(path)
    return paths


# The weights are fetched by a child process: huggingface_hub downloads on a thread pool that
# waits for the files under way on Ctrl-C, 1.9 GB for Depth Pro (and a second Ctrl-C left the
# interpreter joining the same threads). A child is killed at once, and carries the stack's
# marker, so a demo killed outright takes it along.
_FETCH_WEIGHTS = """
import sys
from huggingface_hub import snapshot_download
try:
    snapshot_download(sys.argv[1], allow_patterns=["*.json", "*.safetensors"])
except Exception as exc:
    print((str(exc).strip() or type(exc).__name__).splitlines()[0], flush=True)
    sys.exit(3)
"""


def depth_model_for_demo(work_dir: Path) -> tuple[str, bool]:
    """The depth model and whether it is untrained: the configured one when its weights can be
    had, else (the default model only) an untrained stand-in. A model the user named
    (VIDFLOW_DEPTH_DEPTH_MODEL) that cannot be had is an error, not random weights in its
    place: a mistyped folder or hub id ran the demo untrained and exited 0."""
    wanted = DepthSettings().depth_model
    named = "depth_model" in DepthSettings().model_fields_set  # set in the environment
    if is_local_model(wanted) or cached_model_dir(wanted) is not None:
        try:
            return wanted, check_depth_model(wanted)  # a stand-in folder says it is untrained
        except ValueError as exc:
            raise RuntimeError(f"VIDFLOW_DEPTH_DEPTH_MODEL: {exc}") from None
    try:
        check_hub_reachable(wanted)
        log.info("fetching the weights of %s (about 1.9 GB the first time)", wanted)
        fetch = [sys.executable, "-c", _FETCH_WEIGHTS, wanted]
        fetched = subprocess.run(fetch, stdout=subprocess.PIPE, text=True, check=False)
        reason = None if fetched.returncode == 0 else fetched.stdout.strip() or "no reason given"
    except HubUnreachableError as exc:
        reason = str(exc)
    if reason is None:
        return wanted, False
    if named:
        raise RuntimeError(f"the depth model {wanted} (VIDFLOW_DEPTH_DEPTH_MODEL) cannot be had: "
                           f"{reason}")  # fmt: skip
    from devstack.tiny_depth_pro import save_tiny_depth_pro

    stand_in = save_tiny_depth_pro(work_dir / "untrained-depth-pro")
    print(
        f"\nNOTE: the weights of {wanted} cannot be downloaded here ({reason[:160]}).\n"
        "      This run uses a stand-in Depth Pro of the same architecture, at toy size, with\n"
        "      UNTRAINED random weights: its depth maps mean nothing. Every depth output of this\n"
        "      run is labelled untrained (column depth_untrained = true in the Lance table, and\n"
        "      the description of the depth-extraction-summary artifact). With internet, or\n"
        "      VIDFLOW_DEPTH_DEPTH_MODEL=/path/to/DepthPro-hf, the demo uses the real weights.\n",
        flush=True,
    )
    return str(stand_in), True


def read_artifacts(api_url: str, flow_run_id: str) -> dict[str, dict[str, Any]]:
    """The artifacts of a flow run by key, from the Prefect REST API."""
    query = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    found = post_json(f"{api_url}/artifacts/filter", query)
    return {item["key"]: item for item in found if item.get("key")}


def depth_rows(lance_path: Path) -> list[dict[str, Any]]:
    import lance

    return lance.dataset(lance_path).to_table().to_pylist()


def print_depth_summary(
    lance_path: Path, artifacts: dict[str, dict[str, Any]], expected: int
) -> int:
    """Print one line per video; returns how many of the `expected` failed or have no row
    (a shard whose commit failed writes none; a run that failed part-way left fewer)."""
    rows = depth_rows(lance_path)
    failed = [row for row in rows if row["status"] != "ok"]
    print(f"\nDepth extraction: {len(rows) - len(failed)} of {expected} videos ok")
    if summary := artifacts.get(artifact_keys.DEPTH_SUMMARY):
        print(f"  {summary['description']}")
    if missing := max(0, expected - len(rows)):
        print(f"  {missing} video(s) have no row: the run's log says why")
    for row in rows:
        if row["status"] == "ok":
            untrained = " (UNTRAINED)" if row["depth_untrained"] else ""
            outcome = f"{row['width']}x{row['height']}, depth {row['depth_min_m']:.2f}-"
            outcome += f"{row['depth_max_m']:.2f} m{untrained}"
        else:
            reason = next(iter((row["error"] or "").strip().splitlines()), "")[:120]
            outcome = f"failed at {row['failed_stage']}: {reason}"
        print(f"  {row['video_id']:28s} {row['label'] or '':20s} {outcome}")
    return len(failed) + missing


def print_stream_summary(artifacts: dict[str, dict[str, Any]]) -> None:
    print("\nStream benchmark:")
    report = artifacts.get(artifact_keys.STREAM_REPORT)
    print(report["data"] if report else "  (no report artifact)")


def start_services(
    stack: LocalStack, log_file: Path, cleanup: contextlib.ExitStack
) -> tuple[ServerProcess, LocalBroker]:
    """The Prefect server (launched only: `demo_steps` waits for it before it deploys), the
    inference service and the broker; `cleanup` stops the last two."""
    log.info("starting the Prefect server on %s (embedded SQLite)", stack.ui_url)
    stack.launch_server()
    log.info("starting the inference service (the first start exports the model to ONNX)")
    logs_dir = stack.logs_dir
    # Where the user keeps exported models (VIDFLOW_INFERENCE_CACHE_DIR: a small or read-only
    # home); the flag the launcher passes would beat the variable.
    cache_dir = ModelSource().cache_dir
    inference = start_server(logs_dir, cache_dir, "--log-file", str(log_file))
    cleanup.callback(inference.terminate)
    broker = start_broker(port_or_free(9092), log_path=logs_dir / "broker.log")
    cleanup.callback(broker.stop)
    inference.wait_serving()
    log.info("inference service SERVING on %s", inference.target)
    return inference, broker


def print_classified_samples(target: str, run_dir: Path) -> int:
    """Classify a few sample frames over gRPC: the service answers before the flows start.
    How many got no label (the demo fails for them: it exited 0 after printing ERROR for
    each, found in review, stop 62)."""
    print("\nTop-1 ImageNet label of sample frames (gRPC Classify):")
    failed = 0
    for result in classify_files(target, sample_frames(run_dir, 2)):
        predictions = result.response.predictions if result.response else []
        best = predictions[0] if predictions else None  # none: an answer without a label
        failed += best is None
        shown = f"ERROR {result.error or 'an answer without a label'}"
        print(f"  {result.path.name:36s} " + (f"{best.label} {best.score:.3f}" if best else shown))
    return failed


def run_depth_extraction(
    stack: LocalStack, videos: int, output: Path, depth_model: str
) -> tuple[str, bool]:
    """depth-extraction/local over `videos` Kinetics rows from a local mirror; its run id, and
    whether it completed (it fails where not one video was done, or past its videos: a failed
    Parquet export, a lost Ray)."""
    with running_mirror(port=port_or_free(8765)) as url_template:
        log.info("running depth-extraction/local (%d Kinetics val rows)", videos)
        # `settings` replaces the deployment's whole: its `frames` is given again.
        settings = {"output": str(output), "depth_model": depth_model, "frames": "first"}
        parameters = {
            "kinetics_csv": str(KINETICS_VAL_CSV),
            "url_template": url_template,
            "limit": videos,
            "settings": settings,
        }
        # Failed, its rows still say why, below. Long runs (DEMO_ARGS=--videos N with the
        # real model on a CPU) are given time in proportion.
        echo = RunLogEcho(stack.api_url, "depth-extraction", "local")
        run_id, state = stack.run_deployment(
            "depth-extraction/local", parameters, timeout_s=max(1800.0, 300.0 * videos),
            allow_failed=True, while_waiting=echo,
        )  # fmt: skip
        echo.finish()
    log.info("depth-extraction: %s", state)
    if not OutputLayout(output).lance.exists():  # the run failed before making its table
        raise RuntimeError(f"depth-extraction wrote no table: {state} (see {stack.logs_dir})")
    completed = "finished successfully" in state
    if not completed:
        log.error("depth-extraction did not complete: %s (see %s)", state, stack.logs_dir)
    return run_id, completed


def run_stream_benchmark(
    stack: LocalStack, seconds: float, target: str, bootstrap_servers: str
) -> tuple[str, bool]:
    """stream-benchmark/local on the sample clip through the local broker; its run id, and
    whether it completed (a failed run keeps its report: said all the same)."""
    log.info("running stream-benchmark/local (%.0f s at the clip's native fps)", seconds)
    # `settings` replaces the deployment's whole: its fps, concurrency and consumers are given
    # again; broker and service fields left out come from VIDFLOW_KAFKA_*, VIDFLOW_INFERENCE_*.
    settings = {
        "source": str(SAMPLE_VIDEO),
        "duration": seconds,
        "fps": "native",
        "concurrency": 8,
        "consumers": 1,
        "client": {"target": target},
        "kafka": {"bootstrap_servers": bootstrap_servers},
    }
    parameters = {"settings": settings}
    echo = RunLogEcho(stack.api_url, "stream-benchmark", "local")
    run_id, state = stack.run_deployment(
        "stream-benchmark/local", parameters, timeout_s=max(1800.0, seconds + 900.0),
        allow_failed=True, while_waiting=echo,
    )  # fmt: skip
    echo.finish()
    log.info("stream-benchmark: %s", state)
    completed = "finished successfully" in state
    if not completed:  # the report, the table and the links still follow
        log.error("stream-benchmark did not complete: %s (see %s)", state, stack.logs_dir)
    return run_id, completed


def say_what_exited(inference: ServerProcess, broker: LocalBroker, logs_dir: Path) -> None:
    """The demo's service or broker that exited during the runs, with its log: a failed
    stream run said only its own state."""
    for name, process, log_path in (
        ("inference service", inference.process, inference.log_path),
        ("broker", broker.process, logs_dir / "broker.log"),
    ):
        if process.poll() is not None:
            log.error("the demo's %s exited (%s) during the runs; see %s", name,
                      process.returncode, log_path)  # fmt: skip


def print_where_to_look(
    stack: LocalStack, lance_path: Path, untrained: bool, log_file: Path, run_ids: list[str]
) -> None:
    """Where the table, the logs and the runs in the UI are."""
    print(
        f"\nLance dataset: {lance_path} (and videos.parquet beside it)"
        f"{'  [depth from UNTRAINED stand-in weights]' if untrained else ''}\n"
        f"Log file:      {log_file}  (service, broker, Prefect: {stack.logs_dir})\n"
        f"Prefect UI:    {stack.ui_url}/runs/flow-run/{run_ids[0]}\n"
        f"               {stack.ui_url}/runs/flow-run/{run_ids[1]}"
    )


def hold_ui_or_say_how(stack: LocalStack, keep_ui: bool) -> bool:
    """Keep the Prefect UI up until Ctrl-C (--keep-ui), or say how to browse the runs later.
    False if the UI went away on its own: a server that exited ends the wait, which otherwise
    went on for good with nothing left to show."""
    if keep_ui:
        print(f"\nThe Prefect UI stays up at {stack.ui_url}; Ctrl-C stops everything.")
        # Ctrl-C (or SIGTERM) is the expected way to end this mode: not a failure.
        with contextlib.suppress(KeyboardInterrupt):
            server = stack.processes["prefect-server"]
            while server.poll() is None:
                time.sleep(UI_CHECK_EVERY_S)
            log.error("the Prefect server exited with %s; see %s", server.returncode,
                      stack.logs_dir / "prefect-server.log")  # fmt: skip
            return False
    else:
        print(
            "Everything this demo started is stopped as it ends. To browse the runs later:\n"
            f"  PREFECT_HOME={stack.prefect_home} .venv/bin/prefect server start"
            f"{'' if stack.ui_port == 4200 else f' --port {stack.ui_port}'}"
            "  (or `make demo DEMO_ARGS=--keep-ui`)"
        )
    return True


def demo_steps(
    args: argparse.Namespace,
    run_dir: Path,
    log_file: Path,
    stack: LocalStack,
    cleanup: contextlib.ExitStack,
) -> int:
    """Services, a classify check, both deployments run, their summaries; 1 if a video failed."""
    inference, broker = start_services(stack, log_file, cleanup)
    unlabelled = print_classified_samples(inference.target, run_dir)
    depth_model, untrained = depth_model_for_demo(run_dir)
    stack.wait_for_server()  # started first, it came up meanwhile (or nearly)
    log.info("deploying %s to work pool vidflow-local", ", ".join(DEPLOYMENTS))
    stack.deploy(*DEPLOYMENTS)
    if leftovers := stack.cancel_leftover_runs():
        log.warning("cancelled %d flow run(s) an earlier demo left unfinished", len(leftovers))
    stack.start_worker()
    output = run_dir / "depth-extraction"
    depth_run, completed = run_depth_extraction(stack, args.videos, output, depth_model)
    lance_path = OutputLayout(output).lance
    # Said before the stream runs: a stream that fails hid the depth results already made.
    artifacts = read_artifacts(stack.api_url, depth_run)
    failed = print_depth_summary(lance_path, artifacts, args.videos)
    stream_run, streamed = run_stream_benchmark(
        stack, args.stream_seconds, inference.target, broker.bootstrap_servers
    )
    print_stream_summary(read_artifacts(stack.api_url, stream_run))
    if not streamed:
        say_what_exited(inference, broker, stack.logs_dir)
    print_where_to_look(stack, lance_path, untrained, log_file, [depth_run, stream_run])
    ui_held = hold_ui_or_say_how(stack, args.keep_ui)
    if unlabelled:
        log.error("%d sample frames got no label from the service (see above)", unlabelled)
    if failed:
        log.error("%d videos failed in depth extraction (see above and the Lance table)", failed)
    for run, done in (("depth-extraction", completed), ("stream-benchmark", streamed)):
        if not done:  # said again last: the terminal's last lines were the browse hint
            log.error("the %s run did not complete (its state above, its log in the UI)", run)
    return 1 if unlabelled or failed or not completed or not streamed or not ui_held else 0


def stop_stack(stack: LocalStack, reaper: subprocess.Popen[bytes]) -> None:
    """Stop the worker, the Prefect server and anything else carrying the stack's marker; then
    tell the watcher to stand down. A stop cut short (a second Ctrl-C, a SIGKILL) leaves it
    armed, and it sweeps once this process is gone (it was told first: the server and worker,
    in sessions of their own, outlived such a demo)."""
    leftovers = stack.stop()
    stop_reaper(reaper)
    more = f" (and {len(leftovers)} leftover processes)" if leftovers else ""
    log.info("stopped the worker, the Prefect server, the broker and the service%s", more)


def run_demo(args: argparse.Namespace, run_dir: Path, log_file: Path) -> int:
    """The demo's steps; whatever it started is stopped on the way out, however it ends."""
    logs_dir = run_dir / "logs"
    logs_dir.mkdir(parents=True)
    prefect_home = args.runs_dir.resolve() / "prefect"  # the stack runs from the checkout
    stack = LocalStack(logs_dir, prefect_home=prefect_home, ui_port=port_or_free(4200))
    # Stopped in reverse order: the broker, the service, then the stack and its watcher.
    with contextlib.ExitStack() as cleanup:
        # One demo at a time per Prefect history: two share its database and work pool, and
        # each one's worker would take the other's flow runs.
        try:
            cleanup.enter_context(output_lock(prefect_home))
        except NoLocksError as exc:  # not another demo: the message says what to do
            log.error("%s", exc)
            return 1
        except OutputBusyError:
            log.error(
                "another demo is running on %s: wait for it to end, or give this one its own "
                "folder (make demo DEMO_ARGS='--runs-dir DIR')", prefect_home,
            )  # fmt: skip
            return 1
        # Everything started from here on carries the stack's marker, the service and broker
        # too, and a watcher ends all of it should this process be killed before its stop ends.
        os.environ[MARKER_VARIABLE] = stack.stack_id
        cleanup.callback(stop_stack, stack, start_reaper(MARKER_VARIABLE, stack.stack_id))
        try:
            return demo_steps(args, run_dir, log_file, stack, cleanup)
        except KeyboardInterrupt as interrupt:
            log.warning("interrupted: stopping everything this demo started")
            # The shell's codes for a command ended by SIGTERM or SIGINT.
            return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
        except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
            log.error("demo failed: %s", exc)  # ValueError: a sample video that does not open
            return 1


# Where a user's own service and broker are and how they are reached: the demo runs its own,
# on loopback, in plain text. Inherited, `VIDFLOW_INFERENCE_HOST=0.0.0.0` opened the demo's
# service to the network, and a TLS certificate or a SASL setting kept its own clients out.
# (How the service runs, such as VIDFLOW_INFERENCE_DEVICE=cpu, is still the user's to say.)
OWN_SERVICES_SETTINGS = frozenset(
    [f"VIDFLOW_INFERENCE_{name}" for name in ("HOST", "PORT", "HTTP_PORT", "TARGET", "TLS_CERT",
                                              "TLS_KEY", "TLS_CA", "AUTH_TOKEN")]
    + [f"VIDFLOW_KAFKA_{name}" for name in ("BOOTSTRAP_SERVERS", "SECURITY_PROTOCOL",
                                            "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD",
                                            "SSL_CA_LOCATION")]
)  # fmt: skip


# Where a user's own Ray cluster is: the demo's depth run starts a private Ray on loopback.
# Inherited (or found running, as a run joins `ray start`'s cluster by itself), the demo ran in
# that cluster: its depth actors stayed loaded there for minutes after the demo said all it
# started was stopped, and a remote cluster's workers could not reach the demo's loopback
# mirror. `local` is Ray's word for a private instance (`flows.ray_start.cluster_address`).
PRIVATE_RAY = ("RAY_ADDRESS", "local")


# Where a user's own Prefect server keeps its history: the demo's keeps it in SQLite under its
# runs folder, which its lock covers. Inherited, the demo used that database, and cancelled the
# open runs of its work pool there (the pool of the README's stack by hand).
PREFECT_DATABASE = ("PREFECT_API_DATABASE_", "PREFECT_SERVER_DATABASE_")


def demo_environment() -> list[str]:
    """Make this process's environment (which all it starts inherits) the demo's: drop where a
    user's own service, broker and Ray cluster are and how to reach them, and reach loopback
    without a proxy (a laptop with http_proxy set and no no_proxy sent every call to the local
    Prefect server to the proxy: "did not answer within 120 s"), and keep the history in the
    demo's own SQLite. The names dropped, to say so."""
    dropped = sorted(
        name for name in os.environ
        if name.upper() in OWN_SERVICES_SETTINGS or name.upper().startswith(PREFECT_DATABASE)
    )  # fmt: skip
    for name in dropped:
        del os.environ[name]
    ray_address, private = PRIVATE_RAY
    if os.environ.get(ray_address, private) != private:
        dropped = sorted([*dropped, ray_address])
    os.environ[ray_address] = private
    reach_loopback_directly()
    return dropped


def new_run_dir(runs_dir: Path) -> Path:
    """A folder of its own for this run, named by its start time (a second demo started in the
    same second, refused by the lock as it should be, crashed on the name instead)."""
    stamp = time.strftime("demo-%Y%m%dT%H%M%S")
    for suffix in ("", *(f"-{n}" for n in range(2, 1000))):
        try:
            (run_dir := runs_dir / f"{stamp}{suffix}").mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"{runs_dir / stamp}: 999 runs this second")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt is, so both stop the demo the same way."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--videos", type=positive_int, default=4, help="Kinetics rows for depth extraction"
    )
    parser.add_argument(
        "--stream-seconds", type=positive_float, default=15.0, help="stream duration"
    )
    parser.add_argument(
        "--keep-ui", action="store_true", help="keep the Prefect server up until Ctrl-C"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=REPO_ROOT / "runs",
        help="where run folders and the Prefect history (prefect/) go",
    )
    args = parser.parse_args(argv)

    # the stream run's clip too: missing, it failed only after the whole depth run
    needed = (SAMPLE_VIDEOS_DIR, KINETICS_VAL_CSV, SAMPLE_VIDEO)
    missing = [str(p) for p in needed if not p.exists()]
    if missing:  # before a run folder is made for nothing
        print(
            f"vidflow demo: sample data not found: {', '.join(missing)}. The demo reads the "
            "sample clips and the Kinetics-400 list from ../shared/data beside this checkout "
            "(README, first lines): put them there, or link that folder.",
            file=sys.stderr,
        )
        return 1
    try:  # before a run folder is made for nothing
        log_settings = LogSettings()
    except ValueError as exc:  # VIDFLOW_LOG_LEVEL=verbose: a traceback, an empty run folder
        print(f"vidflow demo: {one_line(exc, LogSettings, ())}", file=sys.stderr)
        return 2
    run_dir = new_run_dir(args.runs_dir.resolve())
    log_file = run_dir / "vidflow.log"
    setup_logging(log_settings.model_copy(update={"file": log_file}))
    # Ctrl-C and SIGTERM (a CI runner, `kill`) stop the demo and all it started. SIGINT is set
    # explicitly: a shell starting the demo in the background hands it SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    if dropped := demo_environment():
        log.warning("the demo runs its own inference service, broker, Prefect database and Ray: "
                    "%s not used", ", ".join(dropped))  # fmt: skip
    return run_demo(args, run_dir, log_file)


if __name__ == "__main__":
    sys.exit(main())
