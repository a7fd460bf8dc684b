"""Packaging checks: Dockerfile lint, compose file validity and what the image promises.

No Docker engine is needed: hadolint and docker-compose (both from the dev extra, in the
venv's bin directory) only read the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> Path:
    path = VENV_BIN / name
    assert path.exists(), f"{path} is missing: install the dev extra (make setup)"
    return path


def _run(args: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


# The two secrets docker-compose.yml requires from .env; test values, never defaults in the file.
COMPOSE_SECRETS = {
    "VIDFLOW_PREFECT_AUTH": "admin:test-secret",
    "VIDFLOW_POSTGRES_PASSWORD": "pg0123",
}


def _compose_env(**overrides: str) -> dict[str, str]:
    """The environment without VIDFLOW_* overrides (so the file's defaults apply) plus secrets."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VIDFLOW_", "COMPOSE_"))}
    return {**clean, **COMPOSE_SECRETS, **overrides}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def _stages() -> tuple[list[tuple[str, str]], list[Stage]]:
    """Instructions before the first FROM, and the stages in order."""
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert match, f"unparsed FROM {args}"
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            preamble.append((keyword, args))
    return preamble, stages


def _runtime_stage() -> Stage:
    _, stages = _stages()
    assert stages[-1].name == "runtime", "runtime must be the last (default) stage"
    return stages[-1]


def test_hadolint_passes() -> None:
    result = _run([_tool("hadolint"), "--failure-threshold", "warning", DOCKERFILE.name])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}\n{result.stderr}"


def test_compose_inference_service() -> None:
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["inference"]
    assert service["build"]["target"] == "runtime"
    test = service["healthcheck"]["test"]
    assert "services.inference.ready_probe" in (test if isinstance(test, str) else " ".join(test))
    assert any("50051" in str(port) for port in service["ports"]), service["ports"]
    assert any("8000" in str(port) for port in service["ports"]), service["ports"]
    assert service.get("restart") in {"always", "unless-stopped", "on-failure"}
    assert any(str(volume).startswith("model-cache:") for volume in service["volumes"])


def test_compose_resolved_ports_and_environment() -> None:
    service = _compose_config()["services"]["inference"]
    published = {(str(p["published"]), p["target"]) for p in service["ports"]}
    assert {("50051", 50051), ("8000", 8000)} <= published
    env = service["environment"]
    assert env["VIDFLOW_INFERENCE_HOST"] == "0.0.0.0"
    assert env["VIDFLOW_INFERENCE_BACKEND"] == "onnx"
    assert env["VIDFLOW_INFERENCE_ONNX_MODEL"] == "/opt/model/efficientnet_lite0.onnx"


def test_compose_ignores_a_shells_settings_meant_for_local_runs() -> None:
    """README tells users to export these for `make demo` / `vidflow serve`: a host path or the
    eager backend (no torch in the image) in a container would keep the stack from starting."""
    local = {
        "VIDFLOW_INFERENCE_BACKEND": "eager",
        "VIDFLOW_INFERENCE_ONNX_MODEL": "/home/me/model.onnx",
        "VIDFLOW_DEPTH_DEPTH_MODEL": "/home/me/DepthPro-hf",
    }
    services = _compose_config(env=_compose_env(**local))["services"]
    assert services["inference"]["environment"]["VIDFLOW_INFERENCE_BACKEND"] == "onnx"
    assert services["inference"]["environment"]["VIDFLOW_INFERENCE_ONNX_MODEL"] == (
        "/opt/model/efficientnet_lite0.onnx"
    )
    assert services["worker"]["environment"]["VIDFLOW_DEPTH_DEPTH_MODEL"] == "apple/DepthPro-hf"
    # The compose stack's own names for them.
    own = {"VIDFLOW_COMPOSE_DEPTH_MODEL": "/data/DepthPro-hf", "VIDFLOW_COMPOSE_ONNX_MODEL": "/m"}
    services = _compose_config(env=_compose_env(**local, **own))["services"]
    assert services["worker"]["environment"]["VIDFLOW_DEPTH_DEPTH_MODEL"] == "/data/DepthPro-hf"
    assert services["inference"]["environment"]["VIDFLOW_INFERENCE_ONNX_MODEL"] == "/m"


