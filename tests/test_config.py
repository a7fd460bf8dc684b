"""Configuration precedence and logging."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import pytest

from common.logs import setup_logging
from common.settings import LogSettings, settings_from_args
from services.inference.settings import InferenceSettings
from vidflow.cli import build_parser


def test_flags_win_over_environment_which_wins_over_defaults(monkeypatch) -> None:
    monkeypatch.setenv("VIDFLOW_INFERENCE_PORT", "6000")
    monkeypatch.setenv("VIDFLOW_INFERENCE_BACKEND", "eager")
    args = build_parser().parse_args(["serve", "--backend", "torchscript"])
    settings = settings_from_args(InferenceSettings, args)
    assert settings.backend == "torchscript"  # flag
    assert settings.port == 6000  # environment
    assert settings.max_batch_size == 8  # default


def test_an_empty_host_for_the_local_broker_or_mirror_is_loopback_not_every_interface() -> None:
    """`sample-mirror --host "$HOST"` with HOST unset listened on every interface (aiohttp's
    reading of an empty address) under a template that said 127.0.0.1 (found in review, stop
    61); the settings' addresses already read an empty one as loopback."""
    for command in ("broker", "sample-mirror"):
        assert build_parser().parse_args([command, "--host", ""]).host == "127.0.0.1"
        assert build_parser().parse_args([command, "--host", "[::1]"]).host == "::1"
        assert build_parser().parse_args([command, "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_bad_values_are_refused_with_the_setting_named(monkeypatch) -> None:
    monkeypatch.setenv("VIDFLOW_INFERENCE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="max_batch_size"):
        InferenceSettings()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--backend", "tensorflow"])


@pytest.mark.parametrize(
    "flag", ["--max-batch-delay-ms", "--idle-call-timeout-s", "--shutdown-grace-s"]
)
@pytest.mark.parametrize("value", ["inf", "nan", "1e12"])
def test_a_wait_python_cannot_wait_for_is_refused_with_the_setting_named(
    flag: str, value: str
) -> None:
    """`--max-batch-delay-ms inf` was taken, and the first wait for a batch to fill raised
    OverflowError in a model worker: it died, and its calls waited for ever."""
    args = build_parser().parse_args(["serve", flag, value])
    with pytest.raises(ValueError, match=f"^{flag} '{value}': Input should be"):
        settings_from_args(InferenceSettings, args)


def test_boolean_flags(monkeypatch) -> None:
    args = build_parser().parse_args(["serve", "--strict-device"])
    assert settings_from_args(InferenceSettings, args).strict_device is True
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(InferenceSettings, args).strict_device is False  # the default
    monkeypatch.setenv("VIDFLOW_INFERENCE_STRICT_DEVICE", "true")
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(InferenceSettings, args).strict_device is True
    # The flag's "no" form overrides the variable: a False given must not read as not given.
    args = build_parser().parse_args(["serve", "--no-strict-device"])
    assert settings_from_args(InferenceSettings, args).strict_device is False


def test_a_flow_run_takes_each_setting_the_caller_left_out_from_the_environment(
    monkeypatch, tmp_path: Path
) -> None:
    from flows.depth_extraction import depth_extraction, run_settings
    from flows.stream_benchmark import stream_benchmark
    from flows.stream_settings import StreamBenchmarkSettings

    monkeypatch.setenv("VIDFLOW_KAFKA_BOOTSTRAP_SERVERS", "broker.example:9092")
    monkeypatch.setenv("VIDFLOW_KAFKA_FRAMES_TOPIC", "frames-from-env")
    monkeypatch.setenv("VIDFLOW_INFERENCE_TARGET", "service.example:50051")
    # A deployment run's parameters arrive as JSON; the flow validates them like this.
    given = {"settings": {"fps": "max", "kafka": {"frames_topic": "mine"}}}
    settings = stream_benchmark.validate_parameters(given)["settings"]
    assert settings.kafka.bootstrap_servers == "broker.example:9092"  # environment, nested
    assert settings.client.target == "service.example:50051"  # environment, nested, not given
    assert settings.kafka.frames_topic == "mine"  # the caller's, over the environment
    assert (settings.duration, settings.fps) == (30.0, "max")  # the run's own: default, given
    assert settings.concurrency == 8 and settings.kafka.results_topic == "predictions"  # defaults
    # No settings at all: the flow builds them, from the environment too.
    assert stream_benchmark.validate_parameters({})["settings"] is None
    assert StreamBenchmarkSettings().kafka.bootstrap_servers == "broker.example:9092"

    monkeypatch.setenv("VIDFLOW_DEPTH_OUTPUT", str(tmp_path / "from-env"))
    monkeypatch.setenv("VIDFLOW_DEPTH_FRAMES", "all")
    depth = depth_extraction.validate_parameters({"settings": {"frames": "middle"}})["settings"]
    assert (depth.output, depth.frames) == (tmp_path / "from-env", "middle")
    assert run_settings(None).frames == "all"
    monkeypatch.chdir(tmp_path)
    assert run_settings(depth.model_copy(update={"output": Path("out")})).output == tmp_path / "out"
    # A model folder and the export cache given relative reach Ray workers (found in review:
    # only the output was made absolute; a worker elsewhere looked the model up on the hub).
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    relative = depth.model_copy(update={"depth_model": "models/tiny", "cache_dir": Path("c")})
    resolved = run_settings(relative)
    assert resolved.depth_model == str(tmp_path / "models" / "tiny")
    assert resolved.cache_dir == tmp_path / "c"
    hub = run_settings(depth.model_copy(update={"depth_model": "apple/DepthPro-hf"}))
    assert hub.depth_model == "apple/DepthPro-hf"  # a hub id, no such folder here


@pytest.mark.parametrize("deployment", ["local", "compose"])
def test_a_stream_deployment_reaches_the_services_its_worker_is_told_of(
    monkeypatch, deployment: str
) -> None:
    """The compose worker moves the service with VIDFLOW_INFERENCE_PORT; an address pinned in
    prefect.yaml would win over the worker's environment and every call would miss."""
    import yaml

    from flows.stream_benchmark import stream_benchmark

    project = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())
    (parameters,) = [
        d["parameters"]
        for d in project["deployments"]
        if d["name"] == deployment and d["entrypoint"].endswith(":stream_benchmark")
    ]
    monkeypatch.setenv("VIDFLOW_INFERENCE_TARGET", "inference:6000")
    monkeypatch.setenv("VIDFLOW_KAFKA_BOOTSTRAP_SERVERS", "redpanda:9093")
    settings = stream_benchmark.validate_parameters(parameters)["settings"]
    assert settings.client.target == "inference:6000"
    assert settings.kafka.bootstrap_servers == "redpanda:9093"
    assert (settings.fps, settings.duration) == ("native", 30)  # the deployment's own knobs


@pytest.mark.parametrize("deployment", ["local", "compose"])
def test_a_depth_deployment_s_parameters_are_the_flow_s(deployment: str) -> None:
    """Found in review: only the stream deployments were checked against their flow; a
    renamed parameter of depth-extraction broke the compose stack's `deploy` (and with it the
    worker) with every test green. Prefect validates them as a run of the deployment would."""
    import yaml

    from flows.depth_extraction import depth_extraction

    project = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())
    (parameters,) = [
        d["parameters"]
        for d in project["deployments"]
        if d["name"] == deployment and d["entrypoint"].endswith(":depth_extraction")
    ]
    validated = depth_extraction.validate_parameters(parameters)
    assert set(parameters) <= set(validated) and validated["url_template"], validated


def test_stream_benchmark_flags_win_over_the_environment(monkeypatch) -> None:
    from vidflow.cli import stream_benchmark_settings

    monkeypatch.setenv("VIDFLOW_KAFKA_BOOTSTRAP_SERVERS", "broker.example:9092")
    monkeypatch.setenv("VIDFLOW_INFERENCE_TARGET", "service.example:50051")
    args = build_parser().parse_args(
        ["stream-benchmark", "--target", "other:1", "--step-seconds", "5", "--capacity"]
    )
    settings = stream_benchmark_settings(args)
    assert settings.kafka.bootstrap_servers == "broker.example:9092"
    assert settings.client.target == "other:1"
    assert (settings.step_seconds, settings.consumers, settings.capacity) == (5.0, 1, True)
    assert settings.max_streams == 16 and settings.output_dir == Path("runs/stream-benchmark")


def test_the_capacity_chart_goes_where_the_environment_says(monkeypatch, tmp_path: Path) -> None:
    """An image sends the chart to its data volume (its working directory is read-only)."""
    from flows.stream_settings import StreamBenchmarkSettings
    from vidflow.cli import stream_benchmark_settings

    monkeypatch.setenv("VIDFLOW_STREAM_OUTPUT_DIR", str(tmp_path / "charts"))
    assert StreamBenchmarkSettings().output_dir == tmp_path / "charts"
    args = build_parser().parse_args(["stream-benchmark", "--capacity"])
    assert stream_benchmark_settings(args).output_dir == tmp_path / "charts"
    args = build_parser().parse_args(["stream-benchmark", "--capacity", "--output-dir", "mine"])
    assert stream_benchmark_settings(args).output_dir == Path("mine")  # the flag wins


def test_log_lines_carry_iso_timestamps_to_stderr_and_file(
    tmp_path: Path, capsys, restore_root_logging
) -> None:
    log_file = tmp_path / "logs" / "vidflow.log"
    setup_logging(LogSettings(level="INFO", file=log_file))
    logging.getLogger("vidflow.test").info("hello %s", "world")
    iso = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 INFO vidflow\.test: hello world$"
    assert re.match(iso, log_file.read_text().strip())
    assert re.search(iso, capsys.readouterr().err.strip(), re.M)


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in subcommands._choices_actions}
    assert set(helps) == set(subcommands.choices)
    assert {"serve", "consume", "produce", "stream-benchmark", "depth", "broker"} <= set(helps)
    assert all(helps.values()), helps  # each with its one line in `vidflow --help`


