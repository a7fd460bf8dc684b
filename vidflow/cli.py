"""The `vidflow` command: one subcommand per job, flags mapped onto each part's settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from common.cli_types import (
    non_negative_float,
    non_negative_int,
    output_file,
    port,
    port_or_zero,
    positive_float,
    positive_int,
    positive_int_list,
    prepare_output_file,
    write_output_file,
)
from common.extras import missing_extra
from common.flow_heartbeats import foreground_heartbeats
from common.import_gc import imports_without_gc
from common.logs import setup_logging
from common.net import reach_loopback_directly
from common.processes import ignore_lance_fork_warning, set_from_handler, stop_on_signals
from common.quick_exit import quick_exit
from common.settings import (
    LogSettings,
    add_settings_arguments,
    bind_address,
    one_line,
    settings_from_args,
)
from flows.stream_settings import STREAM_BENCHMARK_FLAGS, StreamBenchmarkSettings
from services.inference.settings import ClientSettings, InferenceSettings, ModelSource
from tasks.depth.settings import DepthSettings, with_absolute_paths
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings

log = logging.getLogger("vidflow")
# The errors a command says in one line and exits 2 on (`main`): bad input, a service or
# broker not there, a run that could not go.
SAID_IN_ONE_LINE = (ValueError, OSError, TimeoutError, RuntimeError)


def _serve(args: argparse.Namespace) -> int:
    from services.inference.server import serve

    asyncio.run(serve(settings_from_args(InferenceSettings, args)))
    # A stop while the model loads leaves its thread running (an export, a download): the
    # process ends without tearing the interpreter down under it.
    quick_exit.finish(0)
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from services.inference.models import load_model
    from services.inference.onnx_export import export_onnx, export_problem

    settings = settings_from_args(ModelSource, args)
    model = load_model(settings.model, settings.weights)
    path = export_onnx(model, settings.cache_dir)
    if problem := export_problem(path):  # a cached export cut short: made again, as serve does
        log.warning("the cached export %s cannot be loaded (%s): exporting again", path, problem)
        path.unlink(missing_ok=True)
        path = export_onnx(model, settings.cache_dir)
    if args.output is not None:
        # Whole or not at all: a truncated copy, served with --onnx-model, failed every start.
        from common.files import atomic_output

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(Path(args.output), durable=True) as partial:
            shutil.copyfile(path, partial)
        path = Path(args.output)
    print(path)
    return 0


def _classify(args: argparse.Namespace) -> int:
    from services.inference.client import classify_files

    client = settings_from_args(ClientSettings, args)
    failures = 0
    for result in classify_files(client.target, args.files, top_k=args.top_k, tls_ca=client.tls_ca):
        if result.response is None:
            failures += 1
            print(f"{result.path}\tERROR\t{result.error}")
            continue
        for prediction in result.response.predictions:
            print(f"{result.path}\t{prediction.label}\t{prediction.score:.4f}")
    return 1 if failures else 0


def _health(args: argparse.Namespace) -> int:
    from services.inference.client import health_check

    client = settings_from_args(ClientSettings, args)
    status, why = health_check(client.target, args.timeout, tls_ca=client.tls_ca)
    print(status)
    if status == "UNREACHABLE":  # which address, and gRPC's reason (refused, timed out, TLS)
        log.error("no health answer from %s: %s", client.target, why)
    return 0 if status == "SERVING" else 1


def _loadtest(args: argparse.Namespace) -> int:
    from common.frames import load_encoded_images
    from services.inference.loadtest import format_table, run_loadtest, write_json

    client = settings_from_args(ClientSettings, args)
    target = client.target
    images = load_encoded_images(args.images, max_frames=args.max_frames)
    # A service still loading its model (or not there) filled the first level with errors,
    # and a wrong port ran every level before it said so.
    if args.wait > 0 and not _serving_within(target, args.wait, client.tls_ca):
        return 1
    concurrencies = args.concurrency
    rpc = "ClassifyStream" if args.streaming else "Classify"
    log.info(
        "load test of %s (%s) with %d images, concurrency %s",
        target, rpc, len(images), concurrencies,
    )  # fmt: skip
    results = asyncio.run(
        run_loadtest(
            target,
            images,
            concurrencies,
            args.duration,
            args.warmup,
            streaming=args.streaming,
            tls_ca=client.tls_ca,
        )
    )
    print(format_table(results))
    if args.json is not None:
        write_json(results, args.json)
    if failed := sum(r.errors for r in results):  # the figures are not those of a clean run
        log.error("%d calls failed (the errors column, and the first reason of each above)", failed)
    return 1 if failed or any(r.requests == 0 for r in results) else 0


def _serving_within(target: str, wait_s: float, tls_ca: Path | None) -> bool:
    """Wait up to `wait_s` for the service to be SERVING (a target with no health service, a
    proxy in front of it, is taken as it is); False, said why, if it never is."""
    from services.inference.client import (
        ServiceUnreachableError,
        health_check,
        wait_until_serving,
    )

    try:
        wait_until_serving(target, wait_s, tls_ca, also=("UNIMPLEMENTED",))
    except ServiceUnreachableError as exc:  # an HTTP port, a failed TLS handshake: said at once
        log.error("%s: no load test run", exc)
        return False
    except TimeoutError as exc:
        _, why = health_check(target, tls_ca=tls_ca)
        log.error("%s%s: no load test run", exc, f" ({why})" if why else "")
        return False
    return True


def _broker(args: argparse.Namespace) -> int:
    from devstack.broker import run_broker

    return run_broker(args.port, args.host, args.advertised_host)


def _sample_mirror(args: argparse.Namespace) -> int:
    from devstack.sample_mirror import running_mirror

    stop = stop_on_signals()
    with running_mirror(args.host, args.port) as url_template:
        log.info("serving the sample clips as a Kinetics mirror: --url-template '%s'", url_template)
        if args.host in ("0.0.0.0", "::"):
            log.info("listening on every interface: from another machine, or a container, use "
                     "this machine's address or name in place of 127.0.0.1")  # fmt: skip
        stop.wait()
    return 0


def _produce(args: argparse.Namespace) -> int:
    from tasks.stream.producer import check_sources, produce_frames
    from tasks.stream.topics import ensure_topics

    kafka = settings_from_args(KafkaSettings, args)
    settings = settings_from_args(ProducerSettings, args)  # bad flags refused before the broker
    check_sources(settings.source, settings.stream_id, settings.streams)
    ensure_topics(kafka, [kafka.frames_topic])
    stop = _stopped_by_signals()  # a closed terminal too: frames queued are still counted
    stats = produce_frames(settings, kafka, stop)
    with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) fails the print: EIO
        print(json.dumps(stats.as_dict()))
    return 1 if stats.failed or stats.broker_error or stats.source_error else 0


def _consume(args: argparse.Namespace) -> int:
    from tasks.stream.consumer import FrameConsumer, format_summary
    from tasks.stream.consumer_summary import nothing_answered
    from tasks.stream.topics import ensure_topics

    kafka = settings_from_args(KafkaSettings, args)
    settings = settings_from_args(ConsumerSettings, args)
    client = settings_from_args(ClientSettings, args)
    prepare_output_file(settings.summary_json, "--summary-json")  # before the run, not after
    ensure_topics(kafka)
    stop = _stopped_by_signals()  # a closed terminal too: calls in flight finished, committed
    consumer = FrameConsumer(kafka, settings, client.target, stop, client.tls_ca)
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        host, metrics_port = settings.metrics_host, settings.metrics_port
        try:
            server, _ = start_http_server(
                metrics_port, addr=host, registry=consumer.metrics.registry
            )
        except OSError as exc:  # the port taken: one line, not a traceback
            raise ValueError(f"cannot serve /metrics on {host}:{metrics_port}: {exc}") from exc
        # The port bound, said: with --metrics-port 0 nothing else tells which one it is.
        log.info("serving /metrics on %s:%d", host, server.server_address[1])
    summary = consumer.run().as_dict()
    written = settings.summary_json is None or write_output_file(  # first: a closed terminal
        settings.summary_json, json.dumps(summary, indent=2) + "\n", "--summary-json"
    )  # fails the print (EIO)
    with contextlib.suppress(OSError):
        print(format_summary(summary))
    if nothing_answered(summary):
        log.error("no frame was answered: is the service at %s up and right?", client.target)
        return 1
    if summary["passed_over"] and not summary["frames_consumed"]:
        log.error(
            "each of the %d frames read was passed over as another run's, none classified: "
            "--producer-session (the session `vidflow produce` logs) or --produced-since-ms?",
            summary["passed_over"],
        )  # fmt: skip
        return 1
    return 1 if summary["broker_error"] or summary["delivery_error"] or not written else 0


def stream_benchmark_settings(args: argparse.Namespace) -> StreamBenchmarkSettings:
    """The stream-benchmark flow's settings: its flags; broker and service from flags, then the
    environment, then the defaults."""
    kafka = settings_from_args(KafkaSettings, args)
    client = settings_from_args(ClientSettings, args)
    given = {
        name: getattr(args, name)
        for name in STREAM_BENCHMARK_FLAGS
        if getattr(args, name) is not None
    }
    try:
        return StreamBenchmarkSettings(**given, kafka=kafka, client=client)
    except ValidationError as exc:
        raise ValueError(one_line(exc, StreamBenchmarkSettings, given)) from None


def _stream_benchmark(args: argparse.Namespace) -> int:
    with imports_without_gc():
        from prefect.exceptions import TerminationSignal

        from devstack.prefect_api import check_configured_api, prefect_api
        from flows.stream_benchmark import (
            StreamRunFailedError,
            check_inputs,
            check_stack,
            stream_benchmark,
        )
        from tasks.stream.consumer import format_summary
        from tasks.stream.prefect_tasks import RUN_STOP

    settings = stream_benchmark_settings(args)
    check_inputs(settings)  # before a Prefect server starts and a group joins
    prepare_output_file(args.summary_json, "--summary-json")  # before the run, not after
    check_stack(settings)  # a broker or service that is not there: one line, no flow run
    check_configured_api()  # a Prefect login refused, likewise
    # Ctrl-C: the run ends its producing now and reports (a sweep: the steps it finished); a
    # closed terminal too (SIGHUP killed it silently, its flow run left Running). SIGTERM is
    # Prefect's during the flow run: the run ends Crashed, and the command exits 143.
    _stopped_by_signals(RUN_STOP)
    failure: StreamRunFailedError | None = None
    try:
        with prefect_api(), foreground_heartbeats():
            outcome = stream_benchmark(settings=settings)
    except StreamRunFailedError as exc:  # the flow run failed; its report is recorded
        failure, outcome = exc, exc.outcome
    except TerminationSignal:
        log.error("terminated (SIGTERM): the flow run is recorded as Crashed, with no report")
        return 128 + signal.SIGTERM
    written = args.summary_json is None or write_output_file(  # first: a closed terminal
        args.summary_json, json.dumps(outcome, indent=2) + "\n", "--summary-json"
    )  # fails the print below (EIO)
    with contextlib.suppress(OSError):
        if RUN_STOP.is_set():
            log.warning("stopped early: the figures cover the run until then")
        print(outcome["verdict"] if settings.capacity else format_summary(outcome["summary"]))
    if failure is not None:
        log.error("%s", failure)
        return 1
    return 0 if written else 1


def _stopped_by_signals(stop: threading.Event | None = None) -> threading.Event:
    """The stream commands' stop (`stop`, else a new one): set by Ctrl-C and SIGTERM
    (`stop_on_signals`, a second Ctrl-C exits), and by a closed terminal (`_on_hang_up`)."""
    stop = stop_on_signals(stop)
    _on_hang_up(functools.partial(set_from_handler, stop))
    return stop


def _on_hang_up(stop: Callable[[], object]) -> None:
    """A closed terminal or a dropped SSH session (SIGHUP) killed the command silently, and its
    flow run stayed Running for good: `stop` ends the run instead. Not where SIGHUP is ignored
    (`nohup`: the run is meant to outlive the terminal)."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: stop())