@pytest.mark.parametrize("hostname", [None, "gpu-box.lan"])
def test_compose_tells_browsers_and_kafka_clients_the_public_hostname(hostname: str | None) -> None:
    """Opened to the network (VIDFLOW_PUBLISH_HOST=0.0.0.0), a remote browser's UI and a remote
    Kafka client must be sent to this machine, not to their own localhost."""
    extra = {"VIDFLOW_PUBLIC_HOSTNAME": hostname} if hostname else {}
    services = _compose_config(env=_compose_env(**extra))["services"]
    name = hostname or "localhost"
    ui_api = services["prefect-server"]["environment"]["PREFECT_UI_API_URL"]
    assert ui_api == f"http://{name}:4200/api"
    advertised = [a for a in services["broker"]["command"] if a.startswith("--advertise-kafka")]
    assert advertised == [
        f"--advertise-kafka-addr=internal://redpanda:9092,external://{name}:19092"
    ]


def test_dockerfile_structure() -> None:
    text = DOCKERFILE.read_text()
    assert text.splitlines()[0] == "# syntax=docker/dockerfile:1"
    preamble, stages = _stages()
    assert any(args.startswith("BASE_IMAGE=") for kw, args in preamble if kw == "ARG")
    # runtime last: `docker build .` with no target gives the inference service.
    assert [s.name for s in stages] == ["base", "builder", "worker", "runtime"]
    assert stages[0].base == "${BASE_IMAGE}"
    assert all(stage.base == "base" for stage in stages[1:])
    builder = stages[1]
    assert any("export-onnx" in args for args in builder.args_of("RUN"))
    assert any("[torch]" in args for args in builder.args_of("RUN"))


