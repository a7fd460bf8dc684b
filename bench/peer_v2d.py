"""Peer side of the depth benchmark: video2dataset 1.3.0 downloading and resizing the same URLs.

    python -m bench.peer_v2d [--videos 48]

The caller (the depth benchmark) does the alternating rounds and vidflow's side; this module only
runs the peer once per call and measures it. video2dataset runs in a venv of its own
(`ensure_venv`), because its pins (torch 2.1, numpy<2, pyarrow 15) clash with vidflow's. Three
things are done so the comparison is fair and the peer works at all:

- its resize step crashes on every shard in 1.3.0 (issues #263, #311): a runner script sets the
  one missing attribute at run time, without editing the installed package;
- it has no codec option and stock x264 uses preset medium (~2.2x the encode CPU of vidflow's
  veryfast): an `ffmpeg` wrapper first on PATH adds `-preset veryfast -crf 23` to its encodes;
- both tools run the same ffmpeg binary (`tasks.depth.transcode.ffmpeg_exe()`), and the wrapper logs
  each ffmpeg's own CPU time, so the encode share of the peer's CPU can be told apart.

Every output is checked (decodes with OpenCV, has the asked height); a short run is an error.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bench.cli_args import bench_parser
from bench.cpu_account import machine_busy_cpu_s
from common.cli_types import positive_float, positive_int
from common.frames import opened_video

PEER = "video2dataset"
PEER_VERSION = "1.3.0"
PEER_PINS = ("video2dataset==1.3.0", "pyarrow==15.0.2", "pandas==2.2.2")
MARKER = ".vidflow-complete"
X264_FLAGS = ("-preset", "veryfast", "-crf", "23")  # what vidflow's transcode uses
INSTALL_TIMEOUT_S = 3600
LOG_TAIL_CHARS = 3000
LOG_NAME = "video2dataset.log"
FFMPEG_LOG = "ffmpeg-cpu.jsonl"  # the wrapper's log of a run, in its output folder
STOP_GRACE_S = 5.0  # for the peer's process group to end on SIGTERM before SIGKILL


class PeerRunError(RuntimeError):
    """video2dataset did not turn every URL into a valid output."""


def default_root() -> Path:
    """Where the peer's venv lives: under the user's cache (XDG_CACHE_HOME when set)."""
    cache = os.environ.get("XDG_CACHE_HOME") or ""
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "vidflow" / "bench" / f"{PEER}-{PEER_VERSION}"


DEFAULT_ROOT = default_root()

# Checks that a venv holds the pinned peer; `import video2dataset` also proves its deps load.
_VENV_CHECK = f"""
import importlib.metadata as m
import video2dataset
pins = {list(PEER_PINS)!r}
wrong = [p for p in pins if m.version(p.split("==")[0]) != p.split("==")[1]]
raise SystemExit(f"wrong versions: {{wrong}}" if wrong else 0)
"""


def _venv_ready(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", _VENV_CHECK], capture_output=True, timeout=300, check=False
    )
    return check.returncode == 0


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise installs between processes (two pip runs into one venv break it)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_venv(root: Path = DEFAULT_ROOT) -> Path:
    """The peer's venv, made on first use (`python3 -m venv` + pip, ~5.8 GB with torch); returns
    its root. A marker file naming the pins, written after a good install, makes later calls
    free; a venv made by hand without it, or marked for other pins (a bump of `PEER_PINS`: the
    old venv was reused and its figures reported as the new pins'), is accepted only when the
    pinned versions import, and installed again otherwise."""
    python = root / "bin" / "python"
    marker = root / MARKER
    if _marked_for_these_pins(marker) and python.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f".{root.name}.lock"):
        if _marked_for_these_pins(marker) and python.exists():
            return root
        if not _venv_ready(python):
            _install(root)
            if not _venv_ready(python):
                raise RuntimeError(f"{root}: {PEER} {PEER_VERSION} still does not import")
        marker.write_text(" ".join(PEER_PINS) + "\n")
    return root


def _marked_for_these_pins(marker: Path) -> bool:
    return marker.is_file() and marker.read_text().split() == list(PEER_PINS)


def _install(root: Path) -> None:
    log = root.parent / f"{root.name}.install.log"
    base = shutil.which("python3") or sys.executable
    print(
        f"installing {' '.join(PEER_PINS)} into {root} once, for the peer's own pins: ~5.8 GB "
        f"with torch, minutes to download (log {log}; --no-peer measures vidflow alone)",
        file=sys.stderr,
    )
    with log.open("w") as out:
        for command in (
            [base, "-m", "venv", str(root)],
            [str(root / "bin" / "python"), "-m", "pip", "install", *PEER_PINS],
        ):
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S
            )
            if done.returncode != 0:
                shutil.rmtree(root, ignore_errors=True)  # no half-made venv for the next run
                tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
                raise RuntimeError(
                    f"{' '.join(command)} failed ({done.returncode}); without network, run "
                    f"with --no-peer, or make {root} by hand with {' '.join(PEER_PINS)}. "
                    f"The log's end:\n{tail}"
                )


# The ffmpeg wrapper: runs the real binary as its child and appends that child's CPU time (from
# wait4) as one JSON line to a log; adds vidflow's x264 flags to encodes that write a video file.
# Plain stdlib, started with -IS so each of the peer's many ffmpeg calls pays ~10 ms, not ~50.
_WRAPPER = '''#!{python} -IS
"""ffmpeg, as video2dataset sees it on PATH (written by bench.peer_v2d)."""
import json
import os
import signal
import sys
import time

REAL = {real!r}
LOG = {log!r}
FLAGS = {flags!r}
INPUT_FLAGS = {input_flags!r}
CODEC_OPTIONS = ("-c:v", "-vcodec", "-codec:v", "-c", "-codec")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv")


def tuned(args):
    """args with INPUT_FLAGS before the first input and FLAGS before the output file, when
    the call encodes H.264 into a video file."""
    if len(args) < 2 or "-preset" in args or args[-1].startswith("-") or args[-2] == "-i":
        return args, False
    codecs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in CODEC_OPTIONS]
    if any(codec != "libx264" for codec in codecs):
        return args, False
    formats = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-f"]
    if codecs or "mp4" in formats or args[-1].lower().endswith(VIDEO_EXTENSIONS):
        first = args.index("-i") if "-i" in args else 0
        return [*args[:first], *INPUT_FLAGS, *args[first:-1], *FLAGS, args[-1]], True
    return args, False


args, added = tuned(sys.argv[1:])
started = time.time()
pid = os.posix_spawn(REAL, [REAL, *args], os.environ)
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(number, lambda sig, frame: os.kill(pid, sig))
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
line = {{
    "output": args[-1] if args else "", "tuned": added, "rc": code, "start": started,
    "end": time.time(), "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
}}
fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(line) + "\\n").encode())
os.close(fd)
sys.exit(code if code >= 0 else 128 - code)
'''


class ExtraFlags(NamedTuple):
    """Flags the wrapper adds to the peer's encodes: before its first input, and before its
    output with the x264 ones."""

    before_input: tuple[str, ...] = ()
    before_output: tuple[str, ...] = ()


NO_EXTRA_FLAGS = ExtraFlags()
# vidflow's own threading of ffmpeg (tasks/depth/transcode.py), for a peer run at it too:
# video2dataset leaves ffmpeg its defaults (x264 frame threads), which cost it CPU on 2 cores.
# The decoder's threads are an input option, and the peer scales with -filter_complex, whose
# threads are -filter_complex_threads: -threads and -filter_threads before the output alone
# left its decode and scale at their defaults.
SINGLE_THREAD_FLAGS = ExtraFlags(
    before_input=("-filter_complex_threads", "1", "-threads", "1"),
    before_output=("-threads", "1", "-filter_threads", "1"),
)


def write_ffmpeg_wrapper(
    bin_dir: Path, real_ffmpeg: str, cpu_log: Path, extra_flags: ExtraFlags = NO_EXTRA_FLAGS
) -> Path:
    """`bin_dir/ffmpeg`, to put first on the peer's PATH (see `_WRAPPER`); `extra_flags` go
    into the peer's encodes, those before the output with the x264 ones."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "ffmpeg"
    wrapper.write_text(
        _WRAPPER.format(
            python=os.path.realpath(sys.executable),
            real=str(real_ffmpeg),
            log=str(cpu_log),
            flags=[*X264_FLAGS, *extra_flags.before_output],
            input_flags=list(extra_flags.before_input),
        )
    )
    wrapper.chmod(0o755)
    return wrapper


def wrapper_path(output: Path) -> Path:
    """The ffmpeg wrapper of a peer run into `output`: a caller can tell its processes apart."""
    return output / "bin" / "ffmpeg"


def read_ffmpeg_log(cpu_log: Path) -> list[dict[str, Any]]:
    """The wrapper's lines, one per ffmpeg call."""
    if not cpu_log.is_file():
        return []
    return [json.loads(line) for line in cpu_log.read_text().splitlines() if line.strip()]


# Runs video2dataset in the peer venv. The fix for its issues #263/#311: DownloadWorker reads
# `subsamplers["video"][0].encode_formats["video"]`, but ResolutionSubsampler only sets the
# singular `encode_format`, so with a ResolutionSubsampler configured every shard fails with
# AttributeError and nothing is resized. The attribute is set on the class here rather than by
# editing site-packages, so the venv stays a plain pip install. It is set at import of this
# file: the multiprocessing distributor uses the "spawn" start method, whose workers import the
# main script again (as __mp_main__), so they get the fix too. A non-data descriptor, so that an
# instance attribute of a fixed release would still win.
_RUNNER = '''"""video2dataset with the encode_formats fix (written by bench.peer_v2d)."""
import json
import sys

from video2dataset.subsamplers import ResolutionSubsampler


class _EncodeFormats:
    def __get__(self, obj, owner=None):
        return self if obj is None else {"video": obj.encode_format}


if "encode_formats" not in vars(ResolutionSubsampler):
    ResolutionSubsampler.encode_formats = _EncodeFormats()

if __name__ == "__main__":
    from video2dataset.main import video2dataset

    video2dataset(**json.loads(sys.argv[1]))
'''


def peer_config(
    count: int, *, processes: int, threads: int, shards: int, height: int, timeout_s: float = 60
) -> dict[str, Any]:
    """video2dataset's config (the shape of its configs/default.yaml): resize to `height` keeping
    the aspect, `shards` shards so every process has work (it runs one process per shard)."""
    return {
        "subsampling": {
            "ResolutionSubsampler": {
                "args": {"height": height, "resize_mode": "scale", "encode_format": "mp4"}
            }
        },
        "reading": {
            "yt_args": {
                "download_size": height,
                "download_audio_rate": 44100,
                "yt_metadata_args": None,
            },
            "timeout": timeout_s,
            "sampler": None,
        },
        "storage": {
            "number_sample_per_shard": max(1, math.ceil(count / shards)),
            "oom_shard_count": 5,
            "captions_are_subtitles": False,
        },
        "distribution": {
            "processes_count": processes,
            "thread_count": threads,
            "subjob_size": 1000,
            "distributor": "multiprocessing",
        },
    }


def write_inputs(urls: list[str], work: Path, config: dict[str, Any]) -> tuple[Path, Path]:
    """The URL list (csv with a `url` column) and the config YAML, in `work`."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    url_csv = work / "urls.csv"
    with url_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url"])
        writer.writerows([url] for url in urls)
    config_yaml = work / "config.yaml"
    config_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    return url_csv, config_yaml


def check_video(path: Path, height: int) -> str | None:
    """None when the file decodes (one frame) at the asked height, else why not."""
    with opened_video(path) as capture:
        if not capture.isOpened():
            return "does not open"
        ok, frame = capture.read()
    if not ok or frame is None:
        return "no frame decodes"
    if frame.shape[0] != height:
        return f"height {frame.shape[0]}, not {height}"
    return None


def read_stats(dataset: Path) -> dict[str, Any]:
    """video2dataset's per-shard `*_stats.json`, summed; `errors` counts each error message."""
    totals: dict[str, Any] = {"shards": 0, "count": 0, "successes": 0, "errors": {}}
    for path in sorted(dataset.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        totals["shards"] += 1
        for key in ("count", "successes", "failed_to_download", "failed_to_subsample"):
            totals[key] = totals.get(key, 0) + int(stats.get(key, 0))
        for message, times in (stats.get("status_dict") or {}).items():
            if message != "success":
                totals["errors"][message] = totals["errors"].get(message, 0) + times
    return totals


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if path.is_file() else ""


def run_video2dataset(
    urls: list[str],
    output: Path,
    *,
    processes: int = 2,
    threads: int = 4,
    shards: int = 8,
    height: int = 360,
    timeout_s: float = 900,
    root: Path | None = None,
    ffmpeg_flags: ExtraFlags = NO_EXTRA_FLAGS,
) -> dict[str, Any]:
    """Run video2dataset once on `urls` into `output` (a fresh folder), check every output, and
    return its figures. URLs must end in `.mp4` (else video2dataset hands them to yt-dlp).
    `ffmpeg_flags` go into its encodes with the x264 ones (e.g. `SINGLE_THREAD_FLAGS`).

    cpu_s is the whole process tree's user+sys (RUSAGE_CHILDREN around the wait: video2dataset,
    its spawned workers and their ffmpegs, all waited for); so it also counts any other child of
    this process that ends meanwhile. ffmpeg_cpu_s is the ffmpeg calls' own share. `ended_at`:
    when the peer ended, before the output checks, which a caller's phases leave out.
    """
    venv = ensure_venv(root or DEFAULT_ROOT)
    config = peer_config(
        len(urls), processes=processes, threads=threads, shards=shards, height=height
    )
    command, env = _prepare_run(venv, urls, output, config, ffmpeg_flags)
    timed = _run_timed(command, output, env, timeout_s)
    dataset = output / "dataset"
    outputs = sorted(p for p in dataset.rglob("*.mp4") if p.is_file())
    problems = {p.name: why for p in outputs if (why := check_video(p, height)) is not None}
    ok = len(outputs) - len(problems)
    stats = read_stats(dataset)
    result: dict[str, Any] = {
        "tool": PEER,
        "version": PEER_VERSION,
        "videos": len(urls),
        "ok": ok,
        "wall_s": round(timed.wall_s, 3),
        "cpu_s": round(timed.cpu_s, 3),
        "machine_busy_cpu_s": round(timed.machine_busy_cpu_s, 2),
        **_ffmpeg_figures(read_ffmpeg_log(output / FFMPEG_LOG)),
        "videos_per_s": round(ok / timed.wall_s, 4) if timed.wall_s > 0 else 0.0,
        "cpu_s_per_video": round(timed.cpu_s / ok, 3) if ok else None,
        "processes": processes,
        "threads": threads,
        "shards": stats["shards"],
        "height": height,
        "ended_at": timed.ended_at,
    }
    if outputs:
        first = min(p.stat().st_mtime for p in outputs)
        result["first_output_s"] = round(first - timed.started_at, 3)
    if timed.code != 0 or ok < len(urls) or problems:
        raise PeerRunError(
            f"{PEER} exit {timed.code}: {ok} of {len(urls)} outputs valid; "
            f"bad outputs {problems or 'none'}; stats {stats}; figures {result}; "
            f"log tail:\n{_tail(output / LOG_NAME)}"
        )
    return result


def _ffmpeg_figures(calls: list[dict[str, Any]]) -> dict[str, float]:
    """The wrapper's log summed: the ffmpeg calls' own CPU, how many, how many got the flags."""
    return {
        "ffmpeg_cpu_s": round(sum(c["user_s"] + c["sys_s"] for c in calls), 3),
        "ffmpeg_calls": len(calls),
        "ffmpeg_calls_tuned": sum(1 for c in calls if c["tuned"]),
    }


def _prepare_run(
    venv: Path,
    urls: list[str],
    output: Path,
    config: dict[str, Any],
    ffmpeg_flags: ExtraFlags = NO_EXTRA_FLAGS,
) -> tuple[list[str], dict[str, str]]:
    """Write the inputs, the ffmpeg wrapper (with `ffmpeg_flags`) and the runner script; the
    command and its env."""
    from tasks.depth.transcode import ffmpeg_exe

    output.mkdir(parents=True, exist_ok=True)
    dataset, downloads = output / "dataset", output / "tmp"
    downloads.mkdir(exist_ok=True)
    url_csv, config_yaml = write_inputs(urls, output, config)
    wrapper = write_ffmpeg_wrapper(
        wrapper_path(output).parent, ffmpeg_exe(), output / FFMPEG_LOG, ffmpeg_flags
    )
    runner = output / "run_video2dataset.py"
    runner.write_text(_RUNNER)
    arguments = {
        "url_list": str(url_csv),
        "output_folder": str(dataset),
        "output_format": "files",
        "input_format": "csv",
        "encode_formats": {"video": "mp4"},
        "url_col": "url",
        "config": str(config_yaml),
        "tmp_dir": str(downloads),
        "max_shard_retry": 0,  # a failed shard is an error here, not something to time twice
    }
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{wrapper.parent}{os.pathsep}{env.get('PATH', '')}"
    return [str(venv / "bin" / "python"), str(runner), json.dumps(arguments)], env


@dataclass(frozen=True)
class _TimedRun:
    code: int
    started_at: float  # epoch seconds, to compare with output files' mtimes
    wall_s: float
    cpu_s: float  # the process tree's user+sys
    machine_busy_cpu_s: float  # every process's, over the same wall time
    ended_at: float  # epoch seconds, when the peer's process ended


def _run_timed(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> _TimedRun:
    """Run the peer to its end (or kill its process group at the timeout), log in cwd."""
    log = cwd / LOG_NAME
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = machine_busy_cpu_s()
    started_at = time.time()
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout can stop the tree
        )
        try:
            code = process.wait(timeout=timeout_s)
        except BaseException as exc:
            # Ctrl-C, SIGTERM (see exit_on_sigterm), a timeout: its own session would outlive
            # this process, with workers and ffmpegs still using the cores.
            _stop_group(process)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise PeerRunError(
                    f"{PEER} ran past {timeout_s:.0f} s; log tail:\n{_tail(log)}"
                ) from None
            raise
    ended_at = time.time()
    wall_s = time.perf_counter() - started
    busy = machine_busy_cpu_s() - busy_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return _TimedRun(code, started_at, wall_s, cpu_s, busy, ended_at)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the peer's process group (the wrapper passes it on to ffmpeg), then SIGKILL
    whatever is left of it after a short grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)
    # The leader may be gone while its workers are not: the group's id outlives it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in this (main) thread, so `finally` blocks and the peer's
    stop run as on Ctrl-C; Python's default would end the process with none of them."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--videos", type=positive_int, default=48, help="10-s clips")
    parser.add_argument("--processes", type=positive_int, default=2, help="its processes_count")
    parser.add_argument("--threads", type=positive_int, default=4, help="its thread_count")
    parser.add_argument("--shards", type=positive_int, default=8, help="input shards")
    parser.add_argument("--height", type=positive_int, default=360, help="output height")
    parser.add_argument("--timeout", type=positive_float, default=900, help="seconds")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    args = parser.parse_args(argv)

    from common.settings import SAMPLE_VIDEO
    from devstack.video_server import Serve, VideoServer

    exit_on_sigterm()
    ensure_venv()  # outside the timed part: the first call installs (minutes)
    routes = {f"v{i:03d}.mp4": Serve(SAMPLE_VIDEO) for i in range(args.videos)}
    work = Path(tempfile.mkdtemp(prefix="vidflow-peer-v2d-"))
    try:
        with VideoServer(routes) as server:
            result = run_video2dataset(
                [server.url(name) for name in routes],
                work / "run",
                processes=args.processes,
                threads=args.threads,
                shards=args.shards,
                height=args.height,
                timeout_s=args.timeout,
            )
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