def _depth(args: argparse.Namespace) -> int:
    from tasks.depth.dataset_settings import check_dataset_settings
    from tasks.depth.output_lock import check_output_free
    from tasks.depth.preflight import check_run_settings
    from tasks.depth.video_sources import load_sources
    from tasks.depth.video_table import VideoTable

    ignore_lance_fork_warning()
    _on_hang_up(lambda: signal.raise_signal(signal.SIGTERM))  # as SIGTERM: the run Crashed
    settings = with_absolute_paths(settings_from_args(DepthSettings, args))
    # Refuse bad input before starting a Prefect server and Ray (the flow checks again).
    if args.urls is not None and args.url_template:  # (a deployment's template only warns)
        raise ValueError("--url-template is for --kinetics-csv only: a --urls list holds URLs")
    sources = load_sources(args.urls, args.kinetics_csv, args.url_template, args.split, args.limit)
    check_run_settings(settings)
    output = settings.output
    check_output_free(output)
    check_dataset_settings(output, settings)
    VideoTable(output).check_layout()
    with _ray_before_prefect(settings, len(sources)) as wait_for_workers:
        with imports_without_gc():
            from devstack.prefect_api import check_configured_api, prefect_api
            from flows.depth_extraction import DepthRunFailedError, depth_extraction
            from flows.ray_runner import ray_task_runner

        check_configured_api()  # a login refused: one line, not a traceback at the first call
        flow = depth_extraction.with_options(task_runner=ray_task_runner(settings.ray_num_cpus))
        wait_for_workers()
        with prefect_api(), foreground_heartbeats():
            state = flow(
                urls=args.urls,
                kinetics_csv=args.kinetics_csv,
                url_template=args.url_template,
                split=args.split,
                limit=args.limit,
                settings=settings,
                show_progress=True,
                return_state=True,
            )
    summary = state.result(raise_on_failure=False)
    run_failed = isinstance(summary, DepthRunFailedError)
    if run_failed:  # no video done, or no Parquet export: reported all the same
        summary = summary.summary
    elif isinstance(summary, BaseException):  # the run itself failed: bad input, a lost cluster
        if isinstance(summary, (*SAID_IN_ONE_LINE, KeyboardInterrupt)):
            raise summary
        # Said in one line with exit 2 like those: a traceback's exit 1 read as "videos failed"
        raise RuntimeError(f"the run failed: {type(summary).__name__}: {summary}") from summary
    print(json.dumps(summary))
    code = 1 if summary["failed"] or run_failed else 0
    quick_exit.finish(code)
    return code