def test_dockerfile_runtime_stage() -> None:
    runtime = _runtime_stage()
    healthchecks = runtime.args_of("HEALTHCHECK")
    assert len(healthchecks) == 1 and "services.inference.ready_probe" in healthchecks[0]
    users = runtime.args_of("USER")
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"root", "0"}
    exposed = {port for args in runtime.args_of("EXPOSE") for port in args.split()}
    assert {"50051", "8000"} <= exposed
    assert runtime.args_of("ENTRYPOINT") == ['["vidflow"]']
    assert runtime.args_of("CMD") == ['["serve"]']
    env = " ".join(runtime.args_of("ENV"))
    for setting in (
        "VIDFLOW_INFERENCE_HOST=0.0.0.0",
        "VIDFLOW_INFERENCE_BACKEND=onnx",
        "VIDFLOW_INFERENCE_ONNX_MODEL=/opt/model/efficientnet_lite0.onnx",
    ):
        assert setting in env
    labels = " ".join(runtime.args_of("LABEL"))
    for key in ("title", "description", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.mark.parametrize("extra", ["torch", "all"])
def test_dockerfile_runtime_stage_has_no_torch(extra: str) -> None:
    runtime = _runtime_stage()
    extras = re.compile(r"\[[^\]]*\b" + extra + r"\b[^\]]*\]")
    for args in runtime.args_of("RUN"):
        for command in re.split(r"&&|;|\|\|", args):
            if "pip install" in command:
                assert not extras.search(command), f"runtime installs [{extra}]: {command}"
                assert not re.search(r"\btorch(vision)?\b", command), command
    for args in runtime.args_of("COPY"):
        assert "/opt/venv" not in args, f"runtime must not copy the builder's venv: {args}"
    # It installs the project's core dependencies (pyproject.toml as /tmp/deps): torch added
    # there reached the image whatever its RUN lines say.
    core = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    heavy = [d for d in core if re.match(r"(torch|torchvision|transformers)\b", d)]
    assert heavy == [], f"core dependencies the runtime installs: {heavy}"


STACK_SERVICES = {"broker", "inference", "prefect-server", "deploy", "worker"}


def _compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict:
    """The resolved compose configuration (`config -q` must pass first)."""
    env = env or _compose_env()
    # --env-file: a developer's own .env must not change what the test sees.
    args: list[str | Path] = [
        _tool("docker-compose"), "-f", COMPOSE_FILE.name, "--env-file", os.devnull,
    ]  # fmt: skip
    for profile in profiles:
        args += ["--profile", profile]
    checked = _run([*args, "config", "-q"], env=env)
    assert checked.returncode == 0, f"docker-compose config:\n{checked.stdout}\n{checked.stderr}"
    resolved = _run([*args, "config", "--format", "json"], env=env)
    return json.loads(resolved.stdout)


def test_compose_config_is_valid_and_wired() -> None:
    services = _compose_config()["services"]
    assert set(services) >= STACK_SERVICES
    assert "prometheus" not in services  # only with --profile monitoring

    # Everything the worker talks to is up (or, for deploy, done) before it starts.
    worker_needs = services["worker"]["depends_on"]
    assert worker_needs["deploy"]["condition"] == "service_completed_successfully"
    for name in ("broker", "inference", "prefect-server"):
        assert worker_needs[name]["condition"] == "service_healthy", name
    assert services["deploy"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            assert how["condition"] in {"service_healthy", "service_completed_successfully"}
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits on {needed}'s health"

    # The two images come from the Dockerfile's two targets.
    assert services["inference"]["build"]["target"] == "runtime"
    for name in ("deploy", "worker"):
        assert services[name]["build"]["target"] == "worker"
        assert services[name]["image"] == services["worker"]["image"]

    # The flows reach the services by their compose names; the code is the image's checkout.
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["VIDFLOW_PROJECT_DIR"] == "/opt/vidflow"
    assert env["VIDFLOW_KAFKA_BOOTSTRAP_SERVERS"] == "redpanda:9092"
    assert env["VIDFLOW_INFERENCE_TARGET"] == "inference:50051"
    # Files the flows write go to the data volume, never the image's read-only checkout.
    assert env["VIDFLOW_DEPTH_OUTPUT"].startswith("/data/")
    assert env["VIDFLOW_STREAM_OUTPUT_DIR"].startswith("/data/")
    assert "redpanda" in services["broker"]["networks"]["default"]["aliases"]
    assert any(
        v["target"] == "/data" and v["type"] == "volume" for v in services["worker"]["volumes"]
    )
    deploy_script = " ".join(services["deploy"]["command"])
    assert "for name in depth-extraction/compose stream-benchmark/compose;" in deploy_script
    assert "--type process" in deploy_script
    # The deployments go to the pool the worker polls, whatever VIDFLOW_WORK_POOL names (one
    # deploy each: with several names at once `prefect deploy` ignores --pool).
    assert 'prefect --no-prompt deploy --pool "$$VIDFLOW_WORK_POOL" -n "$$name"' in deploy_script
    assert services["deploy"]["environment"]["VIDFLOW_WORK_POOL"] == "vidflow-compose"
    assert services["worker"]["command"][3:5] == ["--pool", "vidflow-compose"]


def test_the_image_makes_every_folder_a_named_volume_mounts_owned_by_its_user() -> None:
    """A fresh named volume copies the image's folder, owner included; where the image has none
    it comes out root's, and the worker (uid 10001) could not write there."""
    services = _compose_config()["services"]
    stages = {stage.name: stage for stage in _stages()[1]}
    for name, target in (("worker", "worker"), ("inference", "runtime")):
        assert services[name]["build"]["target"] == target
        made = {
            path
            for run in stages[target].args_of("RUN")
            for match in re.finditer(r"install -d -o vidflow -g vidflow ((?:/\S+ ?)+)", run)
            for path in match.group(1).split()
        }
        mounted = {v["target"] for v in services[name]["volumes"] if v["type"] == "volume"}
        assert mounted and mounted <= made, (name, mounted - made)
        # ... and runs as that user, never root: the worker fetches any URL it is given and
        # runs FFmpeg on it (the runtime stage's USER was checked, the worker's nowhere).
        users = stages[target].args_of("USER")
        assert users and users[-1] == "10001:10001", (name, users)
        assert "user" not in services[name], (name, services[name].get("user"))


def test_compose_monitoring_profile_scrapes_the_service() -> None:
    services = _compose_config("monitoring")["services"]
    assert set(services) >= STACK_SERVICES | {"prometheus"}
    mounts = {v["target"]: v for v in services["prometheus"]["volumes"]}
    config_file = Path(mounts["/etc/prometheus/prometheus.yml"]["source"])
    assert config_file == REPO_ROOT / "deploy" / "prometheus.yml"

    config = yaml.safe_load(config_file.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    inference = jobs["vidflow-inference"]
    assert inference.get("metrics_path", "/metrics") == "/metrics"
    # Moving the port published on the host leaves the one Prometheus scrapes where it is.
    moved = _compose_config("monitoring", env=_compose_env(VIDFLOW_INFERENCE_HTTP_PORT="9100"))
    for stack in (services, moved["services"]):
        http_port = stack["inference"]["environment"]["VIDFLOW_INFERENCE_HTTP_PORT"]
        assert inference["static_configs"][0]["targets"] == [f"inference:{http_port}"]
    published = {(p["published"], p["target"]) for p in moved["services"]["inference"]["ports"]}
    assert ("9100", 8000) in published or (9100, 8000) in published, published


def _published(services: dict) -> list[tuple[str, str, str]]:
    """(service, host_ip, published port) for every port the stack publishes on the host."""
    return [
        (name, port.get("host_ip", "0.0.0.0"), str(port.get("published")))
        for name, service in services.items()
        for port in service.get("ports", [])
    ]


def test_compose_publishes_every_port_on_loopback_unless_told_otherwise() -> None:
    published = _published(_compose_config("monitoring")["services"])
    assert {name for name, _, _ in published} >= {"broker", "inference", "prefect-server"}
    assert all(host_ip == "127.0.0.1" for _, host_ip, _ in published), published
    # The one switch to open them up, for a user who fronts the stack with TLS and a firewall.
    opened = _compose_config("monitoring", env=_compose_env(VIDFLOW_PUBLISH_HOST="0.0.0.0"))
    assert {host_ip for _, host_ip, _ in _published(opened["services"])} == {"0.0.0.0"}
    # The database is reachable only inside the compose network.
    assert "ports" not in _compose_config()["services"]["postgres"]


def test_the_containers_that_run_untrusted_input_have_no_capabilities() -> None:
    """The worker downloads any URL it is given and runs ffmpeg on it; none of the stack's
    own containers may gain privileges, and Redpanda's unauthenticated admin API stays inside."""
    services = _compose_config()["services"]
    for name in ("inference", "worker", "deploy", "sample-mirror"):
        assert services[name].get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in services[name].get("security_opt", []), name
    assert {str(port["target"]) for port in services["broker"]["ports"]} == {"19092"}


def test_compose_prefect_runs_on_postgres_behind_basic_auth() -> None:
    services = _compose_config()["services"]
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        "postgresql+asyncpg://prefect:pg0123@postgres:5432/prefect"
    )
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"] == "admin:test-secret"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg0123"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for client in ("deploy", "worker"):
        assert services[client]["environment"]["PREFECT_API_AUTH_STRING"] == "admin:test-secret"


@pytest.mark.parametrize("missing", sorted(COMPOSE_SECRETS))
def test_compose_refuses_to_start_without_its_secrets(missing: str) -> None:
    env = {k: v for k, v in _compose_env().items() if k != missing}
    args = [_tool("docker-compose"), "-f", COMPOSE_FILE.name, "--env-file", os.devnull]
    result = _run([*args, "config", "-q"], env=env)
    assert result.returncode != 0
    assert missing in result.stderr and ".env" in result.stderr, result.stderr


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """One .dockerignore line as Docker reads it: anchored at the context root, ** any folders."""
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    # A pattern that names a folder also excludes everything under it.
    return re.compile("".join(parts) + "(?:/.*)?")


def _docker_ignores(path: str) -> bool:
    """Whether the build context leaves `path` out: the last matching line wins, `!` re-includes."""
    ignored = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if _dockerignore_regex(pattern).fullmatch(path):
            ignored = not negated
    return ignored


@pytest.mark.parametrize(
    "secret",
    [
        ".env",
        ".env.local",
        ".env.example",
        "server.key",
        "server.crt",
        "ca.pem",
        "client.p12",
        "deploy/tls/server.key",
        "services/inference/.env.prod",
        "certs/chain.pem",
    ],
)
def test_dockerignore_keeps_secrets_out_of_the_build_context(secret: str) -> None:
    # `COPY . .` in the worker stage copies whatever the context holds into a layer.
    assert _docker_ignores(secret), f"{secret} would be baked into the image"


@pytest.mark.parametrize(
    "needed", ["pyproject.toml", "constraints.txt", "README.md", "prefect.yaml", "vidflow/cli.py"]
)
def test_dockerignore_keeps_what_the_image_builds_from(needed: str) -> None:
    assert not _docker_ignores(needed), f"{needed} is needed by the Dockerfile"


def test_make_refuses_a_python_older_than_3_11_before_making_anything(tmp_path: Path) -> None:
    """`PYTHON ?= python3` took macOS's 3.9 or Ubuntu 22.04's 3.10: a venv made, then pip's
    "requires a different Python" and a .venv that every later `make` reused as it was."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    old.chmod(0o755)
    for given, shown in ((str(old), "Python 3.10.12"), ("python-nowhere", "not found")):
        made = subprocess.run(["make", "-C", str(tmp_path), f"PYTHON={given}", "setup"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert made.returncode != 0
        assert f"vidflow needs Python 3.11 or newer; '{given}' is {shown}" in made.stderr
        assert "make PYTHON=python3.11 setup" in made.stderr
        assert not (tmp_path / ".venv").exists()


def test_make_remakes_a_venv_that_no_longer_runs_or_is_not_the_python_asked_for(
    tmp_path: Path,
) -> None:
    """A .venv whose Python was removed (an OS upgrade) was reused until the pins changed:
    every `make test` failed with "No such file or directory"; `make PYTHON=...` was ignored
    once a .venv existed. `make -n` shows whether the set-up would run, without running it."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".installed").touch()  # installed after the pins: up to date by time
    venv_python = tmp_path / ".venv" / "bin" / "python"

    def setup_runs(*flags: str) -> bool:
        made = subprocess.run(["make", "-n", "-C", str(tmp_path), *flags, "setup"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert made.returncode == 0, made.stderr
        return "-m venv" in made.stdout

    venv_python.symlink_to(tmp_path / "removed" / "python3.11")
    assert setup_runs()
    venv_python.unlink()
    # A working 3.11+ with pip: this venv's own (a link would run as its base Python, which
    # may have no pip; a script keeps the venv's).
    venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    assert not setup_runs() and not setup_runs(f"PYTHON={sys.executable}")
    other = tmp_path / "python3.99"  # another version, asked for by name
    other.write_text('#!/bin/sh\necho "(3, 99)"\n')
    other.chmod(0o755)
    assert setup_runs(f"PYTHON={other}")
    # Made with `make PYTHON=...` where python3 is 3.10 (Ubuntu 22.04), then the pins changed:
    # a plain `make` installs into the usable .venv with its own Python; it was refused
    # "needs Python 3.11" for python3 (found in review, stop 58). (`make -n` prints what would
    # run: the refusal's check among it, before.)
    (tmp_path / "constraints.txt").touch()  # newer than the stamp
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    old.chmod(0o755)
    plain = {**os.environ, "PYTHON": str(old)}  # what `python3` would be, not a flag
    made = subprocess.run(["make", "-n", "-C", str(tmp_path), "setup"], capture_output=True,
                          text=True, timeout=60, env=plain)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "pip install" in made.stdout and "3.11 or newer" not in made.stdout, made.stdout
    assert "-m venv" not in made.stdout
    # `make clean test` in one make: clean removes .venv, and the set-up then makes it (it
    # installed into the .venv just removed: "No such file or directory").
    assert setup_runs("clean")


def test_http_health_checks_answer_through_a_proxy_docker_hands_in() -> None:
    """Docker gives every container the host's proxy settings (~/.docker/config.json): the
    Prefect server's and the worker's health checks sent their loopback request to the proxy,
    the server never turned healthy, and nothing that waits on it started. Each check runs
    here as written, against a loopback HTTP server, with a proxy that is down."""
    from common.net import free_port
    from devstack.video_server import Body, VideoServer

    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    checks = [services[name]["healthcheck"]["test"][-1] for name in ("prefect-server", "worker")]
    _, stages = _stages()
    worker = next(stage for stage in stages if stage.name == "worker")
    checks.append(json.loads(worker.args_of("HEALTHCHECK")[0].split("CMD", 1)[1])[-1])
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env |= {"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy}
    healthy = {"api/ready": Body(b"{}"), "health": Body(b"")}
    with VideoServer(healthy) as server:
        port = server.port
        env["PREFECT_WORKER_WEBSERVER_PORT"] = str(port)  # the Dockerfile's check reads it
        for check in checks:
            code = re.sub(r"127\.0\.0\.1:(4200|8080)", f"127.0.0.1:{port}", check)
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, timeout=30, check=False)  # fmt: skip
            assert done.returncode == 0, (check, done.stderr[-500:])
        assert server.requests["api/ready"] == 1 and server.requests["health"] == 2
    # Prometheus's wget (busybox in its image) ignores no_proxy: `-Y off` keeps it direct.
    # GNU wget takes the same flag, and without it goes to the proxy just as well.
    prometheus = services["prometheus"]["healthcheck"]["test"][1:]
    assert prometheus[:3] == ["wget", "-Y", "off"], prometheus
    if wget := shutil.which("wget"):
        with VideoServer({"-/ready": Body(b"ready")}) as server:
            url = f"http://127.0.0.1:{server.port}/-/ready"
            done = subprocess.run([wget, *prometheus[1:-1], url], env=env, capture_output=True,
                                  timeout=30, check=False)  # fmt: skip
            assert done.returncode == 0 and server.requests["-/ready"] == 1, done.stderr


@pytest.mark.parametrize(
    "shell", [{}, {"no_proxy": ".corp.example"}, {"NO_PROXY": ".corp.example"}]
)
def test_the_worker_reaches_the_stack_directly_and_keeps_the_shells_exceptions(
    shell: dict[str, str],
) -> None:
    """Behind a proxy Docker hands in, the worker's Prefect client (httpx), gRPC and urllib
    sent `prefect-server` and `inference` to the proxy; the shell's own exceptions stay."""
    import urllib.request

    unproxied = {k: v for k, v in _compose_env().items() if "proxy" not in k.lower()}
    services = _compose_config(env=unproxied | shell)["services"]
    for name in ("worker", "deploy"):
        environment = services[name]["environment"]
        for variable in ("NO_PROXY", "no_proxy"):
            bypass = {"no": environment[variable]}
            for host in ("prefect-server", "inference", "redpanda", "127.0.0.1"):
                assert urllib.request.proxy_bypass_environment(host, bypass), (name, host)
            assert not urllib.request.proxy_bypass_environment("huggingface.co", bypass)
            if shell:
                assert urllib.request.proxy_bypass_environment("mirror.corp.example", bypass)
