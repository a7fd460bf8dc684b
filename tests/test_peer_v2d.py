"""The peer benchmark's own parts, without the peer's 5.8 GB venv: the ffmpeg wrapper (flags added
only to H.264 encodes, CPU time logged, exit status kept), the config, the output checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import peer_v2d
from common.settings import SAMPLE_VIDEO
from tasks.depth.transcode import ffmpeg_exe

# Stands in for ffmpeg: prints the arguments it got, exits with $FAKE_RC.
FAKE_FFMPEG = f"""#!{os.path.realpath(sys.executable)} -IS
import json, os, sys
print(json.dumps(sys.argv[1:]))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


@pytest.fixture
def fake_wrapper(tmp_path: Path) -> tuple[Path, Path]:
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(FAKE_FFMPEG)
    fake.chmod(0o755)
    log = tmp_path / "cpu.jsonl"
    return peer_v2d.write_ffmpeg_wrapper(tmp_path / "bin", str(fake), log), log


def _passed_args(wrapper: Path, *args: str, rc: int = 0) -> list[str]:
    done = subprocess.run(
        [str(wrapper), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "FAKE_RC": str(rc)},
        timeout=30,
        check=False,
    )
    assert done.returncode == rc, done.stderr
    return json.loads(done.stdout)


def test_wrapper_adds_x264_flags_before_the_output(fake_wrapper: tuple[Path, Path]) -> None:
    wrapper, log = fake_wrapper
    # The call video2dataset's ResolutionSubsampler makes through ffmpeg-python.
    call = ["-i", "in.mp4", "-filter_complex", "[0]scale=-2:360[s0]", "-map", "[s0]"]
    call += ["-reset_timestamps", "1", "/tmp/x/output.mp4"]
    assert _passed_args(wrapper, *call) == [*call[:-1], *peer_v2d.X264_FLAGS, call[-1]]
    explicit = ["-i", "a.webm", "-c:v", "libx264", "-f", "mp4", "out.part"]
    assert _passed_args(wrapper, *explicit)[-5:] == [*peer_v2d.X264_FLAGS, "out.part"]
    [first, second] = peer_v2d.read_ffmpeg_log(log)
    assert first["tuned"] and second["tuned"] and first["output"] == "/tmp/x/output.mp4"


def test_wrapper_can_run_the_peers_ffmpeg_single_threaded(tmp_path: Path) -> None:
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(FAKE_FFMPEG)
    fake.chmod(0o755)
    wrapper = peer_v2d.write_ffmpeg_wrapper(
        tmp_path / "bin", str(fake), tmp_path / "cpu.jsonl", peer_v2d.SINGLE_THREAD_FLAGS
    )
    # The call video2dataset makes (through ffmpeg-python): its decoder's threads are an input
    # option and its scale a -filter_complex, whose threads are -filter_complex_threads
    call = ["-i", "in.mp4", "-filter_complex", "[0]scale=-2:360[s0]", "-map", "[s0]", "out.mp4"]
    single = peer_v2d.SINGLE_THREAD_FLAGS
    passed = _passed_args(wrapper, *call)
    assert passed == [
        *single.before_input,
        *call[:-1],
        *peer_v2d.X264_FLAGS,
        *single.before_output,
        "out.mp4",
    ]
    assert passed[passed.index("-i") - 2 : passed.index("-i")] == ["-threads", "1"]  # decoder
    assert "-filter_complex_threads" in passed[: passed.index("-i")]
    # vidflow's own calls (already tuned, single-threaded) pass through unchanged
    ours = ["-threads", "1", "-i", "in.mp4", "-preset", "veryfast", "out.mp4"]
    assert _passed_args(wrapper, *ours) == ours


@pytest.mark.parametrize(
    "call",
    [
        ["-version"],
        ["-i", "in.mp4"],
        ["-i", "in.mp4", "-c:v", "copy", "out.mp4"],
        ["-i", "in.mp4", "-vn", "-c:a", "aac", "out.m4a"],
        ["-i", "in.mp4", "-preset", "slow", "out.mp4"],
        ["-i", "in.mp4", "-f", "null", "-"],
    ],
)
def test_wrapper_leaves_other_calls_alone(fake_wrapper: tuple[Path, Path], call: list[str]) -> None:
    wrapper, log = fake_wrapper
    assert _passed_args(wrapper, *call) == call
    assert not peer_v2d.read_ffmpeg_log(log)[0]["tuned"]


def test_wrapper_keeps_the_exit_status(fake_wrapper: tuple[Path, Path]) -> None:
    wrapper, log = fake_wrapper
    _passed_args(wrapper, "-i", "missing.mp4", "out.mp4", rc=3)
    assert peer_v2d.read_ffmpeg_log(log)[0]["rc"] == 3


