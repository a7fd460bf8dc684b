"""Which redirects a download follows: none that leads inside a network the URL list did not.

aiohttp follows any redirect to any host and from https to http. A listed public server could
then send a worker to the cluster's loopback, its private network or the cloud's metadata
address (169.254.169.254), or have it fetch a video in clear text. So redirects are followed
here, one at a time, each checked: never from https to http, never to a scheme other than
http(s), and to a host other than the listed one only where every address it has is public.
The listed host's own redirects (a mirror's `/a.mp4` to `/files/a.mp4`) are followed wherever
it is: the list chose it.

The addresses of a host name are checked by the session's resolver (`PublicOnlyResolver`) as
the connection is made, so what is checked is what is connected to: a name that resolves to a
public address for a check and to a private one for the connection (DNS rebinding) is refused
too, and a hop to another host never goes over a connection kept alive from before (made with
no such check). Hand-written because aiohttp has no hook to refuse a redirect before it is
followed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10

# Set for the request of a redirect to another host: its resolver then wants public addresses.
_PUBLIC_ONLY = contextvars.ContextVar("redirect_public_only", default=False)


class RedirectRefused(Exception):
    """A redirect this download does not follow; the message says why."""


def address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What kind of network an address is on: only `global` ones are public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "global" if address.is_global else "non-global"


def _refusal(host: str, addresses: list[str]) -> str | None:
    kinds = sorted({address_kind(ipaddress.ip_address(a.split("%")[0])) for a in addresses})
    if inside := [kind for kind in kinds if kind != "global"]:
        return f"redirect to another host refused: {host} is a {'/'.join(inside)} address"
    return None


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, which for a redirect to another host refuses a name with any
    address that is not public (see the module's docstring)."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        if _PUBLIC_ONLY.get() and (
            refusal := _refusal(host.rstrip("."), [r["host"] for r in results])
        ):
            raise RedirectRefused(refusal)
        return results

    async def close(self) -> None:
        await self._resolver.close()


def redirect_refusal(listed: URL, from_url: URL, to_url: URL) -> str | None:
    """Why a download of `listed` does not follow a redirect from `from_url` to `to_url`, or
    None; the addresses of a name are checked later, as it is connected to."""
    if to_url.scheme not in ("http", "https") or not to_url.host:
        return f"redirect to {to_url.scheme or 'a relative'} URL refused (http/https only)"
    if from_url.scheme == "https" and to_url.scheme == "http":
        return "redirect from https to http refused"
    if to_url.host == listed.host:
        return None
    try:
        return _refusal(to_url.host, [to_url.host])
    except ValueError:
        return None  # a name: PublicOnlyResolver checks it


def session_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """A connector whose every new connection resolves through `PublicOnlyResolver` (aiohttp's
    DNS cache would hand a redirect the addresses of an earlier, unchecked lookup)."""
    return aiohttp.TCPConnector(resolver=PublicOnlyResolver(), use_dns_cache=False, **kwargs)


@contextlib.asynccontextmanager
async def final_response(
    session: aiohttp.ClientSession, url: str, max_redirects: int = MAX_REDIRECTS
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The response at the end of `url`'s redirects, each checked (`redirect_refusal`, and a
    session from `session_connector`); RedirectRefused for one that is not followed, or past
    `max_redirects`.

    Hops to another host go through a session of their own: `session` keeps connections to
    every host the list names alive, and a hop to one of them (another video's private mirror)
    went over its pooled connection, with no lookup for the resolver to check."""
    listed = current = URL(url)
    async with contextlib.AsyncExitStack() as hop_sessions:
        elsewhere_session: aiohttp.ClientSession | None = None
        for _ in range(max_redirects + 1):
            elsewhere = current.host != listed.host
            if elsewhere and elsewhere_session is None:
                elsewhere_session = await hop_sessions.enter_async_context(
                    aiohttp.ClientSession(  # the cookies a hop sets go on with the download
                        timeout=session.timeout,
                        connector=session_connector(),
                        cookie_jar=session.cookie_jar,
                    )
                )
            to_another_host = _PUBLIC_ONLY.set(elsewhere)
            try:
                hop = elsewhere_session if elsewhere and elsewhere_session else session
                async with hop.get(current, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status not in REDIRECT_STATUS or location is None:
                        yield response
                        return
                    target = response.url.join(URL(location))
            finally:
                _PUBLIC_ONLY.reset(to_another_host)
            if (refusal := redirect_refusal(listed, current, target)) is not None:
                raise RedirectRefused(refusal)
            if target.origin() == current.origin() and target.user is None:
                # The credentials stay for the same origin, as aiohttp keeps them.
                target = target.with_user(current.user).with_password(current.password)
            current = target
        raise RedirectRefused(f"too many redirects (over {max_redirects})")