def test_a_camera_password_is_not_shown_in_the_stream_reports() -> None:
    from flows.stream_settings import StreamBenchmarkSettings

    settings = StreamBenchmarkSettings(source="rtsp://admin:s3cret@10.0.0.5/live?token=t,clip.mp4")
    assert settings.shown_source == "rtsp://10.0.0.5/live?…,clip.mp4"


def test_kafka_tls_and_sasl_settings_reach_the_clients_and_the_password_stays_hidden(
    monkeypatch, kafka
) -> None:
    """A managed cluster wants TLS and SASL: the settings reach librdkafka (a SASL client of
    this plaintext broker is refused where the same call without them succeeds), the password
    comes from the environment only and is never shown."""
    from tasks.stream.settings import KafkaSettings
    from tasks.stream.topics import BrokerUnreachableError, ensure_topics

    monkeypatch.setenv("VIDFLOW_KAFKA_SASL_PASSWORD", "pa55-word")
    args = build_parser().parse_args(
        ["consume", "--bootstrap-servers", kafka.bootstrap_servers,
         "--security-protocol", "SASL_PLAINTEXT", "--sasl-username", "alice"]
    )  # fmt: skip
    secured = settings_from_args(KafkaSettings, args)
    config = secured.client_config()
    assert config["security.protocol"] == "SASL_PLAINTEXT" and config["sasl.username"] == "alice"
    assert config["sasl.password"] == "pa55-word" and config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert "pa55-word" not in repr(secured) and "pa55-word" not in secured.model_dump_json()
    with pytest.raises(SystemExit):  # no flag for it: a command line is visible in `ps`
        build_parser().parse_args(["consume", "--sasl-password", "x"])
    with pytest.raises(BrokerUnreachableError):
        ensure_topics(secured, ["t"], 3.0)
    topic = f"{kafka.frames_topic}-plain"
    assert ensure_topics(kafka, [topic]) == [topic]
    # The producer's and the consumers' clients take them too (only the admin path was shown).
    from confluent_kafka import Consumer, KafkaException

    from tasks.stream.kafka_io import consumer_config, make_producer

    producer = make_producer(secured)
    producer.produce(topic, b"frame")
    assert producer.flush(3.0) == 1  # not delivered: the plaintext broker refuses the client
    member = Consumer(consumer_config(secured, "g"))
    try:
        with pytest.raises(KafkaException):
            member.list_topics(topic, timeout=3.0)
    finally:
        member.close()
    plain = make_producer(kafka)
    plain.produce(topic, b"frame")
    assert plain.flush(10.0) == 0  # the same call without them is delivered
    monkeypatch.delenv("VIDFLOW_KAFKA_SASL_PASSWORD")
    with pytest.raises(ValueError, match="VIDFLOW_KAFKA_SASL_PASSWORD"):
        settings_from_args(KafkaSettings, args)
    assert KafkaSettings(bootstrap_servers="h:1").client_config() == {"bootstrap.servers": "h:1"}


