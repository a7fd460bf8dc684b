"""URLs as they may be shown: in logs, error text, artifacts, Kafka keys."""

from __future__ import annotations

import re
from urllib.parse import unquote

# The userinfo of an authority: `//user:password@` (RFC 3986 3.2.1), after an optional scheme.
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^/?#]*@")
# A password typed with `/`, `?` or `#` unencoded (`rtsp://admin:se#cret@cam/x`) ends the
# authority early for the rule above, which then found no userinfo and showed, or stored, the
# password. Loosely: `user:` and then anything up to an `@`, unless `:` starts a port (digits,
# then the path).
_LOOSE_USERINFO = re.compile(
    r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^@/?#\[\]]*:(?!\d*(?:[/?#]|$))[^@]*@"
)  # no `[`: `http://[::1]:8080/a@2x.mp4` is an IPv6 host and a path, not a login


def without_userinfo(url: str) -> str:
    """`url` without its userinfo, however its password was typed."""
    stripped = _USERINFO.sub(r"\1", url, count=1)
    return stripped if stripped != url else _LOOSE_USERINFO.sub(r"\1", url, count=1)


def shown_url(url: str) -> str:
    """`url` without what tends to be secret: the userinfo (`user:password@`) goes, and a query
    or fragment becomes `?…` (pre-signed URLs carry their signature there, RTSP cameras their
    tokens). Plain string work, so a URL no parser accepts is still cleaned, never raised on."""
    without_user = without_userinfo(url)
    cut = min((i for i in (without_user.find("?"), without_user.find("#")) if i >= 0), default=-1)
    return without_user if cut < 0 else f"{without_user[:cut]}?…"


# Query parameters that sign a URL for a while, not name its object: S3 and GCS pre-signed URLs
# (X-Amz-*, X-Goog-*, and their V2 forms), Azure SAS tokens and CloudFront signed URLs. A list
# of URLs signed again (they expire in hours) would otherwise get new ids: every video done
# again, and two rows for each. The short names (`ss`, `st`, `sp`, `expires`, ...) are
# signature parameters only beside the signature they go with: elsewhere they may name the
# video (`clip.mp4?ss=30`), and two such URLs were given one id, the second dropped as a repeat.
_SIGNATURE_PREFIXES = ("x-amz-", "x-goog-")
_SIGNED_WITH = {
    "signature": frozenset(  # S3 and GCS V2, CloudFront
        {"awsaccesskeyid", "signature", "expires", "googleaccessid", "key-pair-id", "policy"}
    ),
    "sig": frozenset(  # an Azure SAS token
        {"sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "skoid", "sktid", "skt"}
        | {"ske", "sks", "skv", "si"}
    ),
}


def unsigned_url(url: str) -> str:
    """`url` without its signature parameters (the rest of its query kept, in its order)."""
    base, mark, query = url.partition("?")
    if not mark:
        return url
    query, hash_mark, fragment = query.partition("#")
    parts = [(part, unquote(part.partition("=")[0]).lower()) for part in query.split("&")]
    names = {name for _, name in parts}
    dropped = frozenset().union(*(params for sig, params in _SIGNED_WITH.items() if sig in names))
    kept = [
        part
        for part, name in parts
        if not name.startswith(_SIGNATURE_PREFIXES) and name not in dropped
    ]
    return base + (f"?{'&'.join(kept)}" if kept else "") + hash_mark + fragment


def stored_url(url: str) -> str:
    """`url` as a dataset keeps it: without the userinfo and the signature parameters (a
    password, or a pre-signed URL's still valid signature, written to every copy of the table),
    its path and the rest of its query kept, so it still names its video."""
    return unsigned_url(without_userinfo(url))  # first: a `?` may be in the password
