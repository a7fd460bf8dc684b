"""The container's health check: is the service on this machine ready (`/readyz` says 200)?

Over plain HTTP, so it holds with TLS on the gRPC port; asked on the address
`VIDFLOW_INFERENCE_HOST` names where it names one (a pod's own IP: bound there alone, the
service was never seen ready on loopback), then 127.0.0.1, then ::1 (a service bound to
`::1` alone). Exit 0 when ready, 1 otherwise (Docker reserves 2). Standard library only: it
runs every 30 s.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACKS = ("127.0.0.1", "[::1]")
# Never through a proxy: Docker hands the host's proxy settings to every container, and
# urllib sends loopback requests to it unless no_proxy names them (the check failed for good).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probed_hosts(bound: str | None = None) -> list[str]:
    """Where the service is asked, in turn: its bound address first (`bound`, else the
    variable), unless it binds them all."""
    host = (os.environ.get("VIDFLOW_INFERENCE_HOST", "") if bound is None else bound).strip()
    if host in ("", "0.0.0.0", "::", "[::]", "localhost"):
        return list(LOOPBACKS)
    return [f"[{host}]" if ":" in host and not host.startswith("[") else host, *LOOPBACKS]


def ready(port: str, timeout_s: float = 5.0, bound: str | None = None) -> bool:
    """Whether the service's HTTP endpoint on this machine says it is ready (`bound`: the
    address it bound, where known)."""
    for host in probed_hosts(bound):
        try:
            with _DIRECT.open(f"http://{host}:{port}/readyz", timeout=timeout_s):
                return True
        except urllib.error.HTTPError:  # it answered: loading, or draining
            return False
        except OSError:  # nothing there: the other loopback
            continue
    return False


def served_endpoint() -> tuple[str, str | None]:
    """The HTTP port the server bound and the address (None: the variable's): from its
    --http-port-file (the image sets one, so that `serve --http-port 9000`, or 0, and `serve
    --host ADDR` are followed), else the variable, else the default."""
    if port_file := os.environ.get("VIDFLOW_INFERENCE_HTTP_PORT_FILE", "").strip():
        try:
            port, *host = Path(port_file).read_text().split()
            return port, host[0] if host else None
        except (OSError, ValueError):  # not written yet: the server is still starting
            pass
    return os.environ.get("VIDFLOW_INFERENCE_HTTP_PORT", "8000"), None


def main() -> int:
    port, bound = served_endpoint()
    return 0 if ready(port, bound=bound) else 1


if __name__ == "__main__":
    sys.exit(main())
