"""Which redirects a download follows: none that leads somewhere its URL list did not point.

aiohttp follows any redirect to any host and from https to http. A list of public URLs (or one
public server among them) could then send a worker to the cluster's loopback, its private
network or the cloud's metadata address (169.254.169.254), or have it fetch a video in clear
text. So redirects are followed here, one at a time, each checked: never from https to http,
and never to an address of a kind (loopback, private, link-local, ...) that the redirecting
host is not. A local mirror redirecting within its network still works; a public server cannot
point inside it. Hand-written because aiohttp has no hook to refuse a redirect before it is
followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RedirectRefused(Exception):
    """A redirect this download does not follow; the message says why."""


def address_kind(address: IPAddress) -> str:
    """What kind of network an address is on: only `global` ones are public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "global" if address.is_global else "non-global"


async def host_kinds(host: str | None) -> frozenset[str]:
    """The kinds of every address `host` names (resolved if it is a name; empty if it does
    not resolve, and the request then fails on its own)."""
    if not host:
        return frozenset()
    try:
        return frozenset({address_kind(ipaddress.ip_address(host.strip("[]")))})
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(address_kind(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos)


async def redirect_refusal(origin_url: str, target_url: str) -> str | None:
    """Why a download of `origin_url` must not follow a redirect to `target_url`, or None."""
    origin, target = urlsplit(origin_url), urlsplit(target_url)
    if target.scheme not in ("http", "https"):
        return f"redirect to a {target.scheme or 'schemeless'} URL refused (http/https only)"
    if origin.scheme == "https" and target.scheme == "http":
        return "redirect from https to http refused"
    origin_kinds, target_kinds = await asyncio.gather(
        host_kinds(origin.hostname), host_kinds(target.hostname)
    )
    if inside := sorted(target_kinds - origin_kinds - {"global"}):
        return (
            f"redirect to a {'/'.join(inside)} address refused: the redirecting host is "
            f"{'/'.join(sorted(origin_kinds)) or 'unresolved'}"
        )
    return None


@contextlib.asynccontextmanager
async def final_response(
    session: aiohttp.ClientSession, url: str, max_redirects: int = MAX_REDIRECTS
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The response at the end of `url`'s redirects, each checked by `redirect_refusal`;
    RedirectRefused for one that is not followed, or past `max_redirects`."""
    for _ in range(max_redirects + 1):
        async with session.get(url, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUS or location is None:
                yield response
                return
            target = response.url.join(URL(location))
        current = URL(url)
        if target.origin() == current.origin() and target.user is None:
            # The credentials stay for the same origin, as aiohttp keeps them.
            target = target.with_user(current.user).with_password(current.password)
        if (refusal := await redirect_refusal(url, str(target))) is not None:
            raise RedirectRefused(refusal)
        url = str(target)
    raise RedirectRefused(f"too many redirects (over {max_redirects})")
