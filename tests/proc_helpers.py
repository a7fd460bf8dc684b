"""What the kernel says about processes and sockets, read from /proc (Linux; no psutil here)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (zombies included: they are not reaped yet)."""
    parents = {
        int(entry.name): _parent_of(int(entry.name))
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
    }
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, ppid in parents.items() if ppid == parent]
        found += kids
        frontier += kids
    return found


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _listening() -> list[tuple[str, str, int]]:
    """(socket inode, local ip, port) of every TCP socket in LISTEN state, IPv4 and IPv6."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # 0A: LISTEN
                continue
            address, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = struct.unpack(f"<{len(raw) // 4}I", raw)
            ip = socket.inet_ntop(family, struct.pack(f">{len(words)}I", *words))
            found.append((fields[9], ip, int(port_hex, 16)))
    return found


def listening_addresses(port: int) -> list[str]:
    """The local addresses of TCP sockets listening on `port` (IPv4 and IPv6)."""
    return [ip for _, ip, listening_port in _listening() if listening_port == port]


def listening_sockets(pid: int) -> list[str]:
    """The "ip:port" addresses `pid` listens on (its open sockets matched to /proc/net/tcp*)."""
    listening = {inode: f"{ip}:{port}" for inode, ip, port in _listening()}
    found = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone meanwhile
        return []
    for fd in fds:
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:[") and (address := listening.get(target[8:-1])):
            found.append(address)
    return found