@pytest.mark.parametrize("single_thread", [False, True])
def test_wrapper_runs_real_ffmpeg_and_logs_its_cpu(tmp_path: Path, single_thread: bool) -> None:
    log = tmp_path / "cpu.jsonl"
    flags = peer_v2d.SINGLE_THREAD_FLAGS if single_thread else peer_v2d.NO_EXTRA_FLAGS
    wrapper = peer_v2d.write_ffmpeg_wrapper(tmp_path / "bin", ffmpeg_exe(), log, flags)
    out = tmp_path / "out.mp4"
    command = [str(wrapper), "-nostdin", "-loglevel", "error", "-i", str(SAMPLE_VIDEO)]
    # the peer's own call's shape: a -filter_complex scale (real ffmpeg takes the flags added)
    command += ["-frames:v", "10", "-filter_complex", "[0]scale=-2:72[s0]", "-map", "[s0]"]
    command += [str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    [line] = peer_v2d.read_ffmpeg_log(log)
    assert line["tuned"] and line["rc"] == 0 and line["output"] == str(out)
    assert line["user_s"] + line["sys_s"] > 0
    assert peer_v2d.check_video(out, 72) is None
    assert peer_v2d.check_video(out, 360) == "height 72, not 360"
    assert peer_v2d.check_video(tmp_path / "cpu.jsonl", 72) is not None


def test_config_has_the_shape_video2dataset_reads(tmp_path: Path) -> None:
    config = peer_v2d.peer_config(48, processes=2, threads=4, shards=8, height=360)
    url_csv, config_yaml = peer_v2d.write_inputs(
        ["http://h/a.mp4", "http://h/b.mp4"], tmp_path, config
    )
    loaded = yaml.safe_load(config_yaml.read_text())
    assert set(loaded) == {"subsampling", "reading", "storage", "distribution"}
    assert loaded["subsampling"] == {
        "ResolutionSubsampler": {
            "args": {"height": 360, "resize_mode": "scale", "encode_format": "mp4"}
        }
    }
    assert loaded["storage"]["number_sample_per_shard"] == 6
    distribution = {"processes_count": 2, "thread_count": 4, "subjob_size": 1000}
    assert loaded["distribution"] == {**distribution, "distributor": "multiprocessing"}
    assert loaded["reading"]["sampler"] is None and loaded["reading"]["timeout"] > 0
    assert url_csv.read_text().splitlines() == ["url", "http://h/a.mp4", "http://h/b.mp4"]
    odd = peer_v2d.peer_config(5, processes=2, threads=4, shards=8, height=360)
    assert odd["storage"]["number_sample_per_shard"] == 1


def test_stats_are_summed_with_their_errors(tmp_path: Path) -> None:
    for shard, (count, ok, errors) in enumerate([(6, 6, {}), (6, 4, {"boom": 2})]):
        stats = {"count": count, "successes": ok, "failed_to_download": 0}
        stats |= {"failed_to_subsample": count - ok, "status_dict": {"success": ok, **errors}}
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    totals = peer_v2d.read_stats(tmp_path)
    assert totals["shards"] == 2 and totals["count"] == 12 and totals["successes"] == 10
    assert totals["failed_to_subsample"] == 2 and totals["errors"] == {"boom": 2}


def test_venv_root_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert peer_v2d.default_root() == tmp_path / "vidflow/bench/video2dataset-1.3.0"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert peer_v2d.default_root() == Path.home() / ".cache/vidflow/bench/video2dataset-1.3.0"


def test_a_marked_venv_is_not_installed_again(tmp_path: Path) -> None:
    root = tmp_path / "peer"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")  # never run: the marker says the venv is complete
    (root / peer_v2d.MARKER).write_text(" ".join(peer_v2d.PEER_PINS) + "\n")
    assert peer_v2d.ensure_venv(root) == root


def test_a_venv_marked_for_other_pins_is_installed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bump of the peer's pins reused the venv marked for the old ones: the benchmark then
    reported the old versions' figures as the new pins'. (The install itself, minutes of
    downloads, is recorded instead of run.)"""
    root = tmp_path / "peer"
    (root / "bin").mkdir(parents=True)
    python = root / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 1\n")  # the pinned versions do not import in it
    python.chmod(0o755)
    (root / peer_v2d.MARKER).write_text("video2dataset==1.2.0 pyarrow==14.0.0 pandas==2.1.0\n")
    installs: list[Path] = []
    monkeypatch.setattr(peer_v2d, "_install", installs.append)
    with pytest.raises(RuntimeError, match="still does not import"):
        peer_v2d.ensure_venv(root)
    assert installs == [root]