def test_deleting_a_topic_the_broker_never_made_leaves_nothing(kafka) -> None:
    """A capacity step that failed making its topics listed them as left on the broker (and
    warned three times) when the sweep deleted what it had made (found in review, stop 58)."""
    from tasks.stream.topics import delete_topics, ensure_topics

    made = f"{kafka.frames_topic}-made"
    assert ensure_topics(kafka, [made]) == [made]
    assert delete_topics(kafka, [made, f"{kafka.frames_topic}-never-made"]) == []


def test_topics_are_made_with_the_replication_factor_asked(kafka) -> None:
    """On a cluster a topic with one replica loses its frames with its broker: every topic was
    made with replication factor 1 whatever the cluster. The broker reports the replicas."""
    from confluent_kafka.admin import AdminClient
    from pydantic import ValidationError

    from tasks.stream.settings import KafkaSettings
    from tasks.stream.topics import ensure_topics

    args = build_parser().parse_args(
        ["produce", "--bootstrap-servers", kafka.bootstrap_servers, "--replication-factor", "3"]
    )
    replicated = settings_from_args(KafkaSettings, args)
    topic = f"{kafka.frames_topic}-replicated"
    assert ensure_topics(replicated, [topic]) == [topic]
    metadata = AdminClient({"bootstrap.servers": kafka.bootstrap_servers}).list_topics(timeout=10)
    partitions = metadata.topics[topic].partitions.values()
    assert [len(p.replicas) for p in partitions] == [3] * replicated.partitions
    with pytest.raises(ValidationError, match="at least 1 replica"):
        KafkaSettings(replication_factor=0)


