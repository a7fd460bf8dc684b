"""Loopback networking helpers shared by the services, the flows and the dev stack."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def reach_loopback_directly() -> None:
    """Add loopback to this process's no_proxy and NO_PROXY (what it starts inherits them): a
    laptop with http_proxy set and no no_proxy sent every call to a local Prefect server to the
    proxy, and the run failed after 120 s of "did not answer"."""
    given: list[str] = []
    for variable in ("no_proxy", "NO_PROXY"):  # both, as one: the lower case wins where set
        parts = (part.strip() for part in os.environ.get(variable, "").split(","))
        given += [part for part in parts if part and part not in given]
    both = ",".join([*given, *(name for name in LOOPBACK_NAMES if name not in given)])
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = both


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on 127.0.0.1 now (held open together while picked:
    two `free_port` calls in a row may give the same one)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]  # fmt: skip
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and URLs take it: an IPv6 address in brackets (`[::1]:50051`)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address, in brackets or not, or `localhost`) is this machine's
    loopback."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, which Python 3.11 calls not loopback
    return address.is_loopback


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target names loopback addresses only: `HOST:PORT`, `dns:///HOST:PORT`,
    `ipv4:` / `ipv6:` lists (any other scheme, `unix:` included, is not taken for one)."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            addresses = target.removeprefix(scheme).split(",")
            return all(_is_loopback_authority(address) for address in addresses)
    return _is_loopback_authority(target.removeprefix("dns:///"))


def _is_loopback_authority(authority: str) -> bool:
    if "/" in authority or "@" in authority:
        return False
    try:
        host = urlsplit(f"//{authority}").hostname
    except ValueError:
        return False
    return host is not None and is_loopback_host(host)
