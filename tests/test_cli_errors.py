"""Bad input on the command line: one line saying what is wrong and exit 2, before anything
starts (no Prefect server, no Ray, no broker contact), never a traceback."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from common.net import free_port
from common.settings import SAMPLE_VIDEO, LogSettings
from devstack.broker import start_broker
from tasks.depth.dataset_settings import check_dataset_settings, record_dataset_settings
from tasks.depth.output_lock import check_output_free
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord
from tasks.depth.video_table import VideoTable
from tests.conftest import output_held_by_another_run
from vidflow.cli import main

pytestmark = pytest.mark.usefixtures("restore_root_logging")  # `main` sets up logging
CLOSED_PORT = "127.0.0.1:1"  # nothing listens: a command that reached for it would hang or fail


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must end with exit 2 (returned, or argparse's own exit) and no
    traceback. Returns what it printed on stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before Ray and a Prefect server start: the flow checks the same
    things again, so without this the tests passed with the CLI's checks gone, only slower."""
    import devstack.prefect_api
    from vidflow import cli

    def started(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("Ray or a Prefect server was started before the refusal")

    monkeypatch.setattr(cli, "_ray_before_prefect", started)
    monkeypatch.setattr(devstack.prefect_api, "prefect_api", started)


@pytest.fixture
def one_url(tmp_path: Path) -> Path:
    listing = tmp_path / "one.txt"
    listing.write_text(f"http://{CLOSED_PORT}/v.mp4\n")
    return listing


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_an_input_list_with_nothing_to_do(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert "no videos to process" in _refused(["depth", "--urls", str(empty)], capsys)
    three = tmp_path / "three.txt"
    three.write_text("http://h/a.mp4\nhttp://h/b.mp4\nhttp://h/c.mp4\n")
    assert f"no videos to process in {three} (--limit 0)" in _refused(
        ["depth", "--urls", str(three), "--limit", "0"], capsys
    )
    assert "must be 0 or more" in _refused(["depth", "--urls", str(three), "--limit", "-1"], capsys)


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_a_list_of_which_no_video_can_be_fetched_or_a_template_it_ignores(
    tmp_path: Path, capsys
) -> None:
    """A list of YouTube ids (a template meant to fill them) or of local paths started a
    Prefect server and Ray, failed every row at download and exited 1; the template was
    ignored without a word."""
    ids = tmp_path / "ids.txt"
    ids.write_text("abc123\ndef456\n")
    err = _refused(["depth", "--urls", str(ids)], capsys)
    assert f"{ids}: no video of it can be fetched, e.g. 'abc123': not a URL" in err
    err = _refused(["depth", "--urls", str(ids), "--url-template", "http://h/{id}.mp4"], capsys)
    assert "--url-template is for --kinetics-csv only" in err
    ftp = tmp_path / "ftp.txt"
    ftp.write_text("ftp://h/a.mp4\n")
    assert "unsupported URL scheme 'ftp'" in _refused(["depth", "--urls", str(ftp)], capsys)


def test_a_list_with_some_videos_to_fetch_goes_on_and_the_others_fail_in_their_rows(
    tmp_path: Path,
) -> None:
    from tasks.depth.video_sources import load_sources

    mixed = tmp_path / "mixed.txt"
    mixed.write_text("http://h/b.mp4\nlocal/a.mp4\n")  # (a first line of no URL: a header)
    sources = load_sources(str(mixed), None, None, "val", None)
    assert [record.source_url for record in sources] == ["http://h/b.mp4", "local/a.mp4"]


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_a_csv_without_a_url_column(tmp_path: Path, capsys) -> None:
    listing = tmp_path / "videos.csv"
    listing.write_text("name,link\nclip,http://h/a.mp4\n")
    assert "needs a url column" in _refused(["depth", "--urls", str(listing)], capsys)


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_url_templates_it_cannot_fill(tmp_path: Path, capsys) -> None:
    kinetics = tmp_path / "k.csv"
    kinetics.write_text("label,youtube_id,time_start,time_end,split\nx,abc,1,11,val\n")
    given = ["depth", "--kinetics-csv", str(kinetics), "--url-template"]
    assert "need names" in _refused([*given, "http://h/{}.mp4"], capsys)
    err = _refused([*given, "http://h/{youtube_id:06d}.mp4"], capsys)
    assert f"--url-template on {kinetics}:2" in err


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_a_backend_device_pair_and_a_missing_model_folder_first(
    one_url: Path, tmp_path: Path, capsys
) -> None:
    err = _refused(
        ["depth", "--urls", str(one_url), "--depth-backend", "onnx", "--device", "cuda"], capsys
    )
    assert "runs on the CPU only" in err
    missing = tmp_path / "no-such-model"
    err = _refused(["depth", "--urls", str(one_url), "--depth-model", str(missing)], capsys)
    assert f"depth model folder {missing} does not exist" in err


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_an_output_it_cannot_write_and_an_odd_height(
    one_url: Path, tmp_path: Path, tiny_depth_model: Path, capsys
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    given = ["depth", "--urls", str(one_url), "--depth-model", str(tiny_depth_model)]
    err = _refused([*given, "--output", str(a_file / "out")], capsys)
    assert f"cannot write to the output folder {a_file / 'out'}" in err
    # H.264 needs an even height: every video failed at its transcode, after all downloads.
    assert "multiple of 2" in _refused(["depth", "--urls", str(one_url), "--height", "361"], capsys)


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_an_output_folder_another_run_writes_to(
    one_url: Path, tmp_path: Path, tiny_depth_model: Path, capsys
) -> None:
    """Two runs into one folder each committed rows for the same videos: two rows a video."""
    output = tmp_path / "out"
    given = ["depth", "--urls", str(one_url), "--depth-model", str(tiny_depth_model)]
    with output_held_by_another_run(output) as other:
        err = _refused([*given, "--output", str(output)], capsys)
        assert f"another run (pid {other.pid} on " in err and f"is writing to {output}" in err
        other.kill()  # as SIGKILL ends a run: its lock goes with it
        other.wait()
        check_output_free(output)


@pytest.mark.usefixtures("nothing_starts")
def test_depth_refuses_settings_that_differ_from_the_datasets_in_its_folder(
    one_url: Path, tmp_path: Path, tiny_depth_model: Path, capsys
) -> None:
    """Done videos are skipped: a run with another height or frames added nothing for them."""
    output = tmp_path / "out"
    output.mkdir()
    made = DepthSettings(output=output, depth_model=str(tiny_depth_model))
    record_dataset_settings(output, made)
    other = made.model_copy(update={"x264_preset": "fast"})
    # Nothing made yet (a first run whose every transcode failed): the settings may change,
    # and the record follows them (found in review: an empty folder was tied to a typo).
    check_dataset_settings(output, other)
    record_dataset_settings(output, other)
    check_dataset_settings(output, other)
    record_dataset_settings(output, made)
    (output / "videos").mkdir()
    # A run stopped mid-transcode (to correct a setting) leaves only a hidden partial file:
    # nothing was made, and it tied the folder to the settings being corrected.
    (output / "videos" / ".a.mp4.1f2e.part.mp4").write_bytes(b"half a transcode")
    check_dataset_settings(output, other)
    (output / "videos" / "a.mp4").write_bytes(b"a transcode")  # now something was made with them
    given = ["depth", "--urls", str(one_url), "--depth-model", str(tiny_depth_model)]
    err = _refused([*given, "--output", str(output), "--height", "240", "--frames", "all"], capsys)
    assert f"{output} holds a dataset made with height=360;" in err
    assert "this run asks height=240." in err
    check_dataset_settings(output, made)  # the same settings go on
    with pytest.raises(ValueError, match="x264_preset=veryfast"):
        check_dataset_settings(output, other)
    # Transcodes and no depth map (every depth call failed: a model that would not load):
    # another model or frames spec goes on from them (found in review: a new folder was asked).
    check_dataset_settings(output, made.model_copy(update={"frames": "all", "depth_model": "x"}))
    (output / "depth").mkdir()
    (output / "depth" / "a.npy").write_bytes(b"a depth map")  # now the depth settings bind too
    err = _refused([*given, "--output", str(output), "--height", "240", "--frames", "all"], capsys)
    assert f"{output} holds a dataset made with height=360, frames=first" in err
    assert "this run asks height=240, frames=all" in err
    # Its transcodes deleted to free space (as the README says to re-encode): the maps lie on
    # 360p frames all the same, and a 240p run mixed two sizes of map (found in review, stop 58).
    (output / "videos" / "a.mp4").unlink()
    with pytest.raises(ValueError, match=r"made with height=360; this run asks height=240"):
        check_dataset_settings(output, made.model_copy(update={"height": 240}))
    # Its files all deleted, its table kept: the done rows bind (found in review, stop 62: the
    # run skipped them, and the record took the new settings)
    (output / "depth" / "a.npy").unlink()
    table = VideoTable(output)
    table.create()
    table.upsert([VideoRecord(video_id="a", source_url="https://h/a.mp4", status="ok")])
    with pytest.raises(ValueError, match=r"made with height=360, frames=first; this run asks"):
        check_dataset_settings(output, made.model_copy(update={"height": 480, "frames": "all"}))
    table.upsert([VideoRecord(video_id="a", source_url="https://h/a.mp4", status="failed")])
    check_dataset_settings(output, made.model_copy(update={"height": 480, "frames": "all"}))


def test_stream_commands_refuse_bad_rates_and_counts_before_the_broker(capsys) -> None:
    # Against a broker that is not there: a refusal after contacting it would take 15 s and
    # say "unreachable" instead.
    produce = ["produce", "--bootstrap-servers", CLOSED_PORT, "--source", "clip.mp4"]
    assert "fps must be a number from 0.001" in _refused([*produce, "--fps", "abc"], capsys)
    bench = ["stream-benchmark", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    assert "fps must be a number from 0.001" in _refused([*bench, "--fps", "0"], capsys)
    # A frame every 1e10 s waited past what a thread's wait takes: a traceback after frame 0.
    assert "fps must be a number from 0.001" in _refused([*produce, "--fps", "1e-10"], capsys)
    assert "consumers" in _refused([*bench, "--consumers", "0"], capsys)
    assert "duration" in _refused([*bench, "--duration", "-5"], capsys)
    consume = ["consume", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    assert "--rpc-timeout-s '0': Input should be greater than 0" in _refused(
        [*consume, "--rpc-timeout-s", "0"], capsys
    )
    # Found in review: librdkafka refused these in a traceback, after the topics were made;
    # a backoff of 0 called a down service in a tight loop; a sweep at --fps max failed in
    # its flow run, after the Prefect server started.
    for command, flag, value in (
        (produce, "--max-message-bytes", "500"),
        (consume, "--session-timeout-ms", "0"),
        (consume, "--retry-max-backoff-s", "0"),
        (bench, "--fetch-wait-max-ms", "-1"),
    ):
        err = _refused([*command, flag, value], capsys)
        assert err.count("\n") == 1 and f"{flag} '{value}': Input should be" in err, err
    err = _refused([*bench, "--capacity", "--fps", "max"], capsys)
    assert "--fps max does not apply" in err and err.count("\n") == 1, err
    # Too few results a stream after each step's warm-up to fit its rate: "0 streams" on any
    # machine (found in review, stop 57); a frame of margin: 4 are asked for.
    err = _refused([*bench, "--capacity", "--fps", "2", "--step-seconds", "2"], capsys)
    assert "every step would read 0 streams; give --step-seconds 3 or more" in err, err
    assert err.count("\n") == 1, err


def test_stream_commands_refuse_topics_that_loop_or_that_kafka_would_not_take(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Found in review: `consume --topic frames.dlq` (dead letters worked off once the service
    is mended) wrote each frame that failed again back to the topic it read, for ever; a name
    Kafka refuses ended `produce` in a traceback once the broker was reached (and Tansu took
    it); SASL credentials or a CA under PLAINTEXT were dropped without a word."""
    consume = ["consume", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    err = _refused([*consume, "--topic", "frames.dlq"], capsys)
    assert "--frames-topic and --dlq-topic are both 'frames.dlq'" in err, err
    err = _refused([*consume, "--results-topic", "frames"], capsys)
    assert "--frames-topic and --results-topic are both 'frames'" in err, err
    produce = ["produce", "--bootstrap-servers", CLOSED_PORT, "--source", "clip.mp4"]
    for name in ("cams/front", "x" * 250, ".."):
        err = _refused([*produce, "--topic", name], capsys)
        assert "is no Kafka topic name" in err and err.count("\n") == 1, err
    err = _refused([*produce, "--sasl-username", "me"], capsys)
    assert "--sasl-username given, but --security-protocol PLAINTEXT" in err, err
    # A CA file that is not there failed in librdkafka as the first client was made: a
    # traceback (found in review, stop 56).
    err = _refused([*consume, "--security-protocol", "SSL", "--ssl-ca-location",
                    str(tmp_path / "missing.pem")], capsys)  # fmt: skip
    assert "--ssl-ca-location" in err and "missing.pem" in err and err.count("\n") == 1, err
    # One that is there and is no PEM (a DER file, a key, an empty file): the same traceback
    # (found in review, stop 57); gRPC's handshake failed on it as a call's error.
    (der := tmp_path / "ca.der").write_bytes(b"0\x82\x03\x1d0\x82\x02\x05")
    for command, flag in ((consume, "--ssl-ca-location"), (consume, "--tls-ca")):
        protocol = ["--security-protocol", "SSL"] if flag == "--ssl-ca-location" else []
        err = _refused([*command, *protocol, flag, str(der)], capsys)
        assert f"{flag} '{der}': holds no PEM certificate" in err, err
        assert err.count("\n") == 1, err
    (ca := tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("VIDFLOW_KAFKA_SASL_PASSWORD", "secret")
    err = _refused([*consume, "--security-protocol", "SASL_PLAINTEXT", "--sasl-username", "me",
                    "--ssl-ca-location", str(ca)], capsys)  # fmt: skip
    assert "--ssl-ca-location given, but --security-protocol SASL_PLAINTEXT" in err, err


def test_stream_commands_refuse_bad_sources_and_bounds_before_the_broker(
    tmp_path: Path, capsys
) -> None:
    """Found in review: a missing file was named only after 15 s of "broker unreachable" (or
    after the Prefect server started and the group joined), `webcam:abc` gave int()'s message,
    negative counts and budgets ran (or failed 174 traceback lines into the flow)."""
    clip = str(SAMPLE_VIDEO)
    produce = ["produce", "--bootstrap-servers", CLOSED_PORT]
    missing = str(tmp_path / "missing.mp4")
    assert f"video file not found: {missing}" in _refused([*produce, "--source", missing], capsys)
    assert "webcam:N takes a camera index" in _refused([*produce, "--source", "webcam:abc"], capsys)
    if sys.platform.startswith("linux") and not Path("/dev/video97").exists():
        # It failed after the topic was made ("cannot open video source webcam:97").
        err = _refused([*produce, "--source", "webcam:97"], capsys)
        assert "webcam:97: no camera /dev/video97 on this machine (cameras: " in err, err
    assert "--source (or VIDFLOW_PRODUCER_SOURCE) is required" in _refused(produce, capsys)
    err = _refused([*produce, "--source", clip, "--max-frames", "-1"], capsys)
    assert "--max-frames '-1'" in err
    err = _refused([*produce, "--source", clip, "--stream-id", "a@b"], capsys)  # after 15 s
    assert "'@' parts the stream" in err and "unreachable" not in err, err
    long_id = ["--stream-id", "s" * 250, "--streams", "2"]  # fits alone; not with `-N` added
    err = _refused([*produce, "--source", clip, *long_id], capsys)
    assert "at most 240 with --streams" in err and "unreachable" not in err, err
    bench = ["stream-benchmark", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    assert f"video file not found: {missing}" in _refused([*bench, "--source", missing], capsys)
    page = tmp_path / "page.mp4"  # there, but no video: the run logged two tracebacks for it
    page.write_text("<html>sorry</html>")
    err = _refused([*bench, "--source", str(page)], capsys)
    assert f"{page}: no video frame could be read" in err and err.count("\n") == 1, err
    for flag, value in (("--max-frame-age-ms", "-5"), ("--max-streams", "0"),
                        ("--step-seconds", "0")):  # fmt: skip
        err = _refused([*bench, flag, value], capsys)
        assert err.count("\n") == 1 and f"{flag} " in err and "pydantic" not in err, err
    missing_ca = str(tmp_path / "ca.pem")
    err = _refused([*bench, "--tls-ca", missing_ca], capsys)
    assert f"--tls-ca '{missing_ca}': Path does not point to a file" in err
    consume = ["consume", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    for command in (bench, consume):  # before the run, not after it (consume: 30 s, then lost)
        err = _refused([*command, "--summary-json", "/proc/x/y.json"], capsys)
        assert "--summary-json /proc/x/y.json: its folder cannot be made" in err, err
        assert "unreachable" not in err and err.count("\n") == 1, err
        # A folder there but not writable (found in review, stop 61: the write failed after
        # the run, and its summary was lost with it)
        err = _refused([*command, "--summary-json", "/proc/sys/y.json"], capsys)
        assert "--summary-json /proc/sys/y.json: its folder cannot be written here" in err, err
    assert "--idle-timeout" in _refused([*consume, "--idle-timeout", "0"], capsys)


def test_stream_benchmark_refuses_bad_member_tuning_from_the_environment_before_its_run(
    monkeypatch, capsys
) -> None:
    """The flow's consumers and producer read their tuning from `VIDFLOW_CONSUMER_*` /
    `VIDFLOW_PRODUCER_*`: a bad value failed the flow run in a traceback, after the Prefect
    server had started (found in review, stop 56). Against a broker that is not there: refused
    first, and named by its variable."""
    bench = ["stream-benchmark", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    for variable, value in (
        ("VIDFLOW_CONSUMER_RETRY_MAX_BACKOFF_S", "0"),
        ("VIDFLOW_PRODUCER_JPEG_QUALITY", "500"),
    ):
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            err = _refused(bench, capsys)
        assert err.count("\n") == 1 and f"{variable} '{value}': Input should be" in err, err
        assert "unreachable" not in err, err


def test_a_source_named_by_an_unset_variable_or_several_for_a_sweep_is_refused(
    monkeypatch, capsys
) -> None:
    """`env:NAME` keeps a camera's password out of Prefect: an unset NAME is named at once, and
    a capacity sweep of two sources failed as "video file not found: a.mp4,b.mp4"."""
    monkeypatch.delenv("VIDFLOW_NO_SUCH_CAMERA", raising=False)
    produce = ["produce", "--bootstrap-servers", CLOSED_PORT]
    bench = ["stream-benchmark", "--bootstrap-servers", CLOSED_PORT, "--target", CLOSED_PORT]
    for command in (produce, bench):
        err = _refused([*command, "--source", "env:VIDFLOW_NO_SUCH_CAMERA"], capsys)
        assert "the variable VIDFLOW_NO_SUCH_CAMERA is not set" in err and err.count("\n") == 1
    assert "names no variable" in _refused([*produce, "--source", "env:"], capsys)
    # A mistyped URL was shown as a missing file, password and all.
    monkeypatch.setenv("VIDFLOW_TEST_CAMERA", "rtsp:/admin:s3cret@10.0.0.5/live")
    err = _refused([*produce, "--source", "env:VIDFLOW_TEST_CAMERA"], capsys)
    assert "neither a URL (scheme://...), webcam:N nor a file" in err and "s3cret" not in err
    monkeypatch.setenv("VIDFLOW_TEST_CAMERA", "  ")
    err = _refused([*produce, "--source", "env: VIDFLOW_TEST_CAMERA"], capsys)
    assert "the variable VIDFLOW_TEST_CAMERA is empty" in err, err
    two = f"{SAMPLE_VIDEO},{SAMPLE_VIDEO}"
    err = _refused([*bench, "--capacity", "--source", two], capsys)
    assert "--capacity replays one source" in err and err.count("\n") == 1, err


def test_the_broker_refuses_a_port_in_use_and_port_0(capsys) -> None:
    """It said "broker ready" on a port another process listened on (its readiness check
    reached that listener), then "exited unexpectedly"; port 0 waited 15 s for ":0"."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        err = _refused(["broker", "--port", str(port)], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in err and "broker ready" not in err
    # Its address is advertised as given, so 0 (any free port) is refused by the parser.
    assert "a port from 1 to 65535, not 0" in _refused(["broker", "--port", "0"], capsys)


def test_the_broker_says_why_tansu_would_not_start_at_once_and_takes_ipv6(capsys) -> None:
    """`--host ::1` made `tcp://::1:PORT`, no URL to Tansu, and a Tansu that refused its
    arguments was waited for 15 s, its reason thrown away ("did not accept connections")."""
    started = time.monotonic()
    err = _refused(["broker", "--port", str(free_port()), "--advertised-host", "bad name"], capsys)
    assert "broker exited at start" in err and "InvalidDomainCharacter" in err, err
    assert time.monotonic() - started < 10
    if socket.has_ipv6:
        broker = start_broker(free_port(), host="::1")
        try:
            assert broker.bootstrap_servers.startswith("[::1]:")
            admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
            assert admin.list_topics(timeout=10).brokers  # a Kafka client reaches it
        finally:
            broker.stop()


def test_a_broker_whose_port_another_process_took_meanwhile_fails_instead_of_using_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The port was free when checked and another listener's by the time Tansu bound it (two
    demos started a moment apart): the start took that listener for its broker, and streamed
    into the other one's topics."""
    from devstack import broker as broker_module

    monkeypatch.setattr(broker_module, "_check_port_free", lambda _host, _port: None)  # the race
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(broker_module.BrokerError, match="broker exited at start"):
            start_broker(holder.getsockname()[1], timeout_s=10)
        # With a log file (a benchmark's, in a folder it removes as the error unwinds): the
        # broker's own words in the error, not "see <a file soon gone>" alone.
        log_path = tmp_path / "broker.log"
        with pytest.raises(broker_module.BrokerError) as failed:
            start_broker(holder.getsockname()[1], timeout_s=10, log_path=log_path)
    said = str(failed.value)
    assert said.endswith(f"(see {log_path})") and "in use" in said.lower(), said


def test_consume_refuses_a_metrics_port_that_is_taken(kafka, capsys) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        flags = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.frames_topic]
        err = _refused(["consume", *flags, "--target", CLOSED_PORT, "--metrics-port", str(port)],
                       capsys)  # fmt: skip
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in err


def test_flags_out_of_range_are_refused_by_the_parser(tmp_path: Path, capsys) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(b"not read")
    loadtest = ["loadtest", "--target", CLOSED_PORT, "--images", str(image)]
    assert "must be more than 0, not 0" in _refused([*loadtest, "--duration", "0"], capsys)
    for infinite in ("inf", "1e400"):  # --duration inf never ended
        assert "must be a finite number" in _refused([*loadtest, "--duration", infinite], capsys)
        assert "must be a finite number" in _refused([*loadtest, "--warmup", infinite], capsys)
    # Past a day: gRPC reads a deadline of 1e10 s as long past, and `health` said UNREACHABLE
    # of a server that answers (found in review, stop 61)
    health = ["health", "--target", CLOSED_PORT, "--timeout", "1e10"]
    assert "must be at most 86400 (a day), not 1e10" in _refused(health, capsys)
    assert "not a number: 'x'" in _refused([*loadtest, "--concurrency", "1,x"], capsys)
    assert "must be 1 or more" in _refused([*loadtest, "--concurrency", "0"], capsys)
    assert "comma-separated" in _refused([*loadtest, "--concurrency", "1,,8"], capsys)
    assert "must be 1 or more" in _refused([*loadtest, "--max-frames", "0"], capsys)
    # A report that cannot be written is found out before the run, not after it.
    no_folder = tmp_path / "missing" / "report.json"
    err = _refused([*loadtest, "--json", str(no_folder)], capsys)
    assert f"the folder {no_folder.parent} does not exist" in err
    classify = ["classify", "--target", CLOSED_PORT, str(image)]
    assert "must be 1 or more" in _refused([*classify, "--top-k", "-1"], capsys)
    # A host alone: gRPC dialled port 443, "connection refused" from a server that was up.
    err = _refused(["classify", "--target", "127.0.0.1", str(image)], capsys)
    assert "--target '127.0.0.1' has no port, so gRPC would dial 443: give HOST:PORT" in err, err
    # A folder where a file is due: one line, not an IsADirectoryError traceback.
    assert str(tmp_path) in _refused([*classify, "--tls-ca", str(tmp_path)], capsys)
    assert "a port from 0 (any free one) to 65535" in _refused(
        ["sample-mirror", "--port", "99999"], capsys
    )
    assert "a port from 1 to 65535, not -1" in _refused(["broker", "--port", "-1"], capsys)
    # Settings flags: one line naming the flag and the value, not pydantic's report (its
    # lines with the whole input and a web link), before anything starts.
    for flag, value, reason in [
        ("--port", "70000", "less than or equal to 65535"),  # was bound as 70000 - 65536
        ("--max-batch-size", "0", "greater than or equal to 1"),
        ("--shutdown-grace-s", "-5", "greater than or equal to 0"),
        ("--port", "abc", "a valid integer"),
        # gRPC reads -1 as no limit at all: a 200 MB request reached the decoder
        ("--max-message-bytes", "-1", "greater than or equal to 1024"),
        ("--max-image-pixels", "0", "greater than or equal to 1"),
    ]:
        err = _refused(["serve", flag, value, "--http-port", "1"], capsys)
        assert f"{flag} '{value}': Input should be {reason}" in err
        assert "errors.pydantic.dev" not in err and len(err.strip().splitlines()) == 1, err
    err = _refused(["serve", "--tls-cert", str(image), "--http-port", "1"], capsys)
    assert err.strip().endswith("--tls-cert and --tls-key go together: give both or neither")


def test_a_setting_from_the_environment_is_named_as_such_and_a_secret_never_shown(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value from the environment was reported as a flag the user never gave, and a
    malformed token was printed whole, to the console and any log file."""
    monkeypatch.setenv("VIDFLOW_INFERENCE_BACKEND", "bogus")
    err = _refused(["serve", "--http-port", "1"], capsys)
    assert "VIDFLOW_INFERENCE_BACKEND 'bogus': Input should be" in err and "--backend" not in err
    monkeypatch.delenv("VIDFLOW_INFERENCE_BACKEND")
    secret = "s3cret-part other-part"
    monkeypatch.setenv("VIDFLOW_INFERENCE_AUTH_TOKEN", secret)
    image = tmp_path / "x.jpg"
    image.write_bytes(b"not read")
    for argv in (["serve", "--http-port", "1"], ["classify", "--target", CLOSED_PORT, str(image)]):
        err = _refused(argv, capsys)
        assert "VIDFLOW_INFERENCE_AUTH_TOKEN (value not shown): the token must be" in err, err
        assert "s3cret" not in err and len(err.strip().splitlines()) == 1, err


def test_health_with_no_answer_says_where_it_asked_and_why(capsys) -> None:
    """Found in a README walk: `vidflow health` printed UNREACHABLE alone, with no address or
    cause (a wrong port, a TLS mismatch and a stopped service all read the same)."""
    assert main(["health", "--target", CLOSED_PORT, "--timeout", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "UNREACHABLE"  # what scripts and the image's health check read
    # refused at once: no "within 1 s" for a wait that never was
    assert f"no health answer from {CLOSED_PORT}: UNAVAILABLE:" in err, err
    assert "Connection refused" in err, err
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes the connection, says nothing
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        assert main(["health", "--target", target, "--timeout", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "UNREACHABLE"
    assert f"no health answer from {target}: nothing within 1 s: DEADLINE_EXCEEDED" in err, err


def test_logging_that_cannot_be_set_up_is_one_line(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    health = ["health", "--target", CLOSED_PORT]
    refused = _refused([*health, "--log-level", "bogus"], capsys)
    assert refused.count("\n") == 1 and "--log-level 'bogus': not a log level (one of" in refused
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the log's folder would be
    assert "logging:" in _refused([*health, "--log-file", str(blocked / "x.log")], capsys)
    # An empty variable (compose's `${VIDFLOW_LOG_FILE:-}`) is no file: it was the current
    # folder, and every command failed "Is a directory".
    monkeypatch.setenv("VIDFLOW_LOG_FILE", "")
    monkeypatch.setenv("VIDFLOW_LOG_LEVEL", "warning")
    assert LogSettings().file is None and LogSettings().level == "WARNING"


def test_export_onnx_names_a_weights_file_that_is_not_a_checkpoint(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Variables meant for `vidflow serve` (the serving image's file, TLS) are not the export's:
    # their checks refused it ("--onnx-model names its model itself").
    monkeypatch.setenv("VIDFLOW_INFERENCE_ONNX_MODEL", "/opt/model/m.onnx")
    monkeypatch.setenv("VIDFLOW_INFERENCE_TLS_CERT", str(tmp_path / "server.crt"))
    weights = tmp_path / "bad.pt"
    weights.write_text("not a model")
    export = ["export-onnx", "--weights", str(weights), "--cache-dir", str(tmp_path / "cache")]
    assert f"{weights} is not a PyTorch checkpoint" in _refused(export, capsys)
    # An empty file (a download cut short) raised a bare EOFError, then an IndexError in its
    # place (found in review, stop 62)
    weights.write_text("")
    err = _refused(export, capsys)
    assert f"{weights} is not a PyTorch checkpoint" in err and "the file is empty" in err


def test_an_output_folder_on_a_file_system_without_locks_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lustre mounted without `-o flock` answers flock with ENOLCK: only "held by another
    run" was caught, and the run ended in a traceback. (No such file system here: the
    refusal is made up, the rest is real.)"""
    import errno
    import fcntl

    from tasks.depth.output_lock import OutputBusyError, output_lock

    def no_locks(_fd: object, _operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with (
        pytest.raises(OutputBusyError, match=r"takes no lock \(No locks available\)"),
        output_lock(tmp_path / "out"),
    ):
        pass


@pytest.mark.parametrize(
    ("module", "argv", "extra"),
    [
        ("confluent_kafka", ["produce", "--source", str(SAMPLE_VIDEO), "--bootstrap", CLOSED_PORT],
         "stream"),
        ("torch", ["export-onnx", "--output", "unused.onnx"], "torch"),
        # The default ONNX backend, no export given: the registry's model is made with torch
        ("torch", ["serve", "--port", "0", "--http-port", "0", "--cache-dir", "CACHE"], "torch"),
    ],
)  # fmt: skip
def test_a_command_whose_extra_is_not_installed_names_it_in_one_line(
    module: str, argv: list[str], extra: str, tmp_path: Path
) -> None:
    """The inference image and a core install lack the optional parts: `vidflow produce`
    there was a ModuleNotFoundError traceback. The module is made missing as an uninstalled
    one is: its import fails (None in sys.modules)."""
    import subprocess

    program = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from vidflow.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program,
         *(str(tmp_path / "cache") if arg == "CACHE" else arg for arg in argv)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr
    assert (
        f"needs {module}, which the '{extra}' extra installs: pip install 'vidflow[{extra}]'"
        in (ran.stderr)
    )


@pytest.mark.slow
def test_a_consume_run_whose_summary_file_fails_at_the_end_still_prints_the_summary(
    broker, onnx_server
) -> None:
    """A disk that fills during the run, made real with /dev/full (writable now, ENOSPC at the
    write): the run ends, says the file could not be written, prints its summary all the same
    and exits 1 (it raised: a traceback-free line, exit 2, and no summary; found in review,
    stop 61)."""
    import subprocess

    from tests.conftest import fresh_topics

    kafka = fresh_topics(broker)
    ran = subprocess.run(
        [sys.executable, "-m", "vidflow.cli", "consume", "--bootstrap-servers",
         kafka.bootstrap_servers, "--topic", kafka.frames_topic, "--results-topic",
         kafka.results_topic, "--dlq-topic", kafka.dlq_topic, "--target", onnx_server.target,
         "--idle-timeout", "2", "--duration", "20", "--summary-json", "/dev/full"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert "--summary-json /dev/full could not be written" in ran.stderr, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
    assert ran.stdout.startswith("frames consumed 0, results 0"), ran.stdout


def test_a_summary_file_that_cannot_be_written_at_the_end_leaves_the_summary_shown() -> None:
    """A disk that fills during the run: the write fails after it (it raised, exit 2, and the
    summary was never printed); now an error says so and the caller prints the summary."""
    import logging

    from common.cli_types import write_output_file

    said: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logger, heard = logging.getLogger("vidflow"), Heard()
    logger.addHandler(heard)
    try:
        assert write_output_file(Path("/dev/full"), "{}\n", "--summary-json") is False
    finally:
        logger.removeHandler(heard)
    assert len(said) == 1 and "--summary-json /dev/full could not be written" in said[0]
    assert "No space left on device" in said[0]


def test_the_broker_command_needs_no_psutil() -> None:
    """`vidflow broker` is the stream extra's: it said it needed psutil, which the flows extra
    installs, for two helpers quoting a failed start (found in review, stop 61). Its module
    imports with psutil missing as an uninstalled one is (None in sys.modules)."""
    import subprocess

    program = "import sys; sys.modules['psutil'] = None; import devstack.broker, vidflow.cli"
    ran = subprocess.run(
        [sys.executable, "-c", program], cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
