"""A hub id's depth model comes from the Hugging Face cache when the cache holds all of it, asks
the hub only for what is missing, and an unreachable hub is named at once instead of after
huggingface_hub's ~23 s of retries a file.

The loaders run in a child process: huggingface_hub reads HF_HOME and HF_ENDPOINT at import."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devstack.launcher import REPO_ROOT
from tasks.depth.depth_model import check_depth_model
from tasks.depth.model_files import cached_model_dir, model_origin, model_source

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "acme/tiny-depth"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(hf_home: Path, model: Path, files: list[str] | None = None) -> Path:
    """`model`'s files (or the named ones) as the hub cache holds a download of HUB_ID."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for path in model.iterdir():
        if files is None or path.name in files:
            shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub() -> Iterator[tuple[str, list[str]]]:
    """A loopback stand-in for the hub that answers 503 to everything and lists what was asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            asked.append(f"{self.command} {self.path}")
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

    with serving_on_loopback(Handler) as endpoint:
        yield endpoint, asked


@contextlib.contextmanager
def serving_on_loopback(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server of `handler` on 127.0.0.1, quiet, in a thread: its URL."""

    class Quiet(handler):  # type: ignore[misc, valid-type]
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_with_hub(
    code: str, hf_home: Path, endpoint: str, timeout: float = 120, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra_env)
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_a_wholly_cached_hub_model_loads_on_both_backends_without_asking_the_hub(
    tmp_path: Path, tiny_depth_model: Path, hub: tuple[str, list[str]]
) -> None:
    endpoint, asked = hub
    fill_hub_cache(tmp_path / "hf", tiny_depth_model)
    code = f"""
from pathlib import Path
from tasks.depth.depth_torch import DepthEstimator
from tasks.depth.depth_model import check_depth_model
from tasks.depth.depth_onnx import OnnxDepthEstimator
assert check_depth_model({HUB_ID!r}) is True
assert DepthEstimator({HUB_ID!r}, "cpu").untrained
assert OnnxDepthEstimator({HUB_ID!r}, Path({str(tmp_path / "exports")!r})).untrained
print("loaded")
"""
    done = run_with_hub(code, tmp_path / "hf", endpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded" in done.stdout
    assert asked == []  # before: HEAD requests for every file, each retried on a 503
    assert "Retrying" not in done.stderr


def test_a_snapshot_with_only_the_config_is_not_taken_for_the_model(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """The driver's check caches config.json alone; the workers must still fetch the weights
    (before, the ONNX loader took that folder for the model and failed on it)."""
    partial = tmp_path / "partial"
    fill_hub_cache(partial, tiny_depth_model, files=["config.json"])
    assert cached_model_dir(HUB_ID, cache_dir=partial / "hub") is None
    whole = tmp_path / "whole"
    snapshot = fill_hub_cache(whole, tiny_depth_model)
    assert cached_model_dir(HUB_ID, cache_dir=whole / "hub") == snapshot
    assert cached_model_dir("acme/not-cached", cache_dir=whole / "hub") is None


def test_a_partly_cached_model_is_fetched_from_the_hub(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """A cache holding the config alone is not the model: its weights come from the hub, and
    the folder given back holds them (the served bytes)."""
    fill_hub_cache(tmp_path / "hf", tiny_depth_model, files=["config.json"])
    code = f"""
from tasks.depth.model_files import model_dir
print(model_dir({HUB_ID!r}, ["*.json", "*.safetensors"]))
"""
    with serving_hub(tiny_depth_model, bytes_per_s=1e9) as endpoint:
        done = run_with_hub(code, tmp_path / "hf", endpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    weights = (tiny_depth_model / "model.safetensors").read_bytes()
    assert (folder / "model.safetensors").read_bytes() == weights


def test_an_unresolvable_hub_is_named_at_once(tmp_path: Path) -> None:
    code = """
from tasks.depth.depth_model import check_depth_model
try:
    check_depth_model("apple/DepthPro-hf")
except ValueError as exc:
    print(exc)
"""
    # NO_PROXY alone (as Docker and Kubernetes set it) is no proxy: the check still runs.
    done = run_with_hub(
        code, tmp_path / "empty", "http://hub.invalid", timeout=60, NO_PROXY="localhost"
    )
    assert "cannot be reached (hub.invalid" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "hf download apple/DepthPro-hf" in done.stdout
    # ... and how to try the pipeline offline, with a stand-in labelled untrained
    assert "python -m devstack.tiny_depth_pro DIR" in done.stdout
    stand_in = tmp_path / "stand-in"
    made = subprocess.run(
        [sys.executable, "-m", "devstack.tiny_depth_pro", str(stand_in)],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert made.returncode == 0 and f"--depth-model {stand_in}" in made.stdout, made.stderr
    assert check_depth_model(str(stand_in)) is True  # untrained: its outputs say so
    # readable by others: a container's own user loads it from a mounted folder (the weights
    # were saved 0600, and every video of such a run failed at its depth stage)
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in stand_in.iterdir())
    assert "Retrying" not in done.stderr  # before: 5 retries, ~23 s, then a generic message
    # `--help` helps (it saved a model to a folder named "--help"); a used folder is refused
    for argv, code, said in (["--help"], 0, "usage: "), ([str(stand_in)], 2, "not a new or empty"):
        done = subprocess.run([sys.executable, "-m", "devstack.tiny_depth_pro", *argv],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
        assert done.returncode == code and said in done.stdout + done.stderr, done
    assert not (tmp_path / "--help").exists()


def test_a_hub_behind_all_proxy_is_not_called_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a proxy-only host with no DNS, `ALL_PROXY` alone (which huggingface_hub's httpx
    takes) still had the hub refused as unresolvable before the run started."""
    from huggingface_hub import constants

    from tasks.depth.model_files import HubUnreachableError, check_hub_reachable

    for name in list(os.environ):
        if "proxy" in name.lower():
            monkeypatch.delenv(name)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        check_hub_reachable("apple/DepthPro-hf")
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    check_hub_reachable("apple/DepthPro-hf")  # the proxy resolves names, not this machine


def test_huggingface_hub_s_offline_mode_is_named_with_the_cache_it_lacks(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (as a deployment's worker may set it) gave huggingface_hub's generic
    error, which named neither the setting nor the cache; the driver's check and a worker's
    load alike now say both."""
    code = """
from tasks.depth.depth_model import check_depth_model
from tasks.depth.model_files import model_source
for check in (check_depth_model, model_source):
    try:
        check("apple/DepthPro-hf")
    except ValueError as exc:
        print(exc)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    said = done.stdout.splitlines()
    assert len(said) == 2, done.stdout + done.stderr[-2000:]
    for line in said:
        assert "huggingface_hub is offline (HF_HUB_OFFLINE is set)" in line
        assert str(tmp_path / "hf" / "hub") in line and "devstack.tiny_depth_pro DIR" in line


def test_the_run_log_says_whether_the_model_is_cached_or_downloaded(
    tmp_path: Path, tiny_depth_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert model_origin(str(tiny_depth_model)) == ""
    assert "first use downloads" in model_origin(HUB_ID)
    fill_hub_cache(tmp_path / "hf", tiny_depth_model)
    assert "Hugging Face cache" in model_origin(HUB_ID)


def test_a_model_whose_weights_are_not_cached_is_refused_offline_though_its_config_is(
    tmp_path: Path, tiny_depth_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: config.json alone in the cache (a download cut short; this check
    fetches it itself) skipped the check that the hub can be reached: offline, the run went
    through every download and transcode, then every video failed at depth."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fill_hub_cache(tmp_path / "hf", tiny_depth_model, files=["config.json"])
    with pytest.raises(ValueError, match="huggingface_hub is offline"):
        check_depth_model(HUB_ID)
    for path in tiny_depth_model.iterdir():  # the whole model cached: offline is fine
        shutil.copy(path, snapshot / path.name)
    assert check_depth_model(HUB_ID) is True


def test_a_model_in_shards_is_whole_only_with_every_shard(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """A cache holding the index and some of a sharded model's files is not the model."""
    snapshot = fill_hub_cache(tmp_path / "hf", tiny_depth_model)
    weights = snapshot / "model.safetensors"
    weights.rename(snapshot / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    assert cached_model_dir(HUB_ID, cache_dir=tmp_path / "hf" / "hub") is None
    shutil.copy(snapshot / "model-00001-of-00002.safetensors",
                snapshot / "model-00002-of-00002.safetensors")  # fmt: skip
    assert cached_model_dir(HUB_ID, cache_dir=tmp_path / "hf" / "hub") == snapshot
    # The repo's .bin index came too (a download of every *.json), its shards did not: the
    # safetensors shards are still the whole model, whichever index is read first.
    bin_index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}
    for name in ("a.index.json", "pytorch_model.bin.index.json"):
        (snapshot / name).write_text(json.dumps(bin_index))
    assert cached_model_dir(HUB_ID, cache_dir=tmp_path / "hf" / "hub") == snapshot
    # A .bin model in one file beside a safetensors index whose shards are missing is not
    # whole: transformers reads that index first.
    for shard in snapshot.glob("model-0000*.safetensors"):
        shard.rename(snapshot / "pytorch_model.bin")
    assert cached_model_dir(HUB_ID, cache_dir=tmp_path / "hf" / "hub") is None
    # Nor is a .bin model whose own index is whole beside that safetensors index: it was
    # taken whole, and from_pretrained failed on the safetensors shards it reads first.
    shutil.copy(snapshot / "pytorch_model.bin", snapshot / "pytorch_model-00001-of-00002.bin")
    assert cached_model_dir(HUB_ID, cache_dir=tmp_path / "hf" / "hub") is None
    (snapshot / "pytorch_model-00001-of-00002.bin").unlink()
    # A model in one file beside a stray index is.
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "pytorch_model.bin").rename(snapshot / "model.safetensors")
    assert cached_model_dir(HUB_ID, cache_dir=tmp_path / "hf" / "hub") == snapshot


def test_a_missing_folder_is_named_as_a_folder_not_as_a_hub_id(tmp_path: Path) -> None:
    """A path that exists on the driver but not on a Ray node was reported as a hub problem."""
    with pytest.raises(FileNotFoundError, match="does not exist on this machine"):
        model_source(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("folder", [".cache/depth", "models/depth/pro"])
def test_the_driver_s_check_and_the_workers_load_agree_on_what_is_a_folder(
    folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative folder that is missing is refused as a folder by both, before any hub request
    (the check took `.cache/depth` for a hub id, the load `models/depth/pro`)."""
    from tasks.depth.depth_model import check_depth_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub request would fail differently
    with pytest.raises(ValueError, match=f"depth model folder {folder} does not exist"):
        check_depth_model(folder)
    with pytest.raises(FileNotFoundError, match="does not exist on this machine"):
        model_source(folder)


def test_a_model_folder_the_run_s_user_may_not_read_is_refused_up_front(
    tiny_depth_model: Path,
) -> None:
    """A folder whose weights only their owner may read (as safetensors saves them) passed the
    check, and then each video failed at its depth stage with "No such file or directory"."""
    shared = Path(tempfile.mkdtemp(prefix="vidflow-model-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        folder = shared / "model"
        shutil.copytree(tiny_depth_model, folder)
        folder.chmod(0o755)
        (folder / "model.safetensors").chmod(0o600 if os.geteuid() == 0 else 0o000)
        # As root, the check runs as another user (after the imports: the interpreter lives
        # under /root); root itself may read anything.
        drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
        code = f"""
import os
from tasks.depth.depth_model import check_depth_model
{drop}
try:
    check_depth_model({str(folder)!r})
except ValueError as exc:
    print(exc)
"""

        def refusal() -> str:
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
            )
            return done.stdout + done.stderr

        said = refusal()
        assert "may not read model.safetensors" in said and "chmod a+r" in said, said
        # A folder it may not even list: the same kind of answer, not a bare PermissionError.
        folder.chmod(0o700 if os.geteuid() == 0 else 0o000)
        said = refusal()
        assert f"depth model folder {folder}: this user" in said, said
        assert "may not open it; make it readable (chmod a+rx)" in said, said
        folder.chmod(0o755)
    finally:
        shutil.rmtree(shared)


def test_a_model_folder_without_weights_is_refused_up_front(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_depth_model, folder)
    assert check_depth_model(str(folder)) is True
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"does not hold a whole model: it needs config\.json"):
        check_depth_model(str(folder))


@contextlib.contextmanager
def serving_hub(model: Path, bytes_per_s: float) -> Iterator[str]:
    """A loopback stand-in for the hub that serves `model`'s files as HUB_ID at about
    `bytes_per_s`: what huggingface_hub asks for a snapshot (revision, tree, HEAD and GET of
    each file). Its endpoint URL."""
    files = {path.name: path.read_bytes() for path in model.iterdir()}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "GET":
                for start in range(0, len(body), 256 * 1024):  # paced, as a slow link
                    self.wfile.write(body[start : start + 256 * 1024])
                    time.sleep(256 * 1024 / bytes_per_s)

        def _file(self) -> str | None:
            prefix = f"/{HUB_ID}/resolve/{REVISION}/"
            name = self.path.removeprefix(prefix).split("?")[0]
            return name if self.path.startswith(prefix) and name in files else None

        def do_GET(self) -> None:
            api = f"/api/models/{HUB_ID}"
            if self.path.startswith(f"{api}/tree/"):
                tree = [
                    {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in files.items()
                ]
                return self._send(200, json.dumps(tree).encode())
            if self.path.startswith(f"{api}/revision/") or self.path.split("?")[0] == api:
                siblings = [{"rfilename": n, "size": len(b)} for n, b in files.items()]
                info = {"id": HUB_ID, "sha": REVISION, "siblings": siblings}
                return self._send(200, json.dumps(info).encode())
            self.do_HEAD()

        def do_HEAD(self) -> None:
            name = self._file()
            if name is None:
                return self._send(404)
            body = files[name]
            etag = f'"{hashlib.sha256(body).hexdigest()}"'
            self._send(200, body, **{"X-Repo-Commit": REVISION, "ETag": etag})

    with serving_on_loopback(Handler) as endpoint:
        yield endpoint


def test_a_first_download_of_the_model_is_logged_as_it_comes(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """The actors' download of Depth Pro (~1.9 GB) showed nothing on the console or in the UI:
    a first run sat at 0 % for minutes. The driver logs what has reached the cache."""
    model = tmp_path / "model"
    shutil.copytree(tiny_depth_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 24_000_000)  # ~3 s at 8 MB/s
    code = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from tasks.depth.hub_download_log import hub_download_logged
from tasks.depth.model_files import model_dir
with hub_download_logged({HUB_ID!r}, every_s=0.5):
    model_dir({HUB_ID!r}, ["*.json", "*.safetensors"])  # as an actor of this machine does
    with hub_download_logged({HUB_ID!r}, every_s=0.5):  # cached now: nothing to say
        pass
"""
    with serving_hub(model, bytes_per_s=8e6) as endpoint:
        done = run_with_hub(code, tmp_path / "hf", endpoint)
    lines = done.stdout.splitlines()
    progress = [line for line in lines if line.startswith("downloading depth model")]
    assert progress, done.stdout + done.stderr[-2000:]
    assert all(f"{HUB_ID} from the Hugging Face hub: " in line for line in progress)
    assert all(line.endswith("MB/s)") and " of 24.4 MB" in line for line in progress), progress
    [done_line] = [line for line in lines if line.startswith(f"depth model {HUB_ID} downloaded")]
    assert done_line.startswith(f"depth model {HUB_ID} downloaded: 24.4 MB in "), lines