def _ray_before_prefect(
    settings: DepthSettings, videos: int
) -> contextlib.AbstractContextManager[Callable[[], None]]:
    """Ray started, with the first shards' workers warming, before the run imports Prefect,
    where the Prefect API is known or a cluster is joined (flows/ray_start.py); else
    nothing: the flow's task runner starts a private Ray after a temporary Prefect server,
    whose address that Ray's workers take from this process's environment.

    A cluster's workers take no environment from here, and a join it refuses (no token, the
    wrong one) is then refused before a temporary server has started and a flow run was made
    (left Running: Prefect sets no state for a task runner that does not start)."""
    from flows.ray_start import cluster_address, early_ray
    from tasks.depth.settings import shards_in_flight

    if not os.environ.get("PREFECT_API_URL") and cluster_address() is None:
        return contextlib.nullcontext(lambda: None)
    return early_ray(
        settings.ray_num_cpus, lambda cpus: min(videos, shards_in_flight(settings, cpus))
    )


Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidflow", description=__doc__)
    logging_flags = argparse.ArgumentParser(add_help=False)
    logging_flags.add_argument(
        "--log-level", dest="log_level", help="log level (env VIDFLOW_LOG_LEVEL; default INFO)"
    )
    logging_flags.add_argument(
        "--log-file", dest="log_file", help="also log to this file (env VIDFLOW_LOG_FILE)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, parents=[logging_flags]
        )
        sub.set_defaults(handler=handler)
        return sub

    _add_service_commands(command)
    _add_local_dev_commands(command)
    _add_stream_commands(command)
    _add_depth_command(command)
    return parser


