"""Starting or joining the Ray a depth run uses, without importing Prefect: an existing cluster
(RAY_ADDRESS, or one `ray start` runs on this machine), else a private local instance that
listens on 127.0.0.1 only. The Prefect task runner (flows/ray_runner.py) and the CLI, which
starts Ray before it imports Prefect, both use these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from common.net import free_port

log = logging.getLogger(__name__)

# Tasks that reserve no CPU (downloads, writes) let a run keep more Ray workers busy than there
# are CPUs. Above this many, Ray kills a worker after a second idle and starts a new one (a
# second or two of CPU for Python, Ray and Prefect imports) for the next shard; keep them.
RAY_WORKERS_KEPT = 32

RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_ray_init_kwargs(num_cpus: int | None = None) -> dict[str, Any]:
    """`ray.init` arguments for a private local Ray instance sized for this flow (to start it
    within `private_ray_start`)."""
    init_kwargs: dict[str, Any] = {
        # A new instance, whatever Ray would find on its own: left to itself, ray.init() joins
        # the cluster named in Ray's current-cluster file, even a stale one (`cluster_address`
        # joins only a live one).
        "address": "local",
        "include_dashboard": False,
        # Task logs go to the Prefect API (and the UI); echoing every worker's lines here too
        # would bury the progress bar, and costs a log-monitor process.
        "log_to_driver": False,
        # Ray addresses its nodes by this; its servers also bind only to it inside
        # `loopback_only_ray`, which keeps Ray from swapping in the machine's address.
        "_node_ip_address": "127.0.0.1",
        "_system_config": {
            "num_workers_soft_limit": RAY_WORKERS_KEPT,
            # Ray starts one worker per CPU when the driver connects, before any work. The
            # depth actor takes one of them, and the first shards' tasks, submitted while
            # those still start, get others started for them: one worker process (~1 CPU-s
            # of Python and Ray imports) sat idle through the whole run. Workers started
            # for the work as it comes are exactly the ones it uses.
            "prestart_worker_first_driver": False,
            # What Ray records for its dashboard and state API, which a private instance
            # started without a dashboard serves to no one: every worker's and raylet's
            # metrics, exported to the node agent each few seconds, and every task's state
            # changes, sent to the GCS.
            "enable_metrics_collection": False,
            "task_events_report_interval_ms": 0,
        },
    }
    if num_cpus is not None:
        init_kwargs["num_cpus"] = num_cpus
    return init_kwargs


AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"


@contextlib.contextmanager
def private_ray_auth() -> Iterator[None]:
    """Token auth for a private local Ray, with a token of its own, unless RAY_AUTH_MODE says
    otherwise (`disabled`, or `token` with the user's token); this process's environment is
    as it was afterwards.

    Without a token any local account could run code as this user on the instance's loopback
    ports, and read what its tasks carry (the Prefect API's address and credentials). Left to
    itself, Ray 2.60 turns token auth on for a new local instance too, but with a token it
    writes to ~/.ray/auth_token, kept after the run and shared by every later instance and
    cluster of the account. A token in the environment (RAY_AUTH_TOKEN, Ray's first source)
    reaches the instance's processes, which inherit it, and no one else: another account cannot
    read this process's environment. Ray reads the mode into its cached config, so that is
    refreshed as Ray's own default does, on the way in and out (a notebook that later joins
    another cluster would otherwise send it this run's token)."""
    saved_mode = os.environ.get(AUTH_MODE_ENV)
    # A mode the user set is kept; but `token` with no token anywhere would have Ray write
    # one to ~/.ray/auth_token (readable by all, kept for every later cluster): not that.
    if saved_mode and (saved_mode.lower() != "token" or _token_available()):  # Ray lowers it
        yield
        return
    saved_token = os.environ.get(AUTH_TOKEN_ENV)
    os.environ[AUTH_MODE_ENV] = "token"
    os.environ.setdefault(AUTH_TOKEN_ENV, secrets.token_hex(32))
    _reload_ray_auth()
    try:
        yield
    finally:
        if saved_mode is None:
            os.environ.pop(AUTH_MODE_ENV, None)
        if saved_token is None:
            os.environ.pop(AUTH_TOKEN_ENV, None)
        _reload_ray_auth()


def _token_available() -> bool:
    """Whether Ray finds a token of the user's: in the environment, or in a file."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get(AUTH_TOKEN_ENV)) or token_file.is_file()


def _reload_ray_auth() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def cluster_ray_auth() -> None:
    """Token auth for joining a cluster where this account has a Ray token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is unset, as `ray start` does
    (it sets RAY_AUTH_MODE=token then).

    `ray.init` sends no token unless RAY_AUTH_MODE says `token`: a run in a shell without it
    waited 30 s for a cluster with token auth, then failed with "Failed to connect"."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def check_token_to_send() -> None:
    """Token auth as `ray start` sets it up (`cluster_ray_auth`), and a run told to send a
    token (RAY_AUTH_MODE=token) that has none, or cannot read it, refused at once: Ray raised
    its AuthenticationError (a traceback and exit 1), from inside `ray.init` for the first."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        cluster_ray_auth()
        if os.environ.get(AUTH_MODE_ENV, "").lower() != "token":
            return
        has_token = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except AuthenticationError as exc:  # RAY_AUTH_TOKEN_PATH names a file it cannot read
        raise ConnectionError(f"the Ray token cannot be read: {exc}") from None
    if not has_token:
        raise ConnectionError(
            "RAY_AUTH_MODE=token, but this run has no Ray token to send: give it the cluster's "
            "in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        )


def join_failure(exc: ConnectionError, address: str) -> ConnectionError:
    """Ray's "Failed to connect to Ray cluster at ..." with what to do about it. Ray says why
    only in the error it chains (and in 20 warnings over 20 s before it): a cluster with token
    auth refuses a driver without its token or with another one (InvalidAuthToken)."""
    refused = "InvalidAuthToken" in str(exc.__cause__ or "")
    sent_token = os.environ.get(AUTH_MODE_ENV, "").lower() == "token"
    if refused and sent_token:
        why = (
            "the cluster refused this run's Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token): give it the cluster's"
        )
    elif refused:
        why = (
            "the cluster uses token auth and this run sent no token: set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token), as the README's "
            "Ray cluster section shows"
        )
    else:
        why = "is a Ray cluster running there (`ray status`), and reachable from here?"
    return ConnectionError(f"{exc} (joining {address}): {why}")


@contextlib.contextmanager
def private_ray_start() -> Iterator[None]:
    """While a private local Ray starts (`ray.init(address="local")`) and runs: on 127.0.0.1
    only (`loopback_only_ray`), with a token of its own (`private_ray_auth`), without the three
    head processes a private instance has no use for, and with its node agent on a free port
    (`_private_head`)."""
    with loopback_only_ray(), private_ray_auth(), _private_head():
        yield


@contextlib.contextmanager
def _private_head() -> Iterator[None]:
    """What `ray.init` has no argument for, set for a private instance's head.

    - No autoscaler monitor, log monitor or API server (`ray start` has --no-monitor and
      --include-log-monitor for the first two). A private instance of fixed size autoscales
      nothing; with `log_to_driver=False` no one reads what the log monitor forwards; and with
      `include_dashboard=False` the API server loads one module, usage statistics, which Ray
      would report from a private run. Together they cost ~2.5 CPU-s a run, `ray.init` waited
      ~0.9 s for the API server, and the monitor, which ignores SIGTERM, another second at
      shutdown while Ray waits to kill it.
    - The node agent's HTTP port free, not Ray's fixed default (52365): where another Ray runs
      on the machine (a `ray start` cluster, a second run), the agent retried that port for
      ~3.5 s and the raylet waited ~4 s for it before the run could start.
    - The driver asks for its node's record only once the raylet has registered it
      (`_wait_for_registration`).

    Ray 2.60's `ray.init` builds the head's `RayParams` through the module attribute, so a
    subclass with these defaults is put there while it runs; the API server is started by
    `Node.start_api_server`, replaced meanwhile by what Ray does when that server fails to
    start (which it tolerates: the node runs on, with no dashboard URL); the node's record is
    read through `services.get_node`."""
    from ray._private import node, parameter, services

    original_params, original_api_server = parameter.RayParams, node.Node.start_api_server
    original_get_node = services.get_node

    class PrivateHeadParams(original_params):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("no_monitor", True)
            kwargs.setdefault("include_log_monitor", False)
            kwargs.setdefault("dashboard_agent_listen_port", free_port())
            super().__init__(*args, **kwargs)

    def no_api_server(self: Any, **_: Any) -> None:
        self._webui_url = ""

    def get_node_once_registered(gcs_address: str, node_id: str) -> Any:
        _wait_for_registration(gcs_address, node_id)
        return original_get_node(gcs_address, node_id)

    parameter.RayParams, node.Node.start_api_server = PrivateHeadParams, no_api_server
    services.get_node = get_node_once_registered
    try:
        yield
    finally:
        parameter.RayParams, node.Node.start_api_server = original_params, original_api_server
        services.get_node = original_get_node


# How often, and how long at most, a starting head's driver looks for its raylet in the GCS.
NODE_POLL_S = 0.02
NODE_WAIT_S = 30.0  # as long as Ray waits; then Ray's own call reports what is missing


def _wait_for_registration(gcs_address: str, node_id: str) -> None:
    """Until the raylet of `node_id` has registered with the GCS at `gcs_address`, or
    `NODE_WAIT_S`.

    Ray's `services.get_node`, which `ray.init` calls ~0.1 s after starting the raylet, sleeps a
    whole second whenever the node is not registered yet, and a raylet registers only once its
    node agent is up (~0.5 s in): `ray.init` took 1.40-1.44 s and returned ~0.55 s after the
    node was there, with the cores mostly idle meanwhile; asking the GCS's node table every
    20 ms first, 0.87-0.95 s (4 alternating pairs, docs/benchmarks.md). Ray has no setting for
    that interval (a `sleep_for(1 s)` in its C++ `GlobalStateAccessor`)."""
    from ray._private import services, state

    nodes = state.GlobalState()
    nodes._initialize_global_state(services._get_gcs_client_options(gcs_address))
    try:
        deadline = time.monotonic() + NODE_WAIT_S
        while time.monotonic() < deadline:
            if any(n.get("NodeID") == node_id and n.get("Alive") for n in nodes.node_table()):
                return
            time.sleep(NODE_POLL_S)
    except Exception:  # the GCS did not answer: Ray's own call, next, says what is wrong
        log.debug("could not read the node table at %s", gcs_address, exc_info=True)
    finally:
        nodes.disconnect()


@contextlib.contextmanager
def loopback_only_ray() -> Iterator[None]:
    """While a private local Ray starts and runs: every one of its servers on 127.0.0.1 only.

    Ray 2.60 replaces a 127.0.0.1 node address with the machine's own address
    (`services.resolve_ip_for_localhost`), and gcs_server, raylet, its agents and workers then
    listen on every interface, with no authentication. Only its single-machine mode (meant for
    Windows and macOS, off on Linux) keeps the loopback address. That mode is read from the
    environment once, when `ray._private.ray_constants` is imported; ray is already imported
    here (prefect_ray imports it), so the driver's copy is set as a module attribute, which is
    how Ray 2.60 reads it (`services.get_node_ip_address`, `scripts.py`), and the variable is
    set for the processes Ray starts. Both are restored afterwards: in this process a later
    `ray start` of a worker node (multi-node, refused in that mode) must still work.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(RAY_CLUSTER_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = saved_env


# Announced clusters a run of this process would not join, already warned of.
_NOT_JOINED: set[str] = set()


def cluster_address() -> str | None:
    """The Ray cluster a run joins, as `ray.init()` finds one: RAY_ADDRESS, else the cluster
    that `ray start` started on this machine (Ray's current-cluster file, when its GCS is
    alive and both are this account's: `_announced_by_this_account`); None for a private local
    Ray (also when RAY_ADDRESS is `local`, Ray's word for it).

    Joining a running cluster saves the run Ray's start, and its depth actors stay loaded
    between runs. Left to itself, `ray.init()` with the private instance's arguments would find
    that cluster and refuse them (`_system_config must not be provided`)."""
    from ray._private import services, utils

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "auto":
        return None if address == "local" else address
    # `auto` (Ray's word for "the cluster running here") is found as an unset address is, with
    # the same checks: Ray's own search took the first cluster any account had announced in
    # /tmp/ray, or any account's GCS process. Unlike unset, it must find one.
    # What `services.find_bootstrap_address` reads, through the module it leaves unimported.
    started_here = utils.read_ray_address(None)
    if not started_here or started_here not in services.find_gcs_addresses():
        if address == "auto":
            raise ConnectionError(
                "RAY_ADDRESS=auto: no Ray cluster started with `ray start` runs on this "
                "machine; start one, give its HOST:PORT, or unset RAY_ADDRESS for a private Ray"
            )
        return None
    if not _announced_by_this_account(started_here):
        if started_here not in _NOT_JOINED and address != "auto":  # asked up to 3 times
            _NOT_JOINED.add(started_here)
            log.warning(
                "Not joining the Ray cluster at %s that Ray's current-cluster file names: "
                "another account started it or wrote the file; a private Ray runs instead (set "
                "RAY_ADDRESS to join a cluster on purpose)",
                started_here,
            )
        if address == "auto":
            raise ConnectionError(
                f"RAY_ADDRESS=auto: the Ray cluster at {started_here} is not this account's; "
                "give the HOST:PORT of the cluster to join"
            )
        return None
    return started_here


def _announced_by_this_account(address: str) -> bool:
    """Whether Ray's current-cluster file and a raylet serving the cluster at `address` are
    this account's.

    Ray keeps that file in a directory any account can write (/tmp/ray), and `ray.init()` joins
    whatever cluster it names: a run would send its tasks, and with them the Prefect API's
    address and credentials (and its Ray token), to another account's cluster. Another account
    cannot make a file or a process this account's."""
    from ray._private import services, utils

    account = os.getuid()
    try:
        if os.stat(utils.get_ray_address_file(None)).st_uid != account:
            return False
    except OSError:
        return False
    flag = f"--gcs-address={address}"
    for process in psutil.process_iter(["cmdline", "uids"]):
        command = process.info["cmdline"] or []
        uids = process.info["uids"]
        if uids is None or uids.real != account or not services._is_raylet_process(command):
            continue
        if flag in " ".join(command).split():
            return True
    return False


def reaching_cluster(address: str) -> contextlib.AbstractContextManager[None]:
    """What a driver joining the cluster at `address` must hold while connected: a loopback-only
    cluster is reached at 127.0.0.1 (`loopback_only_ray`), or Ray never reaches it."""
    return loopback_only_ray() if loopback_only_cluster(address) else contextlib.nullcontext()


def loopback_only_cluster(address: str) -> bool:
    """Whether `address` names a cluster that listens on 127.0.0.1 only (started in Ray's
    single-machine mode, as `loopback_only_ray` starts ours). A driver swaps 127.0.0.1 for this
    machine's address before it connects (`services.resolve_ip_for_localhost`), where such a
    cluster does not listen, and waits for it for ever; it must keep the loopback address."""
    from ray._private.services import is_localhost, resolve_ip_for_localhost

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit() or not is_localhost(host):
        return False
    machine = resolve_ip_for_localhost(host)
    return not is_localhost(machine) and (
        _listening("127.0.0.1", int(port)) and not _listening(machine, int(port))
    )


def check_cluster_listens(address: str) -> None:
    """Refuse at once a cluster address where nothing listens: Ray tries one for 80 s before
    it says "Failed to connect" (measured: a RAY_ADDRESS with no cluster behind it)."""
    from ray._private.services import resolve_ip_for_localhost

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # not host:port: Ray's to resolve
        return
    host = host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(
            f"the Ray cluster address {address} names a host that does not resolve ({exc}): "
            "check RAY_ADDRESS; RAY_ADDRESS=local runs a private Ray"
        ) from None
    # Ray itself swaps a loopback address for this machine's (`loopback_only_cluster`).
    if not any(_listening(h, int(port)) for h in {host, resolve_ip_for_localhost(host)}):
        raise ConnectionError(
            f"nothing listens at the Ray cluster address {address}: is a Ray cluster running "
            "there (`ray status`), and reachable from here? RAY_ADDRESS=local runs a private Ray"
        )


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


# The Ray namespace of a run's driver (prefect-ray's runner and the CLI's early start alike).
RAY_NAMESPACE = "prefect"


def run_ray(
    num_cpus: int | None,
) -> tuple[str | None, dict[str, Any], contextlib.AbstractContextManager[None]]:
    """How a run reaches its Ray: the running cluster's address (`cluster_address`; None for a
    private local Ray), the rest of `ray.init`'s arguments, and what the driver must hold while
    Ray starts and runs (`reaching_cluster`, or `private_ray_start`). A cluster refuses
    num_cpus: its servers are not ours to size or restrict."""
    if address := cluster_address():
        check_cluster_listens(address)
        check_token_to_send()
        return address, {"namespace": RAY_NAMESPACE}, reaching_cluster(address)
    init_kwargs = {"namespace": RAY_NAMESPACE, **local_ray_init_kwargs(num_cpus)}
    return None, init_kwargs, private_ray_start()


# How long a run waits at most for its warmed workers (2-5 s on a busy 2-core machine) before
# its flow starts anyway, e.g. on a cluster whose CPUs other jobs hold.
WARM_UP_TIMEOUT_S = 30.0
# What a depth task's Ray worker imports before its first task run: Prefect and its task
# engine, prefect-ray, the shard tasks and their libraries (1.5-2.5 CPU-s a worker).
TASK_WORKER_MODULES = (
    "prefect.task_engine",
    "prefect_ray.task_runners",
    "flows.ray_worker_context",
    "tasks.depth.shard_tasks",
)


@contextlib.contextmanager
def early_ray(
    num_cpus: int | None, workers_for_cpus: Callable[[int], int]
) -> Iterator[Callable[[], None]]:
    """Ray for one CLI run, started (or joined) before the run imports Prefect, with the Ray
    workers its first shards will use (`workers_for_cpus` of the cluster's CPUs) importing what
    the flow's tasks need meanwhile. Yields a function that waits for them: call it just before
    the flow starts, so that they are idle when its first tasks come (else Ray starts more).

    A run that starts Ray after its own imports (Prefect, ~1.5 s on one core) leaves the other
    core idle meanwhile, and its first transcode then waits for its workers' imports: started
    first, the first transcode of 48 clips on 2 cores came 0.2-0.6 s sooner on a private Ray
    and 1.5-2 s sooner on a running one (docs/benchmarks.md, ninth pass). The flow's task
    runner uses the Ray it finds running and leaves it to be shut down here. A private Ray
    only where the Prefect API is already known (PREFECT_API_URL): its workers take their
    environment from this process when it starts, before a temporary Prefect server would be
    up. A cluster's workers take the API's address from the settings each task carries."""
    import ray

    address, init_kwargs, hold = run_ray(num_cpus)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold)
        # `ray.init` puts its own SIGTERM handler (sys.exit(15)) in place of the one there: a
        # SIGTERM, which Prefect passes on to it once it has marked the run, ended the command
        # with exit 15, not as killed by SIGTERM (143), as without a known API.
        sigterm = signal.getsignal(signal.SIGTERM)
        # A private Ray's arguments carry its own address ("local").
        try:
            ray.init(**({"address": address} | init_kwargs))
        except ConnectionError as exc:
            if not address:  # a private Ray that did not start: Ray's own error and its cause
                raise
            raise join_failure(exc, address) from exc
        finally:
            if threading.current_thread() is threading.main_thread() and sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        stack.callback(ray.shutdown)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        count = workers_for_cpus(cpus) if cpus else 0  # none to warm before a cluster scales up
        # One CPU each, so that as many workers start at once.
        importer = ray.remote(num_cpus=1)(_import_modules)
        warming = [importer.remote(TASK_WORKER_MODULES) for _ in range(count)]
        log.info("Ray is up; %d of its workers import the flow's tasks meanwhile", count)

        def wait_for_workers() -> None:
            if warming:  # a failed import is the flow's to report, when its tasks run
                ray.wait(warming, num_returns=len(warming), timeout=WARM_UP_TIMEOUT_S)

        yield wait_for_workers


def _import_modules(names: tuple[str, ...]) -> None:
    """Import `names` in a Ray worker, which keeps them for the tasks it runs next."""
    import importlib

    from common.import_gc import imports_without_gc

    with imports_without_gc():
        for name in names:
            importlib.import_module(name)
