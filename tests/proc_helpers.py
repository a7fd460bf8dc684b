"""What the kernel says about the processes and listening sockets a test started (psutil)."""

from __future__ import annotations

import contextlib

import psutil


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (zombies included: they are not reaped yet)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return []


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def listening_addresses(port: int) -> list[str]:
    """The local addresses of TCP sockets listening on `port` (IPv4 and IPv6)."""
    return [
        connection.laddr.ip
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    ]


def listening_sockets(pid: int) -> list[str]:
    """The "ip:port" addresses `pid` listens on."""
    with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to read
        return [
            f"{connection.laddr.ip}:{connection.laddr.port}"
            for connection in psutil.Process(pid).net_connections(kind="tcp")
            if connection.status == psutil.CONN_LISTEN
        ]
    return []