def _add_service_commands(command: AddCommand) -> None:
    """The inference service and its clients: serve, export-onnx, classify, health, loadtest."""
    serve = command("serve", _serve, "run the gRPC inference service")
    add_settings_arguments(serve, InferenceSettings)

    export = command("export-onnx", _export_onnx, "export a model to ONNX (cached by weights)")
    add_settings_arguments(export, ModelSource)
    export.add_argument("--output", type=Path, help="also copy the export to this path")

    classify = command("classify", _classify, "classify image files with a running service")
    add_settings_arguments(classify, ClientSettings)
    classify.add_argument(
        "--top-k", type=positive_int, default=1, help="labels to show per image (default 1)"
    )
    classify.add_argument("files", nargs="+", type=Path)

    health = command("health", _health, "exit 0 when the service's gRPC health is SERVING")
    add_settings_arguments(health, ClientSettings)
    health.add_argument(
        "--timeout", type=positive_float, default=3.0, help="seconds to wait (default 3)"
    )

    _add_loadtest_command(command)


def _add_loadtest_command(command: AddCommand) -> None:
    loadtest = command("loadtest", _loadtest, "measure throughput and latency per concurrency")
    add_settings_arguments(loadtest, ClientSettings)
    loadtest.add_argument(
        "--images", type=Path, required=True, help="an image, a folder of images, or a video"
    )
    loadtest.add_argument(
        "--concurrency",
        type=positive_int_list,
        default="1,2,4,8,16",
        help="comma-separated levels (default 1,2,4,8,16)",
    )
    loadtest.add_argument(
        "--duration", type=positive_float, default=10.0, help="seconds per level (default 10)"
    )
    loadtest.add_argument(
        "--warmup",
        type=non_negative_float,
        default=2.0,
        help="uncounted seconds per level (default 2)",
    )
    loadtest.add_argument(
        "--max-frames",
        type=positive_int,
        default=64,
        help="frames taken from a video, from its start (default 64)",
    )
    loadtest.add_argument("--json", type=output_file, help="write the results as JSON here")
    loadtest.add_argument(
        "--wait",
        type=non_negative_float,
        default=30.0,
        help="seconds to wait for the service to be SERVING before the first level (default "
        "30; 0: none)",
    )
    loadtest.add_argument(
        "--streaming",
        action="store_true",
        help="send over ClassifyStream (one stream per concurrent caller) instead of Classify",
    )