def test_a_topic_that_exists_with_fewer_partitions_than_asked_is_said(
    kafka, caplog: pytest.LogCaptureFixture
) -> None:
    """`--partitions 8` for a frames topic made earlier with 2 was silently ignored: eight
    consumers, one of them with all the work."""
    from tasks.stream.topics import ensure_topics

    wider = kafka.model_copy(update={"partitions": 8})
    assert ensure_topics(wider) == []  # the fixture made them with 2
    said = [r.getMessage() for r in caplog.records if "fewer than the 8 asked" in r.getMessage()]
    assert len(said) == 3 and f"topic {kafka.frames_topic} exists with 2 partition(s)" in said[0]
    caplog.clear()
    assert ensure_topics(kafka) == [] and "fewer than" not in caplog.text


def test_every_stream_command_takes_topic_for_the_frames_topic() -> None:
    """`stream-benchmark` lacked the `--topic` of `produce` and `consume` (a README walk)."""
    from tasks.stream.settings import KafkaSettings

    for command in ("produce", "consume", "stream-benchmark"):
        args = build_parser().parse_args([command, "--topic", "cams"])
        assert settings_from_args(KafkaSettings, args).frames_topic == "cams", command


@pytest.mark.parametrize(
    ("target", "lacks_port"),
    [
        ("127.0.0.1", True), ("service", True), ("::1", True), ("[::1]", True), ("host:", True),
        ("dns:///service", True), ("dns://8.8.8.8/service", True), ("ipv4:10.0.0.1", True),
        ("127.0.0.1:50051", False), ("[::1]:50051", False), ("service:50051", False),
        ("dns:///service:1", False), ("dns://8.8.8.8/service:5", False),
        ("ipv4:127.0.0.1:50051", False), ("ipv6:[::1]:50051", False),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", False), ("unix:///tmp/s.sock", False),
        ("unix:/tmp/s", False), ("xds:///service", False), ("google-c2p:///service", False),
    ],
)  # fmt: skip
def test_a_target_without_a_port_is_told_from_every_form_gRPC_takes(
    target: str, lacks_port: bool, tmp_path: Path
) -> None:
    """`--target 127.0.0.1` dialled port 443: "connection refused" from a server that was up."""
    from services.inference.settings import ClientSettings, target_lacks_port

    assert target_lacks_port(target) is lacks_port
    if lacks_port:
        with pytest.raises(ValueError, match="has no port, so gRPC would dial 443"):
            ClientSettings(target=target)
        # Over TLS a host alone may mean 443 (a service behind an ingress): taken as given.
        (ca := tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
        assert ClientSettings(target=target, tls_ca=ca).target == target
    else:
        assert ClientSettings(target=target).target == target


def test_help_shows_each_flag_s_default_unless_its_text_says_it() -> None:
    """A description that only mentions the word ("the broker's default.replication.factor",
    "by default deleted") hid the flag's default from --help."""
    from vidflow.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    produce = " ".join(commands["produce"].format_help().split())
    assert "(env VIDFLOW_KAFKA_REPLICATION_FACTOR; default 1)" in produce
    sweep = " ".join(commands["stream-benchmark"].format_help().split())
    assert "a dead-letter topic with letters stays) (default False)" in sweep
    consume = " ".join(commands["consume"].format_help().split())
    assert "(default: off) (env VIDFLOW_CONSUMER_MAX_FRAME_AGE_MS)" in consume  # said once


def test_loopback_is_added_to_both_proxy_exceptions_keeping_the_user_s(monkeypatch) -> None:
    """Found in review: each variable was extended on its own, so a shell with NO_PROXY alone
    got a no_proxy of loopback alone, which wins in urllib and httpx: its own exceptions (an
    in-house Prefect server, a hub mirror) then went to the proxy."""
    import urllib.request

    from common.net import reach_loopback_directly

    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("NO_PROXY", "prefect-server,.corp.example")
    reach_loopback_directly()
    assert os.environ["no_proxy"] == os.environ["NO_PROXY"]
    for host in ("prefect-server", "hub.corp.example", "127.0.0.1", "localhost"):
        assert urllib.request.proxy_bypass_environment(host), host
    assert not urllib.request.proxy_bypass_environment("huggingface.co")


@pytest.mark.parametrize("value", ["inf", "1e10"])
@pytest.mark.parametrize(
    "argv",
    [["consume", "--rpc-timeout-s"], ["consume", "--broker-grace-s"],
     ["stream-benchmark", "--duration"],
     ["stream-benchmark", "--capacity", "--step-seconds"],
     ["stream-benchmark", "--service-wait-s"]],
    ids=lambda argv: " ".join(argv),
)  # fmt: skip
def test_a_stream_wait_python_or_grpc_cannot_wait_for_is_refused_with_the_flag_named(
    argv: list[str], value: str
) -> None:
    """`consume --rpc-timeout-s inf` was taken: gRPC read the deadline as long past, every call
    failed at once and each frame went to the dead-letter topic after its tries.
    `stream-benchmark --duration inf` overflowed a thread's wait: its group never read as
    joined, and the producer waited a minute before its first frame."""
    from tasks.stream.settings import ConsumerSettings, KafkaSettings
    from vidflow.cli import stream_benchmark_settings

    args = build_parser().parse_args([*argv, value])
    with pytest.raises(ValueError, match=f"{argv[-1]} '{value}'"):
        if argv[-1] == "--broker-grace-s":  # found in review, stop 62: 1e10 was taken
            settings_from_args(KafkaSettings, args)
        elif argv[0] == "consume":
            settings_from_args(ConsumerSettings, args)
        else:
            stream_benchmark_settings(args)


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_is_not_taken(xdg: str, tmp_path: Path) -> None:
    """`XDG_CACHE_HOME=` (set, empty) put the model cache in ./vidflow of whatever folder a
    command ran from (the package's own folder, in a deployment); the XDG spec says a
    relative value is to be ignored."""
    import subprocess
    import sys

    shown = subprocess.run(
        [sys.executable, "-c", "from common.settings import DEFAULT_CACHE_DIR as d; print(d)"],
        env={**os.environ, "XDG_CACHE_HOME": xdg, "HOME": str(tmp_path)},
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert shown == str(tmp_path / ".cache" / "vidflow")


def test_help_shows_a_default_path_that_holds_a_percent_sign(tmp_path: Path) -> None:
    """argparse formats help with `%`: a checkout or cache under `vidflow%20copy` made
    `--help` a traceback."""
    import subprocess
    import sys

    cache_home = tmp_path / "vidflow%20copy"  # the help wraps a long path at its hyphens
    shown = subprocess.run(
        [sys.executable, "-m", "vidflow.cli", "serve", "--help"],
        env={**os.environ, "XDG_CACHE_HOME": str(cache_home)},
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"{cache_home}/vidflow/models" in "".join(shown.stdout.split())  # wrapped: no space