def _add_local_dev_commands(command: AddCommand) -> None:
    """Local stand-ins: the Kafka-protocol broker and the Kinetics sample mirror."""
    broker = command("broker", _broker, "run the local Kafka-protocol broker (Tansu)")
    broker.add_argument("--port", type=port, default=9092, help="port (default 9092)")
    broker.add_argument(  # an empty one (a script's unset $HOST) is loopback, as everywhere
        "--host",
        type=bind_address,
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    broker.add_argument(
        "--advertised-host",
        help="name or address clients are told to reconnect to (default: --host; for 0.0.0.0 "
        "this machine's name)",
    )

    mirror = command(
        "sample-mirror",
        _sample_mirror,
        "serve the sample clips under the Kinetics-400 val names (a local Kinetics mirror)",
    )
    mirror.add_argument(
        "--port", type=port_or_zero, default=8765, help="port (default 8765; 0: any free one)"
    )
    mirror.add_argument(  # empty: aiohttp's every interface, behind a 127.0.0.1 template
        "--host", type=bind_address, default="127.0.0.1",
        help="address to listen on (default 127.0.0.1)",
    )  # fmt: skip


def _add_stream_commands(command: AddCommand) -> None:
    """The stream pipeline: produce, consume, and the stream-benchmark flow."""
    produce = command("produce", _produce, "publish JPEG frames of a video file, webcam or RTSP")
    add_settings_arguments(produce, ProducerSettings)
    add_settings_arguments(produce, KafkaSettings)
    produce.add_argument("--topic", dest="frames_topic", help="alias of --frames-topic")

    consume = command("consume", _consume, "classify frames from Kafka through the service")
    add_settings_arguments(consume, ConsumerSettings)
    add_settings_arguments(consume, KafkaSettings)
    add_settings_arguments(consume, ClientSettings)
    consume.add_argument("--topic", dest="frames_topic", help="alias of --frames-topic")

    bench = command(
        "stream-benchmark", _stream_benchmark, "run the stream-benchmark flow (Prefect) once"
    )
    # From the flow's own model, as the others: its UI parameters and these flags cannot drift.
    add_settings_arguments(bench, StreamBenchmarkSettings, only=list(STREAM_BENCHMARK_FLAGS))
    bench.add_argument("--summary-json", type=Path, help="write the figures here as JSON")
    add_settings_arguments(bench, KafkaSettings)
    add_settings_arguments(bench, ClientSettings)
    bench.add_argument("--topic", dest="frames_topic", help="alias of --frames-topic")


def _add_depth_command(command: AddCommand) -> None:
    """The depth-extraction flow."""
    depth = command(
        "depth",
        _depth,
        "run the depth-extraction flow: download, transcode to 360p, depth maps, Lance table "
        "(exit 1 when some videos failed; their rows say why)",
    )
    inputs = depth.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--urls", help="a file of URLs, one per line, or a CSV with a url column")
    inputs.add_argument("--kinetics-csv", help="a Kinetics CSV (label,youtube_id,time_start,...)")
    depth.add_argument(
        "--url-template",
        help="URL of a Kinetics row, e.g. https://HOST/val/{youtube_id}_{time_start:06d}_"
        "{time_end:06d}.mp4 (a mirror of clips); without the time fields (https://HOST/"
        "{youtube_id}.mp4, whole videos) each row's window is cut from its video",
    )
    depth.add_argument(
        "--split", default="val", help="Kinetics split to take (default val; all: every row)"
    )
    depth.add_argument("--limit", type=non_negative_int, help="take only the first N inputs")
    add_settings_arguments(depth, DepthSettings)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: value for name, value in (("level", args.log_level), ("file", args.log_file))
             if value}  # fmt: skip
    try:
        setup_logging(LogSettings(**given))
    except ValidationError as exc:  # an unknown level (one_line would name its field, --level)
        where = "--log-level" if "level" in given else "VIDFLOW_LOG_LEVEL"
        why = exc.errors()[0]["msg"].removeprefix("Value error, ")
        parser.exit(2, f"vidflow: error: {where} {exc.errors()[0]['input']!r}: {why}\n")
    except OSError as exc:  # a log file that cannot be opened
        parser.exit(2, f"vidflow: error: logging: {exc}\n")
    reach_loopback_directly()  # the commands' own servers and Ray: never through a proxy
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except SAID_IN_ONE_LINE as exc:
        # OSError: a path that is not there, a file where a folder should be, no permission.
        log.error("%s", exc)
        return 2
    except ModuleNotFoundError as exc:
        if (needs := missing_extra(exc)) is None:
            raise  # not an optional part: a broken install, with its traceback
        log.error("vidflow %s %s", args.command, needs)
        return 2


def run() -> None:
    """The program's entry point (`vidflow`, `python -m vidflow.cli`): `main`, then an exit
    that skips the interpreter's teardown where a command asks for it (`QuickExit`)."""
    quick_exit.arm()
    sys.exit(main())


if __name__ == "__main__":
    run()
